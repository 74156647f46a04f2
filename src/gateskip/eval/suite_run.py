"""``gateskip eval --suite``: every method at several budgets on one suite, in one process.

The model is loaded once; the items are built once; each row (method x budget) scores every item
of every task with the fast scorer (scoring.py) and keeps the per-item scores, so that any two rows
can be compared item by item (paired.py). Rows:

1. dense: the model without gates, scored once; every retention is measured against it;
2. gateskip: the gates folder at each budget (a ratio, or a JSON file of per-branch ratios);
3. random: the same gates and backbone, tokens chosen at random (``policy="random"``), at each ratio;
   oracle (on request): the same again, tokens chosen by the oracle, a ceiling that computes every branch to
   find the tokens whose skipping changes its output least (skipped tokens keep their own K/V): per token
   against thresholds calibrated like the gates' (``oracle_threshold``) when the gateskip rows use
   thresholds, else ranked per request (``oracle``). The random-to-oracle gap is what learned gates can win;
4. shortgpt: the original model without its lowest-Block-Influence layers, at each layer count;
5. shortgpt_linear (row ``shortgpt+linear``): the same layers, each replaced by a linear map of its input
   instead of removed (``linear_replaced``): the strongest static baseline.

With ``--fallback KIND`` the gateskip and random rows give skipped tokens a fitted fallback
(gateskip.fit_fallback; the gates folder's own when it holds that kind) and are named ``gateskip+KIND``
and ``random+KIND``, so they can sit next to zero-fallback rows of another run (suite_merge.merge).

Each row records the tokens skipped and FLOP-weighted compute saved on the evaluation text itself
(gates counted), and, unless switched off, generation fidelity against the dense model's greedy
continuations of held-out prompts (fidelity.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import warnings

import torch

from gateskip.errors import GateSkipError
from gateskip.eval.suite_fallback import install_fallback, say


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
        self.done[_row_key("dense", "-", {}, None)] = saved
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
        saved = self.done.setdefault(_row_key(method, budget, setting, plan), {"tasks": {}})
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


def _row_key(method: str, budget: str, setting: dict, plan: dict | None) -> str:
    """The key of a row's scores in the partial file: method, budget and a hash of its plan."""
    digest = hashlib.sha1(json.dumps([setting, plan], sort_keys=True, default=str).encode()).hexdigest()
    return f"{method}|{budget}|{digest[:12]}"


def _skips(plan: dict) -> bool:
    if plan.get("saved"):
        return True
    r = plan.get("ratio", 0.0)
    return any(v > 0 for v in r.values()) if isinstance(r, dict) else r > 0


def sweep(net, tok, gates: str | None, tasks, methods: list[str], budgets: dict[str, list], policy: str,
          kv: str | None, protect_first: int | None, seed: int, calib, fidelity, bar, shared_prefix: bool = True,
          fallback: dict | None = None, fit_batches=None, resume: tuple[str, dict] | None = None,
          dense_from: tuple[str, dict, dict] | None = None, modules: tuple[str, ...] = ("attn", "mlp")) -> dict:
    """Rows for every method and budget; ``budgets``: method -> list (see ``parse_budgets``).

    ``modules``: the branch kinds that skip in the gateskip, random and oracle rows (the others are gated but
    never skip); with one kind the rows are named for it, e.g. ``gateskip[mlp]+lowrank``.

    ``fallback``: ``{"kind", "rank"}`` of the gateskip and random rows (None or kind ``zero``: the gates
    folder's own, the paper's zero for most); ``fit_batches``: calibration batches (or a function
    returning them) for fitting fallbacks (``--fallback`` and shortgpt_linear). ``resume``: (path, fingerprint)
    of the partial scores file (``SuiteRun.resume_from``). ``dense_from``: (path, results, this run's
    config) of a run whose dense row may be reused (``SuiteRun.reuse_dense``).
    """
    from gateskip.checkpoint import load_gates
    from gateskip.core import gate_state, remove_gates

    batches = _Lazy(fit_batches)
    run = SuiteRun(net, tok, tasks, policy, fidelity, bar, shared_prefix)
    if resume is not None:
        n = run.resume_from(*resume)
        run.resumed = n
        if n:
            say(bar, f"[gateskip] resuming: {n} task scores kept from {resume[0]}")
    run.dense_reference()
    if dense_from is not None and _row_key("dense", "-", {}, None) not in run.done:
        run.reuse_dense(*dense_from)
    rows = [run.row("dense", "-", {}, counters={t.name: run.full_counter() for t in tasks})]
    modules = check_modules(modules)
    common = {"kv": kv, "seed": seed, **({"protect_first": protect_first} if protect_first is not None else {}),
              **({"modules": list(modules)} if modules != BOTH else {})}
    scope = _scope(modules)
    fb_summary = None
    if {"gateskip", "random", "oracle"} & set(methods):
        if not gates:
            raise GateSkipError("methods gateskip/random/oracle need trained gates: pass --gates DIR "
                                "(or --methods shortgpt)")
        load_gates(net, gates)
        try:
            fb_summary = install_fallback(net, gates, fallback, batches, bar)
            suffix = "" if fb_summary["kind"] == "zero" else f"+{fb_summary['kind']}"
            suffix += backbone_suffix(gates)  # a healed folder's rows are told apart from frozen-backbone ones
            if "gateskip" in methods:
                if policy == "threshold" and gate_state(net).loaded.calibration is None:
                    raise GateSkipError(f"gates in {gates!r} have no calibration for policy 'threshold': "
                                        "run gateskip.calibrate and save them again, or pass --policy quantile")
                for b in budgets["gateskip"]:
                    label, ratio = _budget_plan(b)
                    rows.append(run.row("gateskip" + scope + suffix, label, {"ratio": ratio},
                                        {"ratio": ratio, "policy": policy, **common}))
            for m in [m for m in ("gateskip", "random") if m in methods]:
                for v in budgets.get("saved", []):
                    rows.append(run.row(m + scope + suffix, f"saved {v:g}", {"saved": v},
                                        {"saved": v, "policy": policy if m == "gateskip" else "random", **common}))
            for r in budgets.get("random", []) if "random" in methods else []:
                rows.append(run.row("random" + scope + suffix, f"ratio {r:g}", {"ratio": r},
                                    {"ratio": r, "policy": "random", **common}))
            oracle_ratios = budgets.get("oracle", []) if "oracle" in methods else []
            setting, oracle = _oracle_setup(net, policy, batches) if oracle_ratios else ({}, None)
            for r in oracle_ratios:
                rows.append(run.row("oracle" + scope + suffix, f"ratio {r:g}", {"ratio": r, **setting},
                                    {"ratio": r, "policy": oracle, **common, "kv": "compute"}))
        finally:
            remove_gates(net)
    bi = None
    if {"shortgpt", "shortgpt_linear"} & set(methods):
        from gateskip.baselines.shortgpt import block_influence, least_influential, linear_replaced, pruned

        bi = block_influence(net, calib)
        order = least_influential(bi, len(bi))
        for method in [m for m in ("shortgpt", "shortgpt_linear") if m in methods]:
            for n in budgets[method]:
                if n >= len(bi):
                    raise GateSkipError(f"{method} cannot remove {n} of {len(bi)} layers: pass fewer")
                drop = sorted(order[:n])
                if method == "shortgpt":
                    counters = {t.name: run.full_counter() for t in tasks}
                    with pruned(net, drop):
                        rows.append(run.row("shortgpt", f"{n} layers", {"layers_dropped": drop},
                                            removed=tuple(drop), counters=counters))
                    continue
                with linear_replaced(net, drop, batches(), seed) as (plan, fit):  # baselines/shortgpt.py
                    setting = {"layers_dropped": drop, "fit_tokens": fit["tokens"],
                               "r2": {k: v for k, v in fit["r2"].items() if k in plan["ratio"]}}
                    rows.append(run.row("shortgpt+linear", f"{n} layers", setting, plan))
    return {"rows": rows, "block_influence": bi, "fallback": fb_summary, "resumed": getattr(run, "resumed", 0)}


