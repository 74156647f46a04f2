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

import contextlib
import copy
import functools
import json as jsonlib
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gateskip.compat import model_cache_arg, output_cache
from gateskip.config import GateSkipConfig
from gateskip.core import add_gates, calibrate, gate_modules, gate_state, is_gated, remove_gates, skipping
from gateskip.core import stats as gate_stats
from gateskip.errors import GateSkipError

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DECODE_TIMINGS = ("interleaved", "generate")
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
def bench(model: str = "smollm2-135m", gates: str | None = None, random_gates: bool = False,
          gate: str = "vector", rank: int = 16, ratios: str = "0,0.25,0.5", policy: str = "threshold",
          kv: str = "copy", path: str = "auto", prefill_batch: int = 4, prefill_len: int = 512,
          decode_batches: str = "1,8", prompt_len: int = 32, new_tokens: int = 128, repeats: int = 3,
          warmup: int = 1, threads: int = 2, clock: str = "wall", seed: int = 0, json: str | None = None,
          quant: str = "none", speculative: bool = False, draft_ratio: str = "0.25,0.5", k: str = "2,4",
          verify: str = "gated", prompts: int = 4, decode_timing: str = "interleaved", plot: str | None = None,
          fallback: str = "zero", fallback_rank: int = 64) -> dict:
    """Measure prefill and decode speed of the dense and the gated model at several skip ratios.

    Args:
        model: model alias, hub id or folder (``tiny-<family>`` for a tiny random model).
        gates: folder of trained gates (``gateskip train`` output); or use --random-gates.
        random_gates: attach untrained gates with diverse random importances (no trained run needed).
        gate: gate kind(s) for --random-gates, comma-separated: vector, lowrank, scalar, mlp.
        rank: inner size of lowrank gates.
        ratios: comma-separated skip ratios (each branch skips this fraction of tokens).
        policy: skip policy; ``threshold`` (calibrated per token) is what skips at decode batch 1.
        kv: what skipped tokens leave in the KV cache: copy or compute.
        path: auto / physical / masked (masked computes every token: no speed-up expected).
        prefill_batch: prompts per prefill batch.
        prefill_len: tokens per prefill prompt.
        decode_batches: comma-separated batch sizes for decode.
        prompt_len: prompt tokens before decoding.
        new_tokens: tokens generated per decode run.
        repeats: timed repeats per setting (medians reported).
        warmup: untimed rounds before the timed ones (same shapes, 8 decode steps).
        threads: torch CPU threads.
        clock: ``wall`` (elapsed time) or ``cpu`` (this process's CPU time: on a machine shared with
            other jobs, use it with --threads 1, where it tracks what an idle core would take).
        seed: seed of the random prompts and random gates.
        json: write the results to this JSON file.
        quant: quantize the backbone's linear layers first (dense and gated settings alike): none, int4
            or int8 (gateskip.quantize; gates and LM head stay full precision).
        speculative: benchmark lossless self-speculative decoding against dense greedy decoding of the
            same prompts instead (acceptance rate, mean accepted length, tokens/s, output identity).
        draft_ratio: with --speculative: comma-separated draft skip ratios, or JSON files mapping
            branch names to ratios.
        k: with --speculative: comma-separated draft lengths.
        verify: with --speculative: gated (gates on, nothing skipped) or ungated (gates bypassed).
        prompts: with --speculative: number of instruction prompts (chat template), decoded one by one.
        decode_timing: ``interleaved`` (settings take turns one decode step at a time, each with its own
            cache: drift hits them alike) or ``generate`` (``model.generate``, one setting after another).
        plot: write a PNG of speed-up against compute saved, per phase, to this file.
        fallback: with --random-gates: what skipped tokens get, zero (paper) or a mean, lowrank or linear
            fallback (unfitted: the same operations as a fitted one, so the same speed); a gates folder
            brings its own. Comma-separated (``zero,lowrank``): every kind is measured in the same run,
            against the same dense timings, settings named ``gate+fallback@ratio``.
        fallback_rank: inner size of a lowrank fallback.
    """
    from tqdm import tqdm

    ratio_list = _floats(ratios, "ratios")
    batch_list = [int(b) for b in _floats(decode_batches, "decode-batches")]
    kinds = [k.strip() for k in gate.split(",") if k.strip()]
    if gates is None and not random_gates:
        raise GateSkipError("bench needs gates: pass --gates DIR (a trained run) or --random-gates")
    if gates is not None and random_gates:
        raise GateSkipError("--gates and --random-gates exclude each other: pass one of them")
    if min(repeats, prefill_batch, prefill_len, prompt_len) < 1 or new_tokens < 2 or warmup < 0:
        raise GateSkipError("repeats, prefill sizes and prompt-len must be >= 1, new-tokens >= 2, warmup >= 0")
    if clock not in CLOCKS:
        raise GateSkipError(f"clock={clock!r} is not supported: choose wall or cpu")
    if decode_timing not in DECODE_TIMINGS:
        raise GateSkipError(f"decode-timing={decode_timing!r} is not supported: choose interleaved or generate")
    from gateskip.config import FALLBACK_KINDS

    fallbacks = [f.strip() for f in str(fallback).split(",") if f.strip()] or ["zero"]
    for fb in fallbacks:
        if fb not in FALLBACK_KINDS:
            raise GateSkipError(f"fallback={fb!r} is not supported: choose one of {', '.join(FALLBACK_KINDS)}")
    if fallbacks != ["zero"] and gates is not None:
        raise GateSkipError("--fallback applies to --random-gates: a gates folder brings its own fallback")
    torch.set_num_threads(threads)
    from gateskip.loading import load_named, quantize_for_run

    m, tok = load_named(model, tiny_tokenizer=False)
    quantize_for_run(m, quant, gates)
    if speculative:
        return _speculative(m, tok, gates, random_gates, kinds, rank, seed, policy, locals())
    vocab = m.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    rand_ids = lambda b, t: torch.randint(min(10, vocab - 1), vocab, (b, t), generator=gen)  # noqa: E731
    prefill_ids = rand_ids(prefill_batch, prefill_len)
    prompts = {b: rand_ids(b, prompt_len) for b in batch_list}
    variants = _variants(m, gates, kinds, rank, seed, rand_ids, min(256, prefill_len), policy, ratio_list,
                         fallbacks=fallbacks, fallback_rank=fallback_rank)
    settings = [("dense", None, 0.0)] + [(f"{k}@{r:g}", k, r) for k in variants for r in ratio_list]
    live = _live_models(m, variants, settings)
    ctxs = {name: {} if kind is None else dict(ratio=ratio, policy=policy, kv=kv, path=path)
            for name, kind, ratio in settings}
    phases = list(PHASES) + [f"decode_b{b}" for b in batch_list]
    times = {name: {p: [] for p in phases} for name, _, _ in settings}
    saved, skipped = {name: {} for name, _, _ in settings}, {name: {} for name, _, _ in settings}
    pad = getattr(m.generation_config, "pad_token_id", None) or 0
    now = CLOCKS[clock]
    with tqdm(total=(warmup + repeats) * len(settings) * len(phases), desc="bench", unit="phase") as bar:
        for rnd in range(warmup + repeats):
            warm = rnd < warmup  # warm-up rounds: same shapes, fewer decode steps
            steps = min(new_tokens, 8) if warm else new_tokens

            def record(name, phase, dt, s, warm=warm):
                if not warm:
                    times[name][phase].append(dt)
                    saved[name][phase], skipped[name][phase] = s
                bar.update(1)

            for name, _, _ in settings:
                record(name, "prefill", *_prefill(live[name], ctxs[name], prefill_ids, now))
                if decode_timing == "generate":
                    for b, ids in prompts.items():
                        record(name, f"decode_b{b}", *_decode_generate(live[name], ctxs[name], ids, steps, pad, now))
            if decode_timing == "interleaved":
                for b, ids in prompts.items():
                    for name, (dt, s) in _decode_interleaved(live, ctxs, ids, steps, now).items():
                        record(name, f"decode_b{b}", dt, s)
            if json and not warm:  # partial results survive an interrupted run
                partial = _summarise(settings, phases, times, saved, skipped, prefill_batch * prefill_len,
                                     batch_list, new_tokens)
                Path(json).write_text(jsonlib.dumps({"partial_after_round": rnd + 1 - warmup, "results": partial}))
    del live
    results = _summarise(settings, phases, times, saved, skipped, prefill_batch * prefill_len, batch_list,
                         new_tokens)
    report = {"command": _command(locals()), "machine": _machine(threads), "results": results}
    print(format_table(results, phases))
    if json:
        Path(json).write_text(jsonlib.dumps(report, indent=2))
    if plot:
        from gateskip.commands.bench_plot import plot_speed

        plot_speed(results, plot)
    return report


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

    # thresholds calibrated at every numeric draft ratio, as for the speed settings (see _variants)
    numeric = [r for r in map(parse_draft_ratio, draft_list(args["draft_ratio"])) if isinstance(r, float)]
    variant = next(iter(_variants(m, gates, kinds, rank, seed, rand_ids, 256, policy, numeric).values()))
    _install(m, variant)
    keys = ["model", "gates", "random_gates", "gate", "rank", "policy", "kv", "draft_ratio", "k", "verify", "prompts",
            "new_tokens", "repeats", "warmup", "threads", "clock", "seed", "quant"]
    flag = lambda k, v: f"--{'' if v else 'no-'}{k}" if isinstance(v, bool) else f"--{k} {v}"  # noqa: E731
    command = "gateskip bench --speculative " + " ".join(
        flag(k.replace("_", "-"), args[k]) for k in keys if args.get(k) is not None)
    return bench_speculative(m, tok, draft_ratios=args["draft_ratio"], ks=args["k"], verify=args["verify"],
                             policy=policy, kv=args["kv"], prompts=args["prompts"], new_tokens=args["new_tokens"],
                             repeats=args["repeats"], warmup=args["warmup"], clock=CLOCKS[args["clock"]], seed=seed,
                             json=args["json"], command=command, machine=_machine(args["threads"]),
                             on_ratio=lambda r: _use_calibration(m, variant, r))


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise GateSkipError(f"--{what} {text!r} is not a comma-separated list of numbers: e.g. 0,0.25,0.5") from None


