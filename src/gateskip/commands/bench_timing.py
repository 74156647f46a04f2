"""What ``gateskip bench`` times: the settings (dense, gated variants at each ratio and fallback), installed on one
model or on copies sharing its weights, and the timed phases (prefill; decode through ``generate`` or
step-interleaved, each setting with its own KV cache). commands/bench.py runs them and writes the table."""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from gateskip.compat import model_cache_arg, output_cache
from gateskip.config import GateSkipConfig
from gateskip.core import add_gates, calibrate, gate_modules, gate_state, is_gated, remove_gates, skipping
from gateskip.core import stats as gate_stats
from gateskip.policies import POLICY


def variants(m, gates, kinds, rank, seed, rand_ids, calib_len, policy, ratios=(0.25,), fallbacks=("zero",),
              fallback_rank: int = 64) -> dict:
    """Per gate kind: how to install it (a folder to load, or random gate weights + calibration).

    With several ``fallbacks`` there is one variant per (kind, fallback), named ``kind+fallback``,
    with the same random gate weights (the seed) and so the same skip decisions.

    Thresholds are calibrated at each measured ratio (``calibration``: {ratio: calibration}). One
    calibration serves every ratio only near its own: it records importances while skipping at that
    ratio, and skipping more upstream shifts what later branches see. Random low-rank gates calibrated
    at 0.25 skipped 56% at ratio 0.5 (59% of MLP tokens); calibrated at 0.5, 49.6% (docs/benchmark-log.md).
    A gates folder's own calibration (from real text) is used as it is.
    """
    points = sorted({r for r in ratios if r > 0.0}) or [0.25]
    if gates is not None:
        from gateskip.checkpoint import load_gates

        load_gates(m, gates)
        kind = gate_state(m).cfg.gate
        own = gate_state(m).loaded.calibration
        # keyed by calibration ratio; a per-branch calibration (a dict) is the folder's only one anyway
        key = None if own is None else own["ratio"] if not isinstance(own["ratio"], dict) else 0.0
        variant = {"dir": gates, "calibration": {key: own} if own is not None else {}}
        if own is None and POLICY[policy].needs_calibration:  # calibrate on random tokens
            variant["calibration"] = calibrations(m, rand_ids, calib_len, points)
        remove_gates(m)
        return {kind: variant}
    out = {}
    for k, fb in ((k, fb) for k in kinds for fb in fallbacks):
        cfg = GateSkipConfig(gate=k, rank=rank, fallback=fb, fallback_rank=fallback_rank)
        add_gates(m, cfg)
        randomise(m, seed)
        out[k if len(fallbacks) == 1 else f"{k}+{fb}"] = {"cfg": cfg, "weights": {n: {p: t.clone() for p, t in g.state_dict().items()}
                                          for n, g in gate_modules(m).items()},
                  "calibration": calibrations(m, rand_ids, calib_len, points)}
        remove_gates(m)
    return out


@torch.no_grad()
def randomise(m, seed: int) -> None:
    """Gate weights ~ N(0, 1/fan_in), bias 2: gates mostly open, importances differ from token to token."""
    g = torch.Generator().manual_seed(seed)
    for gate in gate_modules(m).values():
        linears = [x for x in gate.modules() if isinstance(x, torch.nn.Linear)]
        for lin in linears:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features))
        linears[-1].bias.fill_(2.0)


def calibrations(m, rand_ids, length: int, ratios) -> dict:
    """{ratio: calibration at that ratio} on random tokens (4 batches of 2 x ``length``)."""
    out = {}
    for r in ratios:
        calibrate(m, [rand_ids(2, length) for _ in range(4)], ratio=r)
        out[r] = gate_state(m).loaded.calibration
    return out


def install(m, variant, ratio: float | None = None) -> None:
    """Put the model in a setting's state: no gates (dense) or one gate kind's gates, with the
    calibration made nearest ``ratio`` (see ``variants``)."""
    current = getattr(m, "_bench_variant", None)
    if current is variant and (variant is None) != is_gated(m):
        use_calibration(m, variant, ratio)
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
    use_calibration(m, variant, ratio)


def use_calibration(m, variant, ratio: float | None) -> None:
    cals = variant["calibration"] if variant is not None else None
    if cals:
        near = min(cals) if ratio is None else min(cals, key=lambda r: abs(r - ratio))
        gate_state(m).loaded.calibration = cals[near]


# ---- measuring -----------------------------------------------------------------------------------


def live_models(m, variants, settings) -> dict:
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
        install(live[name], variant, ratio)
    return live


@torch.no_grad()
def timed(m, ctx: dict, now, fn, **kw):
    """(seconds, the gate statistics after the call or None) of ``fn(**kw)`` under ``skipping(m, **ctx)``."""
    with skipping(m, **ctx) if ctx else contextlib.nullcontext():
        t0 = now()
        fn(**kw)
        dt = now() - t0
        return dt, gate_stats(m) if ctx else None


def prefill(m, ctx: dict, ids, now):
    """(seconds, (compute saved, tokens skipped)) of one prefill as ``generate`` runs it."""
    dt, s = timed(m, ctx, now, m, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                   logits_to_keep=1)
    return dt, saved(s)


def decode_generate(m, ctx: dict, ids, new_tokens: int, pad: int, now):
    """(seconds, (saved, skipped)) of the decode steps of ``m.generate`` (its prefill excluded)."""
    clock = StepClock(m, bool(ctx), now)
    _, s = timed(m, ctx, now, m.generate, input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                  pad_token_id=pad, max_new_tokens=new_tokens, min_new_tokens=new_tokens, stopping_criteria=[clock])
    return clock.marks[-1] - clock.marks[0], saved(s, clock.first)


@torch.no_grad()
def decode_interleaved(live: dict, ctxs: dict, ids, new_tokens: int, now) -> dict:
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
        return {n: (r[3], saved(gate_stats(live[n]) if ctxs[n] else None, r[4])) for n, r in runs.items()}


class StepClock:
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


def saved(s, minus=None) -> tuple[float, float]:
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
