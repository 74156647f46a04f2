"""A budget in compute saved: ``skipping(model, saved=0.25)`` steers the skip ratio so that the FLOP-weighted
compute saved on the text being run lands at the target, whatever the gates skip and whatever the text.

The ratio is the paper's knob: each branch skips a fraction of the tokens of the calibration text (threshold) or of
each call (quantile). What that saves depends on the text (thresholds calibrated on one text skip more or less of
another), on which branches have gates, and on what the run adds (gates, fallbacks, dense rechecks). A small
controller sits on the ratio ``q`` (one for every branch that may skip):

- predicted saving of ``q`` on this text: ``s(q) = slope * q + offset``. ``slope`` comes from the FLOP table (what
  skipping every token of every skippable branch saves); the prior offset is the gates' own cost.
- after each forward call of the model (a prefill, a decode step, a scored batch), the call's observed saving
  updates ``offset``: a FLOP-weighted running mean of ``observed - slope * q`` over the calls so far, the prior
  counting as ``PRIOR_CALLS`` calls of the first one's size.
- with ``prompt_boost`` (generation) a prompt aims at that many times the target, capped at what the answers seen so
  far can pay back (``SavedBudget.boost``), and the answer's steps make up the rest;
- the next call's ``q`` is the one whose predicted saving pays the target plus the debt run up so far, spread over
  ``HORIZON`` calls of its own size (known before it runs: its tokens and their context), or over as many FLOPs as
  were run so far if that is more, and never aiming above ``CATCH_UP`` times the target. The budget is over the
  whole run: a prompt that saved too little is paid back by the answer's steps, a little at each.

The offsets implied by every call are also averaged (FLOP-weighted) on the model, per setting and kind of call, and
the next ``skipping`` context with the same setting starts from them: a second generation starts where the first
ended. ``stats()["compute_saved"]`` reports what was saved, as always.
"""

from __future__ import annotations

import dataclasses

import torch

from gateskip.errors import GateSkipError
from gateskip.policies import POLICY

PRIOR_CALLS = 1.0  # weight of the prior offset, in calls of the first call's size
HORIZON = 8.0  # the debt is paid back over this many calls of the coming one's size
# generation (gateskip.generate, `gateskip generate`, `eval --suite chat/gen`): prompts aim at 1.5 times the budget.
# Skipping a prompt's tokens costs its answer less than skipping the answer's own: on 200 chat requests at 15% saved,
# 1.5 ends no answer early, keeps overlap 0.405 with the original's answers and NLL x1.26, against 1.0% / 0.396 /
# x1.44 at 1.0 and 4.0% / 0.367 / x1.21 at 2.0 (BENCHMARKS.md, "Compute-saved budgets").
GENERATION_PROMPT_BOOST = 1.5
CATCH_UP = 1.5  # a call never aims at more than this times the target
MAX_RATIO = 0.95


def check_saved(saved: float) -> float:
    if not 0.0 < float(saved) < 1.0:
        raise GateSkipError(f"saved={saved!r} is invalid: give the fraction of compute to save, e.g. 0.25 (for nothing "
                            "skipped: ratio 0, --ratio 0)")
    return float(saved)