def _variants(m, gates, kinds, rank, seed, rand_ids, calib_len, policy, ratios=(0.25,), fallbacks=("zero",),
              fallback_rank: int = 64) -> dict:
    """Per gate kind: how to install it (a folder to load, or random gate weights + calibration).

    With several ``fallbacks`` there is one variant per (kind, fallback), named ``kind+fallback``,
    with the same random gate weights (the seed) and so the same skip decisions.

    Thresholds are calibrated at each measured ratio (``calibration``: {ratio: calibration}). One
    calibration serves every ratio only near its own: it records importances while skipping at that
    ratio, and skipping more upstream shifts what later branches see. Random low-rank gates calibrated
    at 0.25 skipped 56% at ratio 0.5 (59% of MLP tokens); calibrated at 0.5, 49.6% (BENCHMARKS.md).
    A gates folder's own calibration (from real text) is used as it is.
    """
    points = sorted({r for r in ratios if r > 0.0}) or [0.25]
    if gates is not None:
        from gateskip.checkpoint import load_gates

        load_gates(m, gates)
        kind = gate_state(m).cfg.gate
        own = gate_state(m).calibration
        # keyed by calibration ratio; a per-branch calibration (a dict) is the folder's only one anyway
        key = None if own is None else own["ratio"] if not isinstance(own["ratio"], dict) else 0.0
        variant = {"dir": gates, "calibration": {key: own} if own is not None else {}}
        if own is None and policy == "threshold":  # calibrate on random tokens
            variant["calibration"] = _calibrations(m, rand_ids, calib_len, points)
        remove_gates(m)
        return {kind: variant}
    out = {}
    for k, fb in ((k, fb) for k in kinds for fb in fallbacks):
        cfg = GateSkipConfig(gate=k, rank=rank, fallback=fb, fallback_rank=fallback_rank)
        add_gates(m, cfg)
        _randomise(m, seed)
        out[k if len(fallbacks) == 1 else f"{k}+{fb}"] = {"cfg": cfg, "weights": {n: {p: t.clone() for p, t in g.state_dict().items()}
                                          for n, g in gate_modules(m).items()},
                  "calibration": _calibrations(m, rand_ids, calib_len, points)}
        remove_gates(m)
    return out


