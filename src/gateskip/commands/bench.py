"""``gateskip bench``: how much faster the gated model runs when it skips, against the dense model.

One process, settings interleaved (every repeat runs every setting once, so drift and neighbours'
load hit all settings alike), medians over repeats after warm-up. Settings: the dense model (gates
removed) and, for each gate kind, the gated model at each skip ratio. Per setting and phase:

- prefill: a batch of random-token prompts, run as ``generate`` runs it (KV cache on, logits for
  the last position only), in tokens/s;
- decode: greedy decoding of exactly ``new_tokens`` new tokens at each batch size, timed from the
  first new token to the last (prefill excluded), tokens/s = batch * (new_tokens - 1) / time. By
  default the settings decode *step-interleaved*: every setting keeps its own KV cache and they take
  turns, one decode step each, so a slow patch of the machine (this 2-core VM drifts by 10-25% from
  one round to the next) hits every setting within the same ~0.1 s. Each gated setting is then a
  copy of the model that shares the dense model's weights (a gates folder that changes backbone
  weights gets a full copy). ``--decode-timing generate`` times ``model.generate`` instead, one
  setting after the other (HF's own loop, its per-step overhead included);
- compute saved (FLOP-weighted, gates and LM head included: ``gateskip.stats``), speed-up against
  dense, and efficiency = speed-up / (1 / (1 - compute saved)): 1.0 means the wall clock falls as
  much as the FLOPs do.
"""

from __future__ import annotations

import dataclasses
import functools
import json as jsonlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gateskip.args import RandomGatesArgs, SpeculativeArgs, TimingArgs
from gateskip.commands import bench_timing as timing
from gateskip.errors import GateSkipError
from gateskip.files import atomic_write
from gateskip.options import as_list

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PHASES = ("prefill",)  # decode phases are added per batch size: "decode_b1", "decode_b8", ...


def _quiet_transformers(fn):
    """Run ``fn`` with transformers' logging at error level, restored afterwards (the timings print tables;
    load and generation warnings would interleave with them)."""

    @functools.wraps(fn)  # keeps the signature and docstring the CLI is built from
    def quiet(*args, **kwargs):
        from transformers.utils import logging as hf_logging

        before = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return fn(*args, **kwargs)
        finally:
            hf_logging.set_verbosity(before)

    return quiet