class SavedBudget:
    """The controller of one ``skipping(saved=...)`` context (see the module doc). Prefill calls (nothing cached) and
    cached steps keep separate offsets: a long prompt and a decode step save differently at the same ratio."""

    def __init__(self, st, target: float, weights: list[float], key: tuple, prompt_boost: float | None = None):
        self.target, self.key = target, key
        self.prompt_boost = 1.0 if prompt_boost is None else prompt_boost
        # generation (a boost given): a prompt's tokens are ranked within its call (quantile-like), so its share lands
        # without the calibration text's shift; otherwise every call is decided by the plan's policy
        self.rank_prompts = prompt_boost is not None
        self.weights = weights  # per branch: 1 where the branch may skip, else 0
        e_cost, d_cost = st.flops_by_branch(key[2])
        ones = torch.tensor([[0.0, 1.0, 64.0, 64.0]], dtype=torch.float64).expand(len(weights), 4)
        dense = float((ones * d_cost).sum())
        none = float((ones * e_cost).sum())
        skip_all = ones.clone()
        skip_all[:, 0] = torch.tensor(weights, dtype=torch.float64)
        skip_all[:, 2] = 64.0 * (1.0 - skip_all[:, 0])
        self.slope = max(1e-6, (none - float((skip_all * e_cost).sum())) / dense)
        self.memory = st.__dict__.setdefault("_saved_offsets", {})  # kept on the model for the next context
        prior = -(none - dense) / dense  # the gates' own cost
        # by prefill / cached step; the memory is (FLOP-weighted mean offset, FLOPs) over earlier contexts
        self.offset = {r: self.memory.get((*key, r), (prior, 0.0))[0] for r in (True, False)}
        self.weight = {True: 0.0, False: 0.0}  # FLOPs observed per kind of call (dense reference)
        self.prior = {True: None, False: None}  # the prior offset's weight per kind, set by its first call
        self.dense = self.executed = 0.0  # FLOPs of every call so far (what stats() counts)
        self.prefill = True
        self.q = self.ratio(True, 0.0)

    def ratio(self, prefill: bool, size: float) -> float:
        """The ratio for the next call (``size``: its dense FLOPs, estimated): its predicted saving pays the target
        and the debt so far, spread over ``HORIZON`` calls of its size. A kind of call not seen yet in this context
        starts from the other kind's offset when that one has been measured."""
        if not self.weight[prefill] and self.weight[not prefill] and (*self.key, prefill) not in self.memory:
            self.offset[prefill] = self.offset[not prefill]
        # a prompt aims at prompt_boost times the target, a cached step at the target; both pay the debt run up so
        # far, spread over HORIZON calls of this one's size or over as many FLOPs as were run so far if that is more
        # (a long prompt is paid back by the answer's steps a little each, not by all of the next one)
        boost = self.boost() if prefill else 1.0
        debt = self.target * self.dense - (self.dense - self.executed)  # FLOPs still to save over the run
        # saved too much so far: skipping less is safe, so the next calls give it back at once
        horizon = HORIZON * size if debt < 0 else max(HORIZON * size, self.dense)
        want = boost * self.target + (debt / horizon if horizon > 0 else 0.0)
        want = min(max(want, 0.0), max(CATCH_UP, boost) * self.target, 0.9)
        self.prefill = prefill
        self.q = min(MAX_RATIO, max(0.0, (want - self.offset[prefill]) / self.slope))
        return self.q

    def boost(self) -> float:
        """What a prompt aims at, in times the target: ``prompt_boost``, but never more than the answers can pay
        back. With answers of A times a prompt's dense compute (seen so far here and in earlier contexts of this
        setting), a prompt at (1 + A) times the target already leaves them nothing to save; a long prompt with a
        short answer (extractive questions) then lands at the target instead of above it. Before any answer has
        been seen: ``prompt_boost``."""
        prompts, answers = self.memory.get((*self.key, "dense"), (0.0, 0.0))
        if not answers:
            return self.prompt_boost
        return max(1.0, min(self.prompt_boost, 1.0 + answers / prompts))

    def observe(self, dense: float, executed: float) -> None:
        """Count the call just run (its dense and executed FLOPs): its kind's offset moves to the FLOP-weighted mean
        of what the calls implied, the prior counting as ``PRIOR_CALLS`` calls of the first one's size."""
        if dense <= 0:
            return
        r = self.prefill
        implied = (1.0 - executed / dense) - self.slope * self.q
        if self.prior[r] is None:
            self.prior[r] = PRIOR_CALLS * dense
        seen = self.prior[r] + self.weight[r]
        self.offset[r] = (self.offset[r] * seen + implied * dense) / (seen + dense)
        self.weight[r] += dense
        self.dense += dense
        self.executed += executed
        mean, weight = self.memory.get((*self.key, r), (0.0, 0.0))
        self.memory[(*self.key, r)] = ((mean * weight + implied * dense) / (weight + dense), weight + dense)
        prompts, answers = self.memory.get((*self.key, "dense"), (0.0, 0.0))  # the answers' share, for boost()
        self.memory[(*self.key, "dense")] = (prompts + dense, answers) if r else (prompts, answers + dense)