@torch.no_grad()
def _randomise(m, seed: int) -> None:
    """Gate weights ~ N(0, 1/fan_in), bias 2: gates mostly open, importances differ from token to token."""
    g = torch.Generator().manual_seed(seed)
    for gate in gate_modules(m).values():
        linears = [x for x in gate.modules() if isinstance(x, torch.nn.Linear)]
        for lin in linears:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features))
        linears[-1].bias.fill_(2.0)


def _calibrations(m, rand_ids, length: int, ratios) -> dict:
    """{ratio: calibration at that ratio} on random tokens (4 batches of 2 x ``length``)."""
    out = {}
    for r in ratios:
        calibrate(m, [rand_ids(2, length) for _ in range(4)], ratio=r)
        out[r] = gate_state(m).calibration
    return out


def _install(m, variant, ratio: float | None = None) -> None:
    """Put the model in a setting's state: no gates (dense) or one gate kind's gates, with the
    calibration made nearest ``ratio`` (see ``_variants``)."""
    current = getattr(m, "_bench_variant", None)
    if current is variant and (variant is None) != is_gated(m):
        _use_calibration(m, variant, ratio)
        return
    if is_gated(m):
        remove_gates(m)
    m._bench_variant = variant
    if variant is None:
        return
    if "dir" in variant:
        from gateskip.checkpoint import load_gates

        load_gates(m, variant["dir"])
    else:
        add_gates(m, variant["cfg"])
        for name, g in gate_modules(m).items():
            g.load_state_dict(variant["weights"][name])
    _use_calibration(m, variant, ratio)


