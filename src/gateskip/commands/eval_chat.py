"""``gateskip eval --suite chat``: chat fidelity of a gates folder between its floor and its ceiling
(eval/chat_fidelity.py), written as OUT/chat.md, chat.json and chat.png."""

from __future__ import annotations

import time

from gateskip.args import SkipArgs
from gateskip.errors import GateSkipError
from gateskip.eval.chat_fidelity import Setting, run, write


def settings(ratios, random_ratios, oracle_ratios, methods, policy: str, skip: SkipArgs = SkipArgs(),
             saved: list[float] | None = None, protect_prompt: bool = False) -> list[Setting]:
    """The rows: dense, then gateskip (``policy``) at ``ratios``, random and oracle at theirs (default: ``ratios``);
    with ``saved``, every method at those compute-saved budgets instead (saved.py: matched by construction).
    ``skip`` (SkipArgs): how tokens skip, the same for every skipping row (the recheck of stops included); only the
    options set away from their defaults are written into a row's setting (the resume key of a gen run)."""
    from gateskip.eval.sweep import parse_ratios

    if saved and skip.allocation != "uniform":
        raise GateSkipError("--saved steers one ratio for every branch: leave --allocation at uniform (or give "
                            "--ratios for a global allocation)")
    default = SkipArgs()
    rules = {k: v for k, v in skip.skipping().items() if k not in ("policy", "seed", "modules", "kv")
             and v is not None and v != getattr(default, k)}
    if protect_prompt:
        rules["protect_prompt"] = True
    if saved:
        rules["prompt_boost"] = skip.prompt_boost
    seed, recheck_stops = skip.seed, skip.recheck_stops
    common = {"modules": tuple(skip.modules), "kv": skip.kv, **rules}
    gates = parse_ratios(ratios)
    out = [Setting("dense", 0.0)]
    per = {"gateskip": (gates, {"policy": policy}),
           "random": (parse_ratios(random_ratios) if random_ratios else gates, {"policy": "random", "seed": seed}),
           "oracle": (parse_ratios(oracle_ratios) if oracle_ratios else gates, {"policy": "oracle", "kv": "compute"})}
    for m in methods:
        if m not in per:
            raise GateSkipError(f"unknown chat method {m!r}: choose from gateskip, random, oracle")
        budgets, extra = per[m]
        knob = "saved" if saved else "ratio"
        out += [Setting(m, r, {**common, knob: r, **extra}, recheck_stops) for r in (saved or budgets)]
    return out


def evaluate_chat(gates, model, ratios, random_ratios, oracle_ratios, methods, policy, skip: SkipArgs, limit, out,
                  fidelity_tokens, batch_size, saved=None, protect_prompt=False, compare_with=None) -> dict:
    """The chat suite; ``compare_with``: chat.json files of other runs on the same requests (e.g. another gates
    folder), whose rows are added and paired with this run's gateskip rows."""
    import json
    from pathlib import Path

    from gateskip.eval.chat_fidelity import merge
    from gateskip.eval.inputs import prepare_run
    from gateskip.loading import load_for_inference

    if not gates:
        raise GateSkipError("--suite chat measures a gates folder: pass --gates DIR")
    others = []
    for path in compare_with or []:
        try:
            others.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise GateSkipError(f"--compare-with {path}: not a readable chat.json ({e.__class__.__name__}); give the "
                                "chat.json of a `gateskip eval --suite chat` run") from None
    prepare_run(limit, out)
    net, tok = load_for_inference(model, gates)
    rows = settings(ratios, random_ratios, oracle_ratios, methods, policy, skip, saved, protect_prompt)
    t0 = time.perf_counter()
    res = run(net, tok, rows, n=limit or 200, max_new_tokens=fidelity_tokens, batch=max(batch_size, 16),
              log=lambda line: print(f"[gateskip eval chat] {line}", flush=True))
    res["config"] = {"gates": gates, "model": model, **config(policy, skip), "saved": saved,
                     "protect_prompt": protect_prompt, "seconds": round(time.perf_counter() - t0, 1),
                     "compare_with": list(compare_with or [])}
    labels = [str(o.get("config", {}).get("gates") or p) for o, p in zip(others, compare_with or [])]
    res = merge(res, others, labels)
    path = write(res, out)
    print(path.read_text())
    print(f"[gateskip] wrote {out}/chat.md, chat.json, chat.png")
    return res


def config(policy: str, skip: SkipArgs) -> dict:
    """The run's skipping options as a report records them."""
    import dataclasses

    return {**dataclasses.asdict(skip), "policy": policy, "modules": list(skip.modules)}