@_quiet_transformers
def bench(model: str = "smollm2-135m", gates: str | None = None, ratios: list[float] = (0.0, 0.25, 0.5),
          saved: list[float] | None = None, policy: str | None = None, kv: str | None = None, path: str = "auto",
          threads: int = 2, seed: int = 0, execution: list[str] = ("cached",), json: str | None = None, quant: str = "none", plot: str | None = None, *,
          random: RandomGatesArgs = RandomGatesArgs(), timing_args: TimingArgs = TimingArgs(),
          speculation: SpeculativeArgs = SpeculativeArgs(), **flags) -> dict:
    """Measure prefill and decode speed of the dense and the gated model at several skip ratios.

    The shapes and the clock are ``timing_args`` (TimingArgs: --prefill-len, --decode-batches, --new-tokens,
    --repeats, --clock ...); ``--speculative`` and its options are ``speculation`` (SpeculativeArgs); untrained
    gates instead of --gates are ``random`` (RandomGatesArgs: --random-gates, --gate, --fallback ...).

    Args:
        model: model alias, hub id or folder (``tiny-<family>`` for a tiny random model).
        gates: folder of trained gates (``gateskip train`` output); or use --random-gates.
        ratios: skip ratios (each branch skips this fraction of tokens).
        saved: compute-saved budgets measured besides --ratios, e.g. 0.25: the ratio is steered while running
            (gateskip.skipping(saved=...)); settings named ``gate@saved0.25``.
        policy: skip policy: threshold (calibrated per token: what skips at decode batch 1; the default, random
            gates are calibrated for it), quantile (paper, per call) or random.
        kv: what skipped tokens leave in the KV cache: copy or compute; default: the gates' (random gates: copy).
        path: auto / physical / masked (masked computes every token: no speed-up expected).
        threads: torch CPU threads.
        execution: how a call with some tokens skipped runs, gathering its kept tokens or computing all and
            blending (the same outputs): cached (a table measured on this model and machine if one is cached, else the
            built-in rule), measured (timed once, about a minute, then cached; gateskip.execution_costs) or rule.
            Several (``rule,measured``): every setting timed each way in the same run, after the first named
            ``...+measured``.
        seed: seed of the random prompts and random gates.
        json: write the results to this JSON file.
        quant: quantize the backbone's linear layers first (dense and gated settings alike): none, int4
            or int8 (gateskip.quantize; gates and LM head stay full precision).
        plot: write a PNG of speed-up against compute saved, per phase, to this file; with --speculative,
            the acceptance every setting would need against what it reached (bench_plot.plot_speculative).
    """
    from gateskip.flags import apply

    groups = apply(flags, {"random": random, "timing_args": timing_args, "speculation": speculation},
                   "gateskip bench")
    ta, sp = groups["timing_args"], groups["speculation"]
    random_gates, gate, rank, fallback, fallback_rank = (getattr(groups["random"], f.name)
                                                         for f in dataclasses.fields(groups["random"]))
    prefill_batch, prefill_len, decode_batches, prompt_len, new_tokens, repeats, warmup, clock, decode_timing = (
        getattr(ta, f.name) for f in dataclasses.fields(ta))
    speculative, draft_ratio, k, verify, prompts = (getattr(sp, f.name) for f in dataclasses.fields(sp))
    ratio_list = as_list(ratios, float, "--ratios")
    saved_list = as_list(saved, float, "--saved") if saved else []
    batch_list = as_list(decode_batches, int, "--decode-batches")
    kinds = as_list(gate, str, "--gate")
    _check_gates(gates, random_gates, fallback)
    executions = as_list(execution, str, "--execution")
    _settings({}, [], [], {}, executions)  # checks every execution before the model loads
    fallbacks = fallback
    torch.set_num_threads(threads)
    from gateskip.loading import load_named, quantize_for_run
    from gateskip.policies import resolve_policy

    m, tok = load_named(model, tiny_tokenizer=False)
    quantize_for_run(m, quant, gates)
    policy = resolve_policy(policy, True)  # gates without thresholds are calibrated for it (bench_timing.variants)
    if speculative:
        return _speculative(m, tok, gates, random_gates, kinds, rank, seed, policy, locals())
    vocab = m.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    rand_ids = lambda b, t: torch.randint(min(10, vocab - 1), vocab, (b, t), generator=gen)  # noqa: E731
    prefill_ids = rand_ids(prefill_batch, prefill_len)
    prompts = {b: rand_ids(b, prompt_len) for b in batch_list}
    variants = timing.variants(m, gates, kinds, rank, seed, rand_ids, min(256, prefill_len), policy, ratio_list,
                         fallbacks=fallbacks, fallback_rank=fallback_rank)
    settings, ctxs = _settings(variants, ratio_list, saved_list, {"policy": policy, "kv": kv, "path": path},
                               executions)
    live = _live(m, variants, settings, ctxs)
    phases = list(PHASES) + [f"decode_b{b}" for b in batch_list]
    times, saved_by, skipped = _time_rounds(m, live, ctxs, settings, phases, prefill_ids, prompts, ta, json,
                                            batch_list)
    del live
    results = _summarise(settings, phases, times, saved_by, skipped, prefill_batch * prefill_len, batch_list,
                         new_tokens)
    report = {"command": _command(locals()), "machine": _machine(threads), "results": results}
    _write(report, phases, json, plot)
    return report


def _live(m, variants, settings, ctxs: dict) -> dict:
    """The models to time (``bench_timing.live_models``); a ``measured`` execution is measured (or read from the
    cache) here, once per setting, before anything is timed."""
    from gateskip.execution import execution_costs

    live = timing.live_models(m, variants, settings)
    for name, ctx in ctxs.items():
        if ctx.get("execution") == "measured":
            ctx["execution"] = execution_costs(live[name])
    return live


def _write(report: dict, phases: list[str], json: str | None, plot: str | None) -> None:
    print(format_table(report["results"], phases))
    if json:
        atomic_write(Path(json), lambda f: Path(f).write_text(jsonlib.dumps(report, indent=2)))
    if plot:
        from gateskip.commands.bench_plot import plot_speed

        plot_speed(report["results"], plot)


