"""Per-branch sensitivity: held-out LM CE when one branch is dropped entirely (all tokens but BOS).

Gives a static "drop whole branches" baseline (ShortGPT-like, at branch granularity) and a
sensitivity ranking for budget allocation. Writes runs/probe/sens_branch.json:
{"dense": ce, "branches": {name: ce_when_dropped}}.
Usage: PROBE_THREADS=1 python experiments/sens_branch.py [--batches 1 --seq 128]
"""
import argparse
import json
import sys
import time

sys.path.insert(0, "experiments")
from probe import gate_state, lm_loss, load

import gateskip
from gateskip.core import gates_bypassed
from gateskip.data import fixed_batches, load_texts

ap = argparse.ArgumentParser()
ap.add_argument("--batches", type=int, default=1)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--out", default="runs/probe/sens_branch.json")
a = ap.parse_args()
model, tok = load(None)
# held-out text, batches beyond the probe's first ones (the LM probe uses 256-token batches 0..3)
b = fixed_batches(tok, load_texts("mix", split="heldout"), a.seq, 4, 20 + a.batches)[20:]
with gates_bypassed(model):
    res = {"dense": lm_loss(model, b), "branches": {}}
for br in gate_state(model).branches:
    t0 = time.time()
    with gateskip.skipping(model, ratio={br.name: 1.0}, policy="random", kv="compute", protect_first=1):
        res["branches"][br.name] = lm_loss(model, b)
    print(br.name, round(res["branches"][br.name], 4), round(time.time() - t0, 1), flush=True)
    json.dump(res, open(a.out, "w"), indent=1)
