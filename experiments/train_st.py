"""`gateskip train` with run-time patches (experiments only; proposed library changes):

--protect N : passed on as `--protect-first N` (now a library option): the first N tokens of every
              row are never skipped (BOS is the attention sink).
--st        : passed on as `--straight-through` (now a library option, gateskip/wrap.py): a skipped
              token's branch output is 0 in the forward pass, but its gate still receives the gradient
              it would get if it were kept.
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
    extra = ["--protect-first", str(a.protect)] + (["--kv", a.kv] if a.kv else []) + (["--straight-through"] if a.st else [])
    from gateskip.cli import main as cli_main

    sys.exit(cli_main(["train", *extra, *rest]))

if __name__ == "__main__":
    main()
