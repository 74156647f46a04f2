"""The picture of a ``gateskip bench`` run: speed-up against FLOP-weighted compute saved, per phase.

One panel per phase (prefill, decode at each batch size). Each gate kind is a line through its skip
ratios; the dashed curve is the ideal ``1 / (1 - saved)``, where time falls exactly as FLOPs do, so a
point's height under that curve is its efficiency. Re-plot a saved run with
``python -m gateskip.commands.bench_plot run.json out.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_speed(results: list[dict], path: str | Path) -> None:
    """Write the PNG for ``results`` (the ``results`` list of a bench report) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    phases = [p for p in results[0] if p == "prefill" or p.startswith("decode_b")]
    kinds = list(dict.fromkeys(r["gate"] for r in results if r["gate"] is not None))
    fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases), 3.9), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        top = max(0.05, max(r[phase]["compute_saved"] for r in results))
        xs = [i * top / 50 for i in range(51)]
        ax.plot([100 * x for x in xs], [1 / (1 - x) for x in xs], "k--", linewidth=1, label="ideal 1/(1-saved)")
        ax.axhline(1.0, color="grey", linewidth=1, label="dense")
        for kind in kinds:
            rows = sorted((r for r in results if r["gate"] == kind), key=lambda r: r["ratio"])
            ax.plot([100 * r[phase]["compute_saved"] for r in rows], [r[phase]["speedup"] for r in rows],
                    marker="o", label=f"{kind} gates")
            for r in rows:
                ax.annotate(f"{100 * r[phase]['tokens_skipped']:.0f}%", (100 * r[phase]["compute_saved"],
                            r[phase]["speedup"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_title(phase.replace("_b", ", batch "))
        ax.set_xlabel("compute saved, FLOP-weighted (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up vs dense (labels: tokens skipped)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m gateskip.commands.bench_plot RUN.json OUT.png")
    plot_speed(json.loads(Path(sys.argv[1]).read_text())["results"], sys.argv[2])
