"""The heatmap PNG (tokens along x, one row per layer for attention and for MLP gates), and the figure
writer the other analysis plots share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

MAX_WIDTH_IN = 120  # inches; past ~600 tokens labels would be unreadable anyway


def split_by_kind(imp: torch.Tensor, branches: list[str]) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``{kind: (array [layers, tokens], layer numbers)}`` from ``imp [tokens, branches]``."""
    out = {}
    for kind in ("attn", "mlp"):
        cols = [(int(n.split(".")[1]), j) for j, n in enumerate(branches) if n.endswith("." + kind)]
        if cols:
            cols.sort()
            out[kind] = (imp[:, [j for _, j in cols]].T.numpy(), [layer for layer, _ in cols])
    return out


def colour_limits(values: np.ndarray) -> tuple[float, float]:
    """Robust colour range (1st-99th percentile): trained gates sit close to 1, and one outlier
    (often BOS) would otherwise squash every other token into a single colour."""
    lo, hi = np.percentile(values, [1, 99])
    if hi - lo < 1e-6:
        lo, hi = float(values.min()) - 1e-3, float(values.max()) + 1e-3
    return float(lo), float(hi)


def save_heatmap(imp: torch.Tensor, labels: list[str], branches: list[str], path: str | Path,
                 title: str = "") -> Path:
    """Write the heatmap of ``imp [tokens, branches]`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    panels = split_by_kind(imp, branches)
    n_tok = imp.shape[0]
    n_rows = sum(len(layers) for _, layers in panels.values())
    width = min(MAX_WIDTH_IN, max(6.0, 0.16 * n_tok + 2.5))
    height = max(3.0, 0.14 * n_rows + 2.2 * len(panels))
    lo, hi = colour_limits(imp.numpy())
    decimals = int(min(9, max(2, np.ceil(-np.log10(hi - lo)) + 1)))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, height), squeeze=False,
                             gridspec_kw={"height_ratios": [len(v[1]) for v in panels.values()]})
    for ax, (kind, (grid, layers)) in zip(axes[:, 0], panels.items()):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_ylabel(f"{kind} gate\nlayer")
        step = max(1, len(layers) // 15)
        ax.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]])
        ax.set_xticks(range(n_tok), labels, rotation=90, fontsize=7)
        bar = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.02 if width > 12 else 0.05,
                           label="importance (mean gate)")
        bar.formatter = FormatStrFormatter(f"%.{decimals}f")  # plain numbers, no "1e-6 + 0.9933" offset
        bar.update_ticks()
    axes[0, 0].set_title(title or "GateSkip token importance", fontsize=10, loc="left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_figure(fig, title: str, path: str | Path) -> Path:
    """Title, lay out, save at the analysis plots' resolution, and close ``fig``; returns the path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
