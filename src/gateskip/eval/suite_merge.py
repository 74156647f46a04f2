"""Merging suite runs on the same items into one report (``--compare-with``) and joining the tasks of a
later run of the same command: the runs are checked to score the same items (their dense rows must agree),
and a method name another run already uses gets ``@<folder>``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gateskip.errors import GateSkipError


def split_paths(paths) -> list[str]:
    """``--compare-with``: a comma list (or list) of results.json paths, each checked to exist."""
    items = [p.strip() for p in (paths.split(",") if isinstance(paths, str) else paths or []) if str(p).strip()]
    for p in items:
        if not os.path.isfile(p):
            raise GateSkipError(f"--compare-with {p!r} does not exist: pass an earlier suite run's results.json")
    return items


def load_run(path: str, expect: dict | None = None) -> dict:
    """A suite run's results.json; with ``expect`` (``tasks``, ``limit``), checked to cover the same items."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise GateSkipError(f"--compare-with {path!r} is not a readable results.json ({e})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not rows or rows[0].get("method") != "dense" or "config" not in data:
        raise GateSkipError(f"--compare-with {path!r} is not a suite run's results.json (gateskip eval --suite)")
    if expect is not None:
        cfg = data["config"]
        for key in ("tasks", "limit", "offset"):
            if not same_key(key, cfg.get(key), expect.get(key)):
                raise GateSkipError(f"--compare-with {path!r} was run with {key}={cfg.get(key)}, this run with "
                                    f"{key}={expect.get(key)}: merge only runs on the same tasks and items")
    return data


def same_key(key: str, a, b) -> bool:
    """Config values ``a`` and ``b`` agree; task lists in any order (a task joined later comes last); a run
    saved before ``offset`` existed scored from item 0."""
    if key == "offset":
        return (a or 0) == (b or 0)
    if key == "tasks" and isinstance(a, list) and isinstance(b, list):
        return sorted(a) == sorted(b)
    return a == b


def _own(rows: list) -> list:
    """A run's own rows (not those it merged from other runs)."""
    return [r for r in rows if "from" not in r]


def _key(r: dict) -> tuple:
    """What makes two rows the same row: method (a copy renamed ``name@folder`` by an earlier merge counts as
    ``name``), budget and every item's score."""
    return r["method"].split("@")[0], r["budget"], json.dumps({t: v.get("correct") for t, v in sorted(r["tasks"].items())})