def _check_gates(gates, random_gates: bool, fallback: list[str]) -> None:
    if gates is None and not random_gates:
        raise GateSkipError("bench needs gates: pass --gates DIR (a trained run) or --random-gates")
    if gates is not None and random_gates:
        raise GateSkipError("--gates and --random-gates exclude each other: pass one of them")
    if fallback != ["zero"] and gates is not None:
        raise GateSkipError("--fallback applies to --random-gates: a gates folder brings its own fallback")


def _settings(variants, ratio_list, saved_list, plan: dict, executions=("rule",)) -> tuple[list, dict]:
    """The timed settings, (name, gate variant, budget) from dense on, and each one's skipping arguments: every
    variant at every ratio (``gate@0.25``) and every compute-saved budget (``gate@saved0.25``), once per execution
    (after the first, named ``gate@0.25+measured``)."""
    from gateskip.execution import check_execution

    settings, ctxs = [("dense", None, 0.0)], {"dense": {}}
    for i, e in enumerate(executions):
        check_execution(e)
        tag = f"+{e}" if i else ""
        for k in variants:
            for knob, values, label in (("ratio", ratio_list, ""), ("saved", saved_list, "saved")):
                for r in values:
                    name = f"{k}@{label}{r:g}{tag}"
                    settings.append((name, k, r))
                    ctxs[name] = {knob: r, **plan, "execution": e}
    return settings, ctxs


def _time_rounds(m, live, ctxs, settings, phases, prefill_ids, prompts, ta: TimingArgs, json, batch_list) -> tuple:
    """Warm-up then timed rounds of every setting and phase: (times, compute saved, tokens skipped) per setting
    and phase; after each timed round the partial results are written to ``json``."""
    from tqdm import tqdm

    times = {name: {p: [] for p in phases} for name, _, _ in settings}
    saved, skipped = {name: {} for name, _, _ in settings}, {name: {} for name, _, _ in settings}
    pad = getattr(m.generation_config, "pad_token_id", None) or 0
    now = CLOCKS[ta.clock]
    with tqdm(total=(ta.warmup + ta.repeats) * len(settings) * len(phases), desc="bench", unit="phase") as bar:
        for rnd in range(ta.warmup + ta.repeats):
            warm = rnd < ta.warmup  # warm-up rounds: same shapes, fewer decode steps
            steps = min(ta.new_tokens, 8) if warm else ta.new_tokens

            def record(name, phase, dt, s, warm=warm):
                if not warm:
                    times[name][phase].append(dt)
                    saved[name][phase], skipped[name][phase] = s
                bar.update(1)

            for name, _, _ in settings:
                record(name, "prefill", *timing.prefill(live[name], ctxs[name], prefill_ids, now))
                if ta.decode_timing == "generate":
                    for b, ids in prompts.items():
                        record(name, f"decode_b{b}", *timing.decode_generate(live[name], ctxs[name], ids, steps, pad,
                                                                            now))
            if ta.decode_timing == "interleaved":
                for b, ids in prompts.items():
                    for name, (dt, s) in timing.decode_interleaved(live, ctxs, ids, steps, now).items():
                        record(name, f"decode_b{b}", dt, s)
            if json and not warm:  # partial results survive an interrupted run
                partial = _summarise(settings, phases, times, saved, skipped, ta.prefill_batch * ta.prefill_len,
                                     batch_list, ta.new_tokens)
                text = jsonlib.dumps({"partial_after_round": rnd + 1 - ta.warmup, "results": partial})
                atomic_write(Path(json), lambda f, text=text: Path(f).write_text(text))
    return times, saved, skipped


# ---- setting up ----------------------------------------------------------------------------------

