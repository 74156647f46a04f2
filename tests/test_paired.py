"""Matched-compute statistics (gateskip.eval.paired): retention, interpolation, paired bootstrap."""

import numpy as np
import pytest

from gateskip.eval.paired import (
    brackets,
    curve,
    gap_closed,
    interpolate,
    item_scores_at,
    matched_table,
    paired_bootstrap,
    retention,
    retention_interval,
    suite_retention,
    task_matched,
    weights_at,
    who_wins,
)


def _row(method, saved, tasks, chance=0.25, budget=""):
    return {"method": method, "budget": budget, "compute_saved": saved,
            "tasks": {t: {"correct": list(c), "chance": chance} for t, c in tasks.items()}}


# ---------------------------------------------------------------- retention

def test_retention_hand_computed():
    assert retention(0.4, 0.5, 0.25) == pytest.approx(0.6)
    assert retention(0.5, 0.5, 0.25) == pytest.approx(1.0)
    assert retention(0.25, 0.5, 0.25) == pytest.approx(0.0)
    # task x: (0.4-0.25)/(0.5-0.25) = 0.6; task y: (0.7-0.5)/(0.9-0.5) = 0.5 -> mean 0.55
    s = suite_retention({"x": 0.4, "y": 0.7}, {"x": 0.5, "y": 0.9}, {"x": 0.25, "y": 0.5})
    assert s == pytest.approx(0.55)


@pytest.mark.parametrize("dense", [0.25, 0.2])
def test_retention_undefined_when_dense_not_above_chance(dense):
    with pytest.raises(ValueError, match="not above chance"):
        retention(0.3, dense, 0.25)
    with pytest.raises(ValueError):
        suite_retention({"x": 0.3}, {"x": dense}, {"x": 0.25})


# ---------------------------------------------------------------- interpolation

def test_interpolate_between_exact_outside_unsorted():
    pts = [(0.3, 0.5), (0.1, 0.9), (0.2, 0.8)]  # unsorted on purpose
    assert interpolate(pts, 0.15) == pytest.approx(0.85)
    assert interpolate(pts, 0.25) == pytest.approx(0.8 + 0.5 * (0.5 - 0.8))  # 0.65
    assert interpolate(pts, 0.27) == pytest.approx(0.8 + 0.7 * (0.5 - 0.8))  # 0.59
    assert interpolate(pts, 0.2) == pytest.approx(0.8)
    assert interpolate(pts, 0.1) == pytest.approx(0.9)
    assert interpolate(pts, 0.3) == pytest.approx(0.5)
    assert interpolate(pts, 0.05) is None
    assert interpolate(pts, 0.31) is None
    assert interpolate([], 0.1) is None


def test_interpolate_duplicate_compute_saved_uses_mean():
    pts = [(0.0, 1.0), (0.2, 0.6), (0.2, 0.8)]
    assert interpolate(pts, 0.2) == pytest.approx(0.7)
    assert interpolate(pts, 0.1) == pytest.approx(0.85)


def test_weights_and_item_scores_hand_computed():
    rows = [_row("m", 0.3, {"t": [0, 0, 1, 0]}), _row("m", 0.1, {"t": [1, 1, 0, 0]})]
    ws = weights_at(rows, 0.15)  # 3/4 of the way from 0.3 back to 0.1 -> w(0.1)=0.75, w(0.3)=0.25
    assert sorted(ws) == [(0, pytest.approx(0.25)), (1, pytest.approx(0.75))]
    assert sum(w for _, w in ws) == pytest.approx(1.0)
    np.testing.assert_allclose(item_scores_at(rows, 0.15)["t"], [0.75, 0.75, 0.25, 0.0])
    np.testing.assert_allclose(item_scores_at(rows, 0.3)["t"], [0, 0, 1, 0])
    assert weights_at(rows, 0.3) == [(0, 1.0)]
    assert weights_at(rows, 0.4) is None and item_scores_at(rows, 0.05) is None


