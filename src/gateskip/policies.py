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
- ``aligned``: ``threshold``, but in a decode step of a batch a branch skips for every row or none (by majority).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gateskip.errors import GateSkipError


@dataclass(frozen=True)
class Policy:
    """A skip policy: how a branch's skip mask comes from its tokens' importance, and what that needs. A new
    policy is one entry in ``POLICY``; the rest of the library asks these attributes, never the name.

    ``ranks_call``: the least important fraction of each forward call skips (its count known on the host).
    ``thresholds``: the calibration record (a ``Loaded`` attribute) whose per-branch thresholds it compares each
    token against, or None. ``computes_branch``: a reference that computes every branch to score its tokens (the
    oracles: kv must be ``compute``). ``draws``: a seeded random draw per token. ``one_token``: a one-token decode
    call can be decided on the host from the gate value alone (one_token.py). ``aligned``: in a decode step of a
    batch (one new token per row), a branch skips for every row or for none, by majority of the rows' own
    decisions: rows that skip together let the branch not run at all, which a batch bound by reading the weights
    needs to gain anything (an opt-in serving policy; at batch 1 it is ``threshold``).
    """

    name: str
    ranks_call: bool = False
    thresholds: str | None = None
    computes_branch: bool = False
    draws: bool = False
    one_token: bool = False
    aligned: bool = False
    given_scores: bool = False

    @property
    def needs_calibration(self) -> bool:
        """It compares the gates' calibrated thresholds (``gateskip.calibrate``)."""
        return self.thresholds == "calibration"

    @property
    def uses_gates(self) -> bool:
        """Its decisions come from trained gates (not random draws, not an oracle's scores)."""
        return not (self.draws or self.computes_branch)

    def decide(self, imp: torch.Tensor, valid: torch.Tensor | None, ratio: float, threshold: torch.Tensor | None,
               generator: torch.Generator | None, n_valid: int | None = None, rank: bool = False
               ) -> tuple[torch.Tensor | None, int | None]:
        """(skip mask or None, number skipped as a host int, else None) for one branch at ``ratio`` > 0.
        ``rank``: rank the call like quantile whatever this policy is (a prompt under a compute-saved budget)."""
        if rank or self.ranks_call:
            if n_valid is not None:
                k = quantile_count(n_valid, ratio)
                return (None, 0) if k == 0 else (quantile_skip(imp, valid, ratio, n_valid), k)
            return quantile_skip(imp, valid, ratio), None
        if self.thresholds is not None:
            skip = threshold_skip(imp, valid, threshold)
            return (aligned_rows(skip, valid) if self.aligned else skip), None
        return random_skip(imp, valid, ratio, generator), None


POLICY = {p.name: p for p in (
    Policy("quantile", ranks_call=True),
    Policy("threshold", thresholds="calibration", one_token=True),
    Policy("random", draws=True),
    Policy("aligned", thresholds="calibration", one_token=True, aligned=True),
    # The oracles are references, not methods: they compute the branch and skip the tokens whose branch output
    # differs least from what they get when skipped (0 or the fallback), ranked per call like quantile ("oracle")
    # or per token against calibrated thresholds like threshold ("oracle_threshold", ``calibrate(score="oracle")``).
    # See wrap.GatedBranch.
    Policy("oracle", ranks_call=True, computes_branch=True),
    Policy("oracle_threshold", thresholds="oracle_calibration", computes_branch=True),
    # stronger ceilings: each token's effect on the outputs (second-order or exact), measured on the text being
    # scored before it runs (oracle_scores.py), ranked per call like quantile
    Policy("oracle_given", ranks_call=True, computes_branch=True, given_scores=True),
)}
POLICIES = tuple(POLICY)
ORACLES = tuple(name for name, p in POLICY.items() if p.computes_branch)


def policy_of(name: str) -> Policy:
    """The policy called ``name`` (a one-line error for an unknown one)."""
    check_policy(name)
    return POLICY[name]


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


def aligned_rows(skip: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """A decode step of a batch (``skip`` [B, 1], B > 1): every valid row skips when more than half of them would,
    none otherwise; any other call as it is."""
    if skip.dim() != 2 or skip.shape[1] != 1 or skip.shape[0] < 2:
        return skip
    v = torch.ones_like(skip) if valid is None else valid
    return v & (2 * (skip & v).sum() > v.sum())


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


def needs_trained_gates(policy: str | None) -> bool:
    """Skipping under ``policy`` (None: the default) chooses tokens by trained gates."""
    return policy is None or POLICY[policy].uses_gates


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
