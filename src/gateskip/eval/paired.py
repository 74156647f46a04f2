"""Comparing skipping methods at matched compute: above-chance retention, curves interpolated at a
compute-saved level, and a paired (item-level) bootstrap for "who wins".

Pure numpy on plain dicts, so sweep results can be re-analysed from JSON without a model. A row is
``{"method", "budget", "compute_saved", "tasks": {task: {"correct": [...], "chance": float}}}``; the
dense row has method ``"dense"``. Every row scores the same items of a task in the same order, which is
what makes the bootstrap paired: the same resampled items are used for every method and for dense.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Row = dict
Scores = dict[str, np.ndarray]
_EPS = 1e-12  # tolerance on the measured range (compute_saved comes from float FLOP ratios)


def retention(acc: float, dense: float, chance: float) -> float:
    """Above-chance retention (acc - chance) / (dense - chance): 1 = as good as dense, 0 = chance.
    Raw accuracy ratios flatter methods on tasks near chance; this does not."""
    if dense <= chance:
        raise ValueError(f"retention undefined: dense accuracy {dense:g} is not above chance {chance:g}")
    return (acc - chance) / (dense - chance)


def suite_retention(accs: dict[str, float], dense: dict[str, float], chance: dict[str, float]) -> float:
    """Mean per-task retention, so each task counts equally whatever its size or chance level."""
    return float(np.mean([retention(accs[t], dense[t], chance[t]) for t in sorted(dense)]))


def _bracket(xs: Sequence[float], level: float) -> list[tuple[int, float]] | None:
    """Indices into sorted unique ``xs`` and linear weights at ``level``; None outside [xs[0], xs[-1]]."""
    if not xs or level < xs[0] - _EPS or level > xs[-1] + _EPS:
        return None
    level = min(max(level, xs[0]), xs[-1])
    for j, x in enumerate(xs):
        if abs(x - level) <= _EPS:
            return [(j, 1.0)]
        if x > level:
            t = (level - xs[j - 1]) / (x - xs[j - 1])
            return [(j - 1, 1.0 - t), (j, t)]
    return None  # unreachable: level is clamped into range


def interpolate(points: Sequence[tuple[float, float]], level: float) -> float | None:
    """Piecewise-linear value of a curve at ``level`` (compute saved); None outside the measured
    range, because extrapolating a method's curve would credit it with settings never run."""
    groups: dict[float, list[float]] = {}
    for x, v in points:
        groups.setdefault(float(x), []).append(float(v))
    xs = sorted(groups)
    br = _bracket(xs, level)
    if br is None:
        return None
    return float(sum(w * np.mean(groups[xs[j]]) for j, w in br))


def weights_at(rows_of_method: Sequence[Row], level: float) -> list[tuple[int, float]] | None:
    """The bracketing rows (indices into ``rows_of_method``) and weights summing to 1, so that
    sum(w * correct) is the item-level score at ``level``. Rows with equal compute_saved share their
    weight equally (their mean). None outside the measured range."""
    groups: dict[float, list[int]] = {}
    for i, r in enumerate(rows_of_method):
        groups.setdefault(float(r["compute_saved"]), []).append(i)
    xs = sorted(groups)
    br = _bracket(xs, level)
    if br is None:
        return None
    return [(i, w / len(groups[xs[j]])) for j, w in br if w > 0 for i in groups[xs[j]]]


def _correct(row: Row) -> Scores:
    return {t: np.asarray(v["correct"], dtype=float) for t, v in row["tasks"].items()}


def item_scores_at(rows: Sequence[Row], level: float) -> Scores | None:
    """Per-item scores of one method at ``level``: the weighted mix of its two bracketing rows."""
    ws = weights_at(rows, level)
    if ws is None:
        return None
    tasks = rows[ws[0][0]]["tasks"]
    return {t: sum(w * _correct(rows[i])[t] for i, w in ws) for t in tasks}


