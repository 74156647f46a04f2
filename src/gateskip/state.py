"""The small per-model runtime state that gated branches read.

One ``GateState`` lives on a gated model (``model.gateskip.state``, record.py). It holds the gated branches
and four parts, each with one job: the active skipping ``Plan`` (installed and removed by
``gateskip.skipping``), the current forward ``Call`` (valid-token mask with padding excluded, context
lengths, the K/V of the previous attention layer for ``kv="copy"``), the ``Stats`` counted since the plan
was installed, and what was ``Loaded`` (calibration, backbone backups, folder metadata); and the ``Taps``
(taps.py: the training log, the calibration record and the teacher bypass, each its own object). Nothing is global: two gated models in one process do not interact.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from gateskip.config import GateSkipConfig
from gateskip.flops import LayerFlops, branch_costs
from gateskip.gates import importance
from gateskip.policies import POLICY
from gateskip.taps import Taps

_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Plan -> values derived from it (plan_memo)


def plan_memo(plan: Plan) -> dict:
    """Values derived from ``plan``'s fields, computed once per plan and kept beside it, never in it: its
    thresholds as host floats per dtype, on another device, the physical path's support per branch."""
    memo = _MEMO.get(plan)
    if memo is None:
        memo = _MEMO[plan] = {}
    return memo


@dataclass(frozen=True, eq=False)
class Plan:
    """An active skipping setting: per-branch ratio, policy, KV mode. Immutable: a new setting (a budget's next
    ratio, a recheck) is a new plan (``dataclasses.replace``); what is derived from one is in ``plan_memo``."""

    policy: str
    ratios: list[float]  # per branch index
    kv: str
    thresholds: list[torch.Tensor] | None = None  # per branch, for policy="threshold"
    generator: torch.Generator | None = None
    path: str = "auto"  # auto (physical unless gradients are needed) / physical / masked
    protect: int = 0  # the first N tokens of each sequence never skip (GateSkipConfig.protect_first)
    protect_last: bool = False  # the last position of a prompt never skips (GateSkipConfig.protect_last)
    protect_prompt: bool = False  # no position of a prompt (a call with nothing cached) skips: only generated tokens
    protect_tail: int = 0  # the last N positions of a prompt never skip (its question, in a long-passage prompt)
    protect_tokens: torch.Tensor | None = None  # token ids that never skip (GateSkipConfig.protect_tokens)
    # training: a skipped token's gate still gets the gradient it would get if it were kept (wrap.py)
    straight_through: bool = False
    # physical path sized from host-known counts only: no device-to-host read per branch (GPU; physical.py)
    sync_free: bool = False
    # dense recheck (recheck.py): rows whose top next token is one of these ids, or whose top probability is below
    # ``recheck_below``, are computed again without skipping
    recheck_tokens: torch.Tensor | None = None
    recheck_below: float = 0.0
    execution: object | None = None  # execution.ExecutionCosts the auto path chooses by (None: physical.py's rule)
    budget: object | None = None  # saved.SavedBudget: the ratio is steered to a compute-saved target (saved.py)
    any_skip: bool = field(init=False, repr=False)  # some branch has a ratio above 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "any_skip", any(r > 0.0 for r in self.ratios))

    @property
    def rechecks(self) -> bool:
        """A recheck rule is set and anything can skip (at ratio 0 a rerun would compute the same)."""
        return (self.recheck_tokens is not None or self.recheck_below > 0.0) and self.any_skip

    def host_thresholds(self, dtype: torch.dtype) -> list[float | None]:
        """Per branch: the threshold as a host float, rounded to ``dtype`` as the tensor comparison rounds it
        (None where the branch does not skip)."""
        memo = plan_memo(self)
        t = memo.get(("host", dtype))
        if t is None:  # one stack and one read for all branches
            values = torch.stack([thr.reshape(()).cpu() for thr in self.thresholds]).to(dtype).tolist()
            t = memo[("host", dtype)] = [v if r > 0.0 else None for v, r in zip(values, self.ratios)]
        return t

    @property
    def copy_kv(self) -> bool:
        """Skipped tokens take the layer below's K/V; only worth the cache proxy when anything can skip."""
        return self.kv == "copy" and self.any_skip

    def decide(self, index: int, imp: torch.Tensor, valid: torch.Tensor | None, n_valid: int | None = None,
               rank: bool = False) -> tuple[torch.Tensor | None, int | None]:
        """(skip mask or None, number skipped as a host int, else None).

        The count is known without reading the device under quantile (and at ratio 0). At inference, one
        token under thresholds (decode at batch 1) is decided by ``one_token.decide`` instead.

        ``valid``: tokens that may skip, or None when all may (not for quantile, which ranks them). ``rank``: rank
        like quantile whatever the policy (a prompt under a compute-saved budget: ``GateState._ranks_prompt``).
        """
        r = self.ratios[index]
        if r <= 0.0:
            return None, 0
        thr = None
        if POLICY[self.policy].thresholds is not None:
            thr = self.thresholds[index]
            if thr.device != imp.device or thr.dtype != imp.dtype:  # once per branch and plan, not per call
                # same result: a 0-d tensor compares in the other operand's dtype anyway
                memo, key = plan_memo(self), ("thr", index, imp.device, imp.dtype)
                thr = memo[key] if key in memo else memo.setdefault(key, thr.to(imp.device, imp.dtype))
        return POLICY[self.policy].decide(imp, valid, r, thr, self.generator, n_valid, rank)


