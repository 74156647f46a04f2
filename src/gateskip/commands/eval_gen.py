"""``gateskip eval --suite gen``: generative tasks with checkable answers (eval/gentasks.py), a gates folder
between its floor (random) and ceiling (oracle) at matched compute; writes OUT/gen.md, gen.json, gen.png."""

from __future__ import annotations

import time

from gateskip.args import SkipArgs
from gateskip.errors import GateSkipError
from gateskip.eval import gentasks

GEN_METHODS = ("gateskip", "random", "oracle")


def evaluate_gen(gates, model, tasks, ratios, random_ratios, oracle_ratios, methods, policy, skip: SkipArgs,
                 limit, out, batch_size, saved=None, compare_with=(), resume=True) -> dict:
    """The original model on every task/format of ``tasks`` (None: all of them), then the ``methods`` rows on
    the qualifying ones; no ``methods`` (``--methods none``): the qualification run alone. ``compare_with``:
    gen.json of runs with the same settings on other tasks, added to this report. ``resume``: rows are kept
    in OUT/partial.json as they are measured and a rerun of the same command keeps them."""
    import json
    import os

    from gateskip.commands.eval_chat import config, settings
    from gateskip.eval.inputs import prepare_run
    from gateskip.loading import load_for_inference

    specs = gentasks.parse_specs(tasks)
    unknown = [m for m in methods if m not in GEN_METHODS]
    if unknown:
        raise GateSkipError(f"unknown gen method(s) {', '.join(unknown)}: choose from "
                            f"{', '.join(GEN_METHODS)} or none (dense only: the qualification run)")
    if methods and not gates:
        raise GateSkipError("--suite gen measures a gates folder: pass --gates DIR (or --methods none for "
                            "the qualification run of the original model)")
    rows = settings(ratios, random_ratios, oracle_ratios, methods, policy, skip, saved)
    others = []
    for path in compare_with:  # fail now, not after the sweep
        try:
            others.append((path, json.loads(open(path, encoding="utf8").read())))
        except (OSError, ValueError) as e:
            raise GateSkipError(f"--compare-with {path!r} is not a readable gen.json ({e}): pass the gen.json "
                                "of an earlier --suite gen run") from None
    prepare_run(limit, out)
    net, tok = load_for_inference(model, gates)
    t0 = time.perf_counter()
    partial = os.path.join(out, "partial.json")
    fingerprint = {"model": model, "gates": gates, "tasks": [f"{t}:{f}" for t, f in specs], "policy": policy}
    res = gentasks.run(net, tok, rows, specs, limit or None, batch=max(batch_size, 16),
                       log=lambda line: print(f"[gateskip eval gen] {line}", flush=True),
                       resume=(partial, fingerprint) if resume else None)
    res["config"] = {"gates": gates, "model": model, "tasks": [f"{t}:{f}" for t, f in specs],
                     "methods": list(methods), **config(policy, skip), "saved": saved,
                     "seconds": round(time.perf_counter() - t0, 1)}
    path = gentasks.write(gentasks.merge(res, others) if others else res, out)
    if resume and os.path.isfile(partial):
        os.remove(partial)  # gen.json holds every row now
    print(path.read_text())
    print(f"[gateskip] wrote {out}/gen.md, gen.json" + (", gen.png" if res["analysis"]["tasks"] else ""))
    return res
