"""Spend a compute budget where it costs least: per-branch skip ratios from measured sensitivity per FLOP.

A uniform ratio (the paper) cuts every branch alike, though some branches (the first layers, most
attention near the top) cost far more quality per FLOP saved than others. Here each branch's cost is
measured on calibration text: the next-token CE when that branch alone skips a ratio r of its tokens
(its own gates choose, with its fallback), at a few ratios. ``allocate`` then assumes the costs add up
and, greedily, takes the cheapest increment (branch, next ratio step) in CE per FLOP saved until the
FLOP-weighted saving reaches the target. The result is a dict of per-branch ratios, accepted by
``skipping(ratio=...)``, ``calibrate`` and the ``--ratios`` of ``gateskip eval`` / ``train`` as a JSON file.

``sensitivity`` is the measurement (a model forward per branch and step); ``allocate`` is a pure function.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

import torch

from gateskip.errors import GateSkipError

STEPS = (0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def sensitivity(model, batches: Iterable, steps: Sequence[float] = STEPS, policy: str = "quantile",
                kv: str | None = None, progress: bool = True) -> dict:
    """Held-out CE with one branch skipping at a time: ``{"base", "steps", "ce": {branch: [CE per step]}}``.

    ``policy``: how the branch chooses its tokens (quantile: its gates, exactly r of them per batch;
    random). ``base``: CE with nothing skipped (the gates and fallbacks in place).
    """
    from gateskip.core import gate_state, skipping
    from gateskip.heldout import language_ce

    st = gate_state(model)
    batches = list(batches)
    if not batches:
        raise GateSkipError("sensitivity got no batches: pass an iterable of input_ids tensors")
    steps = [float(s) for s in steps]
    if not steps or any(not 0.0 < s <= 1.0 for s in steps) or steps != sorted(steps):
        raise GateSkipError(f"steps={steps} are invalid: use increasing ratios in (0, 1]")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(st.branches) * len(steps), desc="branch sensitivity", unit="run")
    base = language_ce(model, batches)
    ce = {}
    try:
        for b in st.branches:
            row = []
            for s in steps:
                with skipping(model, ratio={b.name: s}, policy=policy, kv=kv):
                    row.append(language_ce(model, batches))
                if bar is not None:
                    bar.update(1)
            ce[b.name] = row
    finally:
        if bar is not None:
            bar.close()
    return {"base": base, "steps": steps, "ce": ce, "policy": policy}


def saved_per_token(model, kv: str | None = None, context: float = 128.0) -> dict[str, float]:
    """FLOPs a skipped token saves at each branch, its fallback's cost deducted (``context``: mean positions
    an attention token attends to, for QK^T and AV)."""
    from gateskip.core import gate_state

    st = gate_state(model)
    f, kv = st.flops, kv or st.cfg.kv
    out = {}
    for b in st.branches:
        if b.kind == "mlp":
            full = f.mlp
        else:
            ctx = context if not b.window else min(context, b.window)
            full = f.attn_qo + (f.attn_kv if kv == "copy" else 0) + f.attn_ctx * ctx
        out[b.name] = max(0.0, float(full - f.fallback_for(b.kind)))
    return out


def dense_per_token(model, context: float = 128.0) -> float:
    """FLOPs of one token through the dense model (every layer, both branches whether gated or not, one
    LM-head row), for ``allocate``'s target."""
    from gateskip.core import gate_state

    st = gate_state(model)
    f = st.flops
    total = float(f.lm_head)
    windows = {b.layer: b.window for b in st.branches}  # the gated layers (of a pruned model: those left)
    for window in windows.values():
        ctx = context if not window else min(context, window)
        total += f.mlp + f.attn_qo + f.attn_kv + f.attn_ctx * ctx
    return total


def allocate(sens: Mapping, saved: Mapping[str, float], dense: float, target: float) -> dict[str, float]:
    """Per-branch ratios whose FLOP-weighted saving is ``target`` of ``dense``, cheapest CE per FLOP first.

    Args:
        sens: ``sensitivity``'s result (``steps`` and ``ce`` per branch; ``base``).
        saved: FLOPs a skipped token saves per branch (``saved_per_token``).
        dense: FLOPs of a token through the dense model (``dense_per_token``).
        target: fraction of ``dense`` to save, in [0, 1).

    Greedy over increments: a branch at step j may move to step j+1 at a marginal cost (CE increase)
    per marginal FLOP saved. Costs are treated as additive across branches. The last increment is taken
    in part (a ratio between two steps, cost interpolated), so the total hits the target exactly when
    reachable; if every step of every branch is not enough, every branch is at its last step.
    """
    if not 0.0 <= target < 1.0:
        raise GateSkipError(f"target={target} is invalid: use a fraction of compute saved in [0, 1)")
    steps = [0.0, *sens["steps"]]
    base = sens["base"]
    level = {name: 0 for name in sens["ce"]}
    ratios = {name: 0.0 for name in sens["ce"]}
    need = target * dense
    while need > 1e-9:
        best = None
        for name, j in level.items():
            if j + 1 >= len(steps) or saved.get(name, 0.0) <= 0:
                continue
            ce = [base, *sens["ce"][name]]
            gain = saved[name] * (steps[j + 1] - steps[j])
            price = (ce[j + 1] - ce[j]) / gain
            if best is None or price < best[0]:
                best = (price, name, gain)
        if best is None:
            break
        _, name, gain = best
        j = level[name]
        if gain <= need:
            level[name] = j + 1
            ratios[name] = steps[j + 1]
            need -= gain
        else:  # part of the step: exactly what is still needed
            ratios[name] = steps[j] + (steps[j + 1] - steps[j]) * need / gain
            need = 0.0
    return {k: round(v, 6) for k, v in ratios.items() if v > 0}


def read_budget(path: str) -> dict[str, float]:
    """Per-branch skip ratios from a JSON file ({"layers.3.mlp": 0.5, ...}), checked."""
    from gateskip.policies import check_ratio

    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise GateSkipError(f"budget file {path!r} does not exist: pass a JSON file of per-branch ratios") from None
    except json.JSONDecodeError as e:
        raise GateSkipError(f"budget file {path!r} is not valid JSON ({e.msg}): pass per-branch ratios") from None
    if not isinstance(raw, dict) or not raw:
        raise GateSkipError(f"budget file {path!r} must hold a non-empty object of branch name -> ratio")
    return {str(k): check_ratio(v, f"skip ratio for {k}") for k, v in raw.items()}
