"""What a ``skipping(...)`` block runs under: its arguments checked, defaults taken from the gates, the ``Plan`` built.

``core.skipping`` installs the plan built here for the ``with`` block (and the compute-saved budget on top of it,
saved.py); the per-branch ratios come from the arguments (``uniform``) or from one calibrated importance threshold
for all branches (``global``, budget.py), the thresholds of the threshold policies from the calibration grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from gateskip.budget import check_allocation, global_ratios
from gateskip.config import GateSkipConfig
from gateskip.errors import GateSkipError
from gateskip.policies import POLICY, check_ratio, resolve_policy, threshold_from_grid
from gateskip.recheck import check_recheck_below, check_recheck_tokens
from gateskip.state import GateState, Plan
from gateskip.wrap import GatedBranch


def build_plan(model: nn.Module, st: GateState, ratio, policy: str | None, modules: Iterable[str], kv: str | None,
               seed: int, path: str, allocation: str, protect_first: int | None, straight_through: bool,
               sync_free: bool | None, protect_last: bool | None, protect_tokens: Iterable[int] | None,
               recheck_tokens: Iterable[int] | None, recheck_below: float, saved: float | None,
               protect_prompt: bool, protect_tail: int = 0, execution=None) -> tuple[Plan, tuple[str, ...]]:
    """The plan of ``skipping(model, ...)`` (its arguments as given) and the branch kinds that skip; raises on an
    invalid argument. A ``saved`` budget is checked against ``ratio`` here but installed by the caller."""
    policy, modules, kv, path = _options(st, policy, modules, kv, path, allocation)
    protect, last, never = _rules(st, protect_first, protect_last, protect_tokens)
    if saved is not None and (ratio or allocation != "uniform"):
        raise GateSkipError("saved= sets the budget in compute saved and steers one ratio for every branch: "
                            "leave ratio and allocation at their defaults")
    if allocation == "global":
        ratios = _global_ratios(st, ratio, modules, kv)
    else:
        ratios = [(_ratio_for(b, ratio) if b.kind in modules else 0.0) for b in st.branches]
    if sync_free is None:
        sync_free = next(model.parameters()).device.type != "cpu"
    plan = Plan(policy=policy, ratios=ratios, kv=kv, thresholds=_thresholds(st, policy, ratios),
                generator=torch.Generator().manual_seed(seed) if POLICY[policy].draws else None, path=path,
                protect=protect, straight_through=bool(straight_through), sync_free=bool(sync_free),
                protect_last=last, protect_prompt=bool(protect_prompt), protect_tokens=never,
                protect_tail=_tail(protect_tail),
                recheck_tokens=check_recheck_tokens(recheck_tokens),
                recheck_below=check_recheck_below(recheck_below), execution=execution)
    return plan, modules


def _options(st: GateState, policy: str | None, modules: Iterable[str], kv: str | None, path: str,
             allocation: str) -> tuple[str, tuple[str, ...], str, str]:
    """(policy, modules, kv, path) checked, with the defaults resolved; the oracles run the masked path."""
    policy = resolve_policy(policy, st.loaded.calibration is not None)
    modules = tuple(modules)
    for m in modules:
        if m not in ("attn", "mlp"):
            raise GateSkipError(f"modules={modules!r} is invalid: use 'attn' and/or 'mlp'")
    kv = kv or st.cfg.kv
    if kv not in ("copy", "compute"):
        raise GateSkipError(f"kv={kv!r} is not supported: choose copy or compute")
    if path not in ("auto", "physical", "masked"):
        raise GateSkipError(f"path={path!r} is not supported: choose auto, physical or masked")
    check_allocation(allocation)
    if POLICY[policy].computes_branch:
        if kv != "compute":
            raise GateSkipError(f"policy {policy!r} computes every branch to rank its tokens, so skipped tokens keep "
                                "their own K/V: pass kv='compute'")
        if st.cfg.placement != "after":
            raise GateSkipError(f"policy {policy!r} needs gates placed after the branch (placement='after')")
        path = "masked"
    return policy, modules, kv, path


def _tail(protect_tail) -> int:
    if int(protect_tail) != protect_tail or protect_tail < 0:
        raise GateSkipError(f"protect_tail={protect_tail!r} is invalid: use a whole number >= 0")
    return int(protect_tail)


def _rules(st: GateState, protect_first, protect_last, protect_tokens) -> tuple[int, bool, torch.Tensor | None]:
    """The never-skip rules in force: (first N tokens, a prompt's last position, token ids), the gates' by default."""
    protect = st.cfg.protect_first if protect_first is None else protect_first
    if int(protect) != protect or protect < 0:
        raise GateSkipError(f"protect_first={protect_first!r} is invalid: use a whole number >= 0")
    last = st.cfg.protect_last if protect_last is None else bool(protect_last)
    never = tuple(st.cfg.protect_tokens if protect_tokens is None else GateSkipConfig(protect_tokens=protect_tokens)
                  .protect_tokens)
    return int(protect), last, torch.tensor(never, dtype=torch.long) if never else None


def _thresholds(st: GateState, policy: str, ratios: list[float]) -> list[torch.Tensor] | None:
    """Per branch, the importance threshold of its ratio on the calibration grid (threshold policies only)."""
    record = POLICY[policy].thresholds
    if record is None:
        return None
    cal = getattr(st.loaded, record)
    if cal is None:
        raise GateSkipError(f"policy {policy!r} needs calibrated thresholds: run gateskip.calibrate(model, batches"
                            + (") or load a gates folder that has them" if POLICY[policy].uses_gates
                               else ", score='oracle') first"))
    return [threshold_from_grid(cal["grid"][b.index], r) for b, r in zip(st.branches, ratios)]


def _global_ratios(st: GateState, ratio, modules: tuple[str, ...], kv: str) -> list[float]:
    if isinstance(ratio, Mapping):
        raise GateSkipError("allocation='global' takes one overall ratio, not a mapping: pass a float")
    r = check_ratio(ratio)
    if st.loaded.calibration is None:
        raise GateSkipError("allocation='global' needs calibrated importances: run gateskip.calibrate(model, batches) "
                            "or load a gates folder that has them")
    f = st.flops
    # what a skipped token saves: with kv="compute" its K/V are still projected; its fallback runs instead
    per_token = {"attn": f.attn_qo + (f.attn_kv if kv == "copy" else 0.0), "mlp": f.mlp}
    per_token = {k: max(0.0, v - f.fallback_for(k)) for k, v in per_token.items()}
    weights = [per_token[b.kind] if b.kind in modules else 0.0 for b in st.branches]
    return global_ratios(st.loaded.calibration["grid"], weights, r)


def _ratio_for(branch: GatedBranch, ratio) -> float:
    if isinstance(ratio, Mapping):
        for key in (branch.name, branch.kind):
            if key in ratio:
                return check_ratio(ratio[key], f"skip ratio for {key}")
        return 0.0
    return check_ratio(ratio)
