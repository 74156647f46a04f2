"""``gateskip fit``: fallbacks and gates fitted in closed form, then measured between random and oracle.

Minutes on a CPU, no backprop: (1) every branch's fallback is fitted to the branch output
(``fit_fallback``); (2) every gate is fitted to rank tokens by what skipping them costs under that
fallback (``gatefit.fit_gates``); (3) thresholds are calibrated; (4) the folder is saved. Then, on
held-out text, next-token CE (or, with ``compare_metric="kl"``, KL to the dense model) at each skip ratio for
three ways of choosing the tokens with the same
fallback: random (the floor), the fitted gates, and the residual oracle that computes the branch (the
ceiling). ``gap closed`` = (random - gates) / (random - oracle), per branch kind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gateskip.args import AllocateArgs, CompareArgs, StartArgs, TextArgs
from gateskip.config import RECOMMENDED, GateSkipConfig
from gateskip.errors import GateSkipError
from gateskip.files import atomic_write
from gateskip.flags import FALLBACK_FIELDS, apply, fit_ranks, given_fields, start_config
from gateskip.options import as_list


def fit(model: str = "smollm2-135m", out: str = "runs/fit", *, gates: GateSkipConfig = RECOMMENDED,
        start: StartArgs = StartArgs(), comparison: CompareArgs = CompareArgs(),
        allocation: AllocateArgs = AllocateArgs(), fit_gates: bool = True, seq_len: int = 256, batch_size: int = 4,
        ridge: float = 1e-3, gate_ridge: float = 1e-2, under_ratio: float = 0.0, threads: int = 0,
        data: str = "mix", chat_texts: int = TextArgs.chat_texts, fit_budget: str | None = None,
        save_dtype: str = "float32", gate_target: str = "residual", **flags) -> dict:
    """Fit fallbacks and gates in closed form, save a gates folder, and report held-out CE between random and oracle.

    The gates are ``gates`` (gateskip.GateSkipConfig, default ``config.RECOMMENDED``: its fields are flags, e.g.
    ``--rank 16 --fallback lowrank --modules attn,mlp``) fitted from new (``--init fit``), or a gates folder
    (``--init DIR``) whose config is kept except the gate flags given: its fallbacks are kept unless fallback
    flags are given (``--init DIR --no-fit-gates --fit-ratio 0`` only measures a folder, with its own
    calibrated thresholds). ``--fit-ratio`` and ``--fallback-batches`` are ``gateskip train --init fit``'s.
    The comparison is ``comparison`` (CompareArgs: --compare, --compare-scopes, --baselines ...), per-branch
    allocations ``allocation`` (AllocateArgs: --allocate ...).

    Args:
        model: base model name or folder (ignored with --init DIR: the folder's base model is used).
        out: the gates folder to write (with fit.json and compare.md).
        fit_gates: fit each gate to rank tokens by the fallback's residual (no: keep the gates as they are).
        seq_len: tokens per calibration row.
        batch_size: rows per calibration batch.
        ridge: fallback ridge penalty (relative to the mean input variance).
        gate_ridge: gate fit ridge penalty.
        under_ratio: fit each fallback under random skipping of this ratio upstream (0: on the dense model).
        threads: torch CPU threads (0: leave as is).
        data: text source for calibration and the held-out comparison (built-in name or file; ``chat``: the
            model's own answers to chat requests, written once, as ``gateskip train --data chat``).
        chat_texts: with --data chat: how many self-distillation answers to write (once per model and number).
        fit_budget: refit under this JSON file of per-branch ratios (e.g. an alloc_<t>.json) instead of
            --fit-ratio's uniform ratio.
        save_dtype: how the gates and fallbacks are stored: float32, or float16 / bfloat16 (half the size;
            loading casts them back).
        gate_target: what the gates are fitted to rank tokens by: residual (the fallback's residual, the residual
            oracle's choice) or marginal (the marginal oracle's scores over --oracle-horizon predictions,
            gateskip.oracle_scores: about --oracle-horizon tokens of compute per token and branch, 12 s per
            128-token row of SmolLM2 at horizon 1 on 2 threads; with --fit-ratio 0).
    """
    import torch

    from gateskip.checkpoint import SAVE_DTYPES, save_gates
    from gateskip.core import calibrate, gate_state
    from gateskip.gatefit import check_gate_target

    if threads:
        torch.set_num_threads(threads)
    groups = apply(flags, {"gates": gates, "start": start, "comparison": comparison, "allocation": allocation},
                   "gateskip fit")
    start, cmp, alloc = groups["start"], groups["comparison"], groups["allocation"]
    if start.init is None:
        raise GateSkipError("gateskip fit fits gates in closed form: pass --init fit (new gates) or --init DIR")
    cfg, _, given = start_config(groups["gates"], start, given_fields(flags, gates, RECOMMENDED))
    keep = start.folder is not None and not given & FALLBACK_FIELDS  # a folder's own fallbacks, kept
    if not keep and not cfg.has_fallback:
        raise GateSkipError("gateskip fit needs a fallback to fit: pass --fallback mean, lowrank or linear "
                            "(--fallback-mlp neurons too)")
    if save_dtype not in SAVE_DTYPES:  # fail now, not after the fit
        raise GateSkipError(f"unknown --save-dtype {save_dtype!r}: choose from {', '.join(SAVE_DTYPES)}")
    scopes = _scopes(cmp.compare_scopes, cfg.modules)
    t0 = time.perf_counter()
    TextArgs(data=data, chat_texts=chat_texts)  # checks them as gateskip train does
    check_gate_target(gate_target, fit_budget or start.fit_ratio)  # fail now, not after a fit
    net, tok, cal, summary, data = _fitted(model, cfg, given, start, keep, data, chat_texts, seq_len, batch_size,
                                           ridge, gate_ridge, fit_gates, under_ratio, fit_budget,
                                           {"gate_target": gate_target, "horizon": cmp.oracle_horizon})
    st = gate_state(net)
    allocs = _allocations(net, cal, alloc, seq_len, summary, t0)
    targets = list(allocs)
    cal_ratio = allocs[targets[len(targets) // 2]] if allocs else summary.get("sequential", {}).get("ratio", 0.3)
    measure_only = keep and not fit_gates and "sequential" not in summary
    if not (measure_only and st.loaded.calibration is not None):  # a folder only measured keeps its own thresholds
        calibrate(net, cal[: min(4, len(cal))], ratio=cal_ratio)
    fb = st.cfg
    save_gates(net, out, dtype=save_dtype, extra_meta={"fit": {
        "command": "gateskip fit", "fallback": "keep" if keep else fb.fallback, "fallback_rank": fb.fallback_rank,
        "fit_gates": bool(fit_gates), "gate_target": gate_target, "batches": start.fallback_batches,
        "seq_len": seq_len, "batch_size": batch_size, "under_ratio": under_ratio, "data": data}})
    for t, r in allocs.items():
        atomic_write(Path(out, f"alloc_{t:g}.json"), lambda p, r=r: Path(p).write_text(json.dumps(r, indent=0)))
    _compare(net, tok, cal, cmp, scopes, allocs, data, seq_len, batch_size, out, summary)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write(Path(out, "fit.json"), lambda p: Path(p).write_text(json.dumps(summary, indent=1)))
    print(f"[gateskip fit] wrote {out} in {summary['seconds'] / 60:.1f} min")
    return summary


def _fitted(model, cfg, given, start, keep, data, chat_texts, seq_len, batch_size, ridge, gate_ridge, fit_gates,
            under_ratio, fit_budget, target: dict) -> tuple:
    """(model, tokenizer, calibration batches, summary, the text source): the gates (new or the folder's) with their
    fallbacks and gates fitted in closed form (``gatefit.fit_closed_form``). A ``chat`` part of ``data`` is resolved
    to the model's own answers (``chat.resolve_chat_source``)."""
    from gateskip.chat import resolve_chat_source
    from gateskip.checkpoint import load_gates, read_meta
    from gateskip.core import add_gates, gate_state
    from gateskip.data import fixed_batches, load_texts
    from gateskip.gatefit import fit_closed_form
    from gateskip.models import load_model

    if start.folder:
        model = read_meta(start.folder)["base_model"].get("source") or model
    net, tok = load_model(model)
    # the model's own chat answers are made before any gates are added (as `gateskip train --data chat` does)
    data = resolve_chat_source(data, net, tok, model, n=chat_texts,
                               log=lambda line: print(f"[gateskip fit] {line}", flush=True))
    if start.folder:
        load_gates(net, start.folder)
    else:
        add_gates(net, fit_ranks(cfg, net, given))
    st = gate_state(net)
    if keep and not st.cfg.has_fallback:
        raise GateSkipError(f"--init {start.folder!r} has no fallback (zero) to keep: pass --fallback lowrank (or "
                            "mean, linear) to fit one")
    fb = st.cfg if keep or not start.folder else fit_ranks(cfg, net, given)
    cal = fixed_batches(tok, load_texts(data, "train"), seq_len, batch_size, start.fallback_batches)
    plan = {"ratio": under_ratio, "policy": "random", "kv": st.cfg.kv} if under_ratio > 0 else None
    under = start.fit_ratio
    if fit_budget:
        from gateskip.allocate import read_budget

        under = read_budget(fit_budget)
    summary = fit_closed_form(net, cal, fallback="keep" if keep else fb.fallback, fallback_rank=fb.fallback_rank,
                              ridge=ridge, gate_ridge=gate_ridge, fit_gates=fit_gates, under_plan=plan,
                              sequential=under, sequential_batches=start.fallback_batches,
                              fallback_mlp=None if keep else fb.fallback_mlp,
                              fallback_neurons=None if keep else fb.fallback_neurons,
                              fallback_rank_mlp=None if keep else fb.fallback_rank_mlp, **target,
                              log=lambda line: print(f"[gateskip fit] {line}", flush=True))
    if keep:
        summary["fallback"]["kept"] = start.folder
    return net, tok, cal, summary, data


def _allocations(net, cal, alloc: AllocateArgs, seq_len: int, summary: dict, t0: float) -> dict:
    """``--allocate``: per target, the per-branch ratios that reach it (sensitivity kept in ``summary``)."""
    targets = as_list(alloc.allocate, float, "--allocate")
    if not targets:
        return {}
    from gateskip.allocate import allocate as spread
    from gateskip.allocate import dense_per_token, saved_per_token, sensitivity

    sens = sensitivity(net, cal[:alloc.sens_batches], steps=as_list(alloc.sens_steps, float, "--sens-steps"))
    saved, dense = saved_per_token(net, context=seq_len / 2), dense_per_token(net, context=seq_len / 2)
    summary["sensitivity"] = sens
    allocs = {t: spread(sens, saved, dense, t) for t in targets}
    print(f"[gateskip fit] allocations for {', '.join(f'{t:g}' for t in targets)} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return allocs


def _compare(net, tok, cal, cmp: CompareArgs, scopes, allocs: dict, data, seq_len, batch_size, out,
             summary: dict) -> None:
    """The held-out comparison (random / gates / oracle per scope, ratio and allocation; static baselines),
    in ``summary["compare"]`` and OUT/compare.md."""
    from gateskip.data import fixed_batches, load_texts

    allocs = dict(allocs)
    if as_list(cmp.compare_budgets):
        from gateskip.allocate import read_budget

        for f in as_list(cmp.compare_budgets, str, "--compare-budgets"):
            allocs[Path(f).stem] = read_budget(f)
    ratios = as_list(cmp.compare, float, "--compare")
    layers = as_list(cmp.baselines, int, "--baselines")
    if not (ratios or allocs or layers):
        return
    held = fixed_batches(tok, load_texts(cmp.compare_data or data, "heldout"), seq_len, batch_size,
                         cmp.compare_batches)
    score = held_out_score(net, held, cmp.compare_metric)
    summary["compare"] = compare_choices(net, held, ratios, scopes=scopes, allocs=allocs,
                                         gates_policy=cmp.compare_policy, score=score,
                                         scored_oracle=cmp.scored_oracle, oracle_horizon=cmp.oracle_horizon)
    summary["compare"]["data"] = cmp.compare_data or data
    if layers:
        summary["compare"]["baselines"] = static_baselines(net, cal, held, layers, score=score)
    md = compare_markdown(summary["compare"])
    atomic_write(Path(out, "compare.md"), lambda p: Path(p).write_text(md))
    print(md)


def _scopes(compare_scopes, gated) -> dict[str, tuple[str, ...]]:
    """The --compare scopes: the ones named, or each gated kind (and both when both are gated)."""
    names = as_list(compare_scopes, str, "--compare-scopes") if compare_scopes is not None else \
        [*gated, *(["both"] if len(gated) > 1 else [])]
    scopes = {k: SCOPES.get(k) for k in names}
    if None in scopes.values() or not scopes:
        raise GateSkipError(f"--compare-scopes {compare_scopes!r}: choose from {', '.join(SCOPES)}, comma-separated")
    return scopes


CHOICES = ("random", "gates", "oracle")
METRICS = ("ce", "kl")
SCOPES = {"attn": ("attn",), "mlp": ("mlp",), "both": ("attn", "mlp")}


def held_out_score(net, held, metric: str = "ce"):
    """A zero-argument function scoring ``net`` as it runs now on ``held`` (lower is better): next-token CE, or
    KL(dense || net) per token against the base model's log-probabilities, computed once here (with the
    gates off and, for a healed folder, the original backbone). ``score.metric`` names it, ``score.dense`` is
    the base model's value."""
    from gateskip.core import original_backbone
    from gateskip.heldout import language_ce, language_kl, reference_logprobs

    if metric not in METRICS:
        raise GateSkipError(f"unknown metric {metric!r}: choose {' or '.join(METRICS)}")
    with original_backbone(net):
        if metric == "ce":
            dense = language_ce(net, held)
        else:
            ref, dense = reference_logprobs(net, held), 0.0

    def score(each=None) -> float:
        return language_ce(net, held, each) if metric == "ce" else language_kl(net, held, ref, each)

    score.metric, score.dense = metric, dense
    return score


def compare_choices(net, held, ratios, scopes=SCOPES, seed: int = 0, allocs: dict | None = None,
                    gates_policy: str = "quantile", score=None, scored_oracle: str = "",
                    oracle_horizon: int = 32) -> dict:
    """Held-out CE (or ``score``'s metric, from ``held_out_score``): dense, and per scope and ratio the three ways of choosing tokens with the model's fallback.

    Gates and oracle skip exactly ``ratio`` of the eligible tokens of each branch in scope, per batch (quantile
    ranking of gate importances or of the oracle's residual norms); random skips each token with probability
    ``ratio``. The oracle keeps skipped tokens' own K/V (kv="compute"); the others use the gates' kv mode.
    ``allocs``: {target: per-branch ratios} compared the same way (scope ``alloc <target>``). ``gates_policy``
    "threshold": the gates rows use the calibrated thresholds instead (causal; the ratio skipped follows the
    text, so read those rows at matched compute, not at matched ratio). ``scored_oracle`` (fisher or marginal): a fourth
    choice, "scored", the oracle that ranks by each token's measured effect on the outputs (oracle_scores.py);
    ``scored_gap_closed`` is the gates' share of the random-to-scored gap; ``oracle_horizon``: the marginal one's."""
    from tqdm.auto import tqdm

    from gateskip.core import skipping, stats

    score = score or held_out_score(net, held)  # the dense value is the base model's (original backbone)
    res = {"metric": score.metric, "dense": score.dense, "rows": []}
    settings = [(scope, modules, r, r) for scope, modules in scopes.items() for r in ratios]
    settings += [(f"alloc {t:g}" if isinstance(t, float) else t, ("attn", "mlp"), t, a) for t, a in (allocs or {}).items()]
    if scored_oracle:
        res["scored_oracle"] = scored_oracle if scored_oracle == "fisher" else f"{scored_oracle} (horizon {oracle_horizon})"
    choices = CHOICES + (("scored",) if scored_oracle else ())
    each = _scored_batches(net, held, scored_oracle, seed, oracle_horizon) if scored_oracle else None
    bar = tqdm(total=len(settings) * len(choices), desc=f"held-out {score.metric.upper()}", unit="setting")
    for scope, modules, label, ratio in settings:
        row = {"scope": scope, "ratio": label}
        for choice in choices:
            policy = {"random": "random", "gates": gates_policy, "oracle": "oracle", "scored": "oracle_given"}[choice]
            with skipping(net, ratio=ratio, policy=policy, modules=modules, seed=seed,
                          kv="compute" if choice in ("oracle", "scored") else None):
                row[choice] = score(each if choice == "scored" else None)
                row[f"{choice}_saved"] = stats(net)["compute_saved"]
            bar.update(1)
        for ceiling, key in (("oracle", "gap_closed"), ("scored", "scored_gap_closed")):
            if ceiling in row:
                gap = row["random"] - row[ceiling]
                row[key] = (row["random"] - row["gates"]) / gap if gap > 0 else None
        res["rows"].append(row)
    bar.close()
    return res


def _scored_batches(net, held, scorer: str, seed: int, horizon: int):
    """The scored oracle's scores of every held-out batch (measured once), as ``each(i)`` for the score functions:
    a context that installs batch i's."""
    from gateskip.oracle_scores import fisher_scores, given_scores, marginal_scores

    scores = [fisher_scores(net, ids, seed=seed + i) if scorer == "fisher" else marginal_scores(net, ids, horizon)
              for i, ids in enumerate(held)]
    return lambda i: given_scores(net, scores[i])


def static_baselines(net, cal, held, layers, score=None) -> list[dict]:
    """Held-out CE (or ``score``'s metric) of ShortGPT and ShortGPT + linear replacement at each layer count.
    Removes ``net``'s gates (call it last: the gates folder is saved already)."""
    from gateskip.baselines.shortgpt import block_influence, least_influential, linear_replaced, pruned
    from gateskip.core import remove_gates, skipping, stats
    from gateskip.flopcount import TokenCounter

    score = score or held_out_score(net, held)
    remove_gates(net)
    bi = block_influence(net, cal)
    order = least_influential(bi, len(bi))
    rows = []
    for n in layers:
        drop = sorted(order[:n])
        counter = TokenCounter(net)
        with pruned(net, drop), counter:
            value = score()
        rows.append({"method": "shortgpt", "layers": n, score.metric: value, "saved": counter.stats(drop)["compute_saved"]})
        with linear_replaced(net, drop, cal) as (plan, _fit), skipping(net, **plan):
            value = score()
            saved = stats(net)["compute_saved"]
        rows.append({"method": "shortgpt+linear", "layers": n, score.metric: value, "saved": saved})
    return rows


def compare_markdown(res: dict) -> str:
    metric = res.get("metric", "ce")
    name = "next-token CE" if metric == "ce" else "KL(dense || setting) per token"
    what = f"dense {res['dense']:.3f}" if metric == "ce" else "the dense model scores 0"
    src = f" on held-out `{res['data']}`" if res.get("data") else ""
    scored = res.get("scored_oracle")
    out = [f"Held-out {name}{src} ({what}); each branch in scope skips the ratio of its tokens "
           "per batch; gap closed = (random - gates) / (random - oracle)"
           + (f" (the residual oracle; then of the {scored} oracle's gap, oracle_scores.py)" if scored else "")
           + ".", "",
           "| scope | ratio | random | gates | oracle | " + (f"{scored} oracle | " if scored else "") + "gap closed | "
           + (f"of {scored}'s | " if scored else "") + "compute saved (gates) |",
           "|---|---|---|---|---|---|---|" + ("---|---|" if scored else "")]
    for r in res["rows"]:
        ratio = f"{r['ratio']:g}" if isinstance(r["ratio"], float) else "file"
        f_cols = f"{r['scored']:.3f} | " if scored else ""
        gc = _share(r["gap_closed"]) + (f" | {_share(r.get('scored_gap_closed'))}" if scored else "")
        out.append(f"| {r['scope']} | {ratio} | {r['random']:.3f} | {r['gates']:.3f} | {r['oracle']:.3f} | {f_cols}"
                   f"{gc} | {100 * r['gates_saved']:.1f}% |")
    if res.get("baselines"):
        out += ["", "Static baselines on the same text:", "", f"| method | layers removed | {metric.upper()} | compute saved |",
                "|---|---|---|---|"]
        for r in res["baselines"]:
            out.append(f"| {r['method']} | {r['layers']} | {r[metric]:.3f} | {100 * r['saved']:.1f}% |")
    curves = matched_ce(res)
    if any(v is not None for c in curves.values() for v in c.values()):
        levels = sorted({lv for c in curves.values() for lv in c})
        out += ["", f"At matched compute (each method's {metric.upper()} interpolated linearly between its measured points with every "
                "branch in scope, never extrapolated; - : outside its measured range):", "",
                "| method | " + " | ".join(f"{100 * lv:.0f}% saved" for lv in levels) + " |",
                "|---" * (len(levels) + 1) + "|"]
        for m, c in curves.items():
            out.append(f"| {m} | " + " | ".join("-" if c[lv] is None else f"{c[lv]:.3f}" for lv in levels) + " |")
    return "\n".join(out) + "\n"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def matched_ce(res: dict, levels=(0.1, 0.2, 0.3, 0.4)) -> dict[str, dict[float, float | None]]:
    """Held-out CE of each way of choosing at fixed levels of compute saved: gates, random and oracle over the
    rows where every branch skips (scope ``both`` and allocations), and the static baselines."""
    from gateskip.eval.paired import interpolate

    rows = [r for r in res["rows"] if r["scope"] == "both" or r["scope"] not in SCOPES]
    points = {f"{c} (same fallback)" if c != "gates" else "gateskip (fitted gates)":
              [(r[f"{c}_saved"], r[c]) for r in rows] for c in CHOICES}
    for b in res.get("baselines") or []:
        points.setdefault(b["method"], []).append((b["saved"], b[res.get("metric", "ce")]))
    return {m: {lv: interpolate(p, lv) for lv in levels} for m, p in points.items() if p}

