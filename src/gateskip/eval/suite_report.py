"""The suite sweep's report: retention table, matched-compute who-wins table, each gated method between
its floor and ceiling (random choice and the oracle with the same machinery: the share of the gap it
closes), generation fidelity, and a curve of retention against compute saved with each method's 95% band.
The analysis, the plots and the files are here; the text of report.md is built in suite_markdown.py.

Retention is above-chance retention, (acc - chance) / (dense - chance), per task and as the suite
mean: 100% keeps all of the dense model's advantage over guessing, 0% is chance. Intervals are
paired bootstraps over items (paired.py): every row scored the same items in the same order.

Rows of other suite runs on the same items can be merged in (suite_merge.py, ``--compare-with``): they are
paired with this run's rows through the items, which the dense rows prove identical.

``python -m gateskip.eval.suite_report DIR [--compare-with A/results.json,B/results.json]
[--reference METHOD]`` writes the report of ``DIR/results.json`` again, with those runs merged.
"""

from __future__ import annotations

import json
from pathlib import Path

from gateskip.errors import GateSkipError
from gateskip.eval import paired
from gateskip.eval.suite_markdown import markdown
from gateskip.eval.suite_merge import join_tasks, merge, same_curve
from gateskip.fallback import is_zero

LEVELS = (0.10, 0.20, 0.30, 0.40)
TASK_LEVEL = 0.20  # the per-task table: each task at this compute saved on its own text
GEN_LEVEL = 0.25  # generation fidelity read at this compute saved while generating (issue 20's target level)
BRACKET_LEVELS = (0.10, 0.20, 0.25, 0.30, 0.40)  # the floor-to-ceiling table (issue 20's targets at 25 and 40%)
ITERS = 2000


def default_reference(methods, config: dict | None = None) -> str | None:
    """The method the who-wins table compares against: ``gateskip+<kind>`` of the run's fallback if present,
    else ``gateskip``, else the first gateskip variant, else the first method."""
    methods = list(methods)
    kind = ((config or {}).get("fallback") or {}).get("kind") or "zero"
    tuned = [f"gateskip+{kind}+lora", f"gateskip+{kind}+ft"] if not is_zero(kind) else ["gateskip+lora", "gateskip+ft"]
    for name in tuned + ([f"gateskip+{kind}"] if not is_zero(kind) else []) + ["gateskip"]:
        if name in methods:
            return name
    return next((m for m in methods if m.startswith(("gateskip+", "gateskip@"))), methods[0] if methods else None)


def analyse(results: dict, reference: str | None = None, iters: int = ITERS, seed: int = 0) -> dict:
    """Adds ``analysis``: per-row retention with band, matched-level table, who-wins, curves.

    ``reference``: the method every other one is compared against (default: ``default_reference``)."""
    all_rows = results["rows"]
    methods = list(dict.fromkeys(r["method"] for r in all_rows if r["method"] != "dense"))
    if reference is not None and reference not in methods:
        raise GateSkipError(f"--reference {reference!r} names no method of this report: choose one of "
                            f"{', '.join(methods) or 'none (dense only)'}")
    d = all_rows[0]["tasks"]
    valid = [t for t, v in d.items() if v["acc"] > v["chance"]]  # retention is undefined at or below chance
    if not valid:
        results["analysis"] = {"rows": [], "levels": list(LEVELS), "reference": None, "matched": {}, "who_wins": [],
                               "curves": {}, "tasks": []}
        return results
    rows = [{**r, "tasks": {t: r["tasks"][t] for t in valid}} for r in all_rows]
    dense = rows[0]
    dense_s = {t: v["correct"] for t, v in dense["tasks"].items()}
    chance = {t: v["chance"] for t, v in dense["tasks"].items()}
    per_row = []
    for r in rows:
        ri = paired.retention_interval({t: v["correct"] for t, v in r["tasks"].items()}, dense_s, chance, iters, seed)
        per_row.append({"method": r["method"], "budget": r["budget"], **ri,
                        "tasks": {t: paired.retention(v["acc"], dense["tasks"][t]["acc"], v["chance"])
                                  for t, v in r["tasks"].items()}})
    ref = reference or default_reference(methods, results.get("config"))
    results["analysis"] = {
        "rows": per_row, "levels": list(LEVELS), "reference": ref, "tasks": valid,
        "matched": {m: {f"{k:g}": v for k, v in lv.items()} for m, lv in paired.matched_table(rows, LEVELS).items()},
        "task_level": TASK_LEVEL,
        "task_matched": {m: {t: v[TASK_LEVEL] for t, v in tv.items()}
                         for m, tv in paired.task_matched(all_rows, [TASK_LEVEL]).items()},
        "who_wins": paired.who_wins(rows, LEVELS, reference=ref, iters=iters, seed=seed) if ref and len(methods) > 1
        else [],
        "curves": {m: paired.curve([r for r in rows if r["method"] == m], dense, iters, seed) for m in methods},
        "gap_closed": paired.gap_closed(rows, BRACKET_LEVELS, iters, seed),
    }
    if any(((r.get("fidelity") or {}).get("per_prompt")) for r in all_rows):
        results["analysis"]["generation"] = paired.generation_matched(all_rows, GEN_LEVEL, ref, iters, seed)
    return results


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def styles(methods) -> dict[str, dict]:
    """A distinct (colour, marker) per method, in order: tab10 colours (tab20 beyond 10 methods) and 12
    markers, so no two methods look alike; rows merged from other runs (``@`` in the name) are dashed."""
    import matplotlib

    methods = list(methods)
    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: {"color": matplotlib.colors.to_hex(cmap(i % cmap.N)), "marker": MARKERS[i % len(MARKERS)],
                "linestyle": "--" if "@" in m else "-"} for i, m in enumerate(methods)}


