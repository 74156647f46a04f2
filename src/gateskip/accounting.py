"""What a run computed and saved: ``gateskip.stats``, from the per-branch counts a skipping plan keeps (state.Stats)
and the FLOP table (flops.branch_costs)."""

from __future__ import annotations

from torch import nn

from gateskip.errors import GateSkipError
from gateskip.record import peek


def stats(model: nn.Module) -> dict:
    """Statistics of the forward calls since the current (or last) ``skipping`` context began.

    ``tokens_skipped`` is the paper's measure: the fraction of (token, branch) pairs skipped,
    attention and MLP weighted equally (with gates on one kind only, the other kind's branches
    count as never skipped; ``attn_skipped`` / ``mlp_skipped`` give each kind alone).
    ``compute_saved`` is FLOP-weighted: 1 - FLOPs a physical run executes (kept tokens' branches,
    K/V of skipped tokens in ``kv="compute"`` mode, attention over the context, every gate, the
    fallback of every skipped token, the branches without a gate, the LM head rows computed) / FLOPs
    of the dense model without gates on the same calls. With vector gates on a small model it can be
    negative at low ratios.
    """
    st = peek(model).state
    if st is None:
        raise GateSkipError("this model has no gates: call gateskip.add_gates(model) or load_gates(model, dir) first")
    if st.counts is None:
        raise GateSkipError("no statistics yet: run the model inside `with gateskip.skipping(model, ...)` first")
    kv = st.plan.kv if st.plan is not None else st.cfg.kv
    dense, executed = run_flops(st, kv)
    per_module, frac_by_kind = _fractions(st)
    rechecked = st.stats.recheck.rows if st.stats.recheck is not None else 0
    kinds = {b.kind for b in st.branches}
    all_fracs = frac_by_kind["attn"] + frac_by_kind["mlp"]
    all_fracs += [0.0] * (len(all_fracs) if len(kinds) == 1 else 0)  # the ungated branches skip nothing
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        "tokens_skipped": mean(all_fracs),
        "compute_saved": 1.0 - executed / dense if dense else 0.0,
        "attn_skipped": mean(frac_by_kind["attn"]),
        "mlp_skipped": mean(frac_by_kind["mlp"]),
        "flops_dense": dense,
        "flops_executed": executed,
        "gate_flops": float(st.counts[:, 1].sum()) * st.flops.gate,
        "forward_calls": st.stats.calls,
        "policy": st.plan.policy if st.plan is not None else None,
        "path": _path_summary(st.stats.path_calls),  # physical / masked / mixed / dense (nothing was skipped)
        "path_calls": dict(st.stats.path_calls),  # branch calls per path
        # branch calls that read their skipped count back from the device (one GPU sync each; 0 under
        # the quantile policy, whose count is known on the host)
        "sync_calls": st.stats.sync_calls,
        "per_module": per_module,
        "rechecked": rechecked,  # rows computed again without skipping (recheck.py), their compute counted
    }


def run_flops(st, kv: str) -> tuple[float, float]:
    """(dense FLOPs, executed FLOPs) of the calls since the plan was installed: the dense model without gates on the
    same calls, and what a physical run executes, the dense reruns of recheck.py on top (their calls are not in the
    reference: they were not asked for)."""
    e_cost, d_cost = st.flops_by_branch(kv)
    lm = st.flops.lm_head
    c = st.counts.double().cpu()
    dense = float((c * d_cost).sum()) + lm * st.stats.lm_rows
    executed = float((c * e_cost).sum()) + lm * st.stats.lm_rows
    rerun = st.stats.recheck
    if rerun is not None:
        executed += float((rerun.counts(None).double().cpu() * e_cost).sum()) + lm * rerun.lm_rows
    return dense, executed


def _fractions(st) -> tuple[dict, dict]:
    """(per-module skipped fraction and tokens, skipped fractions by kind)."""
    per_module, frac_by_kind = {}, {"attn": [], "mlp": []}
    for b, (s, n) in zip(st.branches, st.counts[:, :2].double().cpu().tolist()):
        frac = s / n if n else 0.0
        per_module[b.name] = {"skipped": frac, "tokens": int(n)}
        frac_by_kind[b.kind].append(frac)
    return per_module, frac_by_kind


def _path_summary(calls: dict) -> str:
    used = [p for p in ("physical", "masked") if calls.get(p)]
    return used[0] if len(used) == 1 else ("mixed" if used else "dense")
