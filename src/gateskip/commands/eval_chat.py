"""``gateskip eval --suite chat``: chat fidelity of a gates folder between its floor and its ceiling
(eval/chat_fidelity.py), written as OUT/chat.md, chat.json and chat.png."""

from __future__ import annotations

import time

from gateskip.errors import GateSkipError
from gateskip.eval.chat_fidelity import Setting, run, write


def settings(ratios, random_ratios, oracle_ratios, methods, policy: str, modules, kv, protect_first,
             protect_last, seed: int) -> list[Setting]:
    """The rows: dense, then gateskip (``policy``) at ``ratios``, random and oracle at theirs (default: ``ratios``)."""
    from gateskip.eval.sweep import parse_ratios

    rules = {k: v for k, v in (("protect_first", protect_first), ("protect_last", protect_last)) if v is not None}
    common = {"modules": tuple(modules), "kv": kv, **rules}
    gates = parse_ratios(ratios)
    out = [Setting("dense", 0.0)]
    per = {"gateskip": (gates, {"policy": policy}),
           "random": (parse_ratios(random_ratios) if random_ratios else gates, {"policy": "random", "seed": seed}),
           "oracle": (parse_ratios(oracle_ratios) if oracle_ratios else gates, {"policy": "oracle", "kv": "compute"})}
    for m in methods:
        if m not in per:
            raise GateSkipError(f"unknown chat method {m!r}: choose from gateskip, random, oracle")
        budgets, extra = per[m]
        out += [Setting(m, r, {**common, "ratio": r, **extra}) for r in budgets]
    return out


def evaluate_chat(gates, model, ratios, random_ratios, oracle_ratios, methods, policy, modules, kv, limit, out,
                  fidelity_tokens, batch_size, protect_first, protect_last, seed) -> dict:
    from gateskip.eval.inputs import prepare_run
    from gateskip.loading import load_for_inference

    if not gates:
        raise GateSkipError("--suite chat measures a gates folder: pass --gates DIR")
    rows = settings(ratios, random_ratios, oracle_ratios, methods, policy, modules, kv, protect_first, protect_last,
                    seed)
    prepare_run(limit, out)
    net, tok = load_for_inference(model, gates)
    t0 = time.perf_counter()
    res = run(net, tok, rows, n=limit or 200, max_new_tokens=fidelity_tokens, batch=max(batch_size, 16),
              log=lambda line: print(f"[gateskip eval chat] {line}", flush=True))
    res["config"] = {"gates": gates, "model": model, "policy": policy, "modules": list(modules), "kv": kv,
                     "protect_first": protect_first, "protect_last": protect_last, "seed": seed,
                     "seconds": round(time.perf_counter() - t0, 1)}
    path = write(res, out)
    print(path.read_text())
    print(f"[gateskip] wrote {out}/chat.md, chat.json, chat.png")
    return res