class Stats:
    """Counts since the current plan was installed, read by ``gateskip.stats``.

    Per branch ``[skipped, valid, kept_ctx, valid_ctx]`` (``counts``), plus LM-head rows, forward calls,
    branch calls per path and device reads. Decisions are queued per call and counted in one go when
    the call is over: a handful of tensor ops per call instead of per branch (decode at batch 1 is
    overhead-bound). One-token calls (one_token.py) count on the host instead, as Python
    floats added to the tensor when ``counts`` is read (no tensor op per decode step).
    """

    def __init__(self, n_branches: int):
        self.pending: list = []  # (branch index, its layer's attention window or -1 (full), skip, valid)
        self.tally = torch.zeros(n_branches, 4, dtype=torch.float64)
        self.host_tally = [[0.0] * 4 for _ in range(n_branches)]
        self.lm_rows, self.calls, self.sync_calls = 0, 0, 0
        self.path_calls = {"physical": 0, "masked": 0, "dense": 0}  # branch calls per path (dense: nothing to skip)
        self.recheck: Stats | None = None  # the dense reruns' own counts (recheck.py): executed, not in the reference
        self.rows = 0  # rows rerun (on the recheck's Stats)

    def counts(self, ctx: torch.Tensor | None) -> torch.Tensor:
        """The per-branch counts, every queued decision included (``ctx``: the last call's context lengths)."""
        self.flush(ctx)
        if any(r[1] for r in self.host_tally):
            self.tally += torch.tensor(self.host_tally, dtype=self.tally.dtype).to(self.tally.device)
            self.host_tally = [[0.0] * 4 for _ in self.host_tally]
        return self.tally

    def queue(self, branch, skip: torch.Tensor | None, valid: torch.Tensor) -> None:
        # An MLP branch records the context its layer's attention attends to as well (kept_ctx, valid_ctx):
        # its own cost does not use them, but an ungated attention of the same layer does (core.stats).
        self.pending.append((branch.index, branch.window or -1, skip, valid))

    def count_one(self, branch, skipped: bool, ctx_one: float) -> None:
        """The row ``flush`` would add for one token, on the host (``ctx_one``: the context it attends to)."""
        row = self.host_tally[branch.index]
        w = ctx_one if not branch.window else min(ctx_one, branch.window)  # MLP rows too: see ``queue``
        row[0] += skipped
        row[1] += 1.0
        row[2] += 0.0 if skipped else w
        row[3] += w

    @torch.no_grad()
    def flush(self, ctx: torch.Tensor | None) -> None:
        """Add the queued decisions of the last call (stays on the device: no host sync)."""
        if not self.pending:
            return
        entries, self.pending = self.pending, []
        groups = {}  # calls normally share one valid mask; group by it to be safe
        for e in entries:
            groups.setdefault(id(e[3]), []).append(e)
        for group in groups.values():
            valid = group[0][3]
            c = ctx if ctx is not None and ctx.shape == valid.shape else torch.ones(valid.shape, device=valid.device)
            c = c.masked_fill(~valid, 0)
            by_window = {-1: c}
            for _, w, _, _ in group:
                if w not in by_window:
                    by_window[w] = c.clamp(max=w)
            no_skip = torch.zeros_like(valid)
            skips = torch.stack([no_skip if e[2] is None else e[2] for e in group]).flatten(1)
            ctxs = torch.stack([by_window[e[1]] for e in group]).flatten(1)
            rows = torch.stack([skips.sum(1).to(ctxs.dtype), valid.sum().to(ctxs.dtype).expand(len(group)),
                                ctxs.masked_fill(skips, 0).sum(1), ctxs.sum(1)], 1)
            if self.tally.device != rows.device:
                self.tally = self.tally.to(rows.device)
            index = torch.tensor([e[0] for e in group], device=rows.device)
            self.tally.index_add_(0, index, rows.to(self.tally.dtype))