def _use_calibration(m, variant, ratio: float | None) -> None:
    cals = variant["calibration"] if variant is not None else None
    if cals:
        near = min(cals) if ratio is None else min(cals, key=lambda r: abs(r - ratio))
        gate_state(m).calibration = cals[near]


# ---- measuring -----------------------------------------------------------------------------------

def _live_models(m, variants, settings) -> dict:
    """{setting: model}: the dense model itself, and per gated setting a gated copy of it.

    The copies share the dense model's weight tensors (only the gates are their own), so N settings
    cost one model's memory and read the same weights. A gates folder may change backbone weights
    (LoRA merged in place): its settings get full copies.
    """
    live = {}
    for name, kind, ratio in settings:
        if kind is None:
            live[name] = m
            continue
        variant = variants[kind]
        shared = {} if "dir" in variant else {id(t): t for t in (*m.parameters(), *m.buffers())}
        live[name] = copy.deepcopy(m, shared)
        _install(live[name], variant, ratio)
    return live


@torch.no_grad()
def _timed(m, ctx: dict, now, fn, **kw):
    """(seconds, the gate statistics after the call or None) of ``fn(**kw)`` under ``skipping(m, **ctx)``."""
    with skipping(m, **ctx) if ctx else contextlib.nullcontext():
        t0 = now()
        fn(**kw)
        dt = now() - t0
        return dt, gate_stats(m) if ctx else None


def _prefill(m, ctx: dict, ids, now):
    """(seconds, (compute saved, tokens skipped)) of one prefill as ``generate`` runs it."""
    dt, s = _timed(m, ctx, now, m, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                   logits_to_keep=1)
    return dt, _saved(s)


