"""Merge ``gateskip eval`` results of the same sweep run on disjoint task sets (one process per core).

    python experiments/merge_eval.py runs/eval500 runs/eval500_A runs/eval500_B

Rows are matched by method and ratio. Per row: task entries are joined, mean accuracy is the mean over
all tasks, tokens skipped the mean over tasks, compute saved FLOP-weighted over all tasks (as
``gateskip eval`` does in one run). Matched baselines (shortgpt, static) were matched to gateskip's
compute *per part*, so their settings may differ between parts: the merged setting keeps each part's.
"""

import json
import sys
from pathlib import Path

from gateskip.eval.report import write_report


def merge(parts: list[dict]) -> dict:
    out = json.loads(json.dumps(parts[0]))
    out["tasks"] = [t for p in parts for t in p["tasks"]]
    out["metrics"] = {k: v for p in parts for k, v in p["metrics"].items()}
    out["config"]["tasks"] = out["tasks"]
    out["config"]["merged_from"] = [p["config"].get("out", "?") for p in parts]
    for method, rows in out["methods"].items():
        for i, row in enumerate(rows):
            others = [p["methods"][method][i] for p in parts[1:]]
            if any(o["ratio"] != row["ratio"] for o in others):
                raise SystemExit(f"{method} row {i}: ratios differ between parts")
            for o in others:
                row["tasks"].update(o["tasks"])
                if o.get("setting") != row.get("setting"):
                    row.setdefault("part_settings", [row.get("setting")]).append(o.get("setting"))
            ts = row["tasks"].values()
            row["mean_acc"] = sum(t["acc"] for t in ts) / len(ts)
            row["tokens_skipped"] = sum(t["tokens_skipped"] for t in ts) / len(ts)
            dense = sum(t["flops_dense"] for t in ts)
            row["compute_saved"] = 1.0 - sum(t["flops_executed"] for t in ts) / dense if dense else 0.0
    return out


if __name__ == "__main__":
    out, *dirs = sys.argv[1:]
    merged = merge([json.loads((Path(d) / "results.json").read_text()) for d in dirs])
    print(write_report(merged, out))
