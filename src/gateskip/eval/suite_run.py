"""``gateskip eval --suite``: every method at several budgets on one suite, in one process.

The model is loaded once; the items are built once; each row (method x budget) scores every item
of every task with the fast scorer (scoring.py) and keeps the per-item scores, so that any two rows
can be compared item by item (paired.py). Rows:

1. dense: the model without gates, scored once; every retention is measured against it;
2. gateskip: the gates folder at each budget (a ratio, or a JSON file of per-branch ratios);
3. random: the same gates and backbone, tokens chosen at random (``policy="random"``), at each ratio;
4. shortgpt: the original model without its lowest-Block-Influence layers, at each layer count.

Each row records the tokens skipped and FLOP-weighted compute saved on the evaluation text itself
(gates counted), and, unless switched off, generation fidelity against the dense model's greedy
continuations of held-out prompts (fidelity.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings

import torch

from gateskip.errors import GateSkipError


def parse_budgets(values, what: str) -> list:
    """A comma list of ratios or per-branch JSON files (gateskip), ratios (random) or layer counts."""
    items = [v.strip() if isinstance(v, str) else v for v in (values.split(",") if isinstance(values, str) else values)]
    out = []
    for v in items:
        if v == "" or v is None:
            continue
        if what == "layers":
            try:
                n = int(v)
            except ValueError:
                raise GateSkipError(f"shortgpt layer count {v!r} is not a whole number: pass e.g. 4,8,12") from None
            if n < 1:
                raise GateSkipError(f"shortgpt layer count {n} is invalid: remove at least 1 layer")
            out.append(n)
        elif isinstance(v, str) and v.endswith(".json"):
            if what != "ratios":
                raise GateSkipError(f"{what} budgets take ratios only, not {v!r}")
            if not os.path.isfile(v):
                raise GateSkipError(f"budget file {v!r} does not exist: pass a JSON of per-branch ratios")
            out.append(v)
        else:
            from gateskip.policies import check_ratio

            out.append(check_ratio(v))
    return out


def _budget_plan(b) -> tuple[str, float | dict]:
    if isinstance(b, str):
        with open(b) as f:
            ratio = {k: float(v) for k, v in json.load(f).items()}
        return os.path.splitext(os.path.basename(b))[0], ratio
    return f"ratio {b:g}", float(b)


class SuiteRun:
    """Scores rows on a fixed list of suite tasks and keeps what the report needs."""

    def __init__(self, net, tok, tasks, policy: str, fidelity: tuple[int, int, int] | None, bar,
                 shared_prefix: bool = True):
        from gateskip.eval import fidelity as fid
        from gateskip.eval.flopcount import TokenCounter

        self.net, self.tok, self.tasks, self.policy, self.bar = net, tok, tasks, policy, bar
        self.shared_prefix = shared_prefix
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.full_counter = lambda: TokenCounter(net)  # made on the full model: FLOPs of every layer
        self.ref = None
        if fidelity:
            n, length, new = fidelity
            self.prompts = fid.heldout_prompts(tok, n, length)
            self.new_tokens = new
        self.dense_flops: dict[str, float] = {}

    def dense_reference(self) -> None:
        from gateskip.eval import fidelity as fid

        if getattr(self, "prompts", None) is not None:
            self.ref = fid.reference(self.net, self.prompts, self.new_tokens, self.pad)

    def row(self, method: str, budget: str, setting: dict, plan: dict | None = None,
            removed: tuple[int, ...] = (), counters: dict | None = None) -> dict:
        """Score every task under ``plan`` (kwargs of gateskip.skipping; None: no gates active)."""
        from gateskip.core import skipping, stats
        from gateskip.eval.scoring import Scorer, item_scores

        shared = self.shared_prefix and not (plan and plan.get("policy") == "quantile" and _skips(plan))
        scorer = Scorer(self.net, self.tok, shared=shared)
        per_task = {}
        t_row = time.perf_counter()
        for task in self.tasks:
            self.bar.set_postfix_str(f"{method} {budget} {task.name}")
            t0 = time.perf_counter()
            counter = counters[task.name] if counters else None
            block = skipping(self.net, **plan) if plan else contextlib.nullcontext()
            with torch.no_grad(), block, (counter if counter else contextlib.nullcontext()):
                if task.kind == "gen":
                    scores = item_scores(task, texts=scorer.greedy(task.items))
                else:
                    scores = item_scores(task, lls=scorer.loglikelihoods(task.items))
                s = stats(self.net) if plan else None
            if s is None:
                s = counter.stats(removed)
            self._check_flops(task, s["flops_dense"], f"{method} {budget}")
            correct = scores[task.metric]
            n = len(correct)
            acc = sum(correct) / n
            per_task[task.name] = {
                "acc": acc, "stderr": (acc * (1 - acc) / max(n - 1, 1)) ** 0.5, "n": n, "metric": task.metric,
                "chance": task.chance, "correct": correct, "tokens_skipped": s["tokens_skipped"],
                "compute_saved": s["compute_saved"], "flops_dense": s["flops_dense"],
                "flops_executed": s["flops_executed"], "seconds": round(time.perf_counter() - t0, 1)}
            self.bar.update(1)
        dense = sum(p["flops_dense"] for p in per_task.values())
        executed = sum(p["flops_executed"] for p in per_task.values())
        row = {"method": method, "budget": budget, "setting": setting, "policy": plan.get("policy") if plan else None,
               "exact_prefix_sharing": shared,
               "tokens_skipped": sum(p["tokens_skipped"] for p in per_task.values()) / len(per_task),
               "compute_saved": 1.0 - executed / dense if dense else 0.0,
               "mean_acc": sum(p["acc"] for p in per_task.values()) / len(per_task), "tasks": per_task}
        if self.ref is not None:
            from gateskip.eval import fidelity as fid

            block = skipping(self.net, **plan) if plan else contextlib.nullcontext()
            with torch.no_grad(), block:
                row["fidelity"] = fid.measure(self.net, self.ref, self.pad)
        row["seconds"] = round(time.perf_counter() - t_row, 1)
        return row

    def _check_flops(self, task, flops_dense: float, row: str) -> None:
        """Log-likelihood rows score the same tokens, so their dense FLOPs must equal the dense row's."""
        ref = self.dense_flops.setdefault(task.name, flops_dense)
        if task.kind != "gen" and abs(flops_dense - ref) > 1e-6 * ref:
            warnings.warn(f"{row} {task.name}: dense FLOPs {flops_dense:.4g} differ from the dense row's {ref:.4g}; "
                          "its compute saved is not comparable", stacklevel=2)


