"""The qualification rule and the analysis and report of a gen run (gentasks.py): a task/format qualifies when
its dense score is at least ``Z`` standard errors above 0; per level of compute saved, each method's retention
over the qualifying task/formats and gateskip against random and oracle (paired over items); then the markdown
report, the retention plot and the files of a run (gen.json, gen.md, gen.png)."""

from __future__ import annotations

from pathlib import Path

from gateskip.eval.chat_fidelity import matched, paired

LEVELS = (0.10, 0.15, 0.20, 0.25, 0.30)
Z = 3.0


def qualify(scores: list[float], z: float = Z) -> tuple[float, float, bool]:
    """(mean, standard error, qualifies): the mean is positive and at least ``z`` standard errors above 0."""
    n = len(scores)
    mean = sum(scores) / n
    se = (sum((x - mean) ** 2 for x in scores) / (n - 1) / n) ** 0.5 if n > 1 else float("inf")
    return mean, se, mean > 0 and mean >= z * se


def _retention(res: dict, keys: list[str], method: str, level: float) -> tuple[dict, list[float]] | None:
    """Per task, ``method``'s retention at ``level`` of compute saved, and its per-item values weighted so
    that their mean is the mean over tasks; None when a task has no pair of rows that brackets ``level``."""
    per_task, pooled = {}, []
    total = sum(res["tasks"][k]["items"] for k in keys)
    for k in keys:
        t = res["tasks"][k]
        v = matched(t["rows"], method, level, "score")
        if v is None:
            return None
        per_task[k] = sum(v) / len(v) / t["dense"]
        pooled += [x * total / (len(keys) * len(v) * t["dense"]) for x in v]
    return per_task, pooled


def analyse(res: dict) -> dict:
    """Per level of compute saved: each method's retention (mean over the qualifying task/formats, and the
    worst one), gateskip minus random and minus oracle (paired over items) and the share of the
    random-to-oracle gap gateskip closes. A method some task cannot bracket at a level is left out there."""
    keys = [k for k, t in res["tasks"].items() if t.get("qualifies") and len(t["rows"]) > 1]
    methods = dict.fromkeys(r["method"] for k in keys for r in res["tasks"][k]["rows"])
    methods.pop("dense", None)
    out = {"tasks": keys, "levels": {}}
    for level in LEVELS:
        entry, pooled = {}, {}
        for m in methods:
            got = _retention(res, keys, m, level) if keys else None
            if got is None:
                continue
            per_task, pooled[m] = got
            worst = min(per_task, key=per_task.get)
            entry[m] = {"mean": sum(per_task.values()) / len(keys), "worst": [worst, per_task[worst]],
                        "per_task": per_task}
        versus = {}
        if "gateskip" in pooled:
            versus = {o: list(paired(pooled["gateskip"], pooled[o])) for o in ("random", "oracle")
                      if o in pooled}
            if len(versus) == 2 and entry["oracle"]["mean"] != entry["random"]["mean"]:
                versus["gap_closed"] = ((entry["gateskip"]["mean"] - entry["random"]["mean"])
                                        / (entry["oracle"]["mean"] - entry["random"]["mean"]))
        out["levels"][f"{level:.2f}"] = {"methods": entry, "versus": versus}
    return out


def _tables(res: dict) -> list[str]:
    lines = ["## Qualification: the original model (dense)", "", "A task/format qualifies when its dense "
             f"score is positive and at least {Z:g} standard errors above 0; only those are swept.", "",
             "| task | format | metric | items | dense score | SE | EM | seconds | qualifies |",
             "|---" * 9 + "|"]
    for t in res["tasks"].values():
        d = t["rows"][0]
        lines.append(f"| {t['task']} | {t['format']} | {'F1' if t['metric'] == 'f1' else 'number right'} | "
                     f"{t['items']} | {t['dense']:.3f} | {t['se']:.3f} | {d['em']:.3f} | "
                     f"{d['seconds']:.0f} | {'yes' if t['qualifies'] else 'no'} |")
    swept = [(k, t) for k, t in res["tasks"].items() if len(t["rows"]) > 1]
    if swept:
        lines += ["", "## Rows (retention: score over the task's dense score)", "",
                  "| task | method | budget | compute saved | tokens skipped | score | EM | retention | "
                  "new tokens | seconds |", "|---" * 10 + "|"]
    for key, t in swept:
        lines += [f"| {key} | {r['method']} | {r['budget']:g} | {r['compute_saved']:.1%} | "
                  f"{r['tokens_skipped']:.1%} | {r['score']:.3f} | {r['em']:.3f} | "
                  f"{r['score'] / t['dense']:.1%} | {r['new_tokens']} | {r['seconds']:.0f} |"
                  for r in t["rows"]]
    return lines


