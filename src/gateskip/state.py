"""The small per-model runtime state that gated branches read.

One ``GateState`` lives on a gated model (``model.gateskip_state``). It holds the gated branches,
the active skipping plan (installed and removed by ``gateskip.skipping``), the valid-token mask of
the current forward call (padding excluded), the K/V of the previous attention layer (for
``kv="copy"``), running statistics, and optional logs for training and calibration. Nothing is
global: two gated models in one process do not interact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gateskip.config import GateSkipConfig
from gateskip.flops import LayerFlops
from gateskip.gates import importance
from gateskip.policies import quantile_skip, random_skip, threshold_skip


@dataclass
class Plan:
    """An active skipping setting: per-branch ratio, policy, KV mode."""

    policy: str
    ratios: list[float]  # per branch index
    kv: str
    thresholds: list[torch.Tensor] | None = None  # per branch, for policy="threshold"
    generator: torch.Generator | None = None
    path: str = "auto"  # auto (physical unless gradients are needed) / physical / masked

    @property
    def copy_kv(self) -> bool:
        return self.kv == "copy"

    def decide(self, index: int, imp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        r = self.ratios[index]
        if r <= 0.0:
            return None
        if self.policy == "quantile":
            return quantile_skip(imp, valid, r)
        if self.policy == "threshold":
            return threshold_skip(imp, valid, self.thresholds[index].to(imp.device))
        return random_skip(imp, valid, r, self.generator)


@dataclass
class GateState:
    cfg: GateSkipConfig
    flops: LayerFlops
    branches: list = field(default_factory=list)  # GatedBranch, in execution order
    plan: Plan | None = None
    bypass: bool = False  # run the branches without gates (the gate-free teacher for distillation)
    # per forward call (set by the model-level pre-hook)
    valid: torch.Tensor | None = None  # [B, T] bool, False at padding
    ctx: torch.Tensor | None = None  # [B, T] float: context length each token attends to
    prev_kv: tuple | None = None  # (layer_idx, k, v) of the last attention layer run in this call
    # statistics since the current plan was installed: per branch [skipped, valid, kept_ctx, valid_ctx]
    counts: torch.Tensor | None = None
    lm_rows: int = 0
    calls: int = 0
    path_calls: dict = field(default_factory=dict)  # branch calls per path: physical / masked / dense (nothing to skip)
    # training: gate values of this call, (g, valid) per branch; calibration: importances per branch
    collect: bool = False
    gate_log: list = field(default_factory=list)
    record: list | None = None
    calibration: dict | None = None  # {"grid": [n_branches, G] tensor, "ratio": float, "tokens": int}
    backup: dict = field(default_factory=dict)  # backbone weights changed by load_gates, by param name
    meta: dict | None = None  # gateskip.json of the loaded gates folder
    handles: list = field(default_factory=list)

    def begin_call(self, valid: torch.Tensor, ctx: torch.Tensor) -> None:
        self.valid, self.ctx, self.prev_kv = valid, ctx, None
        self.gate_log = []
        if self.counts is not None:
            self.calls += 1

    def reset_stats(self) -> None:
        self.counts = torch.zeros(len(self.branches), 4, dtype=torch.float64)
        self.lm_rows, self.calls = 0, 0
        self.path_calls = {"physical": 0, "masked": 0, "dense": 0}

    def count_path(self, path: str) -> None:
        if self.counts is not None:
            self.path_calls[path] += 1

    def valid_for(self, x: torch.Tensor) -> torch.Tensor:
        v = self.valid
        if v is None or v.shape != x.shape[:2]:
            v = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return v

    def ctx_for(self, x: torch.Tensor, window: int | None) -> torch.Tensor:
        c = self.ctx
        if c is None or c.shape != x.shape[:2]:
            c = torch.ones(x.shape[:2], device=x.device)
        return c if window is None else c.clamp(max=window)

    def on_gate(self, branch, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
        """Decide which tokens of this call skip ``branch``; log for training/calibration/stats."""
        valid = self.valid_for(x)
        if self.collect:
            self.gate_log.append((g, valid))
        if self.record is None and self.plan is None:
            return None
        imp = importance(g.detach())
        if self.record is not None:
            self.record[branch.index].append(imp[valid].float().cpu())
        if self.plan is None:
            return None
        skip = self.plan.decide(branch.index, imp, valid)
        if self.counts is not None:
            with torch.no_grad():
                ctx = self.ctx_for(x, branch.window).masked_fill(~valid, 0) if branch.kind == "attn" else None
                n_valid = valid.sum()
                if skip is None:
                    n_skip, kept_ctx = torch.zeros((), device=x.device), (ctx.sum() if ctx is not None else 0 * n_valid)
                else:
                    n_skip = skip.sum()
                    kept_ctx = ctx.masked_fill(skip, 0).sum() if ctx is not None else 0 * n_valid
                vctx = ctx.sum() if ctx is not None else 0 * n_valid
                if self.counts.device != x.device:  # stays on the model's device: no host sync per module
                    self.counts = self.counts.to(x.device)
                self.counts[branch.index] += torch.stack([n_skip, n_valid, kept_ctx, vctx]).to(self.counts.dtype)
        return skip
