"""The suite sweep's report: retention table, matched-compute who-wins table, each gated method between
its floor and ceiling (random choice and the oracle with the same machinery: the share of the gap it
closes), generation fidelity, and a curve of retention against compute saved with each method's 95% band.

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
from gateskip.eval.suite_merge import join_tasks, merge, same_curve

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
    tuned = [f"gateskip+{kind}+lora", f"gateskip+{kind}+ft"] if kind != "zero" else ["gateskip+lora", "gateskip+ft"]
    for name in tuned + ([f"gateskip+{kind}"] if kind != "zero" else []) + ["gateskip"]:
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


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(results: dict) -> str:
    from gateskip.eval.suite import CORE_MARGIN

    cfg, rows, an = results["config"], results["rows"], results["analysis"]
    tasks = list(rows[0]["tasks"])
    dense = rows[0]
    kept = an["tasks"]
    out = [f"# Core-suite quality vs compute: {cfg.get('model')} + {cfg.get('gates')}", "",
           f"{_items(cfg)}; GateSkip policy "
           f"{cfg.get('policy')}; {_timing(cfg)}. Cells: accuracy "
           "(above-chance retention). Retention = (acc - chance) / (dense - chance); the suite value is the mean "
           "over tasks with a 95% paired-bootstrap band over items. Tokens skipped and compute saved "
           "(FLOP-weighted, gates counted) are measured on the evaluation text itself.", "",
           *_notes(cfg, rows),
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
    out += _bracket_section(an.get("gap_closed") or [])
    tm = an.get("task_matched") or {}
    if any(v is not None for tv in tm.values() for v in tv.values()):
        lv = an["task_level"]
        out += ["", f"## Per task at {100 * lv:.0f}% saved on the task's own text (accuracy, above-chance retention)",
                "", "At one ratio a task's text can be skipped more or less than the suite's as a whole: here each "
                "task is read at the compute saved on its own text (interpolated like the suite). - : outside the "
                "method's measured range on that task, or not recorded.", "",
                "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for m, tv in tm.items():
            cells = []
            for t in tasks:
                d = dense["tasks"][t]
                if tv.get(t) is None:
                    cells.append("-")
                elif d["acc"] > d["chance"]:
                    cells.append(f"{tv[t]:.3f} ({100 * paired.retention(tv[t], d['acc'], d['chance']):.0f}%)")
                else:
                    cells.append(f"{tv[t]:.3f}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
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
                "Next-token agreement: along the dense continuation, how often the row's most likely token is the "
                "dense model's (what a greedy speculative verifier accepts). Free-running agreement: the row "
                "generates on its own; once it parts from dense both texts differ and agreement falls to chance.",
                "", "| method | budget | KL(dense‖row) / token | CE on dense text | next-token agreement | "
                "tokens before first divergence | free-running token agreement | LAMBADA greedy | compute saved "
                "(suite) | compute saved (generating) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            f = r.get("fidelity")
            if not f:
                continue
            lam = f"{r['tasks'][gen_task]['acc']:.3f}" if gen_task else "-"
            out.append(f"| {r['method']} | {r['budget']} | {f['kl']:.3f} | {f['ce']:.3f} | {_pct(f.get('agree_next'))} | "
                       f"{100 * f['agree_prefix']:.1f}% | {100 * f['agree_tokens']:.1f}% | {lam} | "
                       f"{_pct(r['compute_saved'])} | {_pct(f.get('gen_compute_saved'))} |")
        out += _generation_section(an.get("generation"))
    return "\n".join(out) + "\n"


def _bracket_section(entries: list[dict]) -> list[str]:
    """Each gated method between its floor (random choice) and ceiling (the oracle), same machinery."""
    out = []
    for m in dict.fromkeys(e["method"] for e in entries):
        mine = [e for e in entries if e["method"] == m]
        if all(e["value"] is None and "method_retention" not in e for e in mine):
            continue
        e0 = mine[0]
        out += ["", f"## {m} between its floor ({e0['floor']}) and its ceiling ({e0['ceiling']})", "",
                "Suite retention of each at matched compute, and the share of the floor-to-ceiling gap the method "
                "closes with a paired 95% interval (the same item resamples for all three). - : a level outside "
                "one of the three measured curves.", "",
                "| compute saved | floor | method | ceiling | gap closed [95%] |", "|---|---|---|---|---|"]
        for e in mine:
            if "method_retention" not in e:
                out.append(f"| {100 * e['level']:.0f}% | - | - | - | - |")
                continue
            share = "-" if e["value"] is None else (
                f"{100 * e['value']:.0f}%" + ("" if e["lo"] is None else f" [{100 * e['lo']:.0f}, {100 * e['hi']:.0f}]"))
            out.append(f"| {100 * e['level']:.0f}% | {_pct(e['floor_retention'])} | {_pct(e['method_retention'])} | "
                       f"{_pct(e['ceiling_retention'])} | {share} |")
    return out


def _generation_section(gen: dict | None) -> list[str]:
    """Fidelity at GEN_LEVEL saved while generating, and the reference's agreement as a multiple of each method's."""
    if not gen or not any(v for v in gen["methods"].values()):
        return []
    lv, ref = gen["level"], gen["reference"]
    out = ["", f"### Generation at {100 * lv:.0f}% saved while generating (per prompt, interpolated between each "
           "method's rows on the compute saved during its own generation; - : outside its measured range or not "
           "recorded)", "", "| method | KL / token | next-token agreement | free-running token agreement | "
           f"{ref} next-token agreement as a multiple [95%] | free-running, as a multiple [95%] |",
           "|---|---|---|---|---|---|"]

    def mult(c):
        if not c or c["ratio"] is None:
            return "-"
        return f"{c['ratio']:.2f}x" + (f" [{c['lo']:.2f}, {c['hi']:.2f}]" if c["lo"] is not None else "")

    for m, v in gen["methods"].items():
        if v is None:
            out.append(f"| {m} | - | - | - | - | - |")
            continue
        rc = gen["ratios"].get(m) or {}
        out.append(f"| {m} | {v['kl']:.3f} | {100 * v['agree_next']:.1f}% | {100 * v['agree_tokens']:.1f}% | "
                   f"{mult(rc.get('agree_next'))} | {mult(rc.get('agree_tokens'))} |")
    return out


def _notes(cfg: dict, rows: list) -> list[str]:
    """Paragraphs on the fallback, the shortgpt+linear rows and merged runs (none when they do not apply)."""
    out = []
    fb = cfg.get("fallback") or {}
    kind = fb.get("kind") or "zero"
    if kind != "zero":
        what = f"{kind} (rank {fb.get('rank')})" if kind == "lowrank" else kind
        if fb.get("source") == "fitted":
            m = fb.get("r2_mean") or {}
            how = (f"fitted in closed form on {fb.get('tokens')} tokens of calibration text ({fb.get('batches')} "
                   f"batches; mean R² attn {_num(m.get('attn'))}, mlp {_num(m.get('mlp'))})")
        else:
            how = "stored in the gates folder"
        out += [f"Skipped tokens of the gateskip+{kind} and random+{kind} rows get a {what} fallback of the branch "
                f"input instead of 0, {how}; compute saved charges it for every skipped token.", ""]
    if any(r["method"].split("@")[0] == "shortgpt+linear" for r in rows):
        out += ["shortgpt+linear: ShortGPT's layers (lowest Block Influence, same counts), each replaced by linear "
                "maps x W + b of its attention and MLP inputs instead of removed, fitted in closed form layer by "
                "layer on the inputs they see with the earlier replacements installed; compute saved charges the "
                "maps (2 H² FLOPs per token and branch) and a scalar gate per branch.", ""]
    merged = cfg.get("compare_with") or []
    if merged:
        out += ["Rows merged from other runs (paired item by item: their dense rows score every item exactly as "
                "this run's):", ""]
        for c in merged:
            fb = c.get("fallback") or {}
            out.append(f"- `{c['path']}`: {', '.join(c['methods']) or 'no rows'} (model {c.get('model')}, gates "
                       f"{c.get('gates')}, fallback {fb.get('kind') or 'zero'})")
        out.append("")
    joined = cfg.get("same_curve") or {}
    if joined:
        out += ["Declared one curve (`--same-curve`): " + "; ".join(f"the rows of `{a}` are budgets of `{b}`"
                                                                 for a, b in joined.items()) + ".", ""]
    return out


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


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




def _items(cfg: dict) -> str:
    n, offset = cfg.get("limit") or "all", cfg.get("offset") or 0
    if offset:
        return (f"{n} items per task after the first {offset} (a dev split: items the default runs never score; "
                "fewer where a task has fewer), the same for every row")
    return f"{n} items per task (the first ones, the same for every row)"


def _timing(cfg: dict) -> str:
    """Wall time of the sweep; for a resumed one, also what the interrupted runs measured."""
    joined = "".join(f"; {', '.join(j.get('tasks') or [])} joined from a later run of the same command "
                     f"({(j.get('seconds') or 0) / 60:.1f} min)" for j in cfg.get("joined", []))
    if not cfg.get("resumed"):
        return f"{cfg.get('seconds', 0) / 60:.1f} min for the whole sweep" + joined
    return (f"{cfg['seconds'] / 60:.1f} min in the last run of a resumed sweep ({cfg['resumed']} task scores kept from "
            f"interrupted runs){joined}; {cfg.get('scoring_seconds', 0) / 60:.1f} min of scoring time over all rows")


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
