"""GatedBranch: where a token is gated and, when the plan says so, skipped.

A branch (a layer's attention or MLP) is wrapped, never rewritten: the original module is kept
untouched as ``.module`` so ``remove_gates`` restores it exactly. Path of one call:

    x (branch input, after the pre-norm)
      -> g = gate(x)                              gates.py
      -> skip = plan.decide(importance(g))        state.py / policies.py
      -> out = module(x) with K/V handled         kv.py (skipped tokens' K/V from the layer below)
      -> out = post_norm(out)   (Gemma only)      arch.py explains why the gate goes after it
      -> out = g * out, and 0 where skipped       (the hidden state of a skipped token passes unchanged)
         or g * fallback(x) where skipped         (GateSkipConfig.fallback, fallback.py)

Two ways to run a branch that skips tokens. The *masked* path runs the module on every token and
zeroes the skipped outputs: what training uses and the reference. The *physical* path (physical.py)
runs the module on the kept tokens only: what inference uses by default (``skipping(path=...)``).
With a fallback, a skipped token gets ``g * fallback(x)`` on every path: the gate multiplies the
fallback as it would the branch (``fallback`` is None for the paper's zero, whose ops are unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from gateskip import one_token, physical
from gateskip.compat import cache_key
from gateskip.errors import GateSkipError
from gateskip.fallback import gated_fallback
from gateskip.kv import KVProxy
from gateskip.policies import POLICY
from gateskip.state import plan_memo


class GatedBranch(nn.Module):
    def __init__(self, module: nn.Module, gate: nn.Module, *, kind: str, layer: int, index: int,
                 post_norm: nn.Module | None, placement: str, detach_input: bool, window: int | None,
                 state, fallback: nn.Module | None = None):
        super().__init__()
        self.module = module
        self.gate = gate
        self.fallback = fallback  # what a skipped token gets instead of 0 (fallback.py); None: 0
        self.post_norm = post_norm
        self.kind, self.layer, self.index = kind, layer, index
        self.name = f"layers.{layer}.{kind}"
        self.placement, self.detach_input, self.window = placement, detach_input, window
        object.__setattr__(self, "state", state)  # plain attribute: not a submodule, not in state_dict

    # gate / module / post_norm / fallback are read on every call; nn.Module keeps submodules in
    # ``_modules``, reached through __getattr__ (two Python frames here). A plain copy in __dict__ is
    # found directly: ``fast_gate``, ``fast_module``, ``fast_post_norm``, ``fast_fallback``, the public seams the
    # physical and one-token paths read (with ``run_module``, ``gated_call`` and ``takes_physical_path``).
    _FAST = ("gate", "module", "post_norm", "fallback")

    def __setattr__(self, name: str, value):
        super().__setattr__(name, value)
        if name in self._FAST:
            self.__dict__["fast_" + name] = value

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # transformers may read attributes of the wrapped module (layer_idx, ...)
            return getattr(self._modules["module"], name)

    def forward(self, *args, **kwargs):
        if args:
            x, args = args[0], args[1:]
        else:
            x = kwargs.pop("hidden_states")
        st = self.state
        if st.taps.teacher is not None:
            return self.run_module(x, args, kwargs)
        if st.call.one_token and x.numel() == x.shape[-1] and self.placement == "after":
            return one_token.run(self, x, args, kwargs)  # decode at batch 1: one_token.py
        g = self.fast_gate(x.detach() if self.detach_input and x.requires_grad else x)
        if g.dtype != x.dtype:
            g = g.to(x.dtype)
        plan = st.plan
        if plan is not None and POLICY[plan.policy].computes_branch and plan.ratios[self.index] > 0.0:
            return self._oracle_call(x, g, args, kwargs)
        skip = st.on_gate(self, x, g)
        if self.placement == "before":
            x = x * g
        if skip is None:
            st.count_path("dense")
        elif self.takes_physical_path(plan, x) and not (args and self.kind == "attn"):  # attention args come as keywords
            n = skip.numel()
            n_skip = st.skip_count(skip)  # sizes the gather: host-known under quantile, else read (GPU: a sync)
            if n_skip is None:  # sync_free and a data-dependent count: reading it would be a sync, so run masked
                st.count_path("masked")
            elif plan.path == "physical" or n_skip in (0, n) or physical.faster(self.kind, n_skip, n, plan.execution):
                st.count_path("physical")
                if n_skip == 0:
                    skip = None  # nothing skipped: the plain (masked-path) call below is the fastest
                else:
                    return physical.run(self, x, g if self.placement == "after" else None, skip, n_skip, args,
                                        kwargs, static=plan.sync_free)
            else:
                st.count_path("masked")
        else:
            st.count_path("masked")
        return self.gated_call(x, g if self.placement == "after" else None, skip, args, kwargs)

    def _oracle_call(self, x, g, args, kwargs):
        """``policy="oracle"`` / ``"oracle_threshold"``, ceilings to measure learned gates against, not methods: the
        branch runs on every token, and the tokens skipped are those whose gated output moves least when
        replaced by what a skipped token gets (0 or ``g * fallback(x)``), ranked per call like the quantile
        policy or compared per token with calibrated thresholds (``calibrate(score="oracle")``). Masked path,
        skipped tokens keep their own K/V (``skipping`` asks for kv="compute" and gates after the branch)."""
        st = self.state
        out = self.run_module(x, args, kwargs)
        o = out[0] if isinstance(out, tuple) else out
        fb = self.fast_fallback
        alt = None if fb is None else fb(x)
        if POLICY[st.plan.policy].given_scores:
            imp = self._given_scores(x)
        else:
            imp = ((o if alt is None else o - alt) * g).detach().float().norm(dim=-1)
        skip = st.on_gate(self, x, g, imp=imp)
        st.count_path("masked")
        o = o * g
        if skip is not None:
            o = o.masked_fill(skip.unsqueeze(-1), 0.0) if alt is None else torch.where(skip.unsqueeze(-1), alt * g, o)
        return (o, *out[1:]) if isinstance(out, tuple) else o

    def _given_scores(self, x) -> torch.Tensor:
        """This branch's [B, T] scores installed by ``oracle_scores.given_scores`` for the batch being run."""
        scores = self.state.given_scores
        imp = None if scores is None else scores.get(self.index)
        if imp is None or tuple(imp.shape) != tuple(x.shape[:2]):
            raise GateSkipError(f"policy {self.state.plan.policy!r} ranks by scores measured on the batch being run: "
                                "wrap the call in gateskip.oracle_scores.given_scores(model, fisher_scores(model, ids))")
        return imp.to(x.device)

    def gated_call(self, x, g, skip, args, kwargs):
        """The masked path: the branch on every token, times the gate (``g``, None if applied before), 0 where
        skipped (or the gated fallback: computed for every token here, kept only where skipped)."""
        st, plan = self.state, self.state.plan
        if self.kind == "attn" and plan is not None and plan.copy_kv:
            key = cache_key(kwargs)
            kwargs[key] = KVProxy(kwargs.get(key), st, skip)
        out = self.run_module(x, args, kwargs)
        o = out[0] if isinstance(out, tuple) else out
        raw = o
        if g is not None:
            o = o * g
        if skip is not None:
            fb = self.fast_fallback
            if plan.straight_through and g is not None and o.requires_grad:
                o = _straight_through(raw, g, o, skip, None if fb is None else fb(x))
            elif fb is None:
                o = o.masked_fill(skip.unsqueeze(-1), 0.0)
            else:
                o = torch.where(skip.unsqueeze(-1), gated_fallback(fb, x, g), o)
        return (o, *out[1:]) if isinstance(out, tuple) else o

    def takes_physical_path(self, plan, x) -> bool:
        """Whether this call runs the physical path (skipped tokens never computed) under ``plan``."""
        if plan.path == "masked":
            return False
        memo = plan_memo(plan)  # asked once per plan: reading the HF config costs microseconds
        ok = memo.get(("physical", self.index))
        if ok is None:
            ok = memo[("physical", self.index)] = physical.supports(self)
        if not ok:
            return False
        return plan.path == "physical" or not (torch.is_grad_enabled() and x.requires_grad)

    def run_module(self, x, args, kwargs):
        """The original branch, followed by its post-norm where the family has one."""
        out = self.fast_module(x, *args, **kwargs)
        post = self.fast_post_norm
        if post is None:
            return out
        if isinstance(out, tuple):
            return (post(out[0]), *out[1:])
        return post(out)

    def extra_repr(self) -> str:
        return f"name={self.name}, placement={self.placement}"




def _straight_through(raw: torch.Tensor, g: torch.Tensor, gated: torch.Tensor, skip: torch.Tensor,
                      fb: torch.Tensor | None = None) -> torch.Tensor:
    """Skipped rows: 0 (or ``g * fb``) in the forward pass, yet their gate gets the gradient of ``raw * g``.

    Without this, a skipped token's gate only feels the sparsity penalty, which pushes it further down:
    once skipped, a token tends to stay skipped whatever the task loss would say. ``s - s.detach()``
    is exactly 0 in value (so the forward equals the masked path) and has the gradient of ``s``; the
    branch output itself is detached, so no gradient reaches the branch through a skipped token.
    ``fb``: the fallback output of every token (None: zero); it is added with the gate detached, so the
    fallback is trained through skipped tokens while the gate still sees only the kept-token gradient.
    """
    s = raw.detach() * g
    skipped = s - s.detach()
    if fb is not None:
        skipped = skipped + fb * g.detach()
    return torch.where(skip.unsqueeze(-1), skipped, gated)