def test_weights_duplicate_rows_share_weight():
    rows = [_row("m", 0.0, {"t": [1, 1]}), _row("m", 0.2, {"t": [1, 0]}), _row("m", 0.2, {"t": [0, 0]})]
    assert sorted(weights_at(rows, 0.2)) == [(1, 0.5), (2, 0.5)]
    np.testing.assert_allclose(item_scores_at(rows, 0.1)["t"], [0.5 * 1 + 0.5 * 0.5, 0.5 * 1 + 0.5 * 0.0])


# ---------------------------------------------------------------- bootstrap

def test_paired_bootstrap_three_valued_distribution():
    # chance 0, dense all ones -> retention = accuracy; diff of a resample is mean(a[idx]) in {0, .5, 1}
    a, b, dense = {"t": np.array([1.0, 0.0])}, {"t": np.array([0.0, 0.0])}, {"t": np.ones(2)}
    r = paired_bootstrap(a, b, dense, {"t": 0.0}, iters=4000, seed=1)
    assert r["diff"] == pytest.approx(0.5)
    assert (r["lo"], r["hi"]) == (0.0, 1.0)
    assert r["p_le_zero"] == pytest.approx(0.25, abs=0.03)
    assert not r["excludes_zero"] and r["iters"] == 4000 and r["seed"] == 1 and r["skipped"] == 0


def _replay(a, b, dense, chance, iters, seed, alpha=0.05):
    """The specified stream, written out by hand: per iteration, sorted tasks, integers(0, n, n)."""
    rng = np.random.default_rng(seed)
    diffs, skipped = [], 0
    for _ in range(iters):
        ra, rb, bad = [], [], False
        for t in sorted(dense):
            n = len(dense[t])
            idx = rng.integers(0, n, n)
            den = np.mean([dense[t][i] for i in idx]) - chance[t]
            if den <= 0:
                bad = True
                continue
            ra.append((np.mean([a[t][i] for i in idx]) - chance[t]) / den)
            rb.append((np.mean([b[t][i] for i in idx]) - chance[t]) / den)
        if bad:
            skipped += 1
        else:
            diffs.append(sum(ra) / len(ra) - sum(rb) / len(rb))
    return np.percentile(diffs, [100 * alpha / 2, 100 * (1 - alpha / 2)]), np.mean(np.array(diffs) <= 0), skipped


def test_paired_bootstrap_reproduces_replayed_stream():
    a = {"y": [1, 1, 0], "x": [1, 0, 1, 1]}
    b = {"y": [0, 1, 0], "x": [1, 0, 0, 1]}
    dense = {"y": [1, 1, 1], "x": [1, 1, 0, 1]}
    chance = {"x": 0.25, "y": 0.5}
    arr = {k: {t: np.array(v, dtype=float) for t, v in d.items()} for k, d in (("a", a), ("b", b), ("d", dense))}
    r = paired_bootstrap(arr["a"], arr["b"], arr["d"], chance, iters=7, seed=3, alpha=0.2)
    (lo, hi), ple, skipped = _replay(a, b, dense, chance, iters=7, seed=3, alpha=0.2)
    assert r["lo"] == pytest.approx(lo, abs=1e-12) and r["hi"] == pytest.approx(hi, abs=1e-12)
    assert r["p_le_zero"] == pytest.approx(ple) and r["skipped"] == skipped
    assert lo < hi  # a non-degenerate interval, so the stream really matters
    # point estimate: a: x (.75-.25)/(.75-.25)=1, y (2/3-.5)/.5=1/3; b: x (.5-.25)/.5=.5, y (1/3-.5)/.5=-1/3
    assert r["diff"] == pytest.approx((1 + 1 / 3) / 2 - (0.5 - 1 / 3) / 2)  # 7/12


def test_bootstrap_skips_resamples_with_dense_at_chance():
    dense, a = {"t": np.array([1.0, 0.0])}, {"t": np.array([1.0, 1.0])}
    r = paired_bootstrap(a, a, dense, {"t": 0.0}, iters=400, seed=0)
    (_, _), _, skipped = _replay({"t": [1, 1]}, {"t": [1, 1]}, {"t": [1, 0]}, {"t": 0.0}, 400, 0)
    assert r["skipped"] == skipped and 50 < skipped < 150  # P(both items are the wrong one) = 1/4


