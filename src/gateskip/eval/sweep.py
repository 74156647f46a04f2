"""The lm-eval sweep behind ``gateskip eval`` (commands/eval.py): quality vs FLOP-weighted compute for GateSkip
and its baselines, on one set of items.

Order of a sweep (each method reuses what an earlier one measured):
1. dense: the original model without gates, the reference row (tokens counted for the FLOP model);
2. gateskip: the gates folder at every ratio with the chosen policy;
3. random: the same gates, ``policy="random"`` at the same ratios;
4. static: whole branches with the lowest mean gate value skipped for all tokens, as many as
   match gateskip's measured compute saved at each ratio;
5. gatefree_random: the gates folder's backbone (LoRA / full fine-tune; none for frozen gates)
   with the gates fully open, random skipping, gates not counted;
6. shortgpt: the original model with the layers of lowest Block Influence removed, as many as
   match gateskip's measured compute saved at each ratio;
7. mod / mod_topk: Mixture-of-Depths routers (a ``--mod`` folder from ``gateskip train-mod``) at the
   same ratios: causal predictor / non-causal top-k (baselines/mod.py);
8. early_exit: CALM-style exit with the shared LM head, threshold and check layers calibrated to
   save gateskip's measured compute at each ratio (baselines/earlyexit.py).
Rows that would repeat an earlier run exactly (ratio 0, or a budget that rounds to nothing) are
copied from it, marked ``same_as``. Block Influence and mean gate values are measured on the
*train* split of the ``mix`` text (BoolQ passages + Shakespeare): the held-out split holds the
BoolQ passages that evaluation uses.
"""

from __future__ import annotations

import contextlib

from gateskip.errors import GateSkipError
from gateskip.eval.inputs import calibration_batches
from gateskip.eval.runner import Runner
from gateskip.eval.taskconfigs import TASKS
from gateskip.options import as_list
from gateskip.policies import POLICY

METHODS = ("gateskip", "random", "static", "gatefree_random", "shortgpt", "mod", "mod_topk", "early_exit",
           "pruned_gateskip")
NO_GATES = {"shortgpt", "gatefree_random", "mod", "mod_topk", "early_exit"}  # methods that run without --gates
DEFAULT_TASKS = ("hellaswag", "piqa", "arc_easy", "winogrande", "boolq")
DEFAULT_METHODS = ("gateskip", "random", "static", "gatefree_random", "shortgpt")  # mod needs --mod; early_exit asked


def sweep(run: Runner, gates, ratios, methods, policy, mods, kv, calib_batches, allocation, mod=None,
           exit_measure="softmax", prune=4, recalibrate=True) -> dict:
    from gateskip.checkpoint import load_gates
    from gateskip.core import gate_state, remove_gates
    from gateskip.flopcount import TokenCounter

    res = {"config": {"ratios": ratios, "methods": methods}, "tasks": run.tasks,
           "metrics": {t: TASKS[t].metric for t in run.tasks}, "methods": {}}
    counters = {t: TokenCounter(run.net) for t in run.tasks}  # dense tokens: the FLOPs of any layer or branch
    res["methods"]["dense"] = [run.point("dense", 0.0, {}, {}, counters=counters)]
    calibrated = {"static", "shortgpt", "early_exit", "pruned_gateskip"}  # methods that measure something on calibration text
    calib = calibration_batches(run.tok, calib_batches) if calibrated & set(methods) else None
    skip = {"modules": mods, "kv": kv, "seed": run.seed}
    if gates and {"gateskip", "random", "static"} & set(methods):
        load_gates(run.net, gates)
        if POLICY[policy].needs_calibration and gate_state(run.net).loaded.calibration is None:
            raise GateSkipError(f"gates in {gates!r} have no calibration for policy 'threshold': "
                                "run gateskip.calibrate and save them again, or pass --policy quantile")
        if "gateskip" in methods:
            plan = {"policy": policy, "allocation": allocation, **skip}
            res["methods"]["gateskip"] = [run.point("gateskip", r, {}, {"ratio": r, **plan}) for r in ratios]
        if "random" in methods:
            res["methods"]["random"] = [
                run.copy(_at(res, "gateskip", 0.0), r, "gateskip@0") if r == 0 and _at(res, "gateskip", 0.0)
                else run.point("random", r, {}, {"ratio": r, "policy": "random", **skip}) for r in ratios]
        if "static" in methods:
            res["methods"]["static"] = _static(run, res, counters, ratios, calib, mods, kv)
        remove_gates(run.net)
    if "gatefree_random" in methods:
        res["methods"]["gatefree_random"] = _gatefree(run, res, gates, ratios, skip)
    if "shortgpt" in methods:
        res["methods"]["shortgpt"] = _shortgpt(run, res, counters, ratios, calib)
    if {"mod", "mod_topk"} & set(methods):
        from gateskip.eval.baseline_rows import mod_rows

        res["methods"].update(mod_rows(run, mod, ratios, methods, skip))
    if "pruned_gateskip" in methods:
        res["methods"]["pruned_gateskip"] = _pruned_gateskip(run, res, gates, ratios, calib, prune, recalibrate,
                                                             {"policy": policy, "allocation": allocation, **skip})
    if "early_exit" in methods:
        from gateskip.eval.baseline_rows import early_exit_rows

        res["methods"]["early_exit"] = early_exit_rows(run, res["methods"]["dense"][0], ratios,
                                                  [_target(res, r) for r in ratios], calib, exit_measure)
    return res


