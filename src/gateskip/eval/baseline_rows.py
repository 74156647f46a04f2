"""The rows of ``gateskip eval``'s lm-eval sweep for baselines that bring their own decision: Mixture-of-Depths
routers (baselines/mod.py) and early exit (baselines/earlyexit.py), each measured through the sweep's ``Runner``."""

from __future__ import annotations

from gateskip.baselines.earlyexit import EarlyExit, check_measure, choose_exit, layer_confidences
from gateskip.baselines.mod import load_mod, set_mode
from gateskip.core import remove_gates
from gateskip.errors import GateSkipError


def mod_rows(run, mod_dir: str | None, ratios: list[float], methods: list[str], plan: dict) -> dict[str, list]:
    """Rows ``mod`` (causal predictor) and/or ``mod_topk`` (non-causal top-k) at the sweep's ratios.

    ``run``: the sweep's ``Runner``; the model must be without gates. ``plan``: modules / kv / seed.
    At ratio 0 nothing is routed (the router weights still scale the branch outputs): ``mod_topk``
    then copies ``mod``'s row.
    """
    if not mod_dir:
        raise GateSkipError("methods mod/mod_topk need a MoD folder: pass --mod DIR (from `gateskip train-mod`)")
    load_mod(run.net, mod_dir)
    out: dict[str, list] = {}
    try:
        for mode, name in (("predictor", "mod"), ("topk", "mod_topk")):
            if name not in methods:
                continue
            set_mode(run.net, mode)
            rows = []
            for r in ratios:
                first = out.get("mod", [None])[0]
                if r == 0 and name == "mod_topk" and first is not None and first["ratio"] == 0:
                    rows.append(run.copy(first, r, "mod@0"))
                else:
                    rows.append(run.point(name, r, {"routing": mode}, {"ratio": r, "policy": "quantile", **plan}))
            out[name] = rows
    finally:
        remove_gates(run.net)
    return out


def early_exit_rows(run, dense_row: dict, ratios: list[float], targets: list[float], batches,
               measure: str = "softmax") -> list[dict]:
    """``early_exit`` rows: at each ratio, exits calibrated to save ``targets[i]`` of the FLOPs.

    ``run``: the sweep's ``Runner`` (model without gates); ``dense_row``: its dense row; ``targets``: compute saved to match (what
    GateSkip measured at that ratio, or the ratio itself); ``batches``: calibration input_ids (never
    evaluation items). A target <= 0 is the dense model (no checks): its row is copied.
    """
    check_measure(measure)
    cal = layer_confidences(run.net, batches, measure)
    rows, done = [], {}
    for r, target in zip(ratios, targets):
        if target <= 0:
            rows.append(run.copy(dense_row, r, "dense", {"target_saved": target, "check_layers": []}))
            continue
        choice = choose_exit(cal, target)
        setting = {"target_saved": target, **{k: choice[k] for k in ("threshold", "check_layers", "predicted_saved",
                                                                       "predicted_nll", "measure")}}
        key = (choice["threshold"], tuple(choice["check_layers"]))
        if key in done:
            rows.append(run.copy(done[key], r, f"early_exit@{done[key]['ratio']:g}", setting))
            continue
        counters = {t: EarlyExit(run.net, choice["threshold"], choice["check_layers"], measure) for t in run.tasks}
        rows.append(run.point("early_exit", r, setting, {}, counters=counters))
        done[key] = rows[-1]
    return rows
