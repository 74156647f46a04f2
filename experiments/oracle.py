"""Upper bound for output-norm token selection: skip the tokens whose branch output is smallest
relative to the residual stream (computed after running the branch, so no compute is saved; this
only asks whether such a ranking is worth learning). kv=compute semantics (K/V untouched).
Usage: PROBE_THREADS=1 python experiments/oracle.py
"""
import json
import sys

sys.path.insert(0, "experiments")
import torch
from probe import lm_loss, lm_probe_batches, load

import gateskip
from gateskip.policies import quantile_skip
from gateskip.wrap import GatedBranch

_orig = GatedBranch.forward
RES = {}  # (layer, kind) -> residual norm [B, T]
MODE = {"score": "ratio"}


def oracle_forward(self, *args, **kwargs):
    st = self.state
    plan = st.plan
    if plan is None or plan.ratios[self.index] <= 0:
        return _orig(self, *args, **kwargs)
    st.bypass = True
    try:
        out = _orig(self, *args, **kwargs)
    finally:
        st.bypass = False
    o = out[0] if isinstance(out, tuple) else out
    n = o.norm(dim=-1)
    score = n / RES[(self.layer, self.kind)] if MODE["score"] == "ratio" else n
    valid = st.valid_for(o)
    if MODE["score"] == "random":
        score = torch.rand_like(n)
    skip = quantile_skip(score, valid, plan.ratios[self.index])
    skip[:, :1] = False
    o = o.masked_fill(skip.unsqueeze(-1), 0.0)
    return (o, *out[1:]) if isinstance(out, tuple) else o


def main():
    model, tok = load(None)
    for i, layer in enumerate(model.model.layers):
        layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: RES.__setitem__((i, "attn"), a[0].norm(dim=-1)))
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: RES.__setitem__((i, "mlp"), a[0].norm(dim=-1)))
    lmb = lm_probe_batches(tok, 2)
    GatedBranch.forward = oracle_forward
    for r in (0.136, 0.323):
        for mode in ("ratio", "norm", "random"):
            MODE["score"] = mode
            with gateskip.skipping(model, ratio=r, policy="random", kv="compute"):
                ce = lm_loss(model, lmb)
            row = {"oracle": mode, "token_ratio": r, "ce": ce}
            print(json.dumps(row), flush=True)
            with open("runs/probe/oracle.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


main()