def plot(results: dict, path) -> dict[str, dict]:
    """curve.png: every method's retention against compute saved with its 95% band; returns the styles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results["analysis"]["curves"]
    style = styles(curves)
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    ax.axhline(100, color="black", linestyle="--", linewidth=1, label="dense")
    ax.axhline(0, color="grey", linestyle=":", linewidth=1, label="chance")
    for m, pts in curves.items():
        x = [100 * p["compute_saved"] for p in pts]
        st = style[m]
        ax.plot(x, [100 * p["retention"] for p in pts], label=m, color=st["color"], marker=st["marker"],
                linestyle=st["linestyle"], markersize=5)
        ax.fill_between(x, [100 * p["lo"] for p in pts], [100 * p["hi"] for p in pts], color=st["color"],
                        alpha=0.15 if len(curves) <= 3 else 0.07)
    ax.set_xlabel("compute saved, FLOP-weighted, gates counted (%)")
    ax.set_ylabel("above-chance retention, suite mean (%)")
    ax.set_title(f"Retention vs compute ({len(results['analysis']['tasks'])} tasks, 95% bands)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return style


def plot_generation(results: dict, path) -> bool:
    """generation.png: each method's KL to dense and next-token / free-running agreement against the compute
    it saved while generating (rows that recorded it); False (nothing written) when no row did."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts: dict[str, list] = {}
    for r in results["rows"]:
        f = r.get("fidelity") or {}
        if r["method"] != "dense" and f.get("gen_compute_saved") is not None:
            pts.setdefault(r["method"], []).append(f)
    if not pts:
        return False
    style = styles(pts)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = (("kl", "KL(dense ‖ row) per token (nats)", 1), ("agree_next", "next-token agreement (%)", 100),
              ("agree_tokens", "free-running token agreement (%)", 100))
    for ax, (key, label, scale) in zip(axes, panels):
        for m, fs in pts.items():
            fs = sorted(fs, key=lambda f: f["gen_compute_saved"])
            st = style[m]
            ax.plot([100 * f["gen_compute_saved"] for f in fs], [scale * f[key] for f in fs], label=m, color=st["color"],
                    marker=st["marker"], linestyle=st["linestyle"], markersize=5)
        ax.set_xlabel("compute saved while generating (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axvline(100 * GEN_LEVEL, color="grey", linestyle=":", linewidth=1)
    axes[2].axvline(100 * GEN_LEVEL, color="grey", linestyle=":", linewidth=1)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fc = results["config"].get("fidelity") or {}
    fig.suptitle(f"Generation fidelity against the dense model ({fc.get('prompts')} held-out prompts, "
                 f"{fc.get('new_tokens')} greedy tokens each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: dict, out) -> str:
    """results.json, report.md, curve.png and (when rows recorded the compute saved while generating)
    generation.png into ``out``; returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(results)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")
    (out / "report.md").write_text(md)
    plot(results, out / "curve.png")
    plot_generation(results, out / "generation.png")
    return md


OPTIONS = (  # suite_report's command line: (flag, help), every one a string defaulting to None
    ("--compare-with", "results.json of other suite runs on the same items, comma-separated: their rows are merged in "
                       "(replacing any merged before); default: keep the rows already merged"),
    ("--add-tasks", "results.json of runs of the same sweep on other tasks (e.g. --suite <task>), comma-separated: "
                    "their task columns are joined into every row"),
    ("--same-curve", "A=B[,C=D]: method A (a copy an earlier merge renamed name@folder) is more budgets of method B's "
                     "curve: its rows join B's"),
    ("--reference", "the method the who-wins table compares every other against (default: gateskip+<fallback> if "
                    "present, else gateskip)"),
)


def main(argv=None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m gateskip.eval.suite_report",
                                 description="Write a suite run's report.md and curve.png again from DIR/results.json.")
    ap.add_argument("dir", help="folder of a suite run (holds results.json)")
    for flag, text in OPTIONS:
        ap.add_argument(flag, default=None, help=text)
    args = ap.parse_args(argv)
    folder = Path(args.dir)
    try:
        path = folder / "results.json"
        if not path.is_file():
            raise GateSkipError(f"{str(path)!r} does not exist: pass the --out folder of a suite run")
        data = json.loads(path.read_text())
        if args.add_tasks:
            join_tasks(data, args.add_tasks)
        if args.compare_with is not None:
            merge(data, args.compare_with)
        if args.same_curve:
            same_curve(data, args.same_curve)
        print(write(analyse(data, reference=args.reference), folder))
    except GateSkipError as e:
        print(f"gateskip: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m gateskip.eval.suite_report DIR: the report again from DIR/results.json
    raise SystemExit(main())