def _resample(methods: Sequence[Scores], dense: Scores, chance: dict[str, float], iters: int,
              seed: int) -> tuple[np.ndarray, int]:
    """Suite retention of each method per kept resample (shape [kept, len(methods)]) and the number
    skipped. Per iteration, tasks in sorted order, one ``rng.integers(0, n, n)`` per task; the same
    indices serve every method and dense (paired). A resample whose dense mean is not above chance
    on some task has undefined retention and is skipped (the stream is still consumed)."""
    tasks = sorted(dense)
    dense = {t: np.asarray(v, dtype=float) for t, v in dense.items()}  # rows from JSON hold lists
    methods = [{t: np.asarray(v, dtype=float) for t, v in m.items()} for m in methods]
    for m in methods:
        if set(m) != set(tasks):
            raise ValueError(f"task sets differ: {sorted(m)} vs {tasks}")
        for t in tasks:
            if len(m[t]) != len(dense[t]):
                raise ValueError(f"task {t}: {len(m[t])} items vs {len(dense[t])} in dense (not paired)")
    rng = np.random.default_rng(seed)
    out, skipped = [], 0
    for _ in range(iters):
        rets = np.zeros((len(tasks), len(methods)))
        ok = True
        for k, t in enumerate(tasks):
            n = len(dense[t])
            idx = rng.integers(0, n, n)
            d = float(dense[t][idx].mean()) - chance[t]
            if d <= 0:
                ok = False
                continue
            rets[k] = [(float(m[t][idx].mean()) - chance[t]) / d for m in methods]
        if ok:
            out.append(rets.mean(axis=0))
        else:
            skipped += 1
    if not out:
        raise ValueError("every bootstrap resample had a task with dense accuracy at or below chance")
    return np.asarray(out), skipped


def _suite(scores: Scores, dense: Scores, chance: dict[str, float]) -> float:
    return suite_retention({t: float(np.mean(scores[t])) for t in dense},
                           {t: float(np.mean(dense[t])) for t in dense}, chance)


