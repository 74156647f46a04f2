"""The small per-model runtime state that gated branches read.

One ``GateState`` lives on a gated model (``model.gateskip.state``, record.py). It holds the gated branches,
the active skipping plan (installed and removed by ``gateskip.skipping``), the valid-token mask of
the current forward call (padding excluded), the K/V of the previous attention layer (for
``kv="copy"``), running statistics, and optional logs for training and calibration. Nothing is
global: two gated models in one process do not interact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from gateskip.config import GateSkipConfig
from gateskip.flops import LayerFlops
from gateskip.gates import importance, one_token_importance
from gateskip.policies import quantile_count, quantile_skip, random_skip, threshold_skip


@dataclass
class Plan:
    """An active skipping setting: per-branch ratio, policy, KV mode."""

    policy: str
    ratios: list[float]  # per branch index
    kv: str
    thresholds: list[torch.Tensor] | None = None  # per branch, for policy="threshold"
    generator: torch.Generator | None = None
    path: str = "auto"  # auto (physical unless gradients are needed) / physical / masked
    protect: int = 0  # the first N tokens of each sequence never skip (GateSkipConfig.protect_first)
    supported: dict = field(default_factory=dict)  # branch index -> physical path supported (wrap.py)
    # training: a skipped token's gate still gets the gradient it would get if it were kept (wrap.py)
    straight_through: bool = False
    # physical path sized from host-known counts only: no device-to-host read per branch (GPU; physical.py)
    sync_free: bool = False
    host_thr: dict = field(default_factory=dict, repr=False)  # dtype -> host_thresholds (decode at batch 1)

    def host_thresholds(self, dtype: torch.dtype) -> list[float | None]:
        """Per branch: the threshold as a host float, rounded to ``dtype`` as the tensor comparison rounds it
        (None where the branch does not skip)."""
        t = self.host_thr.get(dtype)
        if t is None:
            t = self.host_thr[dtype] = [float(thr.to(dtype)) if r > 0.0 else None
                                        for thr, r in zip(self.thresholds, self.ratios)]
        return t

    @functools.cached_property
    def copy_kv(self) -> bool:
        """Skipped tokens take the layer below's K/V; only worth the cache proxy when anything can skip."""
        return self.kv == "copy" and any(r > 0.0 for r in self.ratios)

    def decide(self, index: int, imp: torch.Tensor, valid: torch.Tensor | None, n_valid: int | None = None
               ) -> tuple[torch.Tensor | None, int | None]:
        """(skip mask or None, number skipped as a host int, else None).

        The count is known without reading the device under quantile (and at ratio 0). At inference, one
        token under thresholds (decode at batch 1) is decided by ``GateState.decide_one`` instead.

        ``valid``: tokens that may skip, or None when all may (not for quantile, which ranks them).
        """
        r = self.ratios[index]
        if r <= 0.0:
            return None, 0
        if self.policy in ("quantile", "oracle"):  # the oracle ranks its own scores (wrap.py) like quantile
            if n_valid is not None:
                k = quantile_count(n_valid, r)
                return (None, 0) if k == 0 else (quantile_skip(imp, valid, r, n_valid), k)
            return quantile_skip(imp, valid, r), None
        if self.policy == "threshold":
            thr = self.thresholds[index]
            if thr.device != imp.device or thr.dtype != imp.dtype:  # once per branch, not per call
                # same result: a 0-d tensor compares in the other operand's dtype anyway
                thr = self.thresholds[index] = thr.to(imp.device, imp.dtype)
            return threshold_skip(imp, valid, thr), None
        return random_skip(imp, valid, r, self.generator), None


_TRUE: dict = {}


def _one_true(like: torch.Tensor) -> torch.Tensor:
    """A shared read-only ``True`` mask of ``like``'s shape (one token): no allocation per branch."""
    key = (like.device, like.shape)
    t = _TRUE.get(key)
    if t is None:
        t = _TRUE[key] = torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return t