def install_budget(st, plan, saved: float, prompt_boost: float | None, modules: tuple[str, ...]):
    """``plan`` steered to ``saved`` (``skipping(saved=...)``): every branch of ``modules`` at the controller's ratio."""
    check_saved(saved)
    if prompt_boost is not None and not 0.0 < float(prompt_boost) * float(saved) < 1.0:
        raise GateSkipError(f"prompt_boost={prompt_boost!r} is invalid: prompts would aim at "
                            f"{prompt_boost * saved:.2f} of their compute; use a factor below {1 / saved:.1f}")
    weights = [1.0 if b.kind in modules else 0.0 for b in st.branches]
    key = (plan.policy, modules, plan.kv, round(float(saved), 6), prompt_boost)
    budget = SavedBudget(st, float(saved), weights, key, prompt_boost)
    return with_ratio(st, dataclasses.replace(plan, budget=budget), budget.q)


def before_call(st, prefill: bool, valid: torch.Tensor, ctx: torch.Tensor) -> None:
    """Before a forward call under a ``saved`` plan (``valid``, ``ctx``: its tokens and the context each sees, as
    ``core.call_tokens`` gives them): install this call's ratio."""
    _, d_cost = st.flops_by_branch(st.plan.kv)
    n = float(valid.sum())
    size = n * float(d_cost[:, 1].sum()) + float(ctx.masked_fill(~valid, 0).sum()) * float(d_cost[:, 3].sum())
    st.plan = with_ratio(st, st.plan, st.plan.budget.ratio(prefill, size))


def after_call(st) -> None:
    """After a forward call under a ``saved`` plan: count its FLOPs (reruns of recheck.py included)."""
    from gateskip.accounting import run_flops

    budget = st.plan.budget
    dense, executed = run_flops(st, st.plan.kv)
    budget.observe(dense - budget.dense, executed - budget.executed)


def with_ratio(st, plan, q: float):
    """``plan`` with every skippable branch at ratio ``q`` (thresholds from the calibration grid under threshold)."""
    ratios = [q * w for w in plan.budget.weights]
    thresholds = None
    if plan.thresholds is not None:
        cal = getattr(st.loaded, POLICY[plan.policy].thresholds or "calibration")
        thresholds = list(thresholds_at(cal["grid"], q, plan.budget.weights).unbind(0))
    return dataclasses.replace(plan, ratios=ratios, thresholds=thresholds)


def thresholds_at(grid: torch.Tensor, q: float, weights: list[float]) -> torch.Tensor:
    """[branches]: ``policies.threshold_from_grid`` of every branch's calibration quantiles ``grid`` ([branches, G])
    at ratio ``q`` in one go (-inf where a branch may not skip: weight 0)."""
    if q <= 0.0:
        return torch.full((grid.shape[0],), float("-inf"), dtype=grid.dtype)
    pos = min(q, 1.0) * (grid.shape[1] - 1)
    lo = int(pos)
    hi = min(lo + 1, grid.shape[1] - 1)
    thr = grid[:, lo] * (1 - (pos - lo)) + grid[:, hi] * (pos - lo)
    if q >= 1.0:
        thr = torch.full_like(thr, float("inf"))
    w = torch.tensor(weights, dtype=torch.bool)
    return thr.masked_fill(~w, float("-inf"))
