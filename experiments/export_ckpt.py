"""Write a loadable gates folder (gates + calibration + merged-LoRA deltas) from a run's checkpoint,
for runs stopped before `gateskip train` wrote its own. Usage:
python experiments/export_ckpt.py runs/r4 artifacts/smollm2-gates"""
import sys

sys.path.insert(0, "experiments")
from probe import load_checkpoint

import gateskip

run, out = sys.argv[1], sys.argv[2]
model, tok = load_checkpoint(run)
meta = {"backbone": "lora" if model.gateskip_lora else "frozen",
        "training": {"exported_from": f"{run}/checkpoint", "log": f"{run}/train_log.jsonl"}}
gateskip.save_gates(model, out, extra_tensors=model.gateskip_lora, extra_meta=meta)
print("wrote", out)