def _speculative(m, tok, gates, random_gates, kinds, rank, seed, policy, args) -> dict:
    """``--speculative``: see gateskip.bench_speculative."""
    from gateskip.commands.bench_speculative import bench_speculative

    if len(kinds) != 1 and random_gates:
        raise GateSkipError("--speculative benchmarks one gate kind: pass a single --gate")
    gen = torch.Generator().manual_seed(seed)
    vocab = m.get_output_embeddings().weight.shape[0]
    rand_ids = lambda b, t: torch.randint(min(10, vocab - 1), vocab, (b, t), generator=gen)  # noqa: E731
    from gateskip.commands.bench_speculative import draft_list, parse_draft_ratio

    # thresholds calibrated at every numeric draft ratio, as for the speed settings (see variants)
    numeric = [r for r in map(parse_draft_ratio, draft_list(args["draft_ratio"])) if isinstance(r, float)]
    variant = next(iter(timing.variants(m, gates, kinds, rank, seed, rand_ids, 256, policy, numeric).values()))
    timing.install(m, variant)
    keys = ["model", "gates", "random_gates", "gate", "rank", "policy", "kv", "draft_ratio", "k", "verify", "prompts",
            "new_tokens", "repeats", "warmup", "threads", "clock", "seed", "quant"]
    command = "gateskip bench --speculative " + " ".join(
        _flag(k, args[k]) for k in keys if args.get(k) is not None)
    return bench_speculative(m, tok, draft_ratios=args["draft_ratio"], ks=args["k"], verify=args["verify"],
                             policy=policy, kv=args["kv"], prompts=args["prompts"], new_tokens=args["new_tokens"],
                             repeats=args["repeats"], warmup=args["warmup"], clock=CLOCKS[args["clock"]], seed=seed,
                             json=args["json"], command=command, machine=_machine(args["threads"]),
                             on_ratio=lambda r: timing.use_calibration(m, variant, r), plot=args["plot"])


def _summarise(settings, phases, times, saved, skipped, prefill_tokens, batch_list, new_tokens) -> list[dict]:
    tokens = {"prefill": prefill_tokens} | {f"decode_b{b}": b * (new_tokens - 1) for b in batch_list}
    rate = {name: {p: tokens[p] / statistics.median(times[name][p]) for p in phases} for name, _, _ in settings}
    rows = []
    for name, kind, ratio in settings:
        row = {"setting": name, "gate": kind, "ratio": ratio}
        for p in phases:
            speedup = rate[name][p] / rate["dense"][p]
            cs = saved[name][p]
            row[p] = {"tokens_per_s": rate[name][p], "speedup": speedup, "compute_saved": cs,
                      "tokens_skipped": skipped[name][p], "efficiency": speedup * (1.0 - cs),
                      "seconds": times[name][p],
                      # the spread a reader should weigh the median against: dense / this setting, per round
                      "speedup_by_round": [d / x for d, x in zip(times["dense"][p], times[name][p])]}
        rows.append(row)
    return rows


def format_table(results: list[dict], phases: list[str]) -> str:
    w = max([14] + [len(r["setting"]) for r in results])  # long names (gate+fallback@ratio) keep the columns
    head = f"{'setting':<{w}}" + "".join(f" | {p:^38}" for p in phases)
    sub = f"{'':<{w}}" + " | {:>8} {:>6} {:>6} {:>6} {:>6}".format("tok/s", "x", "skip", "saved", "eff") * len(phases)
    lines = [head, sub, "-" * len(sub)]
    for r in results:
        cells = "".join(" | {tokens_per_s:8.1f} {speedup:6.2f} {tokens_skipped:6.2f} {compute_saved:6.2f} "
                        "{efficiency:6.2f}".format(**r[p]) for p in phases)
        lines.append(f"{r['setting']:<{w}}{cells}")
    return "\n".join(lines)


def _command(args: dict) -> str:
    keys = ["model", "gates", "random_gates", "gate", "rank", "ratios", "saved", "policy", "kv", "path", "prefill_batch",
            "prefill_len", "decode_batches", "prompt_len", "new_tokens", "repeats", "warmup", "threads", "clock", "seed", "quant",
            "decode_timing"]
    if not args.get("random_gates"):  # a gates folder: the random gates' options do not apply
        keys = [k for k in keys if k not in ("random_gates", "gate", "rank")]
    return "gateskip bench " + " ".join(_flag(k, args[k]) for k in keys if args.get(k) is not None)


def _flag(name: str, value) -> str:
    """One flag of the command line that reproduces a run (lists comma-joined, booleans --x / --no-x)."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{flag}"
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    return f"--{flag} {value}"


def _machine(threads: int) -> dict:
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg()}