@dataclass
class Call:
    """What one forward call of the model sets (the model-level pre-hook) and its branches share."""

    valid: torch.Tensor | None = None  # [B, T] bool, False at padding
    ctx: torch.Tensor | None = None  # [B, T] float: context length each token attends to
    prev_kv: tuple | None = None  # (layer_idx, k, v) of the last attention layer run in this call
    eligible: tuple | None = None  # (valid, valid minus the protected prefix): one mask for all branches
    n_eligible: tuple | None = None  # (eligible mask, its count read once per call): quantile counts on the host
    decided: tuple | None = None  # (skip, number skipped or None) of the last decision: see skip_count
    # one token that may skip, under thresholds (decode at batch 1): each branch decides with one host
    # comparison (one_token.py) instead of building masks (decode is overhead-bound)
    one_token: bool = False
    ctx_one: float = 0.0  # that token's context length (read once per call when counting)
    ids: torch.Tensor | None = None  # [B, T] input ids (None: embeddings were passed), for protect_tokens
    prefill: bool = False  # nothing cached before this call: its last positions are prompts' last (protect_last)


@dataclass
class Loaded:
    """What loading a gates folder and calibrating put on the model, kept for saving and undoing."""

    calibration: dict | None = None  # {"grid": [n_branches, G] tensor, "ratio": float, "tokens": int}
    oracle_calibration: dict | None = None  # the same for the oracle's scores (``calibrate(score="oracle")``)
    backup: dict = field(default_factory=dict)  # backbone weights changed by load_gates, by param name
    meta: dict | None = None  # gateskip.json of the loaded gates folder
    # the folder's backbone change, kept so that save_gates writes it again: {"kind": "lora",
    # "tensors": {lora.*}} or {"kind": "full", "params": [names]}
    backbone: dict | None = None