def _matched(res: dict) -> list[str]:
    a = res["analysis"]
    lines = ["", f"## At matched compute saved while generating ({len(a['tasks'])} qualifying task/formats)",
             "", "Per item, interpolated between a method's rows; a level they do not bracket on every task "
             "is left out (add lower or higher ratios).", "",
             "| level | method | retention, mean over tasks | worst task |", "|---|---|---|---|"]
    for level, e in a["levels"].items():
        lines += [f"| {float(level):.0%} | {m} | {v['mean']:.1%} | {v['worst'][0]} {v['worst'][1]:.1%} |"
                  for m, v in e["methods"].items()]
    lines += ["", "## gateskip against its floor (random) and ceiling (oracle), retention paired over items",
              "", "| level | minus random [95%] | minus oracle [95%] | random-to-oracle gap closed |",
              "|---|---|---|---|"]
    for level, e in a["levels"].items():
        v = e["versus"]
        cell = [f"{v[o][0]:+.1%} [{v[o][1]:+.1%}, {v[o][2]:+.1%}]" if o in v else "-"
                for o in ("random", "oracle")]
        gap = f"{v['gap_closed']:.0%}" if "gap_closed" in v else "-"
        lines += [f"| {float(level):.0%} | {cell[0]} | {cell[1]} | {gap} |"] if v else []
    return lines


def report(res: dict) -> str:
    """The markdown report: qualification, rows, the matched-compute comparison and sample answers."""
    lines = ["# Generative tasks: greedy answers scored against gold answers, the first "
             f"{res['limit'] or 'all'} items of each task", ""] + _tables(res)
    if res["analysis"]["tasks"]:
        lines += _matched(res)
    lines += ["", "## Sample answers (first two items)", ""]
    for key, t in res["tasks"].items():
        for i, q in enumerate(t["questions"][:2]):
            lines.append(f"**{key}: {q[:160]}** (gold {t['golds'][i][:3]})")
            lines += [f"- {r['method']} {r['budget']:g}: {(r['answers'][i].strip() or '(empty)')[:160]!r}"
                      for r in t["rows"]] + [""]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Retention against compute saved: per method and budget, the mean over the swept tasks (each faint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = res["analysis"]["tasks"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for c, m in enumerate(dict.fromkeys(r["method"] for k in keys for r in res["tasks"][k]["rows"])):
        per: dict[float, list] = {}
        for t in (res["tasks"][k] for k in keys):
            mine = sorted((r for r in t["rows"] if r["method"] == m), key=lambda r: r["budget"])
            pts = [(100 * r["compute_saved"], r["score"] / t["dense"]) for r in mine]
            ax.plot([x for x, _ in pts], [y for _, y in pts], "-", color=f"C{c}", alpha=0.25, lw=0.8)
            for r, p in zip(mine, pts):
                per.setdefault(r["budget"], []).append(p)
        mean = [[sum(c) / len(c) for c in zip(*v)] for _, v in sorted(per.items())]
        ax.plot([x for x, _ in mean], [y for _, y in mean], "o-", color=f"C{c}", label=m)
    ax.set_xlabel("compute saved while generating (%)")
    ax.set_ylabel("retention (score / dense score)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write(res: dict, out: str | Path) -> Path:
    """OUT/gen.json, gen.md and (when tasks were swept) gen.png, each written, then renamed."""
    from gateskip.eval.outputs import write_run

    return write_run(out, "gen", res, report(res), plot if res["analysis"]["tasks"] else None)