def paired_bootstrap(a: Scores, b: Scores, dense: Scores, chance: dict[str, float], iters: int = 2000,
                     seed: int = 0, alpha: float = 0.05) -> dict:
    """Suite retention of ``a`` minus ``b`` with a paired percentile interval. Pairing removes the
    item-difficulty variance the two methods share, so small but consistent gaps are detectable."""
    diff = _suite(a, dense, chance) - _suite(b, dense, chance)
    rets, skipped = _resample([a, b], dense, chance, iters, seed)
    d = rets[:, 0] - rets[:, 1]
    lo, hi = (float(x) for x in np.percentile(d, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    return {"diff": diff, "lo": lo, "hi": hi, "excludes_zero": lo > 0 or hi < 0,
            "p_le_zero": float(np.mean(d <= 0)), "iters": iters, "seed": seed, "skipped": skipped}


def retention_interval(a: Scores, dense: Scores, chance: dict[str, float], iters: int = 2000, seed: int = 0,
                       alpha: float = 0.05) -> dict:
    """One method's suite retention and its bootstrap band (resampling items, dense resampled too)."""
    rets, _ = _resample([a], dense, chance, iters, seed)
    lo, hi = (float(x) for x in np.percentile(rets[:, 0], [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    return {"value": _suite(a, dense, chance), "lo": lo, "hi": hi}


def _chance(row: Row) -> dict[str, float]:
    return {t: float(v["chance"]) for t, v in row["tasks"].items()}


def _by_method(rows: Sequence[Row]) -> tuple[Row, dict[str, list[Row]]]:
    """The dense row and the other rows grouped by method (in order of first appearance)."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense is None:
        raise ValueError("no dense row: retention needs the dense reference")
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r["method"] != "dense":
            groups.setdefault(r["method"], []).append(r)
    return dense, groups


def curve(rows_of_method: Sequence[Row], dense_row: Row, iters: int = 2000, seed: int = 0) -> list[dict]:
    """Per measured row (by compute saved): suite retention and its 95% band, for plotting."""
    dense, chance = _correct(dense_row), _chance(dense_row)
    out = []
    for r in sorted(rows_of_method, key=lambda r: r["compute_saved"]):
        ri = retention_interval(_correct(r), dense, chance, iters, seed)
        out.append({"compute_saved": float(r["compute_saved"]), "retention": ri["value"],
                    "lo": ri["lo"], "hi": ri["hi"]})
    return out


def who_wins(rows: Sequence[Row], levels: Sequence[float] = (0.10, 0.20, 0.30, 0.40),
             reference: str = "gateskip", iters: int = 2000, seed: int = 0) -> list[dict]:
    """Reference minus each other method at each matched compute level, with a paired bootstrap.
    The winner is only declared when the 95% interval excludes zero; otherwise "tie". Levels outside
    either measured curve get diff/winner None rather than an extrapolated verdict."""
    dense_row, groups = _by_method(rows)
    if reference not in groups:
        raise ValueError(f"reference method {reference!r} not in rows ({sorted(groups)})")
    dense, chance = _correct(dense_row), _chance(dense_row)
    out = []
    for method, mrows in groups.items():
        if method == reference:
            continue
        for level in levels:
            entry: dict = {"level": level, "method": method, "reference": reference}
            ref_s, m_s = item_scores_at(groups[reference], level), item_scores_at(mrows, level)
            if ref_s is None or m_s is None:
                entry.update(diff=None, lo=None, hi=None, excludes_zero=None, winner=None,
                             note="out of measured range")
            else:
                bs = paired_bootstrap(ref_s, m_s, dense, chance, iters=iters, seed=seed)
                winner = reference if bs["lo"] > 0 else method if bs["hi"] < 0 else "tie"
                entry.update(diff=bs["diff"], lo=bs["lo"], hi=bs["hi"], excludes_zero=bs["excludes_zero"],
                             winner=winner)
            out.append(entry)
    return out


def brackets(methods) -> dict[str, tuple[str, str]]:
    """``{method: (floor, ceiling)}`` for every gated method whose references are in ``methods``: random choice
    and the oracle with the same machinery (``gateskip+X`` -> ``random+X``, ``oracle+X``)."""
    methods = list(methods)
    out = {}
    for m in methods:
        if m == "gateskip" or m.startswith("gateskip+"):
            rest = m[len("gateskip"):]
            if f"random{rest}" in methods and f"oracle{rest}" in methods:
                out[m] = (f"random{rest}", f"oracle{rest}")
    return out


def gap_closed(rows: Sequence[Row], levels: Sequence[float], iters: int = 2000, seed: int = 0,
               alpha: float = 0.05) -> list[dict]:
    """For every gated method with a floor and a ceiling (``brackets``), at each level where all three curves
    were measured: their suite retentions and the share of the floor-to-ceiling gap the method closes,
    ``(method - floor) / (ceiling - floor)``, with a paired percentile interval (the same item resamples for
    the three; resamples where the ceiling is not above the floor are left out of it). None outside a range."""
    dense_row, groups = _by_method(rows)
    dense, chance = _correct(dense_row), _chance(dense_row)
    out = []
    for method, (lo_m, hi_m) in brackets(groups).items():
        for level in levels:
            entry: dict = {"method": method, "floor": lo_m, "ceiling": hi_m, "level": level}
            s = [item_scores_at(groups[x], level) for x in (method, lo_m, hi_m)]
            if any(x is None for x in s):
                out.append({**entry, "value": None})
                continue
            v, f, c = (_suite(x, dense, chance) for x in s)
            rets, _ = _resample(s, dense, chance, iters, seed)
            span = rets[:, 2] - rets[:, 1]
            ok = span > 0
            shares = (rets[ok, 0] - rets[ok, 1]) / span[ok]
            lo, hi = ((float(x) for x in np.percentile(shares, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
                      if ok.any() else (None, None))
            out.append({**entry, "method_retention": v, "floor_retention": f, "ceiling_retention": c,
                        "value": (v - f) / (c - f) if c > f else None, "lo": lo, "hi": hi})
    return out


def task_matched(rows: Sequence[Row], levels: Sequence[float]) -> dict[str, dict[str, dict[float, float | None]]]:
    """Each non-dense method's accuracy on each task at each compute level measured on that task's own text
    (a task whose text is skipped more than the suite's at the same ratio is compared at its own compute, not
    the suite's); None outside the method's measured range on that task, or where a row did not record the
    task's compute (runs before per-task compute was kept)."""
    _, groups = _by_method(rows)
    out: dict[str, dict[str, dict[float, float | None]]] = {}
    for method, mrows in groups.items():
        out[method] = {}
        for t in mrows[0]["tasks"]:
            pts = [(r["tasks"][t].get("compute_saved"), r["tasks"][t]["acc"]) for r in mrows]
            ok = all(x is not None for x, _ in pts)
            out[method][t] = {lv: interpolate(pts, lv) if ok else None for lv in levels}
    return out


def matched_table(rows: Sequence[Row], levels: Sequence[float]) -> dict[str, dict[float, float | None]]:
    """Each non-dense method's suite retention at each compute level (per-task accuracies mixed with
    weights_at, then retention against the dense row); None outside the method's measured range."""
    dense_row, groups = _by_method(rows)
    dense_acc = {t: float(np.mean(v)) for t, v in _correct(dense_row).items()}
    chance = _chance(dense_row)
    table: dict[str, dict[float, float | None]] = {}
    for method, mrows in groups.items():
        accs = [{t: float(np.mean(v)) for t, v in _correct(r).items()} for r in mrows]
        table[method] = {}
        for level in levels:
            ws = weights_at(mrows, level)
            table[method][level] = None if ws is None else suite_retention(
                {t: sum(w * accs[i][t] for i, w in ws) for t in dense_acc}, dense_acc, chance)
    return table


GEN_KEYS = ("kl", "agree_next", "agree_tokens")


def _prompt_scores_at(rows_of_method: Sequence[Row], level: float) -> dict[str, np.ndarray] | None:
    """Per-prompt fidelity of one method at ``level`` of compute saved while generating: the weighted mix of
    its bracketing rows (rows without per-prompt fidelity or generation compute are left out); None outside
    the measured range."""
    fr = [r["fidelity"] for r in rows_of_method
          if (r.get("fidelity") or {}).get("per_prompt") and r["fidelity"].get("gen_compute_saved") is not None]
    ws = weights_at([{"compute_saved": f["gen_compute_saved"]} for f in fr], level)
    if ws is None:
        return None
    return {k: sum(w * np.asarray(fr[i]["per_prompt"][k], dtype=float) for i, w in ws) for k in GEN_KEYS}


def generation_matched(rows: Sequence[Row], level: float, reference: str | None = None, iters: int = 2000,
                       seed: int = 0, alpha: float = 0.05) -> dict:
    """Generation fidelity of each non-dense method at ``level`` of compute saved on the generation itself
    (interpolated per prompt between bracketing rows), and the reference's agreement as a multiple of each
    other method's, with a percentile interval from resampling prompts (paired: every row generated from the
    same prompts). Methods whose rows lack per-prompt fidelity, or whose range misses ``level``, get None."""
    _, groups = _by_method(rows)
    at = {m: _prompt_scores_at(mrows, level) for m, mrows in groups.items()}
    out: dict = {"level": level, "reference": reference,
                 "methods": {m: None if s is None else {k: float(v.mean()) for k, v in s.items()} | {"prompts": len(s["kl"])}
                             for m, s in at.items()},
                 "ratios": {}}
    ref = at.get(reference) if reference else None
    if ref is None:
        return out
    rng = np.random.default_rng(seed)
    n = len(ref["kl"])
    idx = rng.integers(0, n, size=(iters, n))
    for m, s in at.items():
        if m == reference or s is None or len(s["kl"]) != n:
            continue
        cell = {}
        for k in ("agree_next", "agree_tokens"):
            a, b = ref[k][idx].mean(1), s[k][idx].mean(1)
            ok = b > 0
            r = a[ok] / b[ok]
            lo, hi = (float(x) for x in np.percentile(r, [100 * alpha / 2, 100 * (1 - alpha / 2)])) if ok.any() \
                else (None, None)
            cell[k] = {"ratio": float(ref[k].mean() / s[k].mean()) if s[k].mean() > 0 else None, "lo": lo, "hi": hi}
        out["ratios"][m] = cell
    return out