def _pruned_gateskip(run: Runner, res, gates, ratios, calib, prune, recalibrate, plan) -> list[dict]:
    """GateSkip on a ShortGPT-pruned model: ``prune`` layers removed, the remaining gates skip at each ratio."""
    import copy

    from gateskip.baselines.shortgpt import block_influence, least_influential
    from gateskip.checkpoint import load_gates
    from gateskip.flopcount import TokenCounter
    from gateskip.prune import prune_layers

    if not gates:
        raise GateSkipError("method pruned_gateskip needs trained gates: pass --gates DIR")
    bi = res["config"].get("block_influence") or block_influence(run.net, calib)
    n_layers = len(bi)
    if not 0 < prune < n_layers:
        raise GateSkipError(f"prune={prune} is invalid: remove between 1 and {n_layers - 1} layers")
    drop = sorted(least_influential(bi, prune))
    res["config"]["pruned_layers"] = drop
    full, net = run.net, copy.deepcopy(run.net)  # pruning is for good: work on a copy
    # one set per row, made on the full copy: they count the FLOPs of all layers
    counters = [{t: TokenCounter(net) for t in run.tasks} for _ in ratios]
    load_gates(net, gates)
    prune_layers(net, drop, recalibrate=calib if recalibrate else None)
    run.net = net
    try:
        return [run.point("pruned_gateskip", r, {"layers_dropped": drop, "recalibrated": recalibrate},
                          {"ratio": r, **plan}, counters=c, removed=drop) for r, c in zip(ratios, counters)]
    finally:
        run.net = full
        del net


def _at(res: dict, method: str, ratio: float) -> dict | None:
    return next((p for p in res["methods"].get(method, []) if p["ratio"] == ratio), None)


def _target(res: dict, ratio: float) -> float:
    """The FLOP fraction a matched baseline must save at ``ratio``: what gateskip measured there."""
    g = _at(res, "gateskip", ratio)
    return g["compute_saved"] if g else ratio


def _dense_flops(res: dict) -> float:
    return sum(p["flops_dense"] for p in res["methods"]["dense"][0]["tasks"].values())


def _static(run: Runner, res, counters, ratios, calib, mods, kv) -> list[dict]:
    """Whole branches (of the kinds in ``mods``) with the lowest mean gate, as many as match gateskip's compute."""
    from gateskip.baselines import match_prefix
    from gateskip.baselines.static import lowest_first, mean_gate_values, static_plan
    from gateskip.core import gate_state

    means = mean_gate_values(run.net, calib)
    res["config"]["mean_gate_values"] = means
    st = gate_state(run.net)
    kinds = {b.name: b.kind for b in st.branches}
    order = [b for b in lowest_first(means) if kinds[b] in mods]
    g = sum(c.tokens for c in counters.values()) * st.flops.gate  # one gate over all dense tokens
    cost = {b.name: sum((c.attn_flops if b.kind == "attn" else c.mlp_flops)(b.layer) for c in counters.values())
            for b in st.branches}
    points, done = [], {}
    if _at(res, "gateskip", 0.0):
        done[0] = (_at(res, "gateskip", 0.0), "gateskip@0")  # nothing skipped: the gated model at ratio 0
    for r in ratios:
        # Skipping a branch saves its FLOPs and its gate's; every other gate still runs.
        n = match_prefix([cost[b] + g for b in order], _target(res, r) * _dense_flops(res), offset=-len(st.branches) * g)
        setting = {"branches_skipped": order[:n]}
        if n in done:
            points.append(run.copy(done[n][0], r, done[n][1], setting))
            continue
        plan = {**static_plan(order[:n]), "modules": ("attn", "mlp"), "kv": kv}
        points.append(run.point("static", r, setting, plan, uncounted_gates=order[:n]))
        done[n] = (points[-1], f"static@{r:g}")
    return points