def test_pairing_identical_methods_give_zero_interval():
    rng = np.random.default_rng(0)
    a = {t: rng.integers(0, 2, 30).astype(float) for t in ("p", "q")}
    dense = {t: np.ones(30) for t in ("p", "q")}
    r = paired_bootstrap(a, {t: v.copy() for t, v in a.items()}, dense, {"p": 0.25, "q": 0.5}, iters=300)
    assert (r["diff"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0)
    assert not r["excludes_zero"] and r["p_le_zero"] == 1.0


def test_retention_interval_brackets_value():
    rng = np.random.default_rng(0)
    a = {"t": (rng.random(200) < 0.6).astype(float)}
    dense = {"t": (rng.random(200) < 0.9).astype(float)}
    r = retention_interval(a, dense, {"t": 0.25}, iters=500, seed=0)
    assert r["value"] == pytest.approx((a["t"].mean() - 0.25) / (dense["t"].mean() - 0.25))
    assert r["lo"] < r["value"] < r["hi"] and r["hi"] - r["lo"] < 0.5


# ---------------------------------------------------------------- who wins / tables

def _suite_rows():
    n = 40
    ones, half = [1] * n, [1, 0] * (n // 2)
    return [
        _row("dense", 0.0, {"t": ones, "u": ones}),
        _row("gateskip", 0.1, {"t": ones, "u": ones}, budget="0.1"),
        _row("gateskip", 0.4, {"t": half, "u": half}, budget="0.4"),
        _row("weak", 0.1, {"t": half, "u": half}),
        _row("weak", 0.2, {"t": [0] * n, "u": half}),
        _row("same", 0.1, {"t": ones, "u": ones}),
        _row("same", 0.4, {"t": half, "u": half}),
        _row("strong", 0.05, {"t": ones, "u": ones}),
        _row("strong", 0.45, {"t": ones, "u": ones}),
    ]


def test_who_wins_winner_tie_and_out_of_range():
    res = who_wins(_suite_rows(), levels=(0.1, 0.3), iters=300, seed=0)
    got = {(e["method"], e["level"]): e for e in res}
    assert set(got) == {(m, lv) for m in ("weak", "same", "strong") for lv in (0.1, 0.3)}
    e = got[("weak", 0.1)]  # gateskip retention 1 vs weak (0.5-.25)/.75 = 1/3
    assert e["winner"] == "gateskip" and e["excludes_zero"] and e["lo"] > 0
    assert e["diff"] == pytest.approx(1 - 1 / 3) and e["reference"] == "gateskip"
    out = got[("weak", 0.3)]  # weak measured only up to 0.2
    assert out["diff"] is None and out["winner"] is None and out["note"] == "out of measured range"
    assert got[("same", 0.1)]["winner"] == "tie" and got[("same", 0.3)]["winner"] == "tie"
    assert got[("strong", 0.3)]["winner"] == "strong" and got[("strong", 0.3)]["hi"] < 0


def test_who_wins_needs_reference():
    with pytest.raises(ValueError, match="reference"):
        who_wins(_suite_rows(), reference="nope", iters=10)


def test_matched_table_and_curve():
    rows = _suite_rows()
    tab = matched_table(rows, levels=(0.1, 0.25, 0.5))
    assert "dense" not in tab
    assert tab["gateskip"][0.1] == pytest.approx(1.0)
    # at 0.25: halfway between acc 1 and acc .5 -> acc .75 -> (0.75-.25)/.75 = 2/3
    assert tab["gateskip"][0.25] == pytest.approx(2 / 3)
    assert tab["gateskip"][0.5] is None and tab["weak"][0.25] is None
    # weak at 0.2: t acc 0 -> -1/3, u acc .5 -> 1/3 -> mean 0
    assert matched_table(rows, levels=(0.2,))["weak"][0.2] == pytest.approx(0.0)
    pts = curve([r for r in rows if r["method"] == "gateskip"][::-1], rows[0], iters=100, seed=0)
    assert [p["compute_saved"] for p in pts] == [0.1, 0.4]
    assert pts[0]["retention"] == pytest.approx(1.0) and pts[1]["retention"] == pytest.approx(1 / 3)
    assert pts[1]["lo"] <= pts[1]["retention"] <= pts[1]["hi"]


def test_task_matched_reads_each_task_at_its_own_compute():
    def row(method, saved, per_task):  # per_task: {task: (compute saved on that task, acc)}
        r = _row(method, saved, {t: [1] for t in per_task})
        for t, (c, acc) in per_task.items():
            r["tasks"][t].update(compute_saved=c, acc=acc)
        return r

    rows = [row("dense", 0.0, {"mc": (0.0, 0.8), "lam": (0.0, 0.3)}),
            row("g", 0.1, {"mc": (0.08, 0.7), "lam": (0.15, 0.25)}),
            row("g", 0.3, {"mc": (0.28, 0.5), "lam": (0.45, 0.05)})]
    tab = task_matched(rows, [0.2, 0.4, 0.5])
    assert set(tab) == {"g"}
    # mc: 0.2 lies at 0.6 of [0.08, 0.28] -> 0.7 - 0.6 * 0.2; lam: 0.2 at 1/6 of [0.15, 0.45]
    assert tab["g"]["mc"][0.2] == pytest.approx(0.58) and tab["g"]["lam"][0.2] == pytest.approx(0.25 - 0.2 / 6)
    assert tab["g"]["mc"][0.4] is None and tab["g"]["lam"][0.4] == pytest.approx(0.05 + 0.2 / 6)
    assert tab["g"]["lam"][0.5] is None  # never extrapolated
    del rows[2]["tasks"]["lam"]["compute_saved"]  # a run from before per-task compute was kept
    assert task_matched(rows, [0.2])["g"] == {"mc": {0.2: pytest.approx(0.58)}, "lam": {0.2: None}}


def test_gap_closed_between_floor_and_ceiling_hand_computed():
    rng = np.random.default_rng(0)
    n = 400
    dense = rng.random(n) < 0.85

    def drop(p, seed):  # dense's items, each correct one lost with probability p
        return dense & (np.random.default_rng(seed).random(n) >= p)

    def rows_of(method, losses, seed):
        return [_row(method, s, {"t": drop(p, seed + i).astype(float)}) for i, (s, p) in enumerate(losses)]

    rows = [_row("dense", 0.0, {"t": dense.astype(float)}),
            *rows_of("random+fb", [(0.1, 0.4), (0.3, 0.7)], 10),
            *rows_of("gateskip+fb", [(0.1, 0.2), (0.3, 0.4)], 20),
            *rows_of("oracle+fb", [(0.1, 0.1), (0.25, 0.3)], 30),
            *rows_of("gateskip", [(0.1, 0.5), (0.3, 0.6)], 40)]  # no floor or ceiling of its own
    assert brackets(["random+fb", "gateskip+fb", "oracle+fb", "gateskip", "shortgpt"]) == {
        "gateskip+fb": ("random+fb", "oracle+fb")}
    got = {e["level"]: e for e in gap_closed(rows, (0.2, 0.3), iters=300, seed=0)}
    tab = matched_table(rows, (0.2,))
    e = got[0.2]
    f, v, c = tab["random+fb"][0.2], tab["gateskip+fb"][0.2], tab["oracle+fb"][0.2]
    assert (e["floor_retention"], e["method_retention"], e["ceiling_retention"]) == pytest.approx((f, v, c))
    assert e["value"] == pytest.approx((v - f) / (c - f)) and 0 < e["value"] < 1
    assert e["lo"] <= e["value"] <= e["hi"]
    assert got[0.3]["value"] is None and "method_retention" not in got[0.3]  # the ceiling stops at 25%
