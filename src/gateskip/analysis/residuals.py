"""How good each branch's fallback is, and how well its gate ranks tokens by skip cost (``inspect --fallback``).

The model runs densely (nothing skipped) over held-out rows. Per gated branch and real token we take
the branch input the fallback sees (the wrapped module's input, after the pre-norm; with
``placement="before"`` already multiplied by the gate), the branch output y (where the gate
multiplies it: after the post-norm for Gemma), the fallback prediction y^ = fb(x) (0 for the paper's
zero fallback) and the gate value g. Skipping a token changes its residual update from g * y to
g * y^ (wrap.py), so its *skip cost* is ||g * (y - y^)|| (``placement="before"``: ||y - y^||, the gate
then sits inside y), exactly what ``skipping(policy="oracle")`` ranks by.

Four figures per branch:
- ``r2``: held-out R^2 of the fallback, 1 - sum ||y - y^||^2 / sum ||y - mean(y)||^2, pooled over
  tokens (zero fallback: 0 or below);
- ``cost``: mean skip cost relative to mean ||g * y|| (zero fallback: 1.0);
- ``spearman``: rank correlation over tokens between the gate's importance (mean gate, the key the
  skip policies rank by) and the skip cost; > 0 when a higher gate means costlier to skip;
- ``overlap``: of the ``ratio`` share of tokens with the lowest importance, the fraction that is also
  among the ``ratio`` share with the lowest skip cost (1.0: the gate skips what an oracle would;
  ``ratio``: random level).
Padding and the first ``protect_first`` tokens of each row (which never skip) are left out.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gateskip.analysis.heatmap import write_figure
from gateskip.core import _as_inputs, gate_state, skipping
from gateskip.errors import GateSkipError
from gateskip.fallback import FALLBACK
from gateskip.gates import importance
from gateskip.policies import quantile_count
from gateskip.taps import check_not_bypassed

MEASURES = ("r2", "cost", "spearman", "overlap")
KINDS = ("attn", "mlp")


# ---- pure helpers --------------------------------------------------------------------------------

def r2_from_sums(n: int, sum_y: torch.Tensor, sum_yy: float, sse: float) -> float:
    """R^2 from streamed sums: ``n`` tokens, sum of y ([H]), sum of ||y||^2 and sum of ||y - y^||^2."""
    if n == 0:
        return float("nan")
    sst = float(sum_yy) - float(sum_y.double().dot(sum_y.double())) / n
    return 1.0 - float(sse) / sst if sst > 0 else float("nan")


def r2(y: torch.Tensor, yhat: torch.Tensor) -> float:
    """Pooled R^2 of predictions ``yhat`` of ``y`` (both [N, H]): 1 - SSE / SST, SST around the mean vector."""
    y, yhat = y.double().reshape(-1, y.shape[-1]), yhat.double().reshape(-1, y.shape[-1])
    return r2_from_sums(y.shape[0], y.sum(0), float((y * y).sum()), float(((y - yhat) ** 2).sum()))


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """0-based ranks of the values of 1-D ``v``; tied values share their average rank (float64)."""
    v = v.reshape(-1)
    order = v.argsort(stable=True)
    _, counts = torch.unique_consecutive(v[order], return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() + 1) / 2  # average of the 0-based positions each tied run takes
    ranks = torch.empty(v.numel(), dtype=torch.float64)
    ranks[order.cpu()] = torch.repeat_interleave(mean_rank, counts).cpu()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of 1-D ``a`` and ``b`` (ties: average ranks); NaN if either is constant."""
    if a.numel() != b.numel():
        raise GateSkipError(f"spearman needs two equally long vectors, got {a.numel()} and {b.numel()}")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra.dot(rb)) / den if den > 0 else float("nan")


