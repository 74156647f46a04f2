"""The suite sweep's report: retention table, matched-compute who-wins table, generation fidelity,
and a curve of retention against compute saved with each method's 95% band.

Retention is above-chance retention, (acc - chance) / (dense - chance), per task and as the suite
mean: 100% keeps all of the dense model's advantage over guessing, 0% is chance. Intervals are
paired bootstraps over items (paired.py): every row scored the same items in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path

from gateskip.eval import paired

LEVELS = (0.10, 0.20, 0.30, 0.40)
ITERS = 2000


def analyse(results: dict, reference: str = "gateskip", iters: int = ITERS, seed: int = 0) -> dict:
    """Adds ``analysis``: per-row retention with band, matched-level table, who-wins, curves."""
    all_rows = results["rows"]
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
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    ref = reference if reference in methods else (methods[0] if methods else None)
    results["analysis"] = {
        "rows": per_row, "levels": list(LEVELS), "reference": ref, "tasks": valid,
        "matched": {m: {f"{k:g}": v for k, v in lv.items()} for m, lv in paired.matched_table(rows, LEVELS).items()},
        "who_wins": paired.who_wins(rows, LEVELS, reference=ref, iters=iters, seed=seed) if ref and len(methods) > 1
        else [],
        "curves": {m: paired.curve([r for r in rows if r["method"] == m], dense, iters, seed) for m in methods},
    }
    return results


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(results: dict) -> str:
    from gateskip.eval.suite import CORE_MARGIN

    cfg, rows, an = results["config"], results["rows"], results["analysis"]
    tasks = list(rows[0]["tasks"])
    dense = rows[0]
    kept = an["tasks"]
    out = [f"# Core-suite quality vs compute: {cfg.get('model')} + {cfg.get('gates')}", "",
           f"{cfg.get('limit') or 'all'} items per task (the first ones, the same for every row); GateSkip policy "
           f"{cfg.get('policy')}; {cfg.get('seconds', 0) / 60:.1f} min for the whole sweep. Cells: accuracy "
           "(above-chance retention). Retention = (acc - chance) / (dense - chance); the suite value is the mean "
           "over tasks with a 95% paired-bootstrap band over items. Tokens skipped and compute saved "
           "(FLOP-weighted, gates counted) are measured on the evaluation text itself.", "",
           f"| task | metric | items | chance | dense | dense - chance | >= {CORE_MARGIN:.2f} above chance |",
           "|---|---|---|---|---|---|---|"]
    for t in tasks:
        v = dense["tasks"][t]
        out.append(f"| {t} | {v['metric']} | {v['n']} | {v['chance']:.3f} | {v['acc']:.3f} ± {v['stderr']:.3f} | "
                   f"{v['acc'] - v['chance']:+.3f} | {'yes' if v['acc'] - v['chance'] >= CORE_MARGIN else 'no'} |")
    if set(kept) != set(tasks):
        out += ["", "Not in the retention figures (dense at or below chance): "
                + ", ".join(t for t in tasks if t not in kept) + "."]
    if not an["rows"]:
        return "\n".join(out) + "\n"
    head = ["method", "budget", *tasks, "suite retention [95%]", "mean acc", "tokens skipped", "compute saved"]
    out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, a in zip(rows, an["rows"]):
        cells = [f"{r['tasks'][t]['acc']:.3f}" + (f" ({100 * a['tasks'][t]:.0f}%)" if t in a["tasks"] else "")
                 for t in tasks]
        out.append("| " + " | ".join([r["method"], r["budget"], *cells,
                                      f"{100 * a['value']:.1f}% [{100 * a['lo']:.1f}, {100 * a['hi']:.1f}]",
                                      f"{r['mean_acc']:.3f}", _pct(r["tokens_skipped"]),
                                      _pct(r["compute_saved"])]) + " |")
    levels = an["levels"]
    out += ["", "## Retention at matched compute (each curve interpolated linearly between its measured budgets)", "",
            "| method | " + " | ".join(f"{100 * lv:.0f}% saved" for lv in levels) + " |",
            "|---|" + "---|" * len(levels)]
    for m, lv in an["matched"].items():
        out.append(f"| {m} | " + " | ".join(_pct(lv.get(f"{x:g}")) for x in levels) + " |")
    if an["who_wins"]:
        ref = an["reference"]
        out += ["", f"## Who wins: {ref} minus each method, suite retention points, paired 95% interval", "",
                "- marks a level outside one of the two measured curves (never extrapolated); **bold** intervals "
                "exclude zero.", "",
                "| method | " + " | ".join(f"{100 * lv:.0f}% saved" for lv in levels) + " |",
                "|---|" + "---|" * len(levels)]
        for m in dict.fromkeys(e["method"] for e in an["who_wins"]):
            cells = []
            for lv in levels:
                e = next(e for e in an["who_wins"] if e["method"] == m and e["level"] == lv)
                if e["diff"] is None:
                    cells.append("-")
                    continue
                txt = f"{100 * e['diff']:+.1f} [{100 * e['lo']:+.1f}, {100 * e['hi']:+.1f}] {e['winner']}"
                cells.append(f"**{txt}**" if e["excludes_zero"] else txt)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    if any("fidelity" in r for r in rows):
        fc = cfg.get("fidelity") or {}
        gen_task = next((t for t in tasks if t == "lambada_gen"), None)
        out += ["", f"## Generation fidelity ({fc.get('prompts')} held-out prompts of {fc.get('prompt_tokens')} tokens, "
                f"{fc.get('new_tokens')} greedy tokens; the dense model's own continuation is the reference)", "",
                "| method | budget | KL(dense‖row) / token | CE on dense text | tokens before first divergence | "
                "token agreement | LAMBADA greedy | compute saved |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            f = r.get("fidelity")
            if not f:
                continue
            lam = f"{r['tasks'][gen_task]['acc']:.3f}" if gen_task else "-"
            out.append(f"| {r['method']} | {r['budget']} | {f['kl']:.3f} | {f['ce']:.3f} | {100 * f['agree_prefix']:.1f}% | "
                       f"{100 * f['agree_tokens']:.1f}% | {lam} | {_pct(r['compute_saved'])} |")
    return "\n".join(out) + "\n"


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, 4.6))
    ax.axhline(100, color="black", linestyle="--", linewidth=1, label="dense")
    ax.axhline(0, color="grey", linestyle=":", linewidth=1, label="chance")
    for m, pts in results["analysis"]["curves"].items():
        x = [100 * p["compute_saved"] for p in pts]
        line, = ax.plot(x, [100 * p["retention"] for p in pts], marker="o", label=m)
        ax.fill_between(x, [100 * p["lo"] for p in pts], [100 * p["hi"] for p in pts], color=line.get_color(),
                        alpha=0.15)
    ax.set_xlabel("compute saved, FLOP-weighted, gates counted (%)")
    ax.set_ylabel("above-chance retention, suite mean (%)")
    ax.set_title(f"Retention vs compute ({len(results['rows'][0]['tasks'])} tasks, 95% bands)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out) -> str:
    """results.json, report.md and curve.png into ``out``; returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(results)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")
    (out / "report.md").write_text(md)
    plot(results, out / "curve.png")
    return md


if __name__ == "__main__":  # python -m gateskip.eval.suite_report DIR: the report again from DIR/results.json
    import sys

    folder = Path(sys.argv[1])
    data = json.loads((folder / "results.json").read_text())
    print(write(analyse(data), folder))
