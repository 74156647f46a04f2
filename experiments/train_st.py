"""`gateskip train` with run-time patches (experiments only; proposed library changes):

--protect N : passed on as `--protect-first N` (now a library option): the first N tokens of every
              row are never skipped (BOS is the attention sink).
--st        : straight-through skip mask: a skipped token's branch output is 0 in the forward pass,
              but its gate still receives the gradient it would get if it were kept
              (o_skip = s - s.detach() with s = out.detach() * g). Without it a skipped token's gate
              only sees the sparsity penalty, which pushes it further down: skipped sets self-reinforce.
--kv compute: passed on as `train --kv`.
--alloc-json F: train with a per-branch budget (the allocation evaluated later) instead of uniform.
All other flags are passed to gateskip.train.train unchanged (e.g. --gate lowrank --objective distill).
Usage: python experiments/train_st.py --protect 1 --st --out runs/x --gate lowrank --steps 100 ...
"""
import argparse
import os
import sys

import torch

torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "2")))
sys.path.insert(0, os.path.dirname(__file__))

from gateskip.kv import KVProxy  # noqa: E402
from gateskip.wrap import GatedBranch  # noqa: E402


def st_forward(self, *args, **kwargs):
    """GatedBranch.forward with a straight-through skip mask (see module docstring)."""
    if args:
        x, args = args[0], args[1:]
    else:
        x = kwargs.pop("hidden_states")
    st = self.state
    if st.bypass:
        return self._run(x, args, kwargs)
    g = self.gate(x.detach() if self.detach_input else x).to(x.dtype)
    skip = st.on_gate(self, x, g)
    if self.placement == "before":
        x = x * g
    plan = st.plan
    if self.kind == "attn" and plan is not None and plan.copy_kv:
        kwargs["past_key_values"] = KVProxy(kwargs.get("past_key_values"), st, skip)
    out = self._run(x, args, kwargs)
    o = out[0] if isinstance(out, tuple) else out
    raw = o
    if self.placement == "after":
        o = o * g
    if skip is not None:
        m = skip.unsqueeze(-1)
        s = raw.detach() * g
        o = torch.where(m, s - s.detach(), o)
    return (o, *out[1:]) if isinstance(out, tuple) else o


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--protect", type=int, default=1)
    ap.add_argument("--st", action="store_true")
    ap.add_argument("--kv", default=None, help="copy|compute: KV mode stored in the gate config and used in training")
    ap.add_argument("--alloc-json", default=None,
                    help="JSON {branch: R_b}: train with per-branch ratios ratio * R_b (use --max-ratio 1.0 so "
                         "the ramp goes 0 -> R_b); branches not listed never skip")
    a, rest = ap.parse_known_args()
    if a.alloc_json:
        import json

        import gateskip.train as T
        alloc = json.load(open(a.alloc_json))
        orig_skipping = T.skipping

        def alloc_skipping(net, ratio=0.0, **kw):
            if not isinstance(ratio, dict):
                ratio = {name: min(1.0, float(ratio) * r) for name, r in alloc.items()}
            return orig_skipping(net, ratio=ratio, **kw)
        T.skipping = alloc_skipping
    if a.st:
        GatedBranch.forward = st_forward
    extra = ["--protect-first", str(a.protect)] + (["--kv", a.kv] if a.kv else [])
    from gateskip.cli import main as cli_main

    sys.exit(cli_main(["train", *extra, *rest]))

if __name__ == "__main__":
    main()
