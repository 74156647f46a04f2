"""``gateskip eval``: quality vs FLOP-weighted compute for GateSkip and its baselines, on one set of items.

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
import logging
import os
import tempfile
import time

from gateskip.errors import GateSkipError
from gateskip.eval.inputs import calibration_batches, prepare_run, require_lm_eval, resolve_model
from gateskip.eval.runner import Runner
from gateskip.eval.taskconfigs import TASKS, parse_tasks, task_manager

METHODS = ("gateskip", "random", "static", "gatefree_random", "shortgpt", "mod", "mod_topk", "early_exit",
           "pruned_gateskip")
NO_GATES = {"shortgpt", "gatefree_random", "mod", "mod_topk", "early_exit"}  # methods that run without --gates
DEFAULT_TASKS = "hellaswag,piqa,arc_easy,winogrande,boolq"
DEFAULT_METHODS = "gateskip,random,static,gatefree_random,shortgpt"  # mod needs --mod; early_exit on request


def evaluate(gates: str | None = None, tasks: str | list[str] = DEFAULT_TASKS,
             ratios: str | list[float] = "0,0.1,0.2,0.3,0.4,0.5,0.6", policy: str = "threshold",
             methods: str | list[str] = DEFAULT_METHODS, modules: str = "attn,mlp", kv: str | None = None,
             limit: int | None = 50, out: str = "runs/eval", model: str | None = None, tokenizer=None,
             batch_size: int = 1, calib_batches: int = 4, seed: int = 0, threads: int = 0,
             allocation: str = "uniform", mod: str | None = None, exit_measure: str = "softmax",
             quant: str = "none", compare_with: str | None = None, prune: int = 4,
             recalibrate: bool = True, suite: str | None = None, random_ratios: str | None = None,
             shortgpt_layers: str = "4,10,16", protect_first: int | None = None, fidelity_prompts: int = 32,
             fidelity_prompt_tokens: int = 48, fidelity_tokens: int = 64, shared_prefix: bool = True,
             fallback: str = "zero", fallback_rank: int = 64, fallback_batches: int = 12,
             reference: str | None = None, resume: bool = True, reuse_dense: bool = True) -> dict:
    """Sweep skip ratios on offline benchmarks; writes results.json, report.md and curve.png to --out.

    Args:
        gates: a gates folder (``gateskip train --out``); needed by every method but shortgpt.
        tasks: comma-separated tasks: hellaswag, piqa, arc_easy, arc_challenge, winogrande, boolq,
            openbookqa, commonsense_qa, mmlu, lambada, lambada_gen, gsm8k.
        ratios: comma-separated skip ratios per branch, e.g. 0,0.1,0.2,0.3,0.4,0.5,0.6.
        policy: how GateSkip picks tokens: threshold (calibrated, per token), quantile (paper) or random.
        methods: comma-separated methods besides the dense reference: gateskip, random, static,
            gatefree_random, shortgpt, mod, mod_topk (need --mod), early_exit.
        modules: branch kinds that skip: attn, mlp or attn,mlp.
        kv: K/V of skipped attention tokens: copy or compute; default: the gates' config.
        limit: items per task (the first N, same for every row); 0 for all.
        out: output folder.
        model: base model name or folder (a loaded model object from Python); default: the one
            recorded in the gates folder.
        tokenizer: with a model object: its tokenizer.
        batch_size: requests per forward pass. Padding is masked, so threshold results do not depend on it;
            the quantile policy ranks the whole batch, so only 1 keeps its decisions per request.
        calib_batches: batches of 4 x 256 tokens for Block Influence and mean gate values (train
            split of the mix text: BoolQ passages + Shakespeare, never evaluation items).
        seed: seed of random skipping.
        threads: torch CPU threads (0: leave as is).
        allocation: how GateSkip spreads the budget over branches: uniform (paper) or global
            (see gateskip.skipping); baselines are unaffected.
        mod: a MoD folder (``gateskip train-mod --out``) for methods mod and mod_topk.
        exit_measure: confidence of method early_exit: softmax (top-1 minus top-2) or saturation.
        quant: quantize the backbone's linear layers first: none, int4 or int8 (gateskip.quantize);
            rows are then named e.g. gateskip[int4] and dense[int4]. A model object is quantized in place.
        compare_with: results.json of another sweep (e.g. full precision) whose rows are added to this
            report and curve, e.g. ``--quant int4 --compare-with runs/eval/results.json``. Suite: one or
            more suite results.json, comma-separated, on the same tasks and items (same --limit, dense rows
            identical item by item); their rows follow this run's (their dense dropped), a method name
            this run already has suffixed with @<folder of that results.json>.
        prune: method pruned_gateskip: remove this many layers of lowest Block Influence (ShortGPT)
            from the gated model, then skip with its remaining gates at every ratio.
        recalibrate: method pruned_gateskip: re-fit the remaining gates' thresholds on calibration
            text after pruning (their inputs changed).
        suite: core, extended, all or a comma list of tasks: the fast paired sweep (eval/suite_run.py) on
            that task suite instead of --tasks: methods dense + gateskip, random, shortgpt (the default) and shortgpt_linear
            (ShortGPT's layers replaced by fitted linear maps, row shortgpt+linear; on request), or none for
            dense only; per-item scores, above-chance retention, a paired who-wins table at matched compute,
            and generation fidelity. --ratios may then also name JSON files of per-branch ratios.
        random_ratios: suite: ratios of the random method (default: the numeric --ratios).
        shortgpt_layers: suite: numbers of layers ShortGPT removes, one row each.
        protect_first: suite: never skip the first N tokens (default: the gates' config).
        fidelity_prompts: suite: held-out prompts for generation fidelity (0: off).
        fidelity_prompt_tokens: suite: length of each fidelity prompt in tokens.
        fidelity_tokens: suite: greedy tokens generated per fidelity prompt.
        shared_prefix: suite: score a multiple-choice item's shared context once and its choices from
            the KV cache (exact under the threshold policy; the quantile policy always runs whole requests).
        fallback: suite: what skipped tokens of the gateskip and random rows get instead of 0: zero (the
            paper; a gates folder saved with a fallback keeps its own), mean, linear or lowrank. The gates
            folder's fallback is used when it is of that kind (and rank), otherwise one is fitted
            (gateskip.fit_fallback); rows are then named gateskip+KIND and random+KIND.
        fallback_rank: suite: rank of a lowrank fallback.
        fallback_batches: suite: batches of 4 x 256 tokens (train split of the mix text) to fit fallbacks
            on: --fallback and method shortgpt_linear.
        reference: suite: the method the who-wins table compares every other against (default:
            gateskip+KIND of --fallback if present, else gateskip).
        resume: suite: every task score is written to OUT/partial.json as soon as it is measured, and a rerun
            of the same sweep keeps them (an interrupted sweep resumes); --no-resume starts over.
        reuse_dense: suite with --compare-with: take the dense row of the first run to merge when it used the
            same model, items, prefix sharing and fidelity prompts (after re-scoring the first 8 items of
            every task and finding them equal) instead of scoring it again; --no-reuse-dense scores it.
    """
    if suite:
        from gateskip.eval.suite_run import evaluate_suite

        return evaluate_suite(gates=gates, suite=suite, ratios=ratios, random_ratios=random_ratios,
                              shortgpt_layers=shortgpt_layers,
                              methods=None if methods == DEFAULT_METHODS else methods, policy=policy, kv=kv,
                              limit=limit, out=out, model=model, tokenizer=tokenizer, seed=seed, threads=threads,
                              calib_batches=calib_batches, protect_first=protect_first,
                              fidelity=(fidelity_prompts, fidelity_prompt_tokens, fidelity_tokens)
                              if fidelity_prompts else None, shared_prefix=shared_prefix, fallback=fallback,
                              fallback_rank=fallback_rank, fallback_batches=fallback_batches,
                              compare_with=compare_with, reference=reference, resume=resume,
                              reuse_dense=reuse_dense)
    if fallback != "zero" or reference is not None:
        raise GateSkipError("--fallback and --reference apply to suite runs: pass --suite core (or extended, all)")
    require_lm_eval()
    from gateskip.policies import check_policy

    task_names = parse_tasks(tasks)
    ratio_list = _parse_ratios(ratios)
    method_list = _parse_methods(methods)
    if {"mod", "mod_topk"} & set(method_list) and not mod:
        raise GateSkipError("methods mod/mod_topk need a MoD folder: pass --mod DIR (from `gateskip train-mod`)")
    if "early_exit" in method_list and exit_measure not in ("softmax", "saturation"):
        raise GateSkipError(f"exit_measure={exit_measure!r} is not supported: choose softmax or saturation")
    check_policy(policy)
    from gateskip.eval.report import combine_results
    from gateskip.loading import quantize_for_run
    from gateskip.quantize import check_quant

    check_quant(quant)
    if compare_with and not os.path.isfile(compare_with):  # fail now, not after the sweep
        raise GateSkipError(f"--compare-with {compare_with!r} does not exist: pass an earlier sweep's results.json")
    if allocation != "uniform":
        from gateskip.budget import check_allocation

        check_allocation(allocation)
    prepare_run(limit, out, threads)
    net, tok, model_name = resolve_model(model, tokenizer, gates)
    quantize_for_run(net, quant, gates)
    mods = tuple(m.strip() for m in modules.split(",") if m.strip()) if isinstance(modules, str) else tuple(modules)
    lm_log = logging.getLogger("lm_eval")
    level = lm_log.level
    lm_log.setLevel(logging.ERROR)  # lm-eval warns on every model object and default metric setting
    with tempfile.TemporaryDirectory(prefix="gateskip-eval-") as tmp, _gates_restored(net, gates, tmp) as gates_dir:
        if gates_dir is None and set(method_list) - NO_GATES:
            raise GateSkipError("methods gateskip/random/static need trained gates: pass --gates DIR "
                                "(or --methods shortgpt,gatefree_random)")
        runner = Runner(net, tok, task_names, limit or None, batch_size, seed, task_manager(f"{tmp}/tasks"),
                         total=(1 + len(ratio_list) * len(method_list)) * len(task_names))
        t0 = time.perf_counter()
        try:
            results = _sweep(runner, gates_dir, ratio_list, method_list, policy, mods, kv, calib_batches, allocation,
                             mod=mod, exit_measure=exit_measure, prune=prune, recalibrate=recalibrate)
        finally:
            runner.close()
            lm_log.setLevel(level)
    results["config"].update(model=model_name, gates=gates, tasks=task_names, limit=limit, policy=policy,
                             modules=list(mods), kv=kv, seed=seed, batch_size=batch_size, allocation=allocation,
                             mod=mod, exit_measure=exit_measure if "early_exit" in method_list else None,
                             seconds=round(time.perf_counter() - t0, 1), quant=quant)
    results = combine_results(results, quant, compare_with)
    from gateskip.eval.report import write_report

    print(write_report(results, out))
    print(f"[gateskip] wrote {out}/results.json, report.md, curve.png")
    return results


# ---- the sweep ---------------------------------------------------------------------------------

def _sweep(run: Runner, gates, ratios, methods, policy, mods, kv, calib_batches, allocation, mod=None,
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
        if policy == "threshold" and gate_state(run.net).calibration is None:
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
        from gateskip.baselines.mod import sweep_rows

        res["methods"].update(sweep_rows(run, mod, ratios, methods, skip))
    if "pruned_gateskip" in methods:
        res["methods"]["pruned_gateskip"] = _pruned_gateskip(run, res, gates, ratios, calib, prune, recalibrate,
                                                             {"policy": policy, "allocation": allocation, **skip})
    if "early_exit" in methods:
        from gateskip.baselines.earlyexit import sweep_rows

        res["methods"]["early_exit"] = sweep_rows(run, res["methods"]["dense"][0], ratios,
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
    frozen = not gate_state(run.net).backup  # no LoRA / full deltas: the original model
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

def _parse_ratios(ratios) -> list[float]:
    from gateskip.policies import check_ratio

    items = ratios.split(",") if isinstance(ratios, str) else ratios
    out = sorted({check_ratio(r) for r in items if str(r).strip()})
    if not out:
        raise GateSkipError("no ratios given: pass e.g. --ratios 0,0.1,0.2,0.3")
    return out


def _parse_methods(methods) -> list[str]:
    items = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in items if m not in METHODS]
    if unknown:
        raise GateSkipError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)} "
                            "(dense is always included)")
    return [m for m in METHODS if m in items]  # fixed order: baselines match gateskip's measured compute


@contextlib.contextmanager
def _gates_restored(net, gates, tmp):
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