def _decode_generate(m, ctx: dict, ids, new_tokens: int, pad: int, now):
    """(seconds, (saved, skipped)) of the decode steps of ``m.generate`` (its prefill excluded)."""
    clock = _StepClock(m, bool(ctx), now)
    _, s = _timed(m, ctx, now, m.generate, input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                  pad_token_id=pad, max_new_tokens=new_tokens, min_new_tokens=new_tokens, stopping_criteria=[clock])
    return clock.marks[-1] - clock.marks[0], _saved(s, clock.first)


@torch.no_grad()
def _decode_interleaved(live: dict, ctxs: dict, ids, new_tokens: int, now) -> dict:
    """{setting: (seconds, (saved, skipped))} of greedy decoding, the settings taking turns step by step.

    Each setting prefills ``ids`` (untimed, as in the generate timing), then all of them run decode step
    1, then step 2, ... with their own caches, in an order that rotates every step. A step is what
    ``generate`` does for a new token: extend the attention mask, run the model on the last token with
    the cache, take the argmax.
    """
    names = list(live)
    arg = model_cache_arg(live[names[0]])
    runs = {}
    with contextlib.ExitStack() as stack:
        for n in names:
            if ctxs[n]:
                stack.enter_context(skipping(live[n], **ctxs[n]))
        for n in names:
            mask = torch.ones_like(ids)
            out = live[n](input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            first = gate_stats(live[n]) if ctxs[n] else None  # the prompt's share, subtracted at the end
            runs[n] = [out.logits[:, -1:].argmax(-1), output_cache(out), mask, 0.0, first]
        for step in range(new_tokens - 1):
            k = step % len(names)
            for n in names[k:] + names[:k]:
                nxt, cache, mask, secs, first = runs[n]
                t0 = now()
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                out = live[n](input_ids=nxt, attention_mask=mask, use_cache=True, logits_to_keep=1, **{arg: cache})
                nxt = out.logits[:, -1:].argmax(-1)
                runs[n] = [nxt, output_cache(out), mask, secs + now() - t0, first]
        return {n: (r[3], _saved(gate_stats(live[n]) if ctxs[n] else None, r[4])) for n, r in runs.items()}


class _StepClock:
    """A generate stopping criterion that never stops: it timestamps each new token.

    The first call comes right after the prefill, so the decode time is last - first mark, for
    ``new_tokens - 1`` steps; the statistics at that point are the prefill's (subtracted later).
    """

    def __init__(self, m, gated: bool, now):
        self.m, self.gated, self.now, self.marks, self.first = m, gated, now, [], None

    def __call__(self, input_ids, scores, **kwargs):
        if not self.marks and self.gated:
            self.first = gate_stats(self.m)
        self.marks.append(self.now())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _saved(s, minus=None) -> tuple[float, float]:
    """(compute saved, tokens skipped) of a run, or of the part of ``s`` not in ``minus``."""
    if s is None:
        return 0.0, 0.0
    if minus is None:
        return s["compute_saved"], s["tokens_skipped"]
    dense = s["flops_dense"] - minus["flops_dense"]
    done = s["flops_executed"] - minus["flops_executed"]
    # tokens skipped of the decode steps alone: per-branch counts minus the prefill's
    skipped = tokens = 0.0
    for name, mod in s["per_module"].items():
        before = minus["per_module"].get(name, {"skipped": 0.0, "tokens": 0})
        skipped += mod["skipped"] * mod["tokens"] - before["skipped"] * before["tokens"]
        tokens += mod["tokens"] - before["tokens"]
    return (1.0 - done / dense if dense else 0.0), (skipped / tokens if tokens else 0.0)


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
    keys = ["model", "gates", "random_gates", "gate", "rank", "ratios", "policy", "kv", "path", "prefill_batch",
            "prefill_len", "decode_batches", "prompt_len", "new_tokens", "repeats", "warmup", "threads", "clock", "seed", "quant",
            "decode_timing"]
    flag = lambda k, v: f"--{'' if v else 'no-'}{k}" if isinstance(v, bool) else f"--{k} {v}"  # noqa: E731
    return "gateskip bench " + " ".join(flag(k.replace("_", "-"), args[k]) for k in keys if args.get(k) is not None)


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
