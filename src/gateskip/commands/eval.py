"""``gateskip eval``: accuracy against FLOP-weighted compute saved, for GateSkip and its baselines on one set of
items. ``--suite`` runs the core suite with paired comparisons (eval/suite_run.py); otherwise the lm-eval sweep
(eval/sweep.py, run by commands/eval_harness.py). The command checks its flags before the model loads and sets
the thread count; the library does neither.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from gateskip.args import HarnessArgs, SkipArgs, SuiteArgs
from gateskip.commands.eval_harness import _harness_sweep
from gateskip.errors import GateSkipError
from gateskip.eval import suite_fallback, suite_merge, suite_report, suite_run
from gateskip.eval.inputs import calibration_batches, prepare_run, require_lm_eval, resolve_model
from gateskip.eval.sweep import DEFAULT_METHODS, DEFAULT_TASKS
from gateskip.eval.taskconfigs import task_manager
from gateskip.fallback import is_zero
from gateskip.options import as_list


def evaluate(gates: str | None = None, tasks: list[str] = DEFAULT_TASKS,
             ratios: list[str] = ("0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6"), saved: list[float] | None = None,
             methods: list[str] = DEFAULT_METHODS, limit: int | None = 50, out: str = "runs/eval",
             model: str | None = None, tokenizer=None, batch_size: int = 1, threads: int = 0,
             suite: str | None = None, compare_with: list[str] | None = None, *, skipping: SkipArgs = SkipArgs(),
             suite_args: SuiteArgs = SuiteArgs(), harness: HarnessArgs = HarnessArgs(), **flags) -> dict:
    """Sweep skip ratios on offline benchmarks; writes results.json, report.md and curve.png to --out.

    Options in groups (gateskip/args.py): how tokens skip, ``skipping`` (SkipArgs: --policy, --modules, --kv,
    --protect-first, --recheck-stops ..., the same as ``gateskip generate``'s); the suites' own, ``suite_args``
    (SuiteArgs: --random-ratios, --oracle-ratios, --fallback, --fidelity-prompts, --resume ...); the lm-eval
    sweep's, ``harness`` (HarnessArgs: --mod, --quant, --prune ...).

    Args:
        gates: a gates folder (``gateskip train --out``); needed by every method but shortgpt.
        tasks: comma-separated tasks: hellaswag, piqa, arc_easy, arc_challenge, winogrande, boolq,
            openbookqa, commonsense_qa, mmlu, lambada, lambada_gen, gsm8k (suite gen: squad, nq, coqa, gsm8k,
            each alone or as task:fewshot / task:chat).
        ratios: comma-separated skip ratios per branch, e.g. 0,0.1,0.2,0.3,0.4,0.5,0.6 (a suite: also JSON files
            of per-branch ratios).
        saved: compute-saved budgets, e.g. 0.15,0.25 (gateskip.skipping(saved=...): the ratio is steered while
            running). Suites chat and gen: every method (gateskip, random, oracle) runs at these instead of
            --ratios. Other suites: gateskip and random rows at these budgets besides --ratios.
        methods: comma-separated methods besides the dense reference: gateskip, random, static,
            gatefree_random, shortgpt, mod, mod_topk (need --mod), early_exit; a suite: gateskip, random,
            shortgpt (the default), shortgpt_linear and oracle, or none for dense only.
        limit: items per task (the first N, same for every row); 0 for all.
        out: output folder.
        model: base model name or folder (a loaded model object from Python); default: the one
            recorded in the gates folder.
        tokenizer: with a model object: its tokenizer.
        batch_size: requests per forward pass. Padding is masked, so threshold results do not depend on it;
            the quantile policy ranks the whole batch, so only 1 keeps its decisions per request.
        threads: torch CPU threads (0: leave as is).
        suite: chat: chat fidelity (eval/chat_fidelity.py) on --limit held-out chat requests (200 is the
            measured setting): empty and early answers, overlap with the dense answer, the original model's NLL,
            first-token agreement and compute saved while generating, for gateskip, random and oracle rows.
            gen: generative tasks with checkable answers (eval/gentasks.py): retention at matched compute saved
            on the task/formats the original model scores 3 standard errors above 0 (--methods none: that
            qualification alone). core, extended, all or a comma list of tasks: the fast paired sweep
            (eval/suite_run.py): per-item scores, above-chance retention, a paired who-wins table at matched
            compute and generation fidelity.
        compare_with: results.json of another sweep (e.g. full precision) whose rows are added to this
            report and curve, e.g. ``--quant int4 --compare-with runs/eval/results.json``. Suite: one or
            more suite results.json on the same tasks and items; their rows follow this run's (their dense
            dropped), a method name this run already has suffixed with @<folder of that results.json>. Suite
            gen: gen.json of runs with the same settings on other tasks, whose task/formats are added. Suite
            chat: chat.json of runs on the same requests (e.g. another gates folder), whose rows are added as
            "method (their gates)" and paired with this run's gateskip rows.
    """
    from gateskip.flags import apply

    groups = apply(flags, {"skipping": skipping, "suite_args": suite_args, "harness": harness}, "gateskip eval")
    sk, su, ha = groups["skipping"], groups["suite_args"], groups["harness"]
    if threads:
        torch.set_num_threads(threads)
    saved = as_list(saved, float, "--saved") if saved else None
    from gateskip.policies import resolve_policy

    policy = resolve_policy(sk.policy, True)  # gates without thresholds are calibrated first (suite_run, sweep)
    if suite:
        return _run_suite(suite, gates, tasks, ratios, saved, methods, limit, out, model, tokenizer, batch_size,
                          threads, compare_with, policy, sk, su, ha)
    return _harness_sweep(gates, tasks, ratios, methods, limit, out, model, tokenizer, batch_size, compare_with,
                          policy, sk, su, ha)


def _run_suite(suite: str, gates: str | None, tasks: list[str], ratios: list[str], saved: list[float] | None,
               methods: list[str], limit: int | None, out: str, model, tokenizer, batch_size: int, threads: int,
               compare_with: list[str] | None, policy: str, sk: SkipArgs, su: SuiteArgs, ha: HarnessArgs) -> dict:
    """``evaluate`` with --suite (``policy`` resolved): chat, gen, or the paired sweep (``evaluate_suite``)."""
    modules, kv, seed, protect_first = list(sk.modules), sk.kv, sk.seed, sk.protect_first
    random_ratios, oracle_ratios, resume = su.random_ratios, su.oracle_ratios, su.resume
    if suite == "chat":
        from gateskip.commands.eval_chat import evaluate_chat

        return evaluate_chat(gates, model, ratios, random_ratios, oracle_ratios,
                             ["gateskip", "random", "oracle"] if methods == DEFAULT_METHODS else as_list(methods, str),
                             policy, sk, limit, out, su.fidelity_tokens, batch_size, saved, su.protect_prompt,
                             as_list(compare_with, str, "--compare-with"))
    if suite == "gen":
        from gateskip.commands.eval_gen import GEN_METHODS, evaluate_gen

        chosen = list(GEN_METHODS) if methods == DEFAULT_METHODS else as_list(methods, str)
        return evaluate_gen(gates, model, None if tasks == DEFAULT_TASKS else tasks, ratios, random_ratios,
                            oracle_ratios, [] if chosen == ["none"] else chosen, policy, sk, limit, out,
                            batch_size, saved, as_list(compare_with, str, "--compare-with"), resume)
    _generation_only(sk, suite)
    return evaluate_suite(gates=gates, suite=suite, ratios=ratios, random_ratios=random_ratios,
                          oracle_ratios=oracle_ratios, shortgpt_layers=su.shortgpt_layers,
                          methods=None if methods == DEFAULT_METHODS else methods, policy=policy, kv=kv,
                          limit=limit, out=out, model=model, tokenizer=tokenizer, seed=seed, threads=threads,
                          calib_batches=ha.calib_batches, protect_first=protect_first,
                          fidelity=(su.fidelity_prompts, su.fidelity_prompt_tokens, su.fidelity_tokens)
                          if su.fidelity_prompts else None, shared_prefix=su.shared_prefix,
                          fallback=su.fallback or "zero", fallback_rank=su.fallback_rank,
                          fallback_batches=su.fallback_batches, compare_with=compare_with, reference=su.reference,
                          resume=resume, reuse_dense=su.reuse_dense, modules=modules, offset=su.offset,
                          saved=saved)


def _generation_only(sk: SkipArgs, suite: str) -> None:
    """The core suite scores given answers in whole calls: options that act on generation are an error there."""
    default = SkipArgs()
    for name in ("allocation", "protect_last", "protect_tail", "recheck_below", "prompt_boost", "execution"):
        if getattr(sk, name) != getattr(default, name):
            raise GateSkipError(f"--{name.replace('_', '-')} acts on generation: use it with --suite chat or gen, "
                                f"not --suite {suite}")


# ---- the sweep ---------------------------------------------------------------------------------


def evaluate_suite(gates, suite, ratios, random_ratios, oracle_ratios, shortgpt_layers, methods, policy, kv, limit, out, model,
                   tokenizer, seed, threads, calib_batches, protect_first, fidelity, shared_prefix=True,
                   fallback="zero", fallback_rank=64, fallback_batches=12, compare_with=None,
                   reference=None, resume=True, reuse_dense=True, modules=("attn", "mlp"), offset=0,
                   saved=None) -> dict:
    """``gateskip eval --suite``: see ``evaluate`` for the arguments."""
    names, items, budgets, modules, paths, runs = _suite_plan(
        gates, suite, ratios, random_ratios, oracle_ratios, shortgpt_layers, methods, policy, limit, fallback,
        fallback_rank, fallback_batches, compare_with, reference, modules, offset, saved)
    prepare_run(limit, out)
    net, tok, model_name = resolve_model(model, tokenizer, gates)
    t0 = time.perf_counter()
    res = _suite_scores(net, tok, model_name, gates, names, items, budgets, runs, policy=policy, kv=kv, limit=limit,
                        out=out, seed=seed, protect_first=protect_first, calib_batches=calib_batches,
                        fidelity=fidelity, shared_prefix=shared_prefix, fallback=fallback,
                        fallback_rank=fallback_rank, fallback_batches=fallback_batches, modules=modules,
                        offset=offset, resume=resume, reuse_dense=reuse_dense)
    fb = res.pop("fallback") or {"requested": fallback, "kind": "zero", "rank": None, "source": None}
    fb.update(batches=fallback_batches, requested_rank=fallback_rank)
    res["config"] = {"model": model_name, "gates": gates, "suite": suite, "tasks": names, "limit": limit, "offset": offset,
                     "policy": policy, "kv": kv, "protect_first": protect_first, "seed": seed,
                     "methods": items, "budgets": budgets, "shared_prefix": shared_prefix, "fallback": fb,
                     "modules": list(modules),
                     "fidelity": suite_run.fidelity_config(fidelity),
                     "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1),
                     "resumed": res.pop("resumed"), "scoring_seconds": round(sum(r["seconds"] for r in res["rows"]), 1)}
    _write_suite(res, out, paths, reference, resume)
    return res


def _suite_plan(gates, suite, ratios, random_ratios, oracle_ratios, shortgpt_layers, methods, policy, limit,
                fallback, fallback_rank, fallback_batches, compare_with, reference, modules, offset,
                saved) -> tuple:
    """The checks of ``evaluate_suite`` before the model loads: (task names, methods, budgets per method, the
    checked modules, the runs to merge's paths, those runs)."""
    from gateskip.checkpoint import read_meta
    from gateskip.eval.suite import suite_tasks
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
    if is_zero(kind) and gated:
        kind = suite_fallback.fallback_label(read_meta(gates)["config"])  # a folder saved with a fallback runs with it
    if "oracle" in items and gates and read_meta(gates)["config"].get("placement", "after") != "after":
        raise GateSkipError("method oracle needs gates placed after the branch: drop it or pass a folder "
                            "trained with placement='after'")
    own = suite_run.row_names(items, kind, modules, suite_run.backbone_suffix(gates) if gated else "")
    merged = own + [n for _, renamed in suite_merge.renames(own, runs) for n in renamed.values()]
    if reference is not None and reference not in merged:
        raise GateSkipError(f"--reference {reference!r} names no method of this report: choose one of "
                            f"{', '.join(merged) or 'none (dense only)'}")
    return names, items, budgets, modules, paths, runs


def _suite_scores(net, tok, model_name, gates, names, items, budgets, runs, *, policy, kv, limit, out, seed,
                  protect_first, calib_batches, fidelity, shared_prefix, fallback, fallback_rank, fallback_batches,
                  modules, offset, resume, reuse_dense) -> dict:
    """``evaluate_suite``'s scoring: the items loaded, every row swept (resumable from OUT/partial.json)."""
    from tqdm.auto import tqdm

    from gateskip.eval.suite import load_items

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
        return suite_run.sweep(net, tok, gates, tasks, items, budgets, policy, kv, protect_first, seed, calib, fidelity, bar,
                    shared_prefix, fallback={"kind": fallback, "rank": fallback_rank, "batches": fallback_batches},
                    fit_batches=lambda: calibration_batches(tok, fallback_batches), modules=modules,
                    resume=(partial, fingerprint) if resume else None,
                    dense_from=(runs[0][0], runs[0][1], {
                        "model": model_name, "tasks": names, "limit": limit, "offset": offset, "shared_prefix": shared_prefix,
                        "fidelity": suite_run.fidelity_config(fidelity)}) if runs and reuse_dense else None)
    finally:
        bar.close()


def _write_suite(res: dict, out: str, paths: list[str], reference: str | None, resume: bool) -> None:
    """``evaluate_suite``'s write-up: the raw scores saved, the runs of --compare-with merged, the report."""
    suite_run.save_raw(res, out)  # the scores are safe before the merge and the analysis run
    partial = os.path.join(out, "partial.json")
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
