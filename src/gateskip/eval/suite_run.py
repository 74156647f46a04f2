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
continuations of held-out prompts (fidelity.py); suite_rows.py scores one row.
"""

from __future__ import annotations

import json
import os

from gateskip.errors import GateSkipError
from gateskip.eval.suite_fallback import install_fallback, say
from gateskip.eval.suite_rows import SuiteRun, row_key
from gateskip.fallback import is_zero
from gateskip.policies import POLICY


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
    batches = _Lazy(fit_batches)
    run = SuiteRun(net, tok, tasks, policy, fidelity, bar, shared_prefix)
    if resume is not None:
        n = run.resume_from(*resume)
        run.resumed = n
        if n:
            say(bar, f"[gateskip] resuming: {n} task scores kept from {resume[0]}")
    run.dense_reference()
    if dense_from is not None and row_key("dense", "-", {}, None) not in run.done:
        run.reuse_dense(*dense_from)
    rows = [run.row("dense", "-", {}, counters={t.name: run.full_counter() for t in tasks})]
    modules = check_modules(modules)
    common = {"kv": kv, "seed": seed, **({"protect_first": protect_first} if protect_first is not None else {}),
              **({"modules": list(modules)} if modules != BOTH else {})}
    scope = _scope(modules)
    fb_summary = None
    if {"gateskip", "random", "oracle"} & set(methods):
        gated, fb_summary = _gated_rows(run, gates, methods, budgets, common, scope, fallback, batches)
        rows += gated
    bi = None
    if {"shortgpt", "shortgpt_linear"} & set(methods):
        pruned_rows, bi = _shortgpt_rows(run, methods, budgets, calib, batches, seed)
        rows += pruned_rows
    return {"rows": rows, "block_influence": bi, "fallback": fb_summary, "resumed": getattr(run, "resumed", 0)}


def _gated_rows(run: SuiteRun, gates: str | None, methods: list[str], budgets: dict[str, list], common: dict,
                scope: str, fallback: dict | None, batches) -> tuple[list[dict], dict]:
    """The gateskip, random and oracle rows of the gates folder (its gates removed again afterwards), and the
    summary of the fallback their skipped tokens get."""
    from gateskip.checkpoint import load_gates
    from gateskip.core import gate_state, remove_gates

    net, policy, rows = run.net, run.policy, []
    if not gates:
        raise GateSkipError("methods gateskip/random/oracle need trained gates: pass --gates DIR "
                            "(or --methods shortgpt)")
    load_gates(net, gates)
    try:
        fb_summary = install_fallback(net, gates, fallback, batches, run.bar)
        suffix = "" if fb_summary["kind"] == "zero" else f"+{fb_summary['kind']}"
        suffix += backbone_suffix(gates)  # a healed folder's rows are told apart from frozen-backbone ones
        if "gateskip" in methods:
            if POLICY[policy].needs_calibration and gate_state(net).loaded.calibration is None:
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
    return rows, fb_summary


def _shortgpt_rows(run: SuiteRun, methods: list[str], budgets: dict[str, list], calib, batches,
                   seed: int) -> tuple[list[dict], list[float]]:
    """The shortgpt and shortgpt+linear rows at each layer count, and the Block Influence of every layer."""
    from gateskip.baselines.shortgpt import block_influence, least_influential, linear_replaced, pruned

    net, rows = run.net, []
    bi = block_influence(net, calib)
    order = least_influential(bi, len(bi))
    for method in [m for m in ("shortgpt", "shortgpt_linear") if m in methods]:
        for n in budgets[method]:
            if n >= len(bi):
                raise GateSkipError(f"{method} cannot remove {n} of {len(bi)} layers: pass fewer")
            drop = sorted(order[:n])
            if method == "shortgpt":
                counters = {t.name: run.full_counter() for t in run.tasks}
                with pruned(net, drop):
                    rows.append(run.row("shortgpt", f"{n} layers", {"layers_dropped": drop},
                                        removed=tuple(drop), counters=counters))
                continue
            with linear_replaced(net, drop, batches(), seed) as (plan, fit):  # baselines/shortgpt.py
                setting = {"layers_dropped": drop, "fit_tokens": fit["tokens"],
                           "r2": {k: v for k, v in fit["r2"].items() if k in plan["ratio"]}}
                rows.append(run.row("shortgpt+linear", f"{n} layers", setting, plan))
    return rows, bi


def _oracle_setup(net, policy: str, batches) -> tuple[dict, str]:
    """(row setting, policy) of the oracle rows: per token against thresholds when the gateskip rows use
    thresholds (calibrated on the fit batches at the gates' calibration ratio), else ranked per request."""
    from gateskip.core import calibrate, gate_state

    if not POLICY[policy].needs_calibration:
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
    suffix = _scope(check_modules(modules)) + ("" if is_zero(kind) else f"+{kind}") + backbone
    names = {"gateskip": "gateskip" + suffix, "random": "random" + suffix, "oracle": "oracle" + suffix,
             "shortgpt": "shortgpt",
             "shortgpt_linear": "shortgpt+linear"}
    return [names[m] for m in SUITE_METHODS if m in methods]
