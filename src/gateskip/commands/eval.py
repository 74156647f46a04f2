"""``gateskip eval``: accuracy against FLOP-weighted compute saved, for GateSkip and its baselines on one set of
items. ``--suite`` runs the core suite with paired comparisons (eval/suite_run.py); otherwise the lm-eval sweep
(eval/sweep.py). The command checks its flags before the model loads and sets the thread count; the library
does neither.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import torch

from gateskip.errors import GateSkipError
from gateskip.eval import suite_fallback, suite_merge, suite_run
from gateskip.eval.inputs import prepare_run, require_lm_eval, resolve_model
from gateskip.eval.runner import Runner
from gateskip.eval.sweep import (
    DEFAULT_METHODS,
    DEFAULT_TASKS,
    NO_GATES,
    gates_restored,
    parse_methods,
    parse_ratios,
    sweep,
)
from gateskip.eval.taskconfigs import parse_tasks, task_manager
from gateskip.options import as_list
from gateskip.saved import GENERATION_PROMPT_BOOST


def evaluate(gates: str | None = None, tasks: list[str] = DEFAULT_TASKS,
             ratios: list[str] = ("0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6"), policy: str | None = None,
             methods: list[str] = DEFAULT_METHODS, modules: list[str] = ("attn", "mlp"), kv: str | None = None,
             limit: int | None = 50, out: str = "runs/eval", model: str | None = None, tokenizer=None,
             batch_size: int = 1, calib_batches: int = 4, seed: int = 0, threads: int = 0,
             allocation: str = "uniform", mod: str | None = None, exit_measure: str = "softmax",
             quant: str = "none", compare_with: list[str] | None = None, prune: int = 4,
             recalibrate: bool = True, suite: str | None = None, random_ratios: list[str] | None = None,
             oracle_ratios: list[str] | None = None,
             shortgpt_layers: list[int] = (4, 10, 16), protect_first: int | None = None, fidelity_prompts: int = 32,
             fidelity_prompt_tokens: int = 48, fidelity_tokens: int = 64, shared_prefix: bool = True,
             fallback: str = "zero", fallback_rank: int = 64, fallback_batches: int = 12,
             reference: str | None = None, resume: bool = True, reuse_dense: bool = True, offset: int = 0,
             protect_last: bool | None = None, recheck_stops: bool = False, recheck_below: float = 0.0,
             saved: list[float] | None = None, protect_prompt: bool = False,
             prompt_boost: float = GENERATION_PROMPT_BOOST) -> dict:
    """Sweep skip ratios on offline benchmarks; writes results.json, report.md and curve.png to --out.

    Args:
        gates: a gates folder (``gateskip train --out``); needed by every method but shortgpt.
        tasks: comma-separated tasks: hellaswag, piqa, arc_easy, arc_challenge, winogrande, boolq,
            openbookqa, commonsense_qa, mmlu, lambada, lambada_gen, gsm8k.
        ratios: comma-separated skip ratios per branch, e.g. 0,0.1,0.2,0.3,0.4,0.5,0.6.
        policy: how GateSkip picks tokens: threshold (calibrated, per token; the default: gates without thresholds
            are calibrated first), quantile (paper) or random.
        methods: comma-separated methods besides the dense reference: gateskip, random, static,
            gatefree_random, shortgpt, mod, mod_topk (need --mod), early_exit.
        modules: branch kinds that skip: attn, mlp or attn,mlp (suite: the gateskip, random and oracle rows;
            with one kind they are named for it, e.g. gateskip[mlp]+lowrank).
        kv: K/V of skipped attention tokens: copy or compute; default: the gates' config.
        limit: items per task (the first N, same for every row); 0 for all.
        offset: suite: skip the first N items of every task. The default scores items 0..limit-1 (the test
            items every published figure uses); --offset 500 --limit 200 scores items 500-699, a dev split to
            choose recipes on without touching the test items (a task with fewer items gives what it has).
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
            this run already has suffixed with @<folder of that results.json>. Suite gen: gen.json of runs
            with the same settings on other tasks, whose task/formats are added to this report.
        prune: method pruned_gateskip: remove this many layers of lowest Block Influence (ShortGPT)
            from the gated model, then skip with its remaining gates at every ratio.
        recalibrate: method pruned_gateskip: re-fit the remaining gates' thresholds on calibration
            text after pruning (their inputs changed).
        suite: chat: chat fidelity (eval/chat_fidelity.py): --limit held-out chat requests (200 is the measured
            setting) answered greedily with at most --fidelity-tokens new tokens by the original model and by
            gateskip (--ratios), random (--random-ratios) and oracle (--oracle-ratios) rows of --methods (default
            gateskip,random,oracle); empty and early-stopped answers, overlap with the dense answer, the original
            model's NLL, first-token agreement and compute saved while generating.
            gen: generative tasks with checkable answers (eval/gentasks.py: squad, nq, coqa, gsm8k, few-shot and
            chat; --tasks picks some, e.g. squad,nq:chat; default all): the original model on --limit items per
            task, then gateskip, random and oracle rows as for chat on the task/formats it scores 3 standard errors
            above 0; retention at matched compute saved (--methods none: the qualification run alone).
            core, extended, all or a comma list of tasks: the fast paired sweep (eval/suite_run.py) on
            that task suite instead of --tasks: methods dense + gateskip, random, shortgpt (the default), shortgpt_linear
            (ShortGPT's layers replaced by fitted linear maps, row shortgpt+linear; on request) and oracle (the
            gates folder with policy oracle, the ceiling for learned gates; on request), or none for
            dense only; per-item scores, above-chance retention, a paired who-wins table at matched compute,
            and generation fidelity. --ratios may then also name JSON files of per-branch ratios.
        random_ratios: suite: ratios of the random method (default: the numeric --ratios).
        oracle_ratios: suite: ratios of the oracle method (default: the random ones): a ceiling, not a
            method; it computes every branch and skips the tokens whose skipping changes it least.
        shortgpt_layers: suite: numbers of layers ShortGPT removes, one row each.
        protect_first: suite: never skip the first N tokens (default: the gates' config).
        protect_last: suite chat: never skip a prompt's last position (default: the gates' config).
        protect_prompt: suite chat: never skip a prompt at all (only generated tokens skip).
        prompt_boost: suites chat and gen with --saved: prompts aim at this times the budget, the answers make up the
            rest (what gateskip generate does).
        recheck_stops: suites chat and gen: a generated step whose top token ends the answer is computed again without
            skipping (counted in the compute saved), for every skipping row (gateskip, random, oracle).
        recheck_below: suites chat and gen: the same for steps whose top probability is below this value (0: off).
        saved: compute-saved budgets, e.g. 0.15,0.25 (gateskip.skipping(saved=...): the ratio is steered while
            running). Suites chat and gen: every method (gateskip, random, oracle) runs at these instead of
            --ratios. Other suites: gateskip and random rows at these budgets besides --ratios.
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
        resume: suites core and gen: every task score is written to OUT/partial.json as soon as it is measured,
            and a rerun of the same sweep keeps them (an interrupted sweep resumes); --no-resume starts over.
        reuse_dense: suite with --compare-with: take the dense row of the first run to merge when it used the
            same model, items, prefix sharing and fidelity prompts (after re-scoring the first 8 items of
            every task and finding them equal) instead of scoring it again; --no-reuse-dense scores it.
    """
    if threads:
        torch.set_num_threads(threads)
    saved = as_list(saved, float, "--saved") if saved else None
    from gateskip.policies import resolve_policy

    policy = resolve_policy(policy, True)  # gates without thresholds are calibrated first (suite_run, sweep)
    if suite == "chat":
        from gateskip.commands.eval_chat import evaluate_chat

        return evaluate_chat(gates, model, ratios, random_ratios, oracle_ratios,
                             ["gateskip", "random", "oracle"] if methods == DEFAULT_METHODS else as_list(methods, str),
                             policy, as_list(modules, str), kv, limit, out, fidelity_tokens, batch_size, protect_first,
                             protect_last, seed, recheck_stops, recheck_below, saved, protect_prompt, prompt_boost)
    if suite == "gen":
        from gateskip.commands.eval_gen import GEN_METHODS, evaluate_gen

        chosen = list(GEN_METHODS) if methods == DEFAULT_METHODS else as_list(methods, str)
        return evaluate_gen(gates, model, None if tasks == DEFAULT_TASKS else tasks, ratios, random_ratios,
                            oracle_ratios, [] if chosen == ["none"] else chosen, policy, as_list(modules, str), kv,
                            limit, out, batch_size, protect_first, protect_last, seed, recheck_stops, recheck_below,
                            saved, prompt_boost, as_list(compare_with, str, "--compare-with"), resume)
    if suite:
        return evaluate_suite(gates=gates, suite=suite, ratios=ratios, random_ratios=random_ratios,
                              oracle_ratios=oracle_ratios,                              shortgpt_layers=shortgpt_layers,
                              methods=None if methods == DEFAULT_METHODS else methods, policy=policy, kv=kv,
                              limit=limit, out=out, model=model, tokenizer=tokenizer, seed=seed, threads=threads,
                              calib_batches=calib_batches, protect_first=protect_first,
                              fidelity=(fidelity_prompts, fidelity_prompt_tokens, fidelity_tokens)
                              if fidelity_prompts else None, shared_prefix=shared_prefix, fallback=fallback,
                              fallback_rank=fallback_rank, fallback_batches=fallback_batches,
                              compare_with=compare_with, reference=reference, resume=resume,
                              reuse_dense=reuse_dense, modules=modules, offset=offset,
                              saved=saved)
    if offset:
        raise GateSkipError("--offset applies to suite runs: pass --suite core (or extended, all)")
    if fallback != "zero" or reference is not None:
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


# ---- the sweep ---------------------------------------------------------------------------------


def evaluate_suite(gates, suite, ratios, random_ratios, oracle_ratios, shortgpt_layers, methods, policy, kv, limit, out, model,
                   tokenizer, seed, threads, calib_batches, protect_first, fidelity, shared_prefix=True,
                   fallback="zero", fallback_rank=64, fallback_batches=12, compare_with=None,
                   reference=None, resume=True, reuse_dense=True, modules=("attn", "mlp"), offset=0,
                   saved=None) -> dict:
    """``gateskip eval --suite``: see ``evaluate`` for the arguments."""
    import tempfile

    from tqdm.auto import tqdm

    from gateskip.checkpoint import read_meta
    from gateskip.eval import suite_report
    from gateskip.eval.inputs import calibration_batches, prepare_run, require_lm_eval, resolve_model
    from gateskip.eval.suite import load_items, suite_tasks
    from gateskip.eval.taskconfigs import task_manager
    from gateskip.policies import check_policy

    require_lm_eval()
    check_policy(policy)
    suite_fallback.check_fallback(fallback, fallback_rank, fallback_batches)
    modules = suite_run.check_modules(modules)
    names = suite_tasks(suite, None)
    if methods is None:
        methods = list(suite_run.DEFAULT_SUITE_METHODS) if gates else ["shortgpt"]
    items = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if items == ["none"]:
        items = []
    unknown = [m for m in items if m not in suite_run.SUITE_METHODS]
    if unknown:
        raise GateSkipError(f"unknown suite method(s) {', '.join(unknown)}: choose from {', '.join(suite_run.SUITE_METHODS)} "
                            "or none (dense is always included)")
    budgets = {"gateskip": suite_run.parse_budgets(ratios, "ratios")}
    numeric = [b for b in budgets["gateskip"] if not isinstance(b, str)]
    budgets["random"] = suite_run.parse_budgets(random_ratios, "random") if random_ratios else numeric
    budgets["oracle"] = suite_run.parse_budgets(oracle_ratios, "oracle") if oracle_ratios else budgets["random"]
    budgets["shortgpt"] = suite_run.parse_budgets(shortgpt_layers, "layers")
    budgets["shortgpt_linear"] = budgets["shortgpt"]
    budgets["saved"] = list(saved or [])  # gateskip and random rows steered to these savings (saved.py)
    # fail now, not after the sweep: the runs to merge must cover the same tasks and items, and the
    # reference must name a row of the report
    paths = suite_merge.split_paths(compare_with)
    if offset < 0:
        raise GateSkipError(f"--offset {offset} is invalid: give a number of items to skip (0: the first items)")
    runs = [(p, suite_merge.load_run(p, {"tasks": names, "limit": limit, "offset": offset})) for p in paths]
    kind = fallback
    gated = gates and {"gateskip", "random", "oracle"} & set(items)  # rows that load the gates folder
    if kind == "zero" and gated:
        kind = suite_fallback.fallback_label(read_meta(gates)["config"])  # a folder saved with a fallback runs with it
    if "oracle" in items and gates and read_meta(gates)["config"].get("placement", "after") != "after":
        raise GateSkipError("method oracle needs gates placed after the branch: drop it or pass a folder "
                            "trained with placement='after'")
    own = suite_run.row_names(items, kind, modules, suite_run.backbone_suffix(gates) if gated else "")
    merged = own + [n for _, renamed in suite_merge.renames(own, runs) for n in renamed.values()]
    if reference is not None and reference not in merged:
        raise GateSkipError(f"--reference {reference!r} names no method of this report: choose one of "
                            f"{', '.join(merged) or 'none (dense only)'}")
    prepare_run(limit, out)
    net, tok, model_name = resolve_model(model, tokenizer, gates)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gateskip-suite-") as tmp:
        tasks = load_items(names, limit or None, task_manager(f"{tmp}/tasks"), offset=offset)
    n_rows = 1 + sum(len(budgets[m]) + (len(budgets["saved"]) if m in ("gateskip", "random") else 0) for m in items)
    calib = calibration_batches(tok, calib_batches) if {"shortgpt", "shortgpt_linear"} & set(items) else None
    bar = tqdm(total=n_rows * len(tasks), desc="gateskip eval --suite", unit="task")
    try:
        fingerprint = {"model": model_name, "gates": gates, "tasks": names, "limit": limit, **({"offset": offset} if offset else {}),
                       "policy": policy, "kv": kv,
                       "protect_first": protect_first, "seed": seed, "shared_prefix": shared_prefix,
                       "fidelity": list(fidelity) if fidelity else None, "calib_batches": calib_batches,
                       "fallback": [fallback, fallback_rank, fallback_batches],
                       **({"modules": list(modules)} if modules != suite_run.BOTH else {})}
        partial = os.path.join(out, "partial.json")
        res = suite_run.sweep(net, tok, gates, tasks, items, budgets, policy, kv, protect_first, seed, calib, fidelity, bar,
                    shared_prefix, fallback={"kind": fallback, "rank": fallback_rank, "batches": fallback_batches},
                    fit_batches=lambda: calibration_batches(tok, fallback_batches), modules=modules,
                    resume=(partial, fingerprint) if resume else None,
                    dense_from=(runs[0][0], runs[0][1], {
                        "model": model_name, "tasks": names, "limit": limit, "offset": offset, "shared_prefix": shared_prefix,
                        "fidelity": suite_run.fidelity_config(fidelity)}) if runs and reuse_dense else None)
    finally:
        bar.close()
    fb = res.pop("fallback") or {"requested": fallback, "kind": "zero", "rank": None, "source": None}
    fb.update(batches=fallback_batches, requested_rank=fallback_rank)
    res["config"] = {"model": model_name, "gates": gates, "suite": suite, "tasks": names, "limit": limit, "offset": offset,
                     "policy": policy, "kv": kv, "protect_first": protect_first, "seed": seed,
                     "methods": items, "budgets": budgets, "shared_prefix": shared_prefix, "fallback": fb,
                     "modules": list(modules),
                     "fidelity": suite_run.fidelity_config(fidelity),
                     "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1),
                     "resumed": res.pop("resumed"), "scoring_seconds": round(sum(r["seconds"] for r in res["rows"]), 1)}
    suite_run.save_raw(res, out)  # the scores are safe before the merge and the analysis run
    if resume and os.path.isfile(partial):
        os.remove(partial)  # results.json holds them all now; a later run with new code must not reuse them
    if paths:
        try:
            suite_merge.merge(res, paths)
        except GateSkipError as e:
            raise GateSkipError(f"{e} (this run's scores are in {out}/results.json: "
                                "python -m gateskip.eval.suite_report DIR regenerates the report)") from None
    suite_report.analyse(res, reference=reference)
    print(suite_report.write(res, out))
    print(f"[gateskip] wrote {out}/results.json, report.md, curve.png")
    return res