def _gatefree(run: Runner, res, gates, ratios, skip) -> list[dict]:
    """The gates folder's backbone with its gates fully open, random skipping, gates not counted."""
    from gateskip.baselines.gatefree import open_gates
    from gateskip.checkpoint import load_gates
    from gateskip.config import GateSkipConfig
    from gateskip.core import add_gates, gate_state, remove_gates

    if gates:
        load_gates(run.net, gates)
    else:
        add_gates(run.net, GateSkipConfig())
    frozen = not gate_state(run.net).loaded.backup  # no LoRA / full deltas: the original model
    open_gates(run.net)
    res["config"]["gatefree_backbone"] = "original (frozen-backbone gates)" if frozen else "fine-tuned"
    dense = res["methods"]["dense"][0]
    try:
        return [run.copy(dense, r, "dense") if r == 0 and frozen
                else run.point("gatefree_random", r, {}, {"ratio": r, "policy": "random", **skip}, uncounted_gates="all")
                for r in ratios]
    finally:
        remove_gates(run.net)


def _shortgpt(run: Runner, res, counters, ratios, calib) -> list[dict]:
    """The original model without its lowest-Block-Influence layers, as many as match gateskip's compute."""
    from gateskip.baselines import match_prefix
    from gateskip.baselines.shortgpt import block_influence, least_influential, pruned
    from gateskip.flopcount import TokenCounter

    n_layers = next(iter(counters.values())).n_layers
    bi = block_influence(run.net, calib)
    res["config"]["block_influence"] = bi
    order = least_influential(bi, n_layers)  # all layers, lowest Block Influence first
    layer_cost = [sum(c.layer_flops(i) for c in counters.values()) for i in range(n_layers)]
    points, done = [], {0: (res["methods"]["dense"][0], "dense")}
    for r in ratios:
        n = min(match_prefix([layer_cost[i] for i in order], _target(res, r) * _dense_flops(res)), n_layers - 1)
        setting = {"layers_dropped": sorted(order[:n])}
        if n in done:
            points.append(run.copy(done[n][0], r, done[n][1], setting))
            continue
        fresh = {t: TokenCounter(run.net) for t in run.tasks}  # made on the full model: FLOPs of all layers
        with pruned(run.net, setting["layers_dropped"]):
            points.append(run.point("shortgpt", r, setting, {}, counters=fresh, removed=setting["layers_dropped"]))
        done[n] = (points[-1], f"shortgpt@{r:g}")
    return points


# ---- inputs ------------------------------------------------------------------------------------

def parse_ratios(ratios) -> list[float]:
    from gateskip.policies import check_ratio

    out = sorted({check_ratio(r) for r in as_list(ratios, float, "--ratios")})
    if not out:
        raise GateSkipError("no ratios given: pass e.g. --ratios 0,0.1,0.2,0.3")
    return out


def parse_methods(methods) -> list[str]:
    items = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in items if m not in METHODS]
    if unknown:
        raise GateSkipError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)} "
                            "(dense is always included)")
    return [m for m in METHODS if m in items]  # fixed order: baselines match gateskip's measured compute


@contextlib.contextmanager
def gates_restored(net, gates, tmp):
    """The sweep needs the model without gates; a gated model object gets its gates back afterwards."""
    from gateskip.checkpoint import load_gates, save_gates
    from gateskip.core import is_gated, remove_gates

    restore = None
    if is_gated(net):
        restore = gates or str(save_gates(net, f"{tmp}/entry-gates"))  # LoRA / full backbone changes included
        remove_gates(net)
    try:
        yield gates or restore
    finally:
        if is_gated(net):
            remove_gates(net)
        if restore:
            load_gates(net, restore)
