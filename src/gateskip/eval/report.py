"""Writing a sweep's results: ``results.json``, ``report.md`` (table + compute saved at 90/95% of
dense accuracy) and ``curve.png`` (mean accuracy vs FLOP-weighted compute saved)."""

from __future__ import annotations

import json
from pathlib import Path

from gateskip.errors import GateSkipError
from gateskip.quantize import check_quant

LEVELS = (0.90, 0.95)


def saved_at(points: list[dict], dense_acc: float, level: float) -> float | None:
    """Largest compute saved among ``points`` whose mean accuracy is >= level * dense accuracy."""
    ok = [p["compute_saved"] for p in points if p["mean_acc"] >= level * dense_acc]
    return max(ok) if ok else None


def _is_dense(method: str) -> bool:
    return method.split("[")[0] == "dense"  # "dense[int4]": the dense row of a quantized sweep


def _dense(results: dict) -> dict:
    """The reference row: full-precision dense when present, else the (quantized) run's own dense."""
    methods = results["methods"]
    return (methods.get("dense") or next(v for k, v in methods.items() if _is_dense(k)))[0]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _setting(p: dict) -> str:
    s = p.get("setting") or {}
    if "layers_dropped" in s:
        text = f"ratio {p['ratio']:g}: drop {len(s['layers_dropped'])} layers"
    elif "branches_skipped" in s:
        text = f"ratio {p['ratio']:g}: skip {len(s['branches_skipped'])} branches"
    else:
        text = f"ratio {p['ratio']:g}"
    return text + (f" (= {p['same_as']})" if p.get("same_as") else "")


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    dense = _dense(results)
    head = ["method", "setting", *tasks, "mean acc", "tokens skipped", "compute saved"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, points in results["methods"].items():
        for p in points:
            cells = [f"{p['tasks'][t]['acc']:.3f} ± {p['tasks'][t]['stderr'] or 0:.3f}" for t in tasks]
            lines.append("| " + " | ".join([method, _setting(p), *cells, f"{p['mean_acc']:.3f}",
                                            _pct(p["tokens_skipped"]), _pct(p["compute_saved"])]) + " |")
    cfg = results["config"]
    out = [f"# Quality vs compute: {cfg.get('model')} + {cfg.get('gates')}", "",
           "Items per task (the first ones, same for every row): "
           + ", ".join(f"{t} {dense['tasks'][t].get('n', '?')}" for t in tasks) + "; "
           f"policy {cfg.get('policy')}; metric per task: "
           + ", ".join(f"{t} {results['metrics'][t]}" for t in tasks) + ".",
           "Compute saved is FLOP-weighted (gates and LM head counted) against the dense model without gates;",
           "static and shortgpt match gateskip's measured compute saved at each ratio; (= x) marks a row",
           "that is the same model and skipping as row x, so it was not run again.",
           "", *lines, "", "## Compute saved at >= 90% and >= 95% of dense accuracy", "",
           f"Dense mean accuracy: {dense['mean_acc']:.3f}.", "",
           "| method | >= 90% | >= 95% |", "|---|---|---|"]
    for method, points in results["methods"].items():
        if _is_dense(method):
            continue
        out.append(f"| {method} | " + " | ".join(_pct(saved_at(points, dense["mean_acc"], lv)) for lv in LEVELS) + " |")
    return "\n".join(out) + "\n"


def plot_curve(results: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    dense = _dense(results)["mean_acc"]
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.3f})")
    for method, points in results["methods"].items():
        if _is_dense(method):
            if method != "dense":  # a quantized dense row: its own reference line
                acc = points[0]["mean_acc"]
                ax.axhline(acc, color="grey", linestyle=":", linewidth=1, label=f"{method} ({acc:.3f})")
            continue
        pts = sorted(points, key=lambda p: p["compute_saved"])
        ax.plot([100 * p["compute_saved"] for p in pts], [p["mean_acc"] for p in pts], marker="o", label=method)
    ax.set_xlabel("compute saved, FLOP-weighted (%)")
    ax.set_ylabel(f"mean accuracy ({len(results['tasks'])} tasks)")
    ax.set_title("Quality vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out: str | Path) -> str:
    """Write the three files into ``out``; returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    (out / "report.md").write_text(md)
    plot_curve(results, out / "curve.png")
    return md


def combine_results(results: dict, quant: str, compare_with: str | None = None) -> dict:
    """Suffix a quantized sweep's methods (``gateskip[int4]``) and put the rows of ``compare_with``
    (another sweep's results.json, normally full precision) first, so one report and curve hold both."""
    if check_quant(quant) is not None:
        results["methods"] = {f"{m}[{quant}]": pts for m, pts in results["methods"].items()}
    if not compare_with:
        return results
    try:
        with open(compare_with) as f:
            other = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise GateSkipError(f"--compare-with {compare_with!r} is not a readable results.json ({e}): "
                            "pass the results.json of an earlier `gateskip eval`") from None
    oc, rc = other.get("config", {}), results["config"]
    for key in ("tasks", "limit"):
        if oc.get(key) != rc.get(key):
            raise GateSkipError(f"--compare-with {compare_with!r} was run with {key}={oc.get(key)}, this run "
                                f"{rc.get(key)}: compare sweeps over the same items")
    clash = set(other["methods"]) & set(results["methods"])
    if clash:
        raise GateSkipError(f"--compare-with {compare_with!r} has rows named like this run's ({sorted(clash)}): "
                            "compare a full-precision sweep with a --quant one")
    results["methods"] = {**other["methods"], **results["methods"]}
    rc["compared_with"] = {"path": compare_with, "quant": oc.get("quant", "none"), "gates": oc.get("gates")}
    return results
