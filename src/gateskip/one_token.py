"""Decode at batch 1 under thresholds, the common serving case: the whole shortcut, in one place.

When a forward call is one token that may skip under the threshold policy (``Call.one_token``, set by
``GateState.begin_call``), each gated branch runs ``run`` instead of ``GatedBranch.forward``'s general
route. The call is one token, so the branch runs whole or not at all:

    g = gate_values(gate, x)        matrix-vector ops on the flat token, no module call
    skipped = decide(state, ...)    importance read on the host, compared with the host threshold
    skipped: physical.skip_all      the module is not called (K/V of the token still written)
    kept:    branch.gated_call     the branch as is, times its gate

Same decisions and outputs as the general route (tests/test_core.py and tests/test_reliability.py check
them against it); this is only its shortest route. At batch 1 a decode step of SmolLM2 is ~60 branch
calls of ~0.3-0.7 ms each, so tens of microseconds of Python per branch are a few percent of the step
(docs/benchmark-log.md, "What stops it").
"""

from __future__ import annotations

import torch

from gateskip import physical

_TRUE: dict = {}


def run(branch, x: torch.Tensor, args: tuple, kwargs: dict):
    """The output of ``branch`` (a GatedBranch, gate after the branch) on the one token ``x`` ([1, 1, H])."""
    st = branch.state
    g = gate_values(branch.fast_gate, x.detach() if branch.detach_input and x.requires_grad else x)
    skip = decide(st, branch, g)
    if skip is None:
        st.count_path("dense")
    elif branch.takes_physical_path(st.plan, x) and not (args and branch.kind == "attn"):
        st.count_path("physical")
        return physical.skip_all(branch, x, kwargs, skip, g)
    else:
        st.count_path("masked")
    return branch.gated_call(x, g, skip, args, kwargs)


def gate_values(gate, x: torch.Tensor) -> torch.Tensor:
    """``gate(x)`` of a single token ``x`` ([1, 1, H]), shaped [H] or [1], in ``x``'s dtype.

    Matrix-vector products on the flat token through the gate's plain linear layers (``Gate._linears``;
    a gate without them is called as a module). The values broadcast over a [1, 1, H] branch output.
    """
    lin = getattr(gate, "_linears", None)
    if lin is None:
        return gate(x).to(x.dtype).reshape(-1)
    v = x.reshape(-1)
    if v.dtype != torch.float32:
        v = v.float()
    p = lin[0]._parameters
    if len(lin) == 1:
        g = torch.addmv(p["bias"], p["weight"], v).sigmoid_()
    else:
        q = lin[1]._parameters
        g = torch.addmv(q["bias"], q["weight"], torch.mv(p["weight"], v)).sigmoid_()
    return g if g.dtype == x.dtype else g.to(x.dtype)


def importance(g: torch.Tensor) -> float:
    """``gates.importance`` of one token's gate values (``gate_values``), read on the host."""
    return float(g) if g.shape[0] == 1 else float(g.mean())


def decide(st, branch, g: torch.Tensor) -> torch.Tensor | None:
    """``GateState.on_gate`` for the one token: a (shared, all-True) skip mask, or None if kept.

    The importance is read only where the branch may skip and compared with the threshold rounded to the
    gate's dtype, as ``policies.threshold_skip`` compares them; no mask is built. Counted on the host
    (``Stats.count_one``): the row the general route's queue would add.
    """
    thr = st.plan.host_thresholds(g.dtype)[branch.index]
    skipped = thr is not None and importance(g) < thr
    if st.stats is not None:
        if thr is not None:
            st.stats.sync_calls += 1
        st.stats.count_one(branch, skipped, st.call.ctx_one)
    return _one_true(st.call.valid) if skipped else None


def _one_true(like: torch.Tensor) -> torch.Tensor:
    """A shared read-only ``True`` mask of ``like``'s shape (one token): no allocation per branch."""
    key = (like.device, like.shape)
    t = _TRUE.get(key)
    if t is None:
        t = _TRUE[key] = torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return t
