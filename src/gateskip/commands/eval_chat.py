"""``gateskip eval --suite chat``: chat fidelity of a gates folder between its floor and its ceiling
(eval/chat_fidelity.py), written as OUT/chat.md, chat.json and chat.png."""

from __future__ import annotations

import time

from gateskip.errors import GateSkipError
from gateskip.eval.chat_fidelity import Setting, run, write


def settings(ratios, random_ratios, oracle_ratios, methods, policy: str, modules, kv, protect_first,
             protect_last, seed: int, recheck_stops: bool = False, recheck_below: float = 0.0,
             saved: list[float] | None = None, protect_prompt: bool = False, prompt_boost: float | None = None,
             protect_tail: int = 0) -> list[Setting]:
    """The rows: dense, then gateskip (``policy``) at ``ratios``, random and oracle at theirs (default: ``ratios``);
    with ``saved``, every method at those compute-saved budgets instead (saved.py: matched by construction).
    ``recheck_stops`` / ``recheck_below``: the dense recheck (recheck.py), the same for every skipping row."""
    from gateskip.eval.sweep import parse_ratios

    rules = {k: v for k, v in (("protect_first", protect_first), ("protect_last", protect_last)) if v is not None}
    if recheck_below:
        rules["recheck_below"] = recheck_below
    if protect_prompt:
        rules["protect_prompt"] = True
    if protect_tail:
        rules["protect_tail"] = protect_tail
    if saved and prompt_boost is not None:
        rules["prompt_boost"] = prompt_boost
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
        knob = "saved" if saved else "ratio"
        out += [Setting(m, r, {**common, knob: r, **extra}, recheck_stops) for r in (saved or budgets)]
    return out


def evaluate_chat(gates, model, ratios, random_ratios, oracle_ratios, methods, policy, modules, kv, limit, out,
                  fidelity_tokens, batch_size, protect_first, protect_last, seed, recheck_stops=False,
                  recheck_below=0.0, saved=None, protect_prompt=False, prompt_boost=None) -> dict:
    from gateskip.eval.inputs import prepare_run
    from gateskip.loading import load_for_inference

    if not gates:
        raise GateSkipError("--suite chat measures a gates folder: pass --gates DIR")
    prepare_run(limit, out)
    net, tok = load_for_inference(model, gates)
    rows = settings(ratios, random_ratios, oracle_ratios, methods, policy, modules, kv, protect_first, protect_last,
                    seed, recheck_stops, recheck_below, saved, protect_prompt, prompt_boost)
    t0 = time.perf_counter()
    res = run(net, tok, rows, n=limit or 200, max_new_tokens=fidelity_tokens, batch=max(batch_size, 16),
              log=lambda line: print(f"[gateskip eval chat] {line}", flush=True))
    res["config"] = {"gates": gates, "model": model, "policy": policy, "modules": list(modules), "kv": kv,
                     "protect_first": protect_first, "protect_last": protect_last, "seed": seed,
                     "recheck_stops": recheck_stops, "recheck_below": recheck_below, "saved": saved,
                     "protect_prompt": protect_prompt, "prompt_boost": prompt_boost,
                     "seconds": round(time.perf_counter() - t0, 1)}
    path = write(res, out)
    print(path.read_text())
    print(f"[gateskip] wrote {out}/chat.md, chat.json, chat.png")
    return res