def _oracle_setup(net, policy: str, batches) -> tuple[dict, str]:
    """(row setting, policy) of the oracle rows: per token against thresholds when the gateskip rows use
    thresholds (calibrated on the fit batches at the gates' calibration ratio), else ranked per request."""
    from gateskip.core import calibrate, gate_state

    if policy != "threshold":
        return {}, "oracle"
    own = gate_state(net).loaded.calibration
    ratio = own["ratio"] if own is not None else 0.3
    cal = calibrate(net, batches(), ratio=ratio, score="oracle")
    return {"oracle_calibration": {"ratio": cal["ratio"], "tokens": cal["tokens"]}}, "oracle_threshold"


class _Lazy:
    """Calibration batches made on first use (a fit may not be needed), then kept."""

    def __init__(self, source):
        self.source, self.value = source, None

    def __call__(self) -> list:
        if self.value is None:
            if self.source is None:
                raise GateSkipError("fitting a fallback needs calibration batches: pass fit_batches")
            self.value = list(self.source() if callable(self.source) else self.source)
        return self.value



def backbone_suffix(gates: str) -> str:
    """``+lora`` / ``+ft`` for a gates folder that changes the backbone (LoRA / full fine-tuning), else ``""``."""
    from gateskip.checkpoint import read_meta

    return {"lora": "+lora", "full": "+ft"}.get(read_meta(gates).get("backbone"), "")


SUITE_METHODS = ("gateskip", "random", "oracle", "shortgpt", "shortgpt_linear")
DEFAULT_SUITE_METHODS = ("gateskip", "random", "shortgpt")  # shortgpt_linear on request (a fit per count)


def fidelity_config(fidelity) -> dict | None:
    return dict(zip(("prompts", "prompt_tokens", "new_tokens"), fidelity)) if fidelity else None


def save_raw(res: dict, out: str) -> None:
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, os.path.join(out, "results.json"))


BOTH = ("attn", "mlp")


def check_modules(modules) -> tuple[str, ...]:
    """The branch kinds that skip, as ``("attn", "mlp")``, ``("attn",)`` or ``("mlp",)``; one-line error otherwise."""
    items = [m.strip() for part in ([modules] if isinstance(modules, str) else modules) for m in part.split(",")
             if m.strip()]
    if not items or set(items) - set(BOTH):
        raise GateSkipError(f"modules={','.join(items) or '(none)'} is invalid: pass attn, mlp or attn,mlp")
    return tuple(k for k in BOTH if k in items)


def _scope(modules: tuple[str, ...]) -> str:
    return "" if tuple(modules) == BOTH else f"[{','.join(modules)}]"


def row_names(methods, kind: str = "zero", modules: tuple[str, ...] = BOTH, backbone: str = "") -> list[str]:
    """The method names of a suite run's rows (dense excluded), given its fallback kind, skipping kinds and
    the gates folder's ``backbone_suffix``."""
    suffix = _scope(check_modules(modules)) + ("" if kind == "zero" else f"+{kind}") + backbone
    names = {"gateskip": "gateskip" + suffix, "random": "random" + suffix, "oracle": "oracle" + suffix,
             "shortgpt": "shortgpt",
             "shortgpt_linear": "shortgpt+linear"}
    return [names[m] for m in SUITE_METHODS if m in methods]
