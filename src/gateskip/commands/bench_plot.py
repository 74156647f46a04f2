"""The pictures of a ``gateskip bench`` run.

``plot_speed``: speed-up against FLOP-weighted compute saved, one panel per phase (prefill, decode
at each batch size). Each gate kind is a line through its skip ratios; the dashed curve is the ideal
``1 / (1 - saved)``, where time falls exactly as FLOPs do, so a point's height under that curve is
its efficiency.

``plot_speculative`` (``--speculative``): per draft length k, the acceptance a draft needs against
what one of its steps costs (relative to a dense step, at the measured verify cost), for break-even
and for the target speed-up, with every measured setting as a point: a point above the target
curve is faster than the target, and the gap below it is what a better draft must gain.

Re-plot a saved run with ``python -m gateskip.commands.bench_plot run.json out.png``.
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
    kinds = list(dict.fromkeys(_series(r) for r in results if r["gate"] is not None))
    fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases), 3.9), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        top = max(0.05, max(r[phase]["compute_saved"] for r in results))
        xs = [i * top / 50 for i in range(51)]
        ax.plot([100 * x for x in xs], [1 / (1 - x) for x in xs], "k--", linewidth=1, label="ideal 1/(1-saved)")
        ax.axhline(1.0, color="grey", linewidth=1, label="dense")
        for kind in kinds:
            rows = sorted((r for r in results if r["gate"] is not None and _series(r) == kind),
                          key=lambda r: r[phase]["compute_saved"])
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


def _series(row: dict) -> str:
    """One line per gate kind and execution: ``lowrank``, ``lowrank, execution measured`` (settings named
    ``lowrank@saved0.25+measured``)."""
    tail = row["setting"].rsplit("@", 1)[-1]
    return row["gate"] + (f", execution {tail.split('+', 1)[1]}" if "+" in tail else "")


def plot_speculative(rows: list[dict], path: str | Path) -> None:
    """Write the break-even PNG for the rows of a ``--speculative`` bench report to ``path``."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gateskip.speculative import acceptance_needed

    spec = [r for r in rows if "k" in r]
    ks = sorted({r["k"] for r in spec})
    fig, axes = plt.subplots(1, len(ks), figsize=(4.4 * len(ks), 3.9), squeeze=False)
    right = 1.05 * max(1.0, *(r["draft_step_vs_dense"] for r in spec))
    xs = [right * i / 60 for i in range(1, 61)]  # draft step cost, relative to a dense step
    for ax, k in zip(axes[0], ks):
        mine = [r for r in spec if r["k"] == k]
        verify = statistics.median(r["verify_vs_dense"] for r in mine)
        target = mine[0]["target_speedup"]
        for speed, style in ((1.0, "k:"), (target, "k--")):
            pts = [(x, acceptance_needed(speed, k, 1.0, x, verify)) for x in xs]
            pts = [(x, a) for x, a in pts if a is not None]
            ax.plot([x for x, _ in pts], [a for _, a in pts], style, linewidth=1,
                    label=f"needed for {speed:g}x (verify {verify:.2f} steps)")
        for r in mine:
            ax.plot(r["draft_step_vs_dense"], r["per_token_acceptance"], "o", color="C0")
            ax.annotate(f"r={r['draft_ratio']}: {r['speedup']:.2f}x", (r["draft_step_vs_dense"], r["per_token_acceptance"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlim(0, right)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"k = {k} drafts per cycle (labels: measured speed-up)", fontsize=9)
        ax.set_xlabel("one draft step, relative to a dense step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("per-token acceptance")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m gateskip.commands.bench_plot RUN.json OUT.png")
    results = json.loads(Path(sys.argv[1]).read_text())["results"]
    (plot_speculative if any("k" in r for r in results) else plot_speed)(results, sys.argv[2])