def _skips(plan: dict) -> bool:
    r = plan.get("ratio", 0.0)
    return any(v > 0 for v in r.values()) if isinstance(r, dict) else r > 0


def sweep(net, tok, gates: str | None, tasks, methods: list[str], budgets: dict[str, list], policy: str,
          kv: str | None, protect_first: int | None, seed: int, calib, fidelity, bar, shared_prefix: bool = True) -> dict:
    """Rows for every method and budget; ``budgets``: method -> list (see ``parse_budgets``)."""
    from gateskip.checkpoint import load_gates
    from gateskip.core import gate_state, remove_gates

    run = SuiteRun(net, tok, tasks, policy, fidelity, bar, shared_prefix)
    run.dense_reference()
    rows = [run.row("dense", "-", {}, counters={t.name: run.full_counter() for t in tasks})]
    common = {"kv": kv, "seed": seed, **({"protect_first": protect_first} if protect_first is not None else {})}
    if {"gateskip", "random"} & set(methods):
        if not gates:
            raise GateSkipError("methods gateskip/random need trained gates: pass --gates DIR (or --methods shortgpt)")
        load_gates(net, gates)
        try:
            if "gateskip" in methods:
                if policy == "threshold" and gate_state(net).calibration is None:
                    raise GateSkipError(f"gates in {gates!r} have no calibration for policy 'threshold': "
                                        "run gateskip.calibrate and save them again, or pass --policy quantile")
                for b in budgets["gateskip"]:
                    label, ratio = _budget_plan(b)
                    rows.append(run.row("gateskip", label, {"ratio": ratio},
                                        {"ratio": ratio, "policy": policy, **common}))
            for r in budgets.get("random", []) if "random" in methods else []:
                rows.append(run.row("random", f"ratio {r:g}", {"ratio": r}, {"ratio": r, "policy": "random", **common}))
        finally:
            remove_gates(net)
    if "shortgpt" in methods:
        from gateskip.baselines.shortgpt import block_influence, least_influential, pruned

        bi = block_influence(net, calib)
        order = least_influential(bi, len(bi))
        for n in budgets["shortgpt"]:
            if n >= len(bi):
                raise GateSkipError(f"shortgpt cannot remove {n} of {len(bi)} layers: pass fewer")
            drop = sorted(order[:n])
            counters = {t.name: run.full_counter() for t in tasks}
            with pruned(net, drop):
                rows.append(run.row("shortgpt", f"{n} layers", {"layers_dropped": drop}, removed=tuple(drop),
                                    counters=counters))
    return {"rows": rows, "block_influence": locals().get("bi")}


