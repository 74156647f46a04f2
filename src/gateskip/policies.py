"""Skip policies: which tokens a branch skips, given their importance.

Every policy maps ``importance [B, T]`` and ``valid [B, T]`` (False for padding) to a boolean
``skip [B, T]``; padding is never skipped and never counted. Everything stays on the device: no
``.item()`` on the hot path.

- ``quantile`` (paper parity): per branch and per forward call, the ``round(r * n_valid)``
  least important valid tokens of the whole call (batch x sequence) are skipped. A token's fate
  depends on its neighbours, and at decode with batch 1 nothing is skipped when r < 0.5.
- ``threshold``: per-branch thresholds fitted by ``gateskip.calibrate``: a token is skipped when
  its importance is below the branch's calibrated r-quantile. Each decision depends on that token
  alone, so batching does not change it and decode at batch 1 really skips.
- ``random``: each valid token skipped with probability r (the baseline at matched ratio).
"""

from __future__ import annotations

import torch

from gateskip.errors import GateSkipError

POLICIES = ("quantile", "threshold", "random", "oracle", "oracle_threshold")
ORACLES = ("oracle", "oracle_threshold")
# The oracles are references, not methods: they compute the branch and skip the tokens whose branch output
# differs least from what they get when skipped (0 or the fallback), ranked per call like quantile
# ("oracle") or per token against calibrated thresholds like threshold ("oracle_threshold",
# ``calibrate(score="oracle")``). See wrap.GatedBranch.


def quantile_skip(imp: torch.Tensor, valid: torch.Tensor, ratio: float, n_valid: int | None = None
                  ) -> torch.Tensor:
    """Skip exactly ``round(ratio * n_valid)`` lowest-importance valid tokens (ties by position).

    ``n_valid``: the number of valid tokens when the caller knows it on the host (then the count
    skipped is known there too, see ``quantile_count``); otherwise it is counted on the device.
    """
    flat = imp.masked_fill(~valid, float("inf")).flatten()
    order = flat.argsort(stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    k = torch.round(valid.sum() * ratio) if n_valid is None else quantile_count(n_valid, ratio)
    return (ranks.view_as(imp) < k) & valid


def quantile_count(n_valid: int, ratio: float) -> int:
    """How many of ``n_valid`` tokens the quantile policy skips (round half to even, like torch.round)."""
    return round(n_valid * ratio)


def threshold_skip(imp: torch.Tensor, valid: torch.Tensor | None, threshold: torch.Tensor) -> torch.Tensor:
    """``valid=None``: every token is valid (saves an op per branch at decode)."""
    skip = imp < threshold
    return skip if valid is None else skip & valid


def random_skip(imp: torch.Tensor, valid: torch.Tensor | None, ratio: float, generator: torch.Generator | None
                ) -> torch.Tensor:
    u = torch.rand(imp.shape, generator=generator, device="cpu" if generator is None else generator.device)
    skip = u.to(imp.device) < ratio
    return skip if valid is None else skip & valid


def threshold_from_grid(grid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Importance value below which a fraction ``ratio`` of calibration tokens fell.

    ``grid`` holds the calibration importances' quantiles at ``linspace(0, 1, len(grid))``;
    we interpolate linearly between grid points. Ratio 0 gives -inf (nothing skipped), 1 +inf.
    """
    if ratio <= 0.0:
        return torch.tensor(float("-inf"))
    if ratio >= 1.0:
        return torch.tensor(float("inf"))
    pos = ratio * (grid.numel() - 1)
    lo = int(pos)
    frac = pos - lo
    hi = min(lo + 1, grid.numel() - 1)
    return grid[lo] * (1 - frac) + grid[hi] * frac


def check_policy(policy: str | None) -> None:
    if policy is not None and policy not in POLICIES:
        raise GateSkipError(f"policy={policy!r} is not supported: choose one of {', '.join(POLICIES)}")


def resolve_policy(policy: str | None, calibrated: bool) -> str:
    """The policy in force, the same default for the library and every command: ``policy`` when given, else
    ``threshold`` (per token and causal: what generation and evaluation run) when the gates have calibrated
    thresholds (every saved gates folder has them), else ``quantile`` (the paper's per-call ranking, for gates
    not calibrated yet)."""
    check_policy(policy)
    return policy if policy is not None else "threshold" if calibrated else "quantile"


def check_ratio(ratio: float, what: str = "skip ratio") -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise GateSkipError(f"{what} {ratio!r} is not a number: use a value in [0, 1]") from None
    if not 0.0 <= r <= 1.0:
        raise GateSkipError(f"{what} {r} is out of range: use a value in [0, 1]")
    return r
