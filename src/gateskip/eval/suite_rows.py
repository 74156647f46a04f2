"""The rows of the suite sweep (suite_run.py): ``SuiteRun`` scores every item of every task under a skipping
plan (or none) with the fast scorer (scoring.py), records tokens skipped, FLOP-weighted compute saved and
generation fidelity against the dense model, and keeps each task score in a partial file as soon as it is
measured, so that an interrupted sweep resumes where it stopped; the dense row may come from another run."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import warnings

import torch

from gateskip.eval.suite_fallback import say


class SuiteRun:
    """Scores rows on a fixed list of suite tasks and keeps what the report needs."""

    def __init__(self, net, tok, tasks, policy: str, fidelity: tuple[int, int, int] | None, bar,
                 shared_prefix: bool = True):
        from gateskip.eval import fidelity as fid
        from gateskip.flopcount import TokenCounter

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
        self.partial, self.done, self.fingerprint = None, {}, None

    def resume_from(self, path: str, fingerprint: dict) -> int:
        """Keep every task score in ``path`` (written by an earlier run with the same ``fingerprint``) and
        write each new one there as soon as it is measured: an interrupted sweep resumes where it stopped.
        Returns the number of task scores reused."""
        self.partial, self.fingerprint = path, fingerprint
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
            except (OSError, json.JSONDecodeError):
                saved = {}
            if saved.get("fingerprint") == fingerprint:
                self.done = saved.get("rows", {})
            else:
                say(self.bar, f"[gateskip] {path} is from another sweep (settings differ): starting over")
        return sum(len(r.get("tasks", {})) for r in self.done.values())

    def _save_partial(self) -> None:
        if self.partial is None:
            return
        tmp = self.partial + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"fingerprint": self.fingerprint, "rows": self.done}, f)
        os.replace(tmp, self.partial)

    def reuse_dense(self, path: str, data: dict, config: dict, spot: int = 8) -> bool:
        """Take the dense row of another suite run (``data``, its results.json) instead of scoring it again.

        Only when that run used the same model, tasks, limit, prefix sharing and fidelity prompts
        (``config`` holds this run's), and after a spot check: the first ``spot`` items of every task are
        scored again and must give the same per-item scores. Returns whether the row was taken."""
        from gateskip.eval import suite_merge
        from gateskip.eval.scoring import Scorer, item_scores

        other = data.get("config", {})
        same = all(suite_merge.same_key(k, other.get(k), config.get(k))
                   for k in ("model", "tasks", "limit", "offset", "shared_prefix", "fidelity"))
        dense = data["rows"][0]
        if not same or set(dense.get("tasks", {})) != {t.name for t in self.tasks} or (
                self.ref is not None and "fidelity" not in dense):
            return False
        scorer = Scorer(self.net, self.tok, shared=self.shared_prefix)
        for task in self.tasks:
            head = dataclasses.replace(task, items=task.items[:spot])
            with torch.no_grad():
                if task.kind == "gen":
                    got = item_scores(head, texts=scorer.greedy(head.items))[task.metric]
                else:
                    got = item_scores(head, lls=scorer.loglikelihoods(head.items))[task.metric]
            if list(got) != list(dense["tasks"][task.name]["correct"][:spot]):
                say(self.bar, f"[gateskip] the dense row of {path} scores {task.name} differently: scoring it again")
                return False
        saved = {"tasks": dict(dense["tasks"])}
        if "fidelity" in dense:
            saved["fidelity"] = dense["fidelity"]
        self.done[row_key("dense", "-", {}, None)] = saved
        self._save_partial()
        say(self.bar, f"[gateskip] dense row taken from {path} (same model, items and settings; first {spot} "
                       "items of every task re-scored and equal)")
        return True

    def dense_reference(self) -> None:
        from gateskip.eval import fidelity as fid

        if getattr(self, "prompts", None) is not None:
            self.ref = fid.reference(self.net, self.prompts, self.new_tokens, self.pad)

    def row(self, method: str, budget: str, setting: dict, plan: dict | None = None,
            removed: tuple[int, ...] = (), counters: dict | None = None) -> dict:
        """Score every task under ``plan`` (kwargs of gateskip.skipping; None: no gates active)."""
        from gateskip.core import skipping, stats
        from gateskip.eval import suite_merge
        from gateskip.eval.scoring import Scorer, item_scores

        # quantile and oracle rank a whole request: its context's decisions depend on the continuation
        shared = self.shared_prefix and not (plan and plan.get("policy") in ("quantile", "oracle") and _skips(plan))
        scorer = Scorer(self.net, self.tok, shared=shared)
        per_task = {}
        t_row = time.perf_counter()
        saved = self.done.setdefault(row_key(method, budget, setting, plan), {"tasks": {}})
        for task in self.tasks:
            if task.name in saved["tasks"]:  # measured by an interrupted run of the same sweep
                per_task[task.name] = saved["tasks"][task.name]
                if shared == self.shared_prefix:
                    self._check_flops(task, per_task[task.name]["flops_dense"], f"{method} {budget}")
                self.bar.update(1)
                continue
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
            if shared == self.shared_prefix:  # rows without prefix sharing count each choice's context again
                self._check_flops(task, s["flops_dense"], f"{method} {budget}")
            correct = scores[task.metric]
            n = len(correct)
            acc = sum(correct) / n
            per_task[task.name] = {
                "acc": acc, "stderr": (acc * (1 - acc) / max(n - 1, 1)) ** 0.5, "n": n, "metric": task.metric,
                "chance": task.chance, "correct": correct, "tokens_skipped": s["tokens_skipped"],
                "compute_saved": s["compute_saved"], "flops_dense": s["flops_dense"],
                "flops_executed": s["flops_executed"], "seconds": round(time.perf_counter() - t0, 1)}
            saved["tasks"][task.name] = per_task[task.name]
            self._save_partial()
            self.bar.update(1)
        row = {"method": method, "budget": budget, "setting": setting, "policy": plan.get("policy") if plan else None,
               "exact_prefix_sharing": shared, **suite_merge.task_totals(per_task), "tasks": per_task}
        if self.ref is not None and "fidelity" in saved:
            row["fidelity"] = saved["fidelity"]
        elif self.ref is not None:
            row["fidelity"] = saved["fidelity"] = self._fidelity(plan, removed, counters is not None)
            self._save_partial()
        # scoring time of every task, including those an interrupted run measured, plus this run's overhead
        row["seconds"] = round(max(time.perf_counter() - t_row, sum(p["seconds"] for p in per_task.values())), 1)
        return row

    def _fidelity(self, plan: dict | None, removed: tuple[int, ...], counted: bool) -> dict:
        """Generation fidelity of a row (fidelity.py), with the compute saved while generating: measured in a
        skipping block of its own (``stats``), or by a full-model counter for rows without gates (``counted``)."""
        from gateskip.core import skipping, stats
        from gateskip.eval import fidelity as fid

        def block():
            return skipping(self.net, **plan) if plan else contextlib.nullcontext()

        with torch.no_grad(), block():
            logp = fid.forced_logp(self.net, self.ref.prompts, self.ref.continuation)
        counter = self.full_counter() if counted else None
        with torch.no_grad(), block(), (counter if counter else contextlib.nullcontext()):
            gen = fid.greedy(self.net, self.ref.prompts, self.ref.continuation.shape[1], self.pad)
            s = stats(self.net) if plan else counter.stats(removed) if counter else None
        return fid.summary(self.ref, logp, gen, s)

    def _check_flops(self, task, flops_dense: float, row: str) -> None:
        """Log-likelihood rows score the same tokens, so their dense FLOPs must equal the dense row's."""
        ref = self.dense_flops.setdefault(task.name, flops_dense)
        if task.kind != "gen" and abs(flops_dense - ref) > 1e-6 * ref:
            warnings.warn(f"{row} {task.name}: dense FLOPs {flops_dense:.4g} differ from the dense row's {ref:.4g}; "
                          "its compute saved is not comparable", stacklevel=2)


def row_key(method: str, budget: str, setting: dict, plan: dict | None) -> str:
    """The key of a row's scores in the partial file: method, budget and a hash of its plan."""
    digest = hashlib.sha1(json.dumps([setting, plan], sort_keys=True, default=str).encode()).hexdigest()
    return f"{method}|{budget}|{digest[:12]}"


def _skips(plan: dict) -> bool:
    if plan.get("saved"):
        return True
    r = plan.get("ratio", 0.0)
    return any(v > 0 for v in r.values()) if isinstance(r, dict) else r > 0
