"""``reproduction.md`` and ``reproduction.png`` from the grid's finished cells."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gateskip.files import atomic_write
from gateskip.reproduce.curve import Z, acc_at, curve_of, overall, pair_verdict, saved_at_level
from gateskip.reproduce.grid import BASE, COMPARISONS, GATESKIP_AT_30, TARGETS

LEVELS = (0.0, *TARGETS)


def cell_curve(row: dict | None, axis: str = "compute_saved"):
    res = row and row["results"]
    if res is None:
        return None
    return curve_of(res["methods"].get(row["cell"].method, []), axis)


def _acc(v) -> str:
    return "-" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _paper(cell) -> str:
    gen, ll = cell.paper
    if gen is None and ll is None:
        return "-"
    return f"{'-' if gen is None else gen} / {'-' if ll is None else ll} ({cell.paper_note})"


def _switches(cell) -> str:
    if cell.method in ("mod", "mod_topk"):
        return f"eval method {cell.method}: routers from `gateskip train-mod` (same text and steps, CE)"
    if cell.method != "gateskip":
        return f"eval method {cell.method} on the base cell's model"
    return ", ".join(f"{k}={v}" for k, v in cell.switches.items()) or "base"


def table(rows: list[dict]) -> list[str]:
    head = ["cell", "switch", *[f"acc @ {100 * x:.0f}% saved" for x in LEVELS], "saved @ 90%",
            "paper gen / LL", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        c, curve = row["cell"], cell_curve(row)
        accs = [_acc(acc_at(curve, x)) if curve else "-" for x in LEVELS]
        if curve:
            accs = [a if a != "-" else f"beyond {_pct(curve[-1][0])}" if x > curve[-1][0] else a
                    for a, x in zip(accs, LEVELS)]
        saved = _pct(saved_at_level(curve)) if curve else "-"
        lines.append("| " + " | ".join([c.name, _switches(c), *accs, saved, _paper(c), row["status"]]) + " |")
    return lines


def conclusions(rows: list[dict]) -> list[str]:
    """Per comparison: the paper's ordering checked at its operating point, FLOP-weighted (the bold
    answer: every cell has measured points next to each target there) and on the paper's axis, tokens
    skipped (a second opinion: the ratios were chosen for the FLOP axis, so the gaps between measured
    points there are wider, up to 0 -> 42% for vector gates)."""
    by = {r["cell"].name: r for r in rows}
    out = []
    for comp in COMPARISONS:
        out += [f"### {comp.title}", "", f"- Paper: {comp.paper}."]
        answers = {}
        for axis, words in (("compute_saved", "FLOP-weighted compute saved"),
                            ("tokens_skipped", "tokens skipped (the paper's axis)")):
            at = {n: (acc_at(cell_curve(by.get(n), axis), comp.at) if cell_curve(by.get(n), axis) else None)
                  for n in comp.cells}
            verdicts = [pair_verdict(at[a], at[b]) for a, b in comp.pairs]
            pairs = "; ".join(f"{a} > {b}: {v}" for (a, b), v in zip(comp.pairs, verdicts))
            out.append(f"- At {100 * comp.at:.0f}% {words}, interpolated: "
                       + ", ".join(f"{n} {_acc(at[n])}" for n in comp.cells) + (f". Paper's pairs: {pairs}" if pairs else ""))
            answers[axis] = overall(verdicts)
            if not comp.pairs:
                ranked = sorted((n for n in comp.cells if at[n]), key=lambda n: -at[n][0])
                answers[axis] += f" (here: {' > '.join(ranked) if len(ranked) > 1 else 'not measured'})"
        out += [f"- **Does the paper's ordering hold on this model? {answers['compute_saved']}** "
                f"(on the tokens-skipped axis: {answers['tokens_skipped']})", ""]
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    dense = next((r["results"]["methods"]["dense"][0]["mean_acc"] for r in rows if r["results"]), None)
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.3f})")
    for x in TARGETS:
        ax.axvline(100 * x, color="grey", linestyle=":", linewidth=0.8)
    for row in rows:
        curve = cell_curve(row)
        if curve:
            ax.errorbar([100 * p[0] for p in curve], [p[1] for p in curve], yerr=[p[2] for p in curve], marker="o",
                        markersize=3, capsize=2, linewidth=1.2, label=row["cell"].name)
    ax.set_xlabel("compute saved, FLOP-weighted, gates counted (%)")
    ax.set_ylabel("mean accuracy (± stderr)")
    ax.set_title("gateskip reproduce: ablation grid")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def _budget(rows: list[dict], meta: dict) -> list[str]:
    b, s = meta["budget"], meta["spec"]
    out = [f"Per cell: {b['steps']} training steps of {b['batch_size']} x {b['seq_len']} tokens of `{b['data']}` text "
           f"(gate lr {b['lr']}, backbone lr {b['backbone_lr']}, lambda {b['lam']}, warm-up {max(1, b['steps'] // 10)} "
           f"steps, skip ratio ramped 0 -> 0.2 over 80% of the steps, K/V of skipped tokens computed), then one "
           f"`gateskip eval` sweep: tasks {s['tasks']}, first {s['limit']} items each, policy {s['policy']}, the dense "
           f"row and GateSkip at 4 ratios. Base switches: "
           + ", ".join(f"{k}={v}" for k, v in BASE.items()) + ".", "",
           "| cell | ratios | measured points (compute saved: acc ± stderr) | train s | eval s |", "|---|---|---|---|---|"]
    for row in rows:
        if not row["results"]:
            continue
        cfg = row["results"]["config"]
        pts = "; ".join(f"{_pct(x)}: {a:.3f} ± {se:.3f}" for x, a, se in cell_curve(row))
        log = Path(row["train_dir"]) / "train_log.jsonl"
        secs = sum(json.loads(line).get("sec", 0) for line in log.read_text().splitlines()) if log.is_file() else None
        out.append(f"| {row['cell'].name} | {','.join(f'{r:g}' for r in cfg['ratios'])} | {pts} | "
                   f"{'-' if secs is None else round(secs)} | {cfg.get('seconds', '-')} |")
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    dense = next((r["results"]["methods"]["dense"][0] for r in rows if r["results"]), None)
    head = [
        "# Reproducing the paper's comparisons", "",
        f"Generated by `gateskip reproduce` on {meta['date']}:", "", "```", meta["command"], "```", "",
        f"Model: `{meta['budget']['model']}`. Dense mean accuracy: "
        + ("not measured" if dense is None else f"{dense['mean_acc']:.3f}") + ".", "",
        "How to read it: each cell is one short training run (one switch changed from the base) and one eval",
        "sweep. Accuracy is the mean over the tasks; compute saved is FLOP-weighted with the gates' own cost",
        "counted (the paper's \"skip\" is the fraction of tokens skipped, gates not counted). Accuracy at",
        "0/15/25/35% compute saved is **interpolated linearly between the measured points** (listed under",
        "Budget); \"beyond x%\" means the measured curve stops at x% and is not extrapolated. \"saved @ 90%\" is",
        "the largest compute saved on that curve whose accuracy is >= 0.9 x the accuracy at ratio 0 (negative:",
        "the curve is below that before the gates have paid for themselves). Paper",
        "figures (METHOD.md) are accuracy in % of (generative, log-likelihood) runs on Llama-3.2-1B; these runs",
        "are log-likelihood tasks, so compare orderings against the second figure, never absolute values.",
        f"A difference within {Z:g} combined standard error(s) is \"inconclusive\".", "",
        "![curves](reproduction.png)", "", "## Table", "", *table(rows), "",
        f"The paper's GateSkip figure next to the baselines is {GATESKIP_AT_30} (log-likelihood, 30% skip).", "",
        "## Conclusions per comparison", "", *conclusions(rows), "## Budget and measured points", "",
        *_budget(rows, meta)]
    return "\n".join(head) + "\n"


def write_report(rows: list[dict], meta: dict, root: Path, doc: str | None) -> Path:
    md = markdown(rows, meta)
    path = root / "reproduction.md"
    atomic_write(path, lambda p: Path(p).write_text(md))
    plot(rows, root / "reproduction.png")
    if doc:
        target = Path(doc)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda p: Path(p).write_text(md))
        atomic_write(target.with_name("reproduction.png"), lambda p: shutil.copyfile(root / "reproduction.png", p))
    return path