@dataclass
class GateState:
    # A subclass whose decision is not a gate threshold (add_gates' state_cls) turns the one-token decode shortcut off.
    one_token_fast = True

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
    # (read ``counts``). Decisions are queued per call and counted in one go when the call is over:
    # a handful of tensor ops per call instead of per branch (decode at batch 1 is overhead-bound).
    tally: torch.Tensor | None = None
    pending: list = field(default_factory=list)  # (branch index, attention window or 0 for MLP, skip, valid)
    # one-token calls (``decide_one``) count on the host instead: per branch [skipped, valid, kept_ctx,
    # valid_ctx] as Python floats, added to ``tally`` when ``counts`` is read (no tensor op per decode step)
    host_tally: list | None = None
    ctx_one: float = 0.0  # context length of this call's one token (read once per call when ``one_token``)
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
    # the loaded folder's backbone change, kept so that save_gates writes it again: {"kind": "lora",
    # "tensors": {lora.*}} or {"kind": "full", "params": [names]}
    loaded_backbone: dict | None = None
    handles: list = field(default_factory=list)
    eligible: tuple | None = None  # (valid, valid minus the protected prefix) of this call: one mask for all branches
    n_eligible: tuple | None = None  # (eligible mask, its count read once per call): quantile counts on the host
    decided: tuple | None = None  # (skip, number skipped or None) of the last decision: see skip_count
    sync_calls: int = 0  # branch calls whose skipped count had to be read from the device (a GPU sync each)
    # this call is one token that may skip, under thresholds (decode at batch 1): each branch decides with
    # one host comparison (``decide_one``) instead of building masks (decode is overhead-bound)
    one_token: bool = False

    def begin_call(self, valid: torch.Tensor, ctx: torch.Tensor) -> None:
        self._count_pending()
        self.valid, self.ctx, self.prev_kv, self.eligible, self.n_eligible = valid, ctx, None, None, None
        self.gate_log = []
        p = self.plan
        # not under sync_free: deciding one token on the host reads its gate value back (a GPU sync)
        self.one_token = (self.one_token_fast and p is not None and p.policy == "threshold" and valid.numel() == 1
                          and not self.collect
                          and self.record is None and not p.sync_free and bool(self._eligible(valid)))
        if self.one_token and self.tally is not None:
            self.ctx_one = float(ctx) if ctx.numel() == 1 else 1.0
        if self.tally is not None:
            self.calls += 1

    @property
    def counts(self) -> torch.Tensor | None:
        self._count_pending()
        if self.host_tally is not None and self.tally is not None and any(r[1] for r in self.host_tally):
            self.tally += torch.tensor(self.host_tally, dtype=self.tally.dtype).to(self.tally.device)
            self.host_tally = [[0.0] * 4 for _ in self.branches]
        return self.tally

    def reset_stats(self) -> None:
        self.pending = []
        self.tally = torch.zeros(len(self.branches), 4, dtype=torch.float64)
        self.host_tally = [[0.0] * 4 for _ in self.branches]
        self.lm_rows, self.calls, self.sync_calls = 0, 0, 0
        self.path_calls = {"physical": 0, "masked": 0, "dense": 0}

    def count_path(self, path: str) -> None:
        if self.tally is not None:
            self.path_calls[path] += 1

    def valid_for(self, x: torch.Tensor) -> torch.Tensor:
        v = self.valid
        if v is None or v.shape != x.shape[:2]:
            v = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return v

    def on_gate(self, branch, x: torch.Tensor, g: torch.Tensor, imp: torch.Tensor | None = None
                ) -> torch.Tensor | None:
        """Decide which tokens of this call skip ``branch``; log for training/calibration/stats.

        ``imp``: per-token scores to rank by instead of the gate's importance (the oracle policy's)."""
        valid = self.valid_for(x)
        if self.collect:
            self.gate_log.append((g, valid))
        if self.record is None and (self.plan is None or self.plan.ratios[branch.index] <= 0.0):
            # nothing to decide: skip the importance computation too (decode is overhead-bound)
            if self.plan is not None:
                self._queue(branch, None, valid)
            return None
        imp = importance(g.detach()) if imp is None else imp
        if self.record is not None:
            self.record[branch.index].append(imp[valid].float().cpu())
        if self.plan is None:
            return None
        elig = self._eligible(valid)
        # the number of eligible tokens, read once per call, not per branch: the quantile count needs
        # it, and when every token is eligible the other policies can leave the mask out
        n = self._count_eligible(elig)
        if self.plan.policy in ("quantile", "oracle"):
            skip, k = self.plan.decide(branch.index, imp, elig, n)
        else:
            skip, k = self.plan.decide(branch.index, imp, None if n == elig.numel() else elig)
        self.decided = (skip, k)
        self._queue(branch, skip, valid)
        return skip

    def decide_one(self, branch, g: torch.Tensor) -> torch.Tensor | None:
        """``on_gate`` for a call of one eligible token under thresholds: a (shared) skip mask, or None if kept.

        ``g``: the token's gate values (``Gate.one_token``). Its importance is read on the host, only where
        the branch may skip, and compared with the threshold rounded to the gate's dtype, as
        ``threshold_skip`` compares them; no mask is built.
        """
        thr = self.plan.host_thresholds(g.dtype)[branch.index]
        skipped = thr is not None and one_token_importance(g) < thr
        if self.tally is not None:  # the same rows ``_count_pending`` would add, counted on the host
            if thr is not None:
                self.sync_calls += 1
            row = self.host_tally[branch.index]
            w = 0.0 if branch.kind == "mlp" else self.ctx_one if not branch.window else min(self.ctx_one, branch.window)
            row[0] += skipped
            row[1] += 1.0
            row[2] += 0.0 if skipped else w
            row[3] += w
        return _one_true(self.valid) if skipped else None

    def skip_count(self, skip: torch.Tensor) -> int | None:
        """How many tokens ``skip`` (the last decision) skips, as a host int.

        Known without touching the device when the policy fixes the count (quantile). Otherwise it is
        read from the device: free on CPU, a sync on GPU (counted in ``stats()["sync_calls"]``); under
        ``sync_free`` it is not read, and None is returned.
        """
        d = self.decided
        if d is not None and d[0] is skip and d[1] is not None:
            return d[1]
        if self.plan.sync_free:
            return None
        if self.tally is not None:
            self.sync_calls += 1
        # one token (decode at batch 1): reading the bool directly costs a tenth of sum-then-read
        return int(skip) if skip.numel() == 1 else int(skip.sum())

    def _count_eligible(self, elig: torch.Tensor) -> int:
        if self.valid is None or elig.shape != self.valid.shape:  # valid_for made it: all ones
            return elig.numel()
        if self.n_eligible is None or self.n_eligible[0] is not elig:
            self.n_eligible = (elig, int(elig.sum()))
        return self.n_eligible[1]

    def _eligible(self, valid: torch.Tensor) -> torch.Tensor:
        """Tokens that may skip: valid ones past the protected prefix. ``ctx`` is the context length a
        token sees (its 1-based position in its sequence, cache and left padding accounted for), so in
        cached decode nothing is protected and in a left-padded row the first *real* token is."""
        n = self.plan.protect
        if n <= 0 or self.ctx is None or self.ctx.shape != valid.shape:
            return valid
        if self.eligible is None or self.eligible[0] is not valid:  # once per call, not per branch
            self.eligible = (valid, valid & (self.ctx.to(valid.device) > n))
        return self.eligible[1]

    def _queue(self, branch, skip: torch.Tensor | None, valid: torch.Tensor) -> None:
        if self.tally is not None:
            window = 0 if branch.kind == "mlp" else (branch.window or -1)
            self.pending.append((branch.index, window, skip, valid))

    @torch.no_grad()
    def _count_pending(self) -> None:
        """Add the queued decisions of the last call to the statistics (stays on device: no host sync)."""
        if not self.pending or self.tally is None:
            self.pending = []
            return
        entries, self.pending = self.pending, []
        groups = {}  # calls normally share one valid mask; group by it to be safe
        for e in entries:
            groups.setdefault(id(e[3]), []).append(e)
        for group in groups.values():
            valid = group[0][3]
            ctx = self.ctx if self.ctx is not None and self.ctx.shape == valid.shape else torch.ones(
                valid.shape, device=valid.device)
            ctx = ctx.masked_fill(~valid, 0)
            by_window = {0: torch.zeros_like(ctx), -1: ctx}
            for _, w, _, _ in group:
                if w not in by_window:
                    by_window[w] = ctx.clamp(max=w)
            no_skip = torch.zeros_like(valid)
            skips = torch.stack([no_skip if e[2] is None else e[2] for e in group]).flatten(1)
            ctxs = torch.stack([by_window[e[1]] for e in group]).flatten(1)
            rows = torch.stack([skips.sum(1).to(ctxs.dtype), valid.sum().to(ctxs.dtype).expand(len(group)),
                                ctxs.masked_fill(skips, 0).sum(1), ctxs.sum(1)], 1)
            if self.tally.device != rows.device:
                self.tally = self.tally.to(rows.device)
            index = torch.tensor([e[0] for e in group], device=rows.device)
            self.tally.index_add_(0, index, rows.to(self.tally.dtype))
