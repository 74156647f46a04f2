"""Reading a measured accuracy-vs-compute curve: interpolation, compute saved at 90%, orderings.

A curve is a list of ``(compute_saved, mean_acc, stderr)`` measured points. Values between two
measured points are linearly interpolated (accuracy and its stderr alike); outside the measured
range there is no value (no extrapolation).
"""

from __future__ import annotations

import math

Z = 1.0  # a difference within Z combined standard errors is "inconclusive"


def curve_of(points: list[dict], axis: str = "compute_saved") -> list[tuple[float, float, float]]:
    """Eval sweep points -> sorted ``(x, mean_acc, stderr of the mean)``; ``x``: ``compute_saved``
    (FLOP-weighted, gates counted) or ``tokens_skipped`` (the paper's "skip").

    The stderr of a mean over tasks is sqrt(sum of squared task stderrs) / number of tasks.
    """
    out = []
    for p in points:
        ses = [t.get("stderr") or 0.0 for t in p["tasks"].values()]
        out.append((float(p.get(axis, p["compute_saved"])), float(p["mean_acc"]), math.sqrt(sum(s * s for s in ses)) / len(ses)))
    return sorted(out)


def acc_at(curve, x: float) -> tuple[float, float] | None:
    """(accuracy, stderr) at compute saved ``x``, interpolated; None outside the measured range."""
    if not curve or x < curve[0][0] - 1e-9 or x > curve[-1][0] + 1e-9:
        return None
    for (x0, a0, s0), (x1, a1, s1) in zip(curve, curve[1:]):
        if x0 <= x <= x1 and x1 > x0:
            w = (x - x0) / (x1 - x0)
            return a0 + w * (a1 - a0), s0 + w * (s1 - s0)
    best = min(curve, key=lambda p: abs(p[0] - x))  # x on a measured point (or a one-point curve)
    return best[1], best[2]


def saved_at_level(curve, level: float = 0.9) -> float | None:
    """Largest compute saved on the interpolated curve whose accuracy is >= ``level`` x the accuracy
    of the lowest-skip point (the paper's "compute saved at 90%")."""
    if not curve:
        return None
    thr = level * curve[0][1]
    best = None
    for x, a, _ in curve:
        if a >= thr:
            best = x if best is None else max(best, x)
    for (x0, a0, _), (x1, a1, _) in zip(curve, curve[1:]):
        if (a0 >= thr) != (a1 >= thr) and a1 != a0:  # the curve crosses the threshold in this segment
            cross = x0 + (thr - a0) / (a1 - a0) * (x1 - x0)
            best = cross if best is None else max(best, cross)
    return best


def pair_verdict(better: tuple[float, float] | None, worse: tuple[float, float] | None, z: float = Z) -> str:
    """Does ``better`` (acc, stderr) beat ``worse`` as the paper says: holds / reversed / inconclusive /
    unmeasured."""
    if better is None or worse is None:
        return "unmeasured"
    diff = better[0] - worse[0]
    if abs(diff) <= z * math.hypot(better[1], worse[1]):
        return "inconclusive"
    return "holds" if diff > 0 else "reversed"


def overall(verdicts: list[str]) -> str:
    """One answer for a comparison: no if any pair is reversed, yes if all hold, else inconclusive."""
    measured = [v for v in verdicts if v != "unmeasured"]
    if not verdicts:
        return "no paper ordering"
    if not measured:
        return "not measured"
    if "reversed" in measured:
        return "no"
    if len(measured) == len(verdicts) and all(v == "holds" for v in measured):
        return "yes"
    return "inconclusive"
