"""``gateskip eval`` without ``--suite``: the lm-eval harness sweep (eval/sweep.py) of ``evaluate``
(commands/eval.py), from its checks to the written report."""

from __future__ import annotations

import logging
import os
import tempfile
import time

from gateskip.args import HarnessArgs, SkipArgs, SuiteArgs
from gateskip.errors import GateSkipError
from gateskip.eval.inputs import prepare_run, require_lm_eval, resolve_model
from gateskip.eval.runner import Runner
from gateskip.eval.sweep import NO_GATES, gates_restored, parse_methods, parse_ratios, sweep
from gateskip.eval.taskconfigs import parse_tasks, task_manager
from gateskip.fallback import is_zero
from gateskip.options import as_list


def _harness_sweep(gates: str | None, tasks: list[str], ratios: list[str], methods: list[str], limit: int | None,
                   out: str, model, tokenizer, batch_size: int, compare_with: list[str] | None, policy: str,
                   sk: SkipArgs, su: SuiteArgs, ha: HarnessArgs) -> dict:
    """The lm-eval sweep of ``evaluate`` (``policy`` resolved): results.json, report.md and curve.png in ``out``."""
    modules, kv, seed, allocation = list(sk.modules), sk.kv, sk.seed, sk.allocation
    fallback, reference, offset = su.fallback or "zero", su.reference, su.offset
    calib_batches, mod, exit_measure, quant, prune, recalibrate = (
        ha.calib_batches, ha.mod, ha.exit_measure, ha.quant, ha.prune, ha.recalibrate)
    if offset:
        raise GateSkipError("--offset applies to suite runs: pass --suite core (or extended, all)")
    if not is_zero(fallback) or reference is not None:
        raise GateSkipError("--fallback and --reference apply to suite runs: pass --suite core (or extended, all)")
    require_lm_eval()
    from gateskip.policies import check_policy

    task_names = parse_tasks(tasks)
    ratio_list = parse_ratios(ratios)
    method_list = parse_methods(methods)
    if {"mod", "mod_topk"} & set(method_list) and not mod:
        raise GateSkipError("methods mod/mod_topk need a MoD folder: pass --mod DIR (from `gateskip train-mod`)")
    if "early_exit" in method_list and exit_measure not in ("softmax", "saturation"):
        raise GateSkipError(f"exit_measure={exit_measure!r} is not supported: choose softmax or saturation")
    check_policy(policy)
    from gateskip.eval.report import combine_results
    from gateskip.loading import quantize_for_run
    from gateskip.quantize import check_quant

    check_quant(quant)
    merge_with = as_list(compare_with, str, "--compare-with")
    if len(merge_with) > 1:
        raise GateSkipError("--compare-with takes one results.json for an lm-eval sweep (several for --suite runs)")
    compare_with = merge_with[0] if merge_with else None
    if compare_with and not os.path.isfile(compare_with):  # fail now, not after the sweep
        raise GateSkipError(f"--compare-with {compare_with!r} does not exist: pass an earlier sweep's results.json")
    if allocation != "uniform":
        from gateskip.budget import check_allocation

        check_allocation(allocation)
    prepare_run(limit, out)
    net, tok, model_name = resolve_model(model, tokenizer, gates)
    quantize_for_run(net, quant, gates)
    mods = tuple(as_list(modules, str, "--modules"))
    lm_log = logging.getLogger("lm_eval")
    level = lm_log.level
    lm_log.setLevel(logging.ERROR)  # lm-eval warns on every model object and default metric setting
    with tempfile.TemporaryDirectory(prefix="gateskip-eval-") as tmp, gates_restored(net, gates, tmp) as gates_dir:
        if gates_dir is None and set(method_list) - NO_GATES:
            raise GateSkipError("methods gateskip/random/static need trained gates: pass --gates DIR "
                                "(or --methods shortgpt,gatefree_random)")
        runner = Runner(net, tok, task_names, limit or None, batch_size, seed, task_manager(f"{tmp}/tasks"),
                         total=(1 + len(ratio_list) * len(method_list)) * len(task_names))
        t0 = time.perf_counter()
        try:
            results = sweep(runner, gates_dir, ratio_list, method_list, policy, mods, kv, calib_batches, allocation,
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
