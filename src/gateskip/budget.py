"""How a compute budget is spread over the gated branches.

``uniform`` (the paper): every branch skips the same fraction r of its tokens.

``global``: one importance threshold t for all branches, chosen so that the FLOP-weighted skipped
fraction over all branches is r. A branch skips the fraction F_b(t) of its tokens, where F_b is the
distribution of its importances measured by ``calibrate``. Gates trained with a sparsity penalty close
most where a branch matters least, so this lets the gates decide *which layers* as well as *which
tokens*, instead of forcing the same cut on a branch that every token needs.
"""

from __future__ import annotations

import torch

from gateskip.errors import GateSkipError

ALLOCATIONS = ("uniform", "global")


def branch_cdf(grid: torch.Tensor, t: float) -> float:
    """Fraction of a branch's calibration importances below ``t`` (``grid``: quantiles at linspace(0, 1))."""
    g = grid.double()
    if t <= float(g[0]):
        return 0.0
    if t > float(g[-1]):
        return 1.0
    # First grid point >= t; interpolate between it and the one before.
    hi = int(torch.searchsorted(g, torch.tensor([t], dtype=g.dtype), right=False)[0])
    lo = max(hi - 1, 0)
    span = float(g[hi] - g[lo])
    frac = 0.0 if span <= 0 else (t - float(g[lo])) / span
    return (lo + frac) / (g.numel() - 1)


def global_ratios(grids: torch.Tensor, weights: list[float], ratio: float, iters: int = 60) -> list[float]:
    """Per-branch skip ratios sharing one importance threshold, FLOP-weighted total = ``ratio``.

    ``grids``: [branches, G] calibration quantiles; ``weights``: per-branch FLOPs per token (0 for a
    branch that may not skip). Bisection on the threshold: the weighted skipped fraction is monotone in t.
    """
    total = sum(weights)
    if total <= 0 or ratio <= 0:
        return [0.0] * len(weights)
    active = [i for i, w in enumerate(weights) if w > 0]
    lo, hi = float(grids[active].min()), float(grids[active].max()) + 1e-6

    def skipped(t: float) -> list[float]:
        return [branch_cdf(grids[i], t) if weights[i] > 0 else 0.0 for i in range(len(weights))]

    for _ in range(iters):
        mid = (lo + hi) / 2
        frac = sum(w * r for w, r in zip(weights, skipped(mid))) / total
        lo, hi = (mid, hi) if frac < ratio else (lo, mid)
    return skipped(hi)


def check_allocation(allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise GateSkipError(f"allocation={allocation!r} is not supported: choose one of {', '.join(ALLOCATIONS)}")