@dataclass
class GateState:
    """The gated branches and the decision, with its parts: the active ``plan`` (immutable), this forward ``call``'s
    masks, the ``stats`` since the plan was installed (None: not counting), what was ``loaded`` (calibration,
    backbone backups, folder metadata) and the ``taps`` (taps.py: the training log, the calibration record and the
    teacher bypass, each its own object, None when off).

    Extension point (``add_gates(state_cls=...)``): a subclass may decide differently in ``on_gate``,
    counting its decisions with ``count_decision``; one whose decision is not a gate threshold sets
    ``one_token_fast = False`` (the one-token decode shortcut is then off).
    """

    one_token_fast = True

    cfg: GateSkipConfig
    flops: LayerFlops
    branches: list = field(default_factory=list)  # GatedBranch, in execution order
    plan: Plan | None = None
    call: Call = field(default_factory=Call)
    stats: Stats | None = None
    loaded: Loaded = field(default_factory=Loaded)
    taps: Taps = field(default_factory=Taps)
    handles: list = field(default_factory=list)
    rechecking: bool = False  # inside a dense recheck (recheck.py)
    given_scores: dict | None = None  # branch index -> [B, T] scores of policy oracle_given (oracle_scores.given_scores)

    def begin_call(self, valid: torch.Tensor, ctx: torch.Tensor, ids: torch.Tensor | None = None,
                   prefill: bool = False) -> None:
        if self.stats is not None:
            self.stats.flush(self.call.ctx)
        p = self.plan
        # not under sync_free: deciding one token on the host reads its gate value back (a GPU sync)
        self.call = c = Call(valid, ctx, ids=ids, prefill=prefill)
        c.one_token = (self.one_token_fast and p is not None and POLICY[p.policy].one_token and valid.numel() == 1
                       and not self.taps.observers and not p.sync_free and bool(self._eligible(valid)))
        if self.stats is not None:
            if c.one_token:
                c.ctx_one = float(ctx) if ctx.numel() == 1 else 1.0
            self.stats.calls += 1

    @property
    def counts(self) -> torch.Tensor | None:
        return None if self.stats is None else self.stats.counts(self.call.ctx)

    def flops_by_branch(self, kv: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``flops.branch_costs`` of these branches (executed, dense per unit of each count), made once per kv mode."""
        cache = self.__dict__.setdefault("_costs", {})
        key = (self.flops, kv)  # the FLOP table may be replaced (a fallback fitted after add_gates)
        if key not in cache:
            cache[key] = branch_costs(self.flops, [b.kind for b in self.branches], kv)
        return cache[key]

    def reset_stats(self) -> None:
        self.stats = Stats(len(self.branches))

    def count_path(self, path: str) -> None:
        if self.stats is not None:
            self.stats.path_calls[path] += 1

    def count_decision(self, branch, skip: torch.Tensor | None, valid: torch.Tensor) -> None:
        """Queue a branch's decision for the statistics (``skip`` None: nothing skipped)."""
        if self.stats is not None:
            self.stats.queue(branch, skip, valid)

    def valid_for(self, x: torch.Tensor) -> torch.Tensor:
        v = self.call.valid
        if v is None or v.shape != x.shape[:2]:
            v = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return v

    def on_gate(self, branch, x: torch.Tensor, g: torch.Tensor, imp: torch.Tensor | None = None
                ) -> torch.Tensor | None:
        """Decide which tokens of this call skip ``branch``; show the gate to the taps; count for the statistics.

        ``imp``: per-token scores to rank by instead of the gate's importance (the oracle policy's)."""
        valid = self.valid_for(x)
        observers = self.taps.observers
        if self.plan is None or self.plan.ratios[branch.index] <= 0.0:
            if not any(o.wants_importance for o in observers):
                # nothing to decide: skip the importance computation too (decode is overhead-bound)
                for o in observers:
                    o.see(branch, g, valid, None)
                if self.plan is not None:
                    self.count_decision(branch, None, valid)
                return None
        imp = importance(g.detach()) if imp is None else imp
        for o in observers:
            o.see(branch, g, valid, imp)
        if self.plan is None:
            return None
        elig = self._eligible(valid)
        # the number of eligible tokens, read once per call, not per branch: the quantile count needs
        # it, and when every token is eligible the other policies can leave the mask out
        n = self._count_eligible(elig)
        if POLICY[self.plan.policy].ranks_call:
            skip, k = self.plan.decide(branch.index, imp, elig, n)
        elif self._ranks_prompt():
            skip, k = self.plan.decide(branch.index, imp, elig, n, rank=True)
        else:
            skip, k = self.plan.decide(branch.index, imp, None if n == elig.numel() else elig)
        self.call.decided = (skip, k)
        self.count_decision(branch, skip, valid)
        return skip

    def _ranks_prompt(self) -> bool:
        """Under a compute-saved budget, a prompt (a call with nothing cached) is ranked like the quantile policy
        ranks a call: its least important fraction skips, whatever the thresholds, calibrated on other text, would
        make of it (saved.py)."""
        return (self.plan.budget is not None and self.plan.budget.rank_prompts and self.call.prefill
                and POLICY[self.plan.policy].thresholds == "calibration")

    def skip_count(self, skip: torch.Tensor) -> int | None:
        """How many tokens ``skip`` (the last decision) skips, as a host int.

        Known without touching the device when the policy fixes the count (quantile). Otherwise it is
        read from the device: free on CPU, a sync on GPU (counted in ``stats()["sync_calls"]``); under
        ``sync_free`` it is not read, and None is returned.
        """
        d = self.call.decided
        if d is not None and d[0] is skip and d[1] is not None:
            return d[1]
        if self.plan.sync_free:
            return None
        if self.stats is not None:
            self.stats.sync_calls += 1
        # one token (decode at batch 1): reading the bool directly costs a tenth of sum-then-read
        return int(skip) if skip.numel() == 1 else int(skip.sum())

    def _count_eligible(self, elig: torch.Tensor) -> int:
        c = self.call
        if c.valid is None or elig.shape != c.valid.shape:  # valid_for made it: all ones
            return elig.numel()
        if c.n_eligible is None or c.n_eligible[0] is not elig:
            c.n_eligible = (elig, int(elig.sum()))
        return c.n_eligible[1]

    def _eligible(self, valid: torch.Tensor) -> torch.Tensor:
        """Tokens that may skip: valid ones that no never-skip rule protects (once per call, not per branch).

        ``protect``: ``ctx`` is the context length a token sees (its 1-based position in its sequence, cache and
        left padding accounted for), so in cached decode nothing is protected and in a left-padded row the first
        *real* token is. ``protect_last``: in a call with nothing cached, each row's last real token (``protect_prompt``:
        all of its tokens).
        ``protect_tokens``: tokens with those ids, wherever they are."""
        p, c = self.plan, self.call
        if c.valid is None or c.valid.shape != valid.shape:
            return valid
        if c.eligible is not None and c.eligible[0] is valid:
            return c.eligible[1]
        elig = valid
        if p.protect > 0 and c.ctx is not None and c.ctx.shape == valid.shape:
            elig = elig & (c.ctx.to(valid.device) > p.protect)
        if p.protect_prompt and c.prefill:
            elig = torch.zeros_like(valid)
        elif (p.protect_last or p.protect_tail) and c.prefill:
            elig = elig & ~last_real(valid, max(int(p.protect_last), p.protect_tail))
        if p.protect_tokens is not None and c.ids is not None and c.ids.shape == valid.shape:
            never = p.protect_tokens
            if never.device != c.ids.device:  # once per plan and device, kept beside the plan
                memo = plan_memo(p)
                never = memo.setdefault(("never", c.ids.device), never.to(c.ids.device))
            elig = elig & ~torch.isin(c.ids, never)
        c.eligible = (valid, elig)
        return elig


def last_real(valid: torch.Tensor, k: int = 1) -> torch.Tensor:
    """[B, T] bool: each row's last ``k`` True positions of ``valid`` (a row with fewer has them all)."""
    n = valid.long().cumsum(-1)
    return valid & (n > n[:, -1:] - k)
