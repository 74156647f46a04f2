"""Where can a 135M model afford skipping? Random-policy probes of held-out LM loss (no training).

Untrained lowrank gates (importance identical for all tokens), random policy; compares allocations
at matched estimated FLOP saving and the effect of never skipping the first token (BOS).
Usage: PROBE_THREADS=1 python experiments/sens_random.py [--target 0.25] [--per-layer]
"""
import argparse
import json
import sys
import time

sys.path.insert(0, "experiments")
from probe import allocate, gate_state, lm_loss, lm_probe_batches, load

import gateskip
from gateskip.core import gates_bypassed

ap = argparse.ArgumentParser()
ap.add_argument("--target", type=float, default=0.25)
ap.add_argument("--batches", type=int, default=2)
ap.add_argument("--per-layer", action="store_true")
ap.add_argument("--kv-test", action="store_true")
ap.add_argument("--out", default="runs/probe/sens_random.jsonl")
a = ap.parse_args()
model, tok = load(None)
lmb = lm_probe_batches(tok, a.batches)


def run(tag, ratios, protect=0, kv=None):
    t0 = time.time()
    with gateskip.skipping(model, ratio=ratios, policy="random", seed=0, kv=kv, protect_first=protect):
        ce = lm_loss(model, lmb)
        s = gateskip.stats(model)
    row = {"tag": tag, "ce": ce, "compute_saved": s["compute_saved"], "tokens_skipped": s["tokens_skipped"],
           "sec": round(time.time() - t0, 1)}
    print(json.dumps(row), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")


with gates_bypassed(model):
    print(json.dumps({"tag": "dense", "ce": lm_loss(model, lmb)}), flush=True)
T = a.target
if a.kv_test:
    for t in (0.1, 0.25):
        r = allocate(model, t, "uniform")
        run(f"uniform t={t} kv=compute", r, 1, "compute")
        run(f"uniform t={t} kv=copy", r, 1, "copy")
elif not a.per_layer:
    run(f"uniform t={T}", allocate(model, T, "uniform"))
    run(f"uniform t={T} protect1", allocate(model, T, "uniform"), 1)
    run(f"attn-only t={T} protect1", allocate(model, T, "uniform", kinds=("attn",)), 1)
    run(f"mlp-only t={T} protect1", allocate(model, T, "uniform", kinds=("mlp",)), 1)
    run(f"uniform kf2 kl2 t={T} protect1", allocate(model, T, "uniform", keep_first=2, keep_last=2), 1)
else:
    st = gate_state(model)
    for b in st.branches:  # one branch skips 50% of tokens at random
        run(f"single {b.name} r=0.5", {b.name: 0.5}, 1)
