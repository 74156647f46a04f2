"""``gateskip bench --speculative``: self-speculative decoding against dense greedy decoding, one run.

For the same prompts (real instructions through the chat template; random tokens for tiny
models), rounds interleave the settings: dense greedy ``generate`` of the full model, then
``speculative_generate`` for every (draft ratio, k). Reported per setting: tokens/s and speed-up
(median over rounds), acceptance rate, mean accepted length (tokens per verify pass), the draft's
FLOP-weighted compute saved, executed FLOPs per generated token relative to dense decoding (draft
+ verify: speculation trades extra FLOPs for fewer sequential full passes), and whether every
output was token-identical to the dense one.

The costs behind the speed-up are measured too: one draft step and one verify pass (k + 1 tokens),
each relative to one dense decoding step, and the per-token acceptance (accepted / (accepted +
rejections): how often a draft the verifier looked at was kept; the acceptance rate, accepted /
drafted, counts the drafts after a rejection as rejected too). From them, the speed-up the cost model predicts (a check of the decomposition
against the measured speed-up) and the per-token acceptance these costs would need for ``TARGET``
(issue 20's 1.3x): what a better draft must reach, or None when no acceptance can make these costs pay.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import statistics
from pathlib import Path

import torch

from gateskip.errors import GateSkipError
from gateskip.options import as_list

TARGET = 1.3  # the speed-up the "acceptance needed" column solves for


def draft_list(value) -> list[str]:
    """``--draft-ratio`` as a list of items (floats or JSON files): a list, or comma- or space-separated text."""
    if not isinstance(value, str):
        return [str(v) for v in as_list(value, str, "--draft-ratio")]
    return [d.strip() for d in value.replace(";", " ").split() for d in d.split(",") if d.strip()]


def parse_draft_ratio(text):
    """A float, or a JSON file mapping branch names / kinds to ratios (``gateskip.skipping``'s mapping)."""
    if isinstance(text, (int, float, dict)):
        return text
    text = str(text).strip()
    if text.endswith(".json"):
        try:
            with open(text) as f:
                value = jsonlib.load(f)
        except (OSError, ValueError) as e:
            raise GateSkipError(f"cannot read draft ratios from {text!r} ({e}): give a JSON mapping of "
                                "branch names to ratios") from None
        if not isinstance(value, dict):
            raise GateSkipError(f"{text!r} must hold a JSON mapping of branch names to ratios")
        return value
    from gateskip.policies import check_ratio

    return check_ratio(text, "draft ratio")


def bench_speculative(m, tok, *, draft_ratios: str, ks: str, verify: str, policy: str, kv: str, prompts: int,
                      new_tokens: int, repeats: int, warmup: int, clock, seed: int, json: str | None,
                      command: str, machine: dict, on_ratio=None, plot: str | None = None) -> dict:
    """``on_ratio(r)``: called before each setting with a float draft ratio ``r`` (the bench installs the
    thresholds calibrated at ``r`` there). ``plot``: a PNG of the acceptance each setting needs against
    what it reached."""
    from tqdm import tqdm

    from gateskip.speculative import speculative_generate
    from gateskip.taps import gates_bypassed

    drafts = draft_list(draft_ratios)
    k_list = as_list(ks, int, "--k")
    if not drafts or not k_list or min(k_list) < 1:
        raise GateSkipError("--draft-ratio and --k need at least one value each, k >= 1 (e.g. --k 2,4)")
    inputs = _prompts(m, tok, prompts, seed)
    eos = m.generation_config.eos_token_id if tok is None else tok.eos_token_id
    pad = (getattr(tok, "pad_token_id", None) if tok is not None else None) or 0
    settings = [("dense", None, None)] + [(f"spec r={d} k={k}", parse_draft_ratio(d), k) for d in drafts for k in k_list]
    times = {s[0]: [] for s in settings}
    info = {s[0]: {"accepted": 0, "drafted": 0, "cycles": 0, "new": 0, "saved": [], "identical": 0,
                   "draft_s": 0.0, "verify_s": 0.0, "rejections": 0} for s in settings}
    ref = {}
    with tqdm(total=(warmup + repeats) * len(settings), desc="bench speculative", unit="setting") as bar:
        for rnd in range(warmup + repeats):
            for name, ratio, k in settings:
                if on_ratio is not None and isinstance(ratio, float):
                    on_ratio(ratio)
                n = new_tokens if rnd >= warmup else min(new_tokens, 8)
                t0, outs = clock(), []
                for enc in inputs:
                    if k is None:
                        with torch.no_grad(), gates_bypassed(m) if verify == "ungated" else contextlib.nullcontext():
                            out = m.generate(**enc, max_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                                             top_k=None, pad_token_id=pad, eos_token_id=eos)
                        outs.append(out)
                        continue
                    res = speculative_generate(m, enc["input_ids"], enc["attention_mask"], max_new_tokens=n, k=k,
                                               draft_ratio=ratio, draft_policy=policy, kv=kv, verify=verify,
                                               eos_token_id=eos, pad_token_id=pad, seed=seed, clock=clock)
                    outs.append(res.sequences)
                    if rnd >= warmup:
                        inf = info[name]
                        inf["accepted"] += res.accepted
                        inf["drafted"] += res.drafted
                        inf["cycles"] += res.cycles
                        inf["new"] += res.new_tokens
                        inf["rejections"] += res.rejections
                        inf["draft_s"] += res.draft_seconds
                        inf["verify_s"] += res.verify_seconds
                        inf["saved"].append(res.draft_stats.get("compute_saved", 0.0))
                elapsed = clock() - t0
                if rnd >= warmup:
                    times[name].append((elapsed, sum(o.shape[1] - e["input_ids"].shape[1] for o, e in zip(outs, inputs))))
                    if k is None:
                        ref = {i: o for i, o in enumerate(outs)}
                    else:
                        info[name]["identical"] += sum(torch.equal(o, ref[i]) for i, o in enumerate(outs))
                bar.update(1)
    rows = _summarise(settings, times, info, repeats, len(inputs))
    report = {"command": command, "machine": machine, "results": rows}
    print(format_table(rows))
    if json:
        tmp = Path(json).with_suffix(".tmp")
        tmp.write_text(jsonlib.dumps(report, indent=2))
        tmp.replace(json)
    if plot:
        from gateskip.commands.bench_plot import plot_speculative

        plot_speculative(rows, plot)
    return report


def _summarise(settings, times, info, repeats, n_prompts) -> list[dict]:
    from gateskip.speculative import acceptance_needed, predicted_speedup

    rate = {name: statistics.median(tokens / max(sec, 1e-9) for sec, tokens in times[name]) for name, _, _ in settings}
    step = 1.0 / rate["dense"]  # seconds per token of dense decoding
    rows = []
    for name, ratio, k in settings:
        row = {"setting": name, "tokens_per_s": rate[name], "speedup": rate[name] / rate["dense"]}
        if k is not None:
            inf = info[name]
            saved = statistics.mean(inf["saved"]) if inf["saved"] else 0.0
            verified = inf["cycles"] + inf["drafted"]  # k + 1 tokens per verify pass
            row.update(k=k, draft_ratio=ratio, acceptance_rate=inf["accepted"] / max(inf["drafted"], 1),
                       mean_accepted_length=inf["new"] / max(inf["cycles"], 1), draft_compute_saved=saved,
                       flops_per_token_vs_dense=(inf["drafted"] * (1 - saved) + verified) / max(inf["new"], 1),
                       identical=f"{inf['identical']}/{repeats * n_prompts}")
            draft = inf["draft_s"] / max(inf["drafted"], 1)  # one draft step (all prompts are batch 1)
            verify = inf["verify_s"] / max(inf["cycles"], 1)  # one verify pass over k + 1 tokens
            alpha = inf["accepted"] / max(inf["accepted"] + inf["rejections"], 1)
            row.update(draft_step_vs_dense=draft / step, verify_vs_dense=verify / step, per_token_acceptance=alpha,
                       predicted_speedup=predicted_speedup(alpha, k, step, draft, verify),
                       target_speedup=TARGET, acceptance_needed=acceptance_needed(TARGET, k, step, draft, verify))
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'setting':<26} {'tok/s':>7} {'x':>5} {'accept':>6} {'len':>5} {'draft saved':>11} {'FLOPs/tok':>9} "
            f"{'draft':>5} {'verify':>6} {'model x':>7} {'alpha':>5} {'needed':>6} identical")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "k" in r:
            need = "none" if r["acceptance_needed"] is None else f"{r['acceptance_needed']:.3f}"
            lines.append(f"{r['setting']:<26} {r['tokens_per_s']:7.1f} {r['speedup']:5.2f} {r['acceptance_rate']:6.3f} "
                         f"{r['mean_accepted_length']:5.2f} {r['draft_compute_saved']:11.3f} "
                         f"{r['flops_per_token_vs_dense']:9.2f} {r['draft_step_vs_dense']:5.2f} {r['verify_vs_dense']:6.2f} "
                         f"{r['predicted_speedup']:7.2f} {r['per_token_acceptance']:5.3f} {need:>6} {r['identical']}")
        else:
            lines.append(f"{r['setting']:<26} {r['tokens_per_s']:7.1f} {1.0:5.2f} {'':>6} {'':>5} {'':>11} {1.0:9.2f}")
    lines.append(f"draft / verify: one draft step / one verify pass (k + 1 tokens) relative to one dense step; alpha: "
                 f"per-token acceptance (accepted / (accepted + rejections)); model x: the speed-up these costs give at alpha; "
                 f"needed: the alpha they need for {TARGET}x")
    return "\n".join(lines)


def _prompts(m, tok, n: int, seed: int) -> list[dict]:
    if n < 1:
        raise GateSkipError(f"prompts={n} is invalid: benchmark at least one prompt")
    if tok is None:  # tiny random model: random token prompts
        g = torch.Generator().manual_seed(seed)
        vocab = m.get_output_embeddings().weight.shape[0]
        ids = [torch.randint(min(10, vocab - 1), vocab, (1, 16), generator=g) for _ in range(n)]
        return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
    from gateskip.data import encode_prompt, sample_prompts

    texts = sample_prompts()
    return [encode_prompt(tok, texts[i % len(texts)], True, None, 0) for i in range(n)]