def lowest(v: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the ``round(ratio * n)`` lowest values of 1-D ``v`` (ties by position, like quantile_skip)."""
    return v.reshape(-1).argsort(stable=True)[:quantile_count(v.numel(), ratio)]


def overlap(gate: torch.Tensor, cost: torch.Tensor, ratio: float) -> float:
    """Of the ``ratio`` share of tokens with the lowest ``gate``, the fraction also among the ``ratio`` share
    with the lowest ``cost`` (1.0: the same tokens; about ``ratio`` for an unrelated ranking)."""
    if gate.numel() != cost.numel():
        raise GateSkipError(f"overlap needs two equally long vectors, got {gate.numel()} and {cost.numel()}")
    a, b = lowest(gate, ratio), lowest(cost, ratio)
    if a.numel() == 0:
        return float("nan")
    both = torch.zeros(gate.numel(), dtype=torch.bool)
    both[b.cpu()] = True
    return float(both[a.cpu()].double().mean())


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


# ---- collection ----------------------------------------------------------------------------------

class _Branch:
    """Streamed sums and per-token scalars of one branch."""

    def __init__(self):
        self.n, self.sum_y, self.sum_yy, self.sse = 0, None, 0.0, 0.0
        self.imp, self.cost, self.full = [], [], []

    @torch.no_grad()
    def add(self, y: torch.Tensor, yhat: torch.Tensor | None, g: torch.Tensor | None, imp: torch.Tensor) -> None:
        """``y``, ``yhat`` [N, H] (``yhat`` None: zero fallback); ``g`` [N, H or 1] multiplying the output, or
        None (gate before the branch); ``imp`` [N] the tokens' importances."""
        y = y.double()
        d = y if yhat is None else y - yhat.double()
        self.n += y.shape[0]
        s = y.sum(0).cpu()
        self.sum_y = s if self.sum_y is None else self.sum_y + s
        self.sum_yy += float((y * y).sum())
        self.sse += float((d * d).sum())
        if g is not None:
            g = g.double()
            d, y = d * g, y * g
        self.cost.append(d.norm(dim=-1).cpu())
        self.full.append(y.norm(dim=-1).cpu())
        self.imp.append(imp.double().cpu())

    def figures(self, ratio: float) -> dict:
        imp, cost, full = (torch.cat(t) if t else torch.zeros(0, dtype=torch.float64)
                           for t in (self.imp, self.cost, self.full))
        mean_full = float(full.mean()) if full.numel() else 0.0
        return {
            "tokens": self.n,
            "r2": r2_from_sums(self.n, self.sum_y, self.sum_yy, self.sse) if self.n else float("nan"),
            "cost": float(cost.mean()) / mean_full if mean_full > 0 else float("nan"),
            "spearman": spearman(imp, cost) if self.n > 1 else float("nan"),
            "overlap": overlap(imp, cost, ratio) if self.n else float("nan"),
        }


@torch.no_grad()
def fallback_stats(model, batches, ratio: float = 0.3, protect_first: int | None = None,
                   progress: bool = True) -> dict:
    """The fallback and gate-ranking figures of every gated branch over ``batches`` (module docstring).

    Args:
        batches: 1-D rows or 2-D batches of ``input_ids``, or tokenizer outputs (``attention_mask``: padding
            is left out).
        ratio: share of tokens the overlap is measured at, in (0, 1).
        protect_first: leave out the first N tokens of each row; default: the gate config's.

    Returns ``{"fallback", "rank", "placement", "ratio", "protect_first", "tokens", "rows", "branches":
    [{"name", "kind", "layer", "tokens", "r2", "cost", "spearman", "overlap"}], "by_kind": {kind: means}}``
    (a figure that cannot be computed, e.g. the Spearman of constant gates, is None).
    """
    from tqdm import tqdm

    st = gate_state(model)
    check_not_bypassed(st, "measure them")
    if not 0.0 < float(ratio) < 1.0:
        raise GateSkipError(f"ratio={ratio} is invalid for the overlap: use a share of tokens strictly between 0 and 1")
    first = int(getattr(st.cfg, "protect_first", 0) if protect_first is None else protect_first)
    device = next(model.parameters()).device
    inputs = [_as_inputs(b, device) for b in batches]
    if not inputs:
        raise GateSkipError("no rows to measure: pass held-out input_ids rows")
    acc = {b.index: _Branch() for b in st.branches}
    handles = _hooks(st, acc, first)
    bar = tqdm(total=sum(int(inp["input_ids"].numel()) for inp in inputs), unit="tok", desc="fallback residuals",
               disable=not progress)
    _dense_run(model, inputs, handles, bar)
    if acc[st.branches[0].index].n == 0:
        raise GateSkipError(f"no token left to measure (padding and the first {first} of each row are left out): "
                            "pass longer rows")
    rows = sum(int(inp["input_ids"].shape[0]) for inp in inputs)
    return _summary(st, acc, ratio, first, rows)


def _hooks(st, acc: dict, first: int) -> list:
    """Hooks feeding each branch's real tokens (past the first ``first`` of a row) to its ``acc`` entry."""
    raw, seen = {}, {}
    handles = []

    def mask_for(x):
        valid = st.valid_for(x)
        if first and st.call.ctx is not None and st.call.ctx.shape == valid.shape:
            valid = valid & (st.call.ctx.to(valid.device) > first)
        return valid

    def take_branch_input(b):  # the gate's input, before a "before" gate multiplies it
        def hook(_mod, args, kwargs):
            raw[b.index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def take_module_input(b):  # the fallback's input
        def hook(_mod, args, kwargs):
            seen[b.index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def take_output(b):
        def hook(_mod, _args, out):
            x, xg = seen.pop(b.index), raw.pop(b.index)
            y = out[0] if isinstance(out, tuple) else out
            valid = mask_for(x)
            g = b.gate(xg)
            g = g.to(xg.dtype)[valid]  # as the branch uses it (wrap.py)
            yhat = None if b.fallback is None else b.fallback(x[valid])
            acc[b.index].add(y[valid], yhat, g if b.placement == "after" else None, importance(g))
        return hook

    for b in st.branches:
        handles.append(b.register_forward_pre_hook(take_branch_input(b), with_kwargs=True))
        handles.append(b.module.register_forward_pre_hook(take_module_input(b), with_kwargs=True))
        handles.append((b.module if b.post_norm is None else b.post_norm).register_forward_hook(take_output(b)))
    return handles


def _dense_run(model, inputs: list[dict], handles: list, bar) -> None:
    """One dense forward per batch of ``inputs``, counting tokens on ``bar``; then closes it and removes
    ``handles``."""
    try:
        with skipping(model, ratio=0.0):  # a dense run, whatever context the caller is in
            for inp in inputs:
                model(**inp, use_cache=False)
                bar.update(int(inp["input_ids"].numel()))
    finally:
        bar.close()
        for h in handles:
            h.remove()


def _summary(st, acc: dict, ratio: float, first: int, rows: int) -> dict:
    """``fallback_stats``'s result from the filled ``acc`` (NaN figures become None)."""
    branches = []
    for b in st.branches:
        f = acc[b.index].figures(ratio)
        branches.append({"name": b.name, "kind": b.kind, "layer": b.layer,
                         **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in f.items()}})
    by_kind = {k: {"branches": sum(1 for r in branches if r["kind"] == k),
                   **{m: _mean(r[m] for r in branches if r["kind"] == k) for m in MEASURES}}
               for k in KINDS if any(r["kind"] == k for r in branches)}
    kind = st.cfg.fallback if any(b.fallback is not None for b in st.branches) else "zero"
    return {"fallback": kind, "rank": st.cfg.fallback_rank if FALLBACK[kind].uses_rank else None,
            "placement": st.cfg.placement, "ratio": float(ratio), "protect_first": first,
            "tokens": branches[0]["tokens"], "rows": rows, "branches": branches, "by_kind": by_kind}


# ---- outputs -------------------------------------------------------------------------------------

def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def fallback_name(s: dict) -> str:
    if s["fallback"] == "zero":
        return "zero fallback (a skipped token gets 0: ŷ = 0)"
    return f"{s['fallback']} fallback" + (f" (rank {s['rank']})" if s["rank"] else "")


def markdown_table(s: dict) -> str:
    """Markdown: one row per branch, then the mean per branch kind, with how to read them."""
    r = s["ratio"]
    cost = "skip cost / ‖g·y‖" if s["placement"] == "after" else "skip cost / ‖y‖"
    head = f"| R² | {cost} | Spearman(gate, cost) | overlap@{r:g} |"
    lines = [f"Fallback: {fallback_name(s)}. Sample: {s['tokens']} tokens per branch in {s['rows']} held-out rows"
             + (f" (first {s['protect_first']} of each row left out)" if s["protect_first"] else "") + ".", "",
             f"How to read: R² is the share of a branch's output variance its fallback predicts (0 or below: no "
             f"better than zero); skip cost is the mean ‖g·(y−ŷ)‖ a skipped token loses, relative to its full "
             f"update (1.0: as costly as zeroing it); a Spearman above 0 and an overlap above {r:g} (random level, "
             f"1.0 = oracle) mean the gate skips the tokens that are cheapest to skip.", "",
             "| branch " + head, "|---|---:|---:|---:|---:|"]
    for b in s["branches"]:
        lines.append(f"| {b['name']} | {_fmt(b['r2'])} | {_fmt(b['cost'])} | {_fmt(b['spearman'])} | "
                     f"{_fmt(b['overlap'])} |")
    lines += ["", "Mean per branch kind:", "", "| kind | branches " + head, "|---|---:|---:|---:|---:|---:|"]
    for k, m in s["by_kind"].items():
        lines.append(f"| {k} | {m['branches']} | {_fmt(m['r2'])} | {_fmt(m['cost'])} | {_fmt(m['spearman'])} | "
                     f"{_fmt(m['overlap'])} |")
    return "\n".join(lines) + "\n"


def save_plot(s: dict, path: str | Path) -> Path:
    """PNG: per layer, R² (left) and overlap (right), one line per branch kind; overlap's random level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for c, (measure, ylabel) in enumerate((("r2", "held-out R² of the fallback"),
                                           ("overlap", f"overlap@{s['ratio']:g} (gate vs skip cost)"))):
        ax = axes[0, c]
        for ki, kind in enumerate(KINDS):
            pts = sorted((b["layer"], b[measure]) for b in s["branches"]
                         if b["kind"] == kind and b[measure] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", marker=".", color=cmap(ki), label=kind)
        if measure == "overlap":
            ax.axhline(s["ratio"], color="grey", linestyle="--", linewidth=1, label="random")
            ax.set_ylim(0, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return write_figure(fig, f"{fallback_name(s)}: {s['tokens']} held-out tokens per branch", path)