def _rows_to_merge(data: dict, seen: set) -> list:
    """The non-dense rows a run brings: its own and those it merged itself (a committed merged report, e.g.
    ``docs/results/*.json``, brings every row it shows), each once: a row equal to one already taken (same
    method, budget and item scores, as when a run and a report that merged it are both given) is skipped."""
    out = []
    for r in data["rows"]:
        if r["method"] == "dense":
            continue
        key = _key(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


CURVE_KEYS = ("model", "gates", "policy", "kv", "protect_first", "seed", "shared_prefix", "fallback", "modules",
              "fidelity")


def same_curves(a: dict, b: dict) -> bool:
    """Two runs' configs (results.json ``config``) measure the same curves: the same model, gates folder,
    policy, fallback, protected tokens, branch kinds and fidelity prompts, so a method both have is one curve
    and the other run's budgets extend this run's."""
    return all(same_key(k, a.get(k), b.get(k)) for k in CURVE_KEYS)


def renames(own_names, runs, seen: set | None = None, config: dict | None = None) -> list[tuple[str, dict[str, str]]]:
    """Per run ``(path, data)``: its non-dense methods mapped to their names in the merged report. A name
    already taken (by this run or a run merged before) gets ``@<folder of that results.json>``, except the
    other run's own rows of a method this run has when both runs measure the same curves (``same_curves``
    with this run's ``config``): those are more budgets of this run's curve and keep its name."""
    taken = {"dense", *own_names}
    seen = set(seen or ())  # rows already in the report (``_key``): not merged again
    out = []
    for path, data in runs:
        label = Path(os.path.abspath(path)).parent.name or "other"
        extends = config is not None and same_curves(config, data.get("config", {}))
        names: dict[str, str] = {}
        for r in _rows_to_merge(data, seen):
            m = r["method"]
            if m in names:
                continue
            if extends and "from" not in r and m in own_names:
                names[m] = m
                continue
            new, k = m, 2
            if new in taken:
                new = f"{m}@{label}"
            while new in taken:
                new, k = f"{m}@{label}-{k}", k + 1
            names[m] = new
            taken.add(new)
        out.append((path, names))
    return out


def _check_dense(dense: dict, other: dict, path: str) -> None:
    if set(other["tasks"]) != set(dense["tasks"]):
        raise GateSkipError(f"--compare-with {path!r} has tasks {sorted(other['tasks'])}, this run "
                            f"{sorted(dense['tasks'])}: merge only runs on the same tasks")
    for t, v in dense["tasks"].items():
        a, b = v["correct"], other["tasks"][t]["correct"]
        if a != b:
            n = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
            raise GateSkipError(f"--compare-with {path!r}: its dense row scores {t} differently ({n} of {len(a)} "
                                "items differ): not the same model or items, so its rows cannot be paired")


def merge(results: dict, paths) -> dict:
    """Add the rows of other suite runs (``paths``: results.json files) after this run's own, in place.

    Each must cover the same tasks with the same limit and offset, and its dense row must score every item exactly
    as this run's (same model, same items); its dense row is dropped and its methods renamed where they
    collide (``renames``; the rows of a run of the same curves, ``same_curves``, add budgets to this run's
    methods instead). Rows merged before are replaced. A run that holds rows it merged itself brings them too,
    each row once. Merged rows carry ``from`` (the file they were taken from), and their generation fidelity only
    when it was measured on this run's prompts."""
    paths = split_paths(paths)
    cfg = results["config"]
    own = _own(results["rows"])
    runs = [(p, load_run(p, {"tasks": cfg.get("tasks"), "limit": cfg.get("limit"), "offset": cfg.get("offset")}))
            for p in paths]
    rows, sources, seen = list(own), [], {_key(r) for r in own}
    for (path, data), (_, names) in zip(runs, renames([r["method"] for r in own], runs, seen, cfg)):
        _check_dense(own[0], data["rows"][0], path)
        oc = data["config"]
        same_prompts = same_key("fidelity", oc.get("fidelity"), cfg.get("fidelity"))
        rows += [_without_fidelity({**r, "method": names[r["method"]], "from": path}, same_prompts)
                 for r in _rows_to_merge(data, seen)]
        sources.append({"path": path, "model": oc.get("model"), "gates": oc.get("gates"),
                        "fallback": oc.get("fallback"), "methods": list(names.values()), "renamed": {
                            k: v for k, v in names.items() if k != v}})
    results["rows"] = rows
    cfg["compare_with"] = sources
    earlier = cfg.pop("same_curve", None) or {}  # joins declared before: again where both methods are back
    names = {r["method"] for r in rows}
    same_curve(results, [f"{a}={b}" for a, b in earlier.items() if a in names and b in names])
    return results


def _without_fidelity(row: dict, keep: bool) -> dict:
    """``row`` as merged: its generation fidelity only when measured on this run's prompts (else dropped: it
    cannot be compared or paired with this run's)."""
    if keep or "fidelity" not in row:
        return row
    return {k: v for k, v in row.items() if k != "fidelity"}


def same_curve(results: dict, pairs) -> dict:
    """Declare merged methods one curve, in place: ``pairs`` (``"A=B"`` items, a comma list or list) renames
    method A's rows to B, so that A's budgets extend B's curve. For a copy an earlier merge renamed
    ``name@folder`` (a report does not record the policy and protection of the runs it merged, so
    ``same_curves`` cannot tell): A and B must be the same method up to the ``@folder`` suffix, and A's rows
    must be at budgets B does not have. Recorded in ``config["same_curve"]``."""
    items = [x.strip() for x in (pairs.split(",") if isinstance(pairs, str) else pairs or []) if str(x).strip()]
    methods = {r["method"] for r in results["rows"]}
    done = dict(results["config"].get("same_curve") or {})
    for item in items:
        a, sep, b = item.partition("=")
        a, b = a.strip(), b.strip()
        if not sep or not a or not b:
            raise GateSkipError(f"--same-curve {item!r} is not A=B: name a merged copy and the method it extends")
        if a not in methods and done.get(a) == b:  # joined before (the report written again)
            continue
        for m in (a, b):
            if m not in methods:
                raise GateSkipError(f"--same-curve {item!r}: {m!r} names no method of this report")
        if a.split("@")[0] != b.split("@")[0] or a == b:
            raise GateSkipError(f"--same-curve {item!r}: {a!r} and {b!r} are not copies of one method (they must "
                                "differ only in an @folder suffix)")
        budgets = {r["budget"] for r in results["rows"] if r["method"] == b}
        clash = sorted({r["budget"] for r in results["rows"] if r["method"] == a} & budgets)
        if clash:
            raise GateSkipError(f"--same-curve {item!r}: both have a row at {', '.join(clash)}: not budgets of one "
                                "curve")
        for r in results["rows"]:
            if r["method"] == a:
                r["method"] = b
        methods.discard(a)
        done[a] = b
    results["config"]["same_curve"] = done
    return results


JOIN_KEYS = ("model", "gates", "limit", "policy", "kv", "protect_first", "seed", "shared_prefix", "fallback",
             "methods", "budgets")


def join_tasks(results: dict, paths) -> dict:
    """Add the task columns of other runs of the same sweep (``paths``: results.json files), in place.

    For a task added to a suite after its sweep finished: run the same command on that task alone
    (``--suite <task>``) and join it here instead of scoring every task again. Each run must have the same
    model, gates, items limit, policy, fallback, methods and budgets, and no task in common with this one;
    rows are matched by method, budget and setting, and every row's aggregates (tokens skipped, compute
    saved FLOP-weighted, mean accuracy, seconds) are recomputed over all tasks. Generation fidelity does not
    depend on the tasks and stays this run's. Join before merging other methods (``--compare-with``)."""
    cfg = results["config"]
    if any("from" in r for r in results["rows"]):
        raise GateSkipError("this run already holds rows merged from other runs: join tasks before --compare-with")
    for path in split_paths(paths):
        data = load_run(path)
        oc = data["config"]
        diff = [k for k in JOIN_KEYS if oc.get(k) != cfg.get(k)]
        if diff:
            raise GateSkipError(f"{path!r} is not the same sweep ({', '.join(diff)} differ): join only runs of "
                                "the same command on other tasks")
        common = set(oc.get("tasks", [])) & set(cfg.get("tasks", []))
        if common:
            raise GateSkipError(f"{path!r} also scores {', '.join(sorted(common))}: join only runs on other tasks")
        theirs = {(r["method"], r["budget"], json.dumps(r.get("setting"), sort_keys=True)): r for r in data["rows"]}
        for row in results["rows"]:
            key = (row["method"], row["budget"], json.dumps(row.get("setting"), sort_keys=True))
            if key not in theirs:
                raise GateSkipError(f"{path!r} has no row {row['method']} {row['budget']}: join only runs of the "
                                    "same command on other tasks")
            other = theirs.pop(key)
            row["tasks"].update(other["tasks"])
            _reaggregate(row, other.get("seconds", 0.0))
        if theirs:
            extra = ", ".join(f"{m} {b}" for m, b, _ in theirs)
            raise GateSkipError(f"{path!r} has rows this run lacks ({extra}): join only runs of the same command")
        cfg["tasks"] = list(cfg.get("tasks", [])) + list(oc.get("tasks", []))
        cfg.setdefault("joined", []).append({"path": path, "tasks": oc.get("tasks"), "seconds": oc.get("seconds")})
        cfg["scoring_seconds"] = round(cfg.get("scoring_seconds", 0.0) + oc.get("scoring_seconds", 0.0), 1)
    return results


def task_totals(per_task: dict) -> dict:
    """A row's aggregates over its tasks: mean tokens skipped, FLOP-weighted compute saved, mean accuracy."""
    per = per_task.values()
    dense = sum(p["flops_dense"] for p in per)
    executed = sum(p["flops_executed"] for p in per)
    return {"tokens_skipped": sum(p["tokens_skipped"] for p in per) / len(per),
            "compute_saved": 1.0 - executed / dense if dense else 0.0,
            "mean_acc": sum(p["acc"] for p in per) / len(per)}


def _reaggregate(row: dict, extra_seconds: float) -> None:
    row.update(task_totals(row["tasks"]))
    row["seconds"] = round(row.get("seconds", 0.0) + extra_seconds, 1)
