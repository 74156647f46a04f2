"""The text of the suite sweep's report (report.md; suite_report.py analyses the rows and writes it): the
dense model per task, every row with its above-chance retention, retention at matched compute, each gated
method between its floor and ceiling, each task at one level of compute saved, who wins against the reference
method and generation fidelity, one function per section."""

from __future__ import annotations

from gateskip.eval import paired
from gateskip.fallback import is_zero, with_rank


def markdown(results: dict) -> str:
    """report.md: the dense table, then (when some task is above chance) every section of an analysed run."""
    cfg, rows, an = results["config"], results["rows"], results["analysis"]
    tasks = list(rows[0]["tasks"])
    out = _dense_section(cfg, rows, an["tasks"])
    if not an["rows"]:
        return "\n".join(out) + "\n"
    out += _rows_section(rows, an, tasks) + _matched_section(an)
    out += _bracket_section(an.get("gap_closed") or []) + _task_section(an, rows[0], tasks)
    out += _who_wins_section(an)
    if any("fidelity" in r for r in rows):
        out += _fidelity_section(cfg, rows, tasks) + _generation_section(an.get("generation"))
    return "\n".join(out) + "\n"


def _dense_section(cfg: dict, rows: list, kept: list[str]) -> list[str]:
    """The title, what the cells mean, the notes and the dense model on every task."""
    from gateskip.eval.suite import CORE_MARGIN

    tasks = list(rows[0]["tasks"])
    dense = rows[0]
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
    return out


def _rows_section(rows: list, an: dict, tasks: list[str]) -> list[str]:
    """Every row: accuracy (retention) per task, suite retention with its band, tokens skipped, compute saved."""
    head = ["method", "budget", *tasks, "suite retention [95%]", "mean acc", "tokens skipped", "compute saved"]
    out = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, a in zip(rows, an["rows"]):
        cells = [f"{r['tasks'][t]['acc']:.3f}" + (f" ({100 * a['tasks'][t]:.0f}%)" if t in a["tasks"] else "")
                 for t in tasks]
        out.append("| " + " | ".join([r["method"], r["budget"], *cells,
                                      f"{100 * a['value']:.1f}% [{100 * a['lo']:.1f}, {100 * a['hi']:.1f}]",
                                      f"{r['mean_acc']:.3f}", _pct(r["tokens_skipped"]),
                                      _pct(r["compute_saved"])]) + " |")
    return out


def _matched_section(an: dict) -> list[str]:
    """Each method's suite retention at every level of compute saved."""
    levels = an["levels"]
    out = ["", "## Retention at matched compute (each curve interpolated linearly between its measured budgets)", "",
           "| method | " + " | ".join(f"{100 * lv:.0f}% saved" for lv in levels) + " |",
           "|---|" + "---|" * len(levels)]
    for m, lv in an["matched"].items():
        out.append(f"| {m} | " + " | ".join(_pct(lv.get(f"{x:g}")) for x in levels) + " |")
    return out


def _task_section(an: dict, dense: dict, tasks: list[str]) -> list[str]:
    """Each task at ``task_level`` saved on its own text; none when no method reaches it on any task."""
    tm = an.get("task_matched") or {}
    if not any(v is not None for tv in tm.values() for v in tv.values()):
        return []
    lv = an["task_level"]
    out = ["", f"## Per task at {100 * lv:.0f}% saved on the task's own text (accuracy, above-chance retention)",
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
    return out


def _who_wins_section(an: dict) -> list[str]:
    """The reference minus each method at every level, bold where the interval excludes zero."""
    if not an["who_wins"]:
        return []
    ref, levels = an["reference"], an["levels"]
    out = ["", f"## Who wins: {ref} minus each method, suite retention points, paired 95% interval", "",
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
    return out


def _fidelity_section(cfg: dict, rows: list, tasks: list[str]) -> list[str]:
    """Every row's generation fidelity against the dense model's own continuations."""
    fc = cfg.get("fidelity") or {}
    gen_task = next((t for t in tasks if t == "lambada_gen"), None)
    out = ["", f"## Generation fidelity ({fc.get('prompts')} held-out prompts of {fc.get('prompt_tokens')} tokens, "
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
    return out


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
    """Fidelity at suite_report.GEN_LEVEL saved while generating, and the reference's agreement as a multiple of each method's."""
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
    if not is_zero(kind):
        what = with_rank(kind, fb.get("rank"))
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


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


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