SUITE_METHODS = ("gateskip", "random", "shortgpt")


def _save_raw(res: dict, out: str) -> None:
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, os.path.join(out, "results.json"))


def evaluate_suite(gates, suite, ratios, random_ratios, shortgpt_layers, methods, policy, kv, limit, out, model,
                   tokenizer, seed, threads, calib_batches, protect_first, fidelity, shared_prefix=True) -> dict:
    """``gateskip eval --suite``: see ``gateskip.eval.evaluate`` for the arguments."""
    import tempfile

    from tqdm.auto import tqdm

    from gateskip.eval.suite import load_items, suite_tasks
    from gateskip.eval.suite_report import analyse, write
    from gateskip.eval.sweep import _calibration_batches, _prepare_run, _require_lm_eval, _resolve_model
    from gateskip.eval.taskconfigs import task_manager
    from gateskip.policies import check_policy

    _require_lm_eval()
    check_policy(policy)
    names = suite_tasks(suite, None)
    if methods is None:
        methods = list(SUITE_METHODS) if gates else ["shortgpt"]
    items = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if items == ["none"]:
        items = []
    unknown = [m for m in items if m not in SUITE_METHODS]
    if unknown:
        raise GateSkipError(f"unknown suite method(s) {', '.join(unknown)}: choose from {', '.join(SUITE_METHODS)} "
                            "or none (dense is always included)")
    budgets = {"gateskip": parse_budgets(ratios, "ratios")}
    numeric = [b for b in budgets["gateskip"] if not isinstance(b, str)]
    budgets["random"] = parse_budgets(random_ratios, "random") if random_ratios else numeric
    budgets["shortgpt"] = parse_budgets(shortgpt_layers, "layers")
    _prepare_run(limit, out, threads)
    net, tok, model_name = _resolve_model(model, tokenizer, gates)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gateskip-suite-") as tmp:
        tasks = load_items(names, limit or None, task_manager(f"{tmp}/tasks"))
    n_rows = 1 + sum(len(budgets[m]) for m in items)
    calib = _calibration_batches(tok, calib_batches) if "shortgpt" in items else None
    bar = tqdm(total=n_rows * len(tasks), desc="gateskip eval --suite", unit="task")
    try:
        res = sweep(net, tok, gates, tasks, items, budgets, policy, kv, protect_first, seed, calib, fidelity, bar,
                    shared_prefix)
    finally:
        bar.close()
    res["config"] = {"model": model_name, "gates": gates, "suite": suite, "tasks": names, "limit": limit,
                     "policy": policy, "kv": kv, "protect_first": protect_first, "seed": seed,
                     "methods": items, "budgets": budgets, "shared_prefix": shared_prefix,
                     "fidelity": dict(zip(("prompts", "prompt_tokens", "new_tokens"), fidelity)) if fidelity else None,
                     "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1)}
    _save_raw(res, out)  # the scores are safe before the analysis runs
    analyse(res)
    print(write(res, out))
    print(f"[gateskip] wrote {out}/results.json, report.md, curve.png")
    return res
