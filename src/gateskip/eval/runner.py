"""One row of a sweep: a (method, setting) evaluated on every task through the ``gateskip`` lm-eval model.

Each task runs in its own ``simple_evaluate`` call, so that its statistics (tokens skipped, FLOPs)
are its own; the same first ``limit`` items are scored for every row.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings

from gateskip.eval.taskconfigs import TASKS


class Runner:
    """Evaluates one (method, setting) on every task through the ``gateskip`` lm-eval model."""

    def __init__(self, net, tok, tasks, limit, batch_size, seed, tm, total):
        from tqdm.auto import tqdm

        self.net, self.tok, self.tasks, self.limit = net, tok, tasks, limit
        self.batch_size, self.seed, self.tm = batch_size, seed, tm
        self.chat = bool(getattr(tok, "chat_template", None))
        self.bar = tqdm(total=total, desc="gateskip eval", unit="run")
        self.dense_flops: dict[str, float] = {}  # per task, from the first (dense) row

    def point(self, method, ratio, setting, plan, counters=None, removed=(), uncounted_gates=None) -> dict:
        import lm_eval

        from gateskip.eval.lm import GateSkipLM

        lm = GateSkipLM(pretrained=self.net, tokenizer=self.tok, batch_size=self.batch_size,
                        uncounted_gates=uncounted_gates, **plan)
        per_task = {}
        for task in self.tasks:
            self.bar.set_postfix_str(f"{method} {ratio:g} {task}")
            lm.reset_stats()
            t0 = time.perf_counter()
            with counters[task] if counters else contextlib.nullcontext():
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], limit=self.limit, task_manager=self.tm, log_samples=False,
                    bootstrap_iters=100, apply_chat_template=TASKS[task].chat and self.chat, random_seed=self.seed)
            s = counters[task].stats(removed) if counters else lm.stats()
            if counters and plan:  # pruned and gated: removed layers count as skipped, the rest as measured
                s = _pruned_and_gated(lm.stats(), s, len(removed) / counters[task].n_layers)
            self._check_flops(task, s["flops_dense"], f"{method} {ratio:g}")
            r, metric = out["results"][task], TASKS[task].metric
            stderr = r.get(metric.replace(",", "_stderr,", 1))
            per_task[task] = {
                "acc": float(r[metric]), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "n": int(out["n-samples"][task]["effective"]), "metric": metric,
                "tokens_skipped": s["tokens_skipped"], "compute_saved": s["compute_saved"],
                "flops_dense": s["flops_dense"], "flops_executed": s["flops_executed"],
                "seconds": round(time.perf_counter() - t0, 1),
                "all_metrics": {k: v for k, v in r.items() if isinstance(v, (int, float)) and "stderr" not in k},
            }
            self.bar.update(1)
        dense = sum(p["flops_dense"] for p in per_task.values())
        executed = sum(p["flops_executed"] for p in per_task.values())
        return {"ratio": ratio, "setting": setting,
                "mean_acc": sum(p["acc"] for p in per_task.values()) / len(per_task),
                "tokens_skipped": sum(p["tokens_skipped"] for p in per_task.values()) / len(per_task),
                "compute_saved": 1.0 - executed / dense if dense else 0.0, "tasks": per_task}

    def _check_flops(self, task: str, flops_dense: float, row: str) -> None:
        """Log-likelihood rows score the same token sequences, so every row's dense FLOPs must equal
        the dense row's: a mismatch means the statistics missed calls (a bug, not a finding)."""
        ref = self.dense_flops.setdefault(task, flops_dense)
        if not TASKS[task].generative and abs(flops_dense - ref) > 1e-6 * ref:
            warnings.warn(f"{row} {task}: dense FLOPs {flops_dense:.4g} differ from the dense row's {ref:.4g}; "
                          "its compute saved is not comparable", stacklevel=2)

    def copy(self, point: dict, ratio: float, same_as: str, setting: dict | None = None) -> dict:
        """A row identical to an earlier run (same model, same skipping): not run again."""
        self.bar.update(len(self.tasks))
        new = {**copy.deepcopy(point), "ratio": ratio, "same_as": same_as}
        if setting is not None:
            new["setting"] = setting
        return new

    def close(self):
        self.bar.close()


def _pruned_and_gated(gated: dict, pruned: dict, removed_fraction: float) -> dict:
    """Statistics of a pruned gated model against the full dense model.

    ``gated``: gateskip.stats over the remaining layers (gates and LM head counted); ``pruned``:
    the token counter's dense FLOPs of the full model. Tokens skipped: removed layers skip every
    token, the others what their gates skipped.
    """
    dense = pruned["flops_dense"]
    return {**gated, "flops_dense": dense, "compute_saved": 1.0 - gated["flops_executed"] / dense if dense else 0.0,
            "tokens_skipped": removed_fraction + (1.0 - removed_fraction) * gated["tokens_skipped"]}
