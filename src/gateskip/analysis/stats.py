"""Importance by token category and layer depth, over a corpus sample (``inspect --stats``).

Two measures per (category, branch):
- ``mean``: the mean importance (mean gate) of the category's tokens;
- ``rank``: the mean percentile rank of those tokens within their row for that branch (0 = the
  least important token of the row, 1 = the most). Skip policies rank tokens, so ``rank`` says
  directly who is kept first; it is also comparable across layers whose gate levels differ.
Rows are packed like training rows (BOS first, documents joined by EOS).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gateskip.analysis.categories import CATEGORIES, WHITESPACE_LED, categorize, whitespace_led
from gateskip.analysis.heatmap import split_by_kind, write_figure
from gateskip.analysis.importance import branch_importances, token_texts
from gateskip.core import gate_state

GROUPS = CATEGORIES + (WHITESPACE_LED,)


def row_categories(tok, ids: list[int]) -> list[tuple[str, bool]]:
    """(primary category, whitespace-led) for each token of one row."""
    specials = set(getattr(tok, "all_special_ids", []) or [])
    texts = token_texts(tok, ids)
    return [(categorize(t, first=(i == 0), special=(tid in specials)), whitespace_led(t) and tid not in specials)
            for i, (t, tid) in enumerate(zip(texts, ids))]


def percentile_ranks(imp: torch.Tensor) -> torch.Tensor:
    """Per column of ``imp [T, branches]``: each token's rank among the T tokens, scaled to [0, 1].

    Tied values share their average rank: gates near saturation repeat float32 values, and ranking
    ties by position would make early tokens look less important.
    """
    t = imp.shape[0]
    less = (imp.unsqueeze(0) < imp.unsqueeze(1)).sum(1)  # [T, branches]: tokens below each token
    equal = (imp.unsqueeze(0) == imp.unsqueeze(1)).sum(1)
    return (less + (equal - 1) / 2).double() / max(1, t - 1)


@torch.no_grad()
def category_stats(model, tok, rows: list[torch.Tensor], progress: bool = True) -> dict:
    """Sums per group over ``rows`` (1-D ``input_ids`` tensors); returns the means by group.

    Result: ``{"branches": names, "count": {group: n}, "mean": {group: [per branch]},
    "rank": {group: [per branch]}}`` (groups with no token are left out).
    """
    from tqdm import tqdm

    names = [b.name for b in gate_state(model).branches]
    nb = len(names)
    sums = {g: torch.zeros(2, nb, dtype=torch.float64) for g in GROUPS}
    counts = dict.fromkeys(GROUPS, 0)
    bar = tqdm(total=sum(len(r) for r in rows), unit="tok", desc="importance by category", disable=not progress)
    for row in rows:
        imp = branch_importances(model, row.view(1, -1))[0].double()  # [T, branches]
        rank = percentile_ranks(imp)
        for i, (cat, led) in enumerate(row_categories(tok, row.tolist())):
            for g in (cat, WHITESPACE_LED) if led else (cat,):
                sums[g][0] += imp[i]
                sums[g][1] += rank[i]
                counts[g] += 1
        bar.update(len(row))
    bar.close()
    kept = [g for g in GROUPS if counts[g]]
    return {
        "branches": names,
        "tokens": int(sum(len(r) for r in rows)),
        "rows": len(rows),
        "count": {g: counts[g] for g in kept},
        "mean": {g: (sums[g][0] / counts[g]).tolist() for g in kept},
        "rank": {g: (sums[g][1] / counts[g]).tolist() for g in kept},
    }


def _by_kind(values: list[float], names: list[str]) -> dict[str, tuple[list[float], list[int]]]:
    panels = split_by_kind(torch.tensor(values).view(1, -1), names)
    return {k: (a[:, 0].tolist(), layers) for k, (a, layers) in panels.items()}


def _decimals(values_by_group: dict[str, list[float]]) -> int:
    """Enough decimals to tell the groups apart: lightly trained gates differ in the 6th decimal."""
    vals = [v for vs in values_by_group.values() for v in vs]
    spread = max(vals) - min(vals) if vals else 0.0
    return int(min(8, max(3, math.ceil(-math.log10(spread)) + 2))) if spread > 0 else 4


def markdown_tables(s: dict) -> str:
    """Markdown: token counts, then per measure and kind a table of layers x groups."""
    groups = list(s["count"])
    lines = [f"Sample: {s['tokens']} tokens in {s['rows']} rows.", "",
             "| group | tokens |", "|---|---:|"]
    lines += [f"| {g} | {s['count'][g]} |" for g in groups]
    for measure, what in (("mean", "mean importance (mean gate)"),
                          ("rank", "mean percentile rank within the row (1 = most important)")):
        for kind in ("attn", "mlp"):
            per_group = {g: _by_kind(s[measure][g], s["branches"]).get(kind) for g in groups}
            if not any(per_group.values()):
                continue
            layers = next(v for v in per_group.values() if v)[1]
            lines += ["", f"### {kind}: {what}", "", "| layer | " + " | ".join(groups) + " |",
                      "|---:|" + "---:|" * len(groups)]
            digits = 3 if measure == "rank" else _decimals(s["mean"])
            for li, layer in enumerate(layers):
                cells = [f"{per_group[g][0][li]:.{digits}f}" for g in groups]
                lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_lines(s: dict, path: str | Path) -> Path:
    """PNG: one line per group across layers; columns attn / mlp, rows mean importance / rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(s["count"])
    kinds = [k for k in ("attn", "mlp") if any(n.endswith("." + k) for n in s["branches"])]
    fig, axes = plt.subplots(2, len(kinds), figsize=(6.5 * len(kinds), 8), squeeze=False, sharex=True)
    cmap = plt.get_cmap("tab10")
    for r, (measure, ylabel) in enumerate((("mean", "mean importance"), ("rank", "mean percentile rank in row"))):
        for c, kind in enumerate(kinds):
            ax = axes[r, c]
            for gi, g in enumerate(groups):
                vals, layers = _by_kind(s[measure][g], s["branches"])[kind]
                style = "--" if g == WHITESPACE_LED else "-"
                ax.plot(layers, vals, style, color=cmap(gi % 10), marker=".", label=f"{g} ({s['count'][g]})")
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")  # no "1e-6 + 0.9933" offset
            ax.set_title(f"{kind} gates", fontsize=10)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if r == 1:
                ax.set_xlabel("layer")
    axes[0, -1].legend(fontsize=8, loc="best")
    return write_figure(fig, f"Importance by token category ({s['tokens']} tokens)", path)
