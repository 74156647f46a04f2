"""Lossless self-speculative decoding: the gated model drafts cheaply, the full model verifies.

One cycle (Leviathan et al. 2023; LayerSkip's self-speculation with GateSkip as the draft):
1. draft ``k`` tokens one by one with the same model inside ``skipping(draft_ratio)`` (its own
   gates decide what to skip; KV cache on);
2. roll the cache back to where the draft started (draft K/V came from skipped compute and would
   poison the full model's cache);
3. verify: one forward of the full model (no skipping) over ``[last token, draft_1 .. draft_k]``
   gives the full model's next-token distribution at all ``k + 1`` positions;
4. accept the longest prefix the full model agrees with (greedy: exact argmax match; sampling:
   accept ``d`` with probability ``min(1, p(d) / q(d))``, on rejection sample from
   ``normalise(max(0, p - q))``), emit the full model's own token after it (a correction, or a
   bonus token when all ``k`` are accepted), and crop the cache to the accepted tokens.
Every emitted token is therefore the full model's: greedy output equals dense greedy decoding, and
sampled output has the full model's distribution.

Batches: all rows advance by the same number of tokens per cycle: the smallest accepted length
among unfinished rows, plus each row's own token at the next position (for a row that accepted
further, that token is its accepted draft; its marginal is still the full model's), so the cache
stays rectangular. Rows that produced EOS are padded like ``generate`` pads them.

The verifier (``verify``): ``gated`` is the gated model without skipping (what
``generate --skip 0`` runs); ``ungated`` runs the branches without their gates (for gates trained
on a frozen backbone, the original model; no gate cost in the verify pass).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from gateskip.compat import model_cache_arg
from gateskip.errors import GateSkipError

VERIFIERS = ("gated", "ungated")


@dataclass
class SpeculativeResult:
    """Output of :func:`speculative_generate`."""

    sequences: torch.Tensor  # [B, prompt + new] like ``generate``'s output
    new_tokens: int  # generated per row (including padding after EOS)
    cycles: int = 0
    drafted: int = 0  # draft tokens proposed (per row, summed over cycles)
    accepted: int = 0  # draft tokens accepted (the common prefix that was kept)
    rejections: int = 0  # cycles that ended in a rejected draft (the others accepted all of theirs)
    draft_stats: dict = field(default_factory=dict)  # gateskip.stats over the draft forwards
    seconds: float = 0.0
    draft_seconds: float = 0.0  # time (``clock``) of the draft forwards: ``drafted`` one-token steps
    verify_seconds: float = 0.0  # time (``clock``) of the verify forwards: ``cycles`` of them, k + 1 tokens each
    past_key_values: object = None  # the cache: every token but the last, full-model K/V only

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens that were accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_token_acceptance(self) -> float:
        """How often a draft the verifier looked at was accepted: accepted / (accepted + rejections). Drafts after
        a rejection are never looked at, so this is the acceptance of ``tokens_per_cycle`` and
        ``acceptance_needed``; ``acceptance_rate`` counts those drafts as rejected and is lower."""
        seen = self.accepted + self.rejections
        return self.accepted / seen if seen else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify forward (accepted drafts + the full model's own token)."""
        return self.new_tokens / self.cycles if self.cycles else 0.0


# ---- what a setting can save: pure functions ----------------------------------------------------

def tokens_per_cycle(acceptance: float, k: int) -> float:
    """Expected tokens emitted per cycle when each draft is accepted with probability ``acceptance``
    independently: ``1 + a + ... + a^k`` (Leviathan et al. 2023)."""
    a = min(max(float(acceptance), 0.0), 1.0)
    return float(sum(a ** i for i in range(k + 1)))  # the sum, not (1 - a^(k+1)) / (1 - a): exact near a = 1


def predicted_speedup(acceptance: float, k: int, step: float, draft: float, verify: float) -> float:
    """Speed-up over plain decoding at ``step`` seconds per token, for drafts at ``draft`` seconds per
    step and a verify pass over k + 1 tokens at ``verify`` seconds."""
    return tokens_per_cycle(acceptance, k) * step / (k * draft + verify)


def acceptance_needed(target: float, k: int, step: float, draft: float, verify: float) -> float | None:
    """The per-token acceptance at which a setting with these measured costs reaches ``target``
    speed-up; None when even a draft that is always accepted falls short."""
    if predicted_speedup(1.0, k, step, draft, verify) < target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):  # tokens_per_cycle rises with acceptance: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted_speedup(mid, k, step, draft, verify) < target else (lo, mid)
    return hi


# ---- sampling: pure functions ------------------------------------------------------------------

def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (nucleus) filtering, over the last dim.

    The draft and the verifier use the same warping, so the output follows the full model's
    *warped* distribution (what ``generate(do_sample=True, ...)`` samples from).
    """
    logits = logits.float() / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative sampling rule for one position, per row.

    Args:
        p: [B, V] the verifier's probabilities; q: [B, V] the draft's; draft: [B] drafted tokens;
        u: [B] uniform(0, 1) draws.
    Returns:
        (accepted [B] bool, token [B]): the draft where accepted, else a sample of
        ``normalise(max(0, p - q))``. Marginally, ``token ~ p`` whatever ``q`` is.
    """
    pd = p.gather(-1, draft[:, None]).squeeze(-1)
    qd = q.gather(-1, draft[:, None]).squeeze(-1)
    accepted = u * qd <= pd  # u < min(1, p/q) without dividing by q
    residual = (p - q).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)  # p == q: any rejection is measure-zero
    resampled = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
    return accepted, torch.where(accepted, draft, resampled)


# ---- the decoding loop -------------------------------------------------------------------------

def speculative_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                         max_new_tokens: int = 64, k: int = 4, draft_ratio: float = 0.5,
                         draft_policy: str | None = None, modules=("attn", "mlp"), kv: str | None = None,
                         verify: str = "gated", sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, eos_token_id=None, pad_token_id: int | None = None,
                         seed: int = 0, allocation: str = "uniform", clock=time.perf_counter) -> SpeculativeResult:
    """Generate with self-speculative decoding; the output is the full model's (see module docstring).

    Args:
        model: a gated model (``gateskip.add_gates`` / ``load_gates``); the draft uses its gates.
        input_ids, attention_mask: the prompt batch (left padding, as for ``generate``).
        max_new_tokens: tokens to generate per row.
        k: draft tokens per cycle.
        draft_ratio: skip ratio of the draft (``gateskip.skipping``'s ``ratio``).
        draft_policy: skip policy of the draft (``threshold`` decides per token at decode).
        verify: ``gated`` (the gated model without skipping) or ``ungated`` (gates bypassed).
        sample: sample instead of greedy decoding; temperature / top_k / top_p warp both models.
        eos_token_id: int or list; rows stop there and are padded with ``pad_token_id``.
        seed: seed of sampling and of the random draft policy.
        clock: the clock of ``seconds``, ``draft_seconds`` and ``verify_seconds`` (e.g. ``time.process_time``).
    """
    _check_request(model, input_ids, k, max_new_tokens, verify)
    dev = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev).long()
    eos = _eos_set(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(model.generation_config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    gen = torch.Generator(device=dev).manual_seed(seed) if sample else None
    probs = (lambda logits: warp(logits, temperature, top_k, top_p)) if sample else None
    plan = {"ratio": draft_ratio, "policy": draft_policy, "modules": modules, "kv": kv,
            "allocation": allocation}  # the draft's skipping() arguments, but its seed

    cache = _new_cache(model)
    res = SpeculativeResult(sequences=input_ids, new_tokens=0)
    t0 = clock()
    with torch.no_grad(), _full(model, verify):
        logits = _forward(model, input_ids, mask, cache, last_only=True)[:, -1]
    nxt = _pick(logits, probs, gen)
    out = [nxt]
    done = _hit(nxt, eos)
    tally = None
    while sum(t.shape[1] for t in out) < max_new_tokens and not bool(done.all()):
        kk = min(k, max_new_tokens - sum(t.shape[1] for t in out) - 1)
        last = out[-1][:, -1:]
        start = cache.get_seq_length()
        drafts, qs = [], []
        if kk > 0:
            drafts, qs, s = _draft(model, last, mask, cache, kk, probs, gen,
                                   {**plan, "seed": seed + res.cycles}, res, clock)
            tally = _add_stats(tally, s)
        emitted, mask = _verify_drafts(model, last, drafts, qs, mask, cache, start, verify, probs, gen, done,
                                       res, clock)
        emitted = torch.where(done[:, None], torch.full_like(emitted, pad_token_id), emitted)
        out.append(emitted)
        done = done | _hit_any(emitted, eos)
    new = torch.cat(out, dim=1)[:, :max_new_tokens]
    new = _pad_after_eos(new, eos, pad_token_id)
    res.sequences = torch.cat([input_ids, new], dim=1)
    res.new_tokens = new.shape[1]
    res.seconds = clock() - t0
    res.draft_stats = tally or {}
    res.past_key_values = cache
    return res


def _check_request(model, input_ids: torch.Tensor, k: int, max_new_tokens: int, verify: str) -> None:
    """A one-line error for a request ``speculative_generate`` cannot serve."""
    from gateskip.core import gate_state, is_gated

    if not is_gated(model):
        raise GateSkipError("self-speculative decoding drafts with the model's gates: add or load gates first")
    if verify not in VERIFIERS:
        raise GateSkipError(f"verify={verify!r} is not supported: choose {' or '.join(VERIFIERS)}")
    if int(k) != k or k < 1:
        raise GateSkipError(f"k={k!r} is invalid: draft at least 1 token per cycle")
    if max_new_tokens < 1:
        raise GateSkipError(f"max_new_tokens={max_new_tokens} is invalid: use a positive integer")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise GateSkipError("empty prompt: input_ids must be [batch, tokens] with at least one token")
    if gate_state(model).plan is not None:
        raise GateSkipError("speculative_generate manages skipping itself: call it outside `gateskip.skipping`")


def _draft(model, last: torch.Tensor, mask: torch.Tensor, cache, kk: int, probs, gen, plan: dict,
           res: SpeculativeResult, clock) -> tuple[list, list, dict]:
    """Draft ``kk`` tokens after ``last`` under the skipping ``plan``: (drafts [B, 1] each, their warped
    distributions when sampling, the draft's ``stats``). The cache is cropped back to where it started."""
    from gateskip.core import skipping, stats

    drafts, qs = [], []
    t_draft = clock()
    with torch.no_grad(), skipping(model, **plan):
        tok = last
        for _ in range(kk):
            mask = torch.cat([mask, mask.new_ones(last.shape[0], 1)], dim=1)
            lg = _forward(model, tok, mask, cache)[:, -1]
            tok = _pick(lg, probs, gen, keep=qs)
            drafts.append(tok)
        s = stats(model)
    res.draft_seconds += clock() - t_draft
    cache.crop(-kk)  # the full model recomputes these positions
    return drafts, qs, s


def _verify_drafts(model, last: torch.Tensor, drafts: list, qs: list, mask: torch.Tensor, cache, start: int,
                   verify: str, probs, gen, done: torch.Tensor, res: SpeculativeResult,
                   clock) -> tuple[torch.Tensor, torch.Tensor]:
    """One full-model forward over ``[last, *drafts]`` appended to the cache (``start`` tokens long):
    (the tokens the cycle emits [B, n + 1], the mask cropped to the cache and them); counts it in ``res``."""
    kk = len(drafts)
    block = torch.cat([last, *drafts], dim=1)
    mask = torch.cat([mask, mask.new_ones(last.shape[0], kk + 1)], dim=1)
    t_verify = clock()
    with torch.no_grad(), _full(model, verify):
        lg = _forward(model, block, mask, cache)  # [B, kk + 1, V]
    res.verify_seconds += clock() - t_verify
    n, own = _accept(lg, drafts, qs, probs, gen, done)
    res.rejections += int(n < kk)
    emitted = torch.cat([*drafts[:n], own[:, None]], dim=1) if n else own[:, None]
    cache.crop(-(kk - n))
    res.cycles += 1
    res.drafted += kk
    res.accepted += n
    return emitted, mask[:, :start + n + 1]


# ---- helpers -----------------------------------------------------------------------------------

def _new_cache(model):
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers 5.x
        cache = DynamicCache()
    if hasattr(cache, "activate_past_recording"):  # sliding-window layers must keep what a rollback needs
        cache.activate_past_recording()
    return cache


@contextlib.contextmanager
def _full(model, verify: str):
    """The verifier: no skipping plan; ``ungated`` also bypasses the gates."""
    from gateskip.taps import gates_bypassed

    with gates_bypassed(model) if verify == "ungated" else contextlib.nullcontext():
        yield


def _forward(model, ids: torch.Tensor, mask: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
    """Logits of ``ids`` appended to ``cache``; ``mask`` covers the cache and ``ids``."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    kwargs = {"logits_to_keep": 1} if last_only else {}
    kwargs[model_cache_arg(model)] = cache
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs).logits


def _pick(logits: torch.Tensor, probs, gen, keep: list | None = None) -> torch.Tensor:
    """Next token [B, 1]: argmax, or a sample of the warped distribution (kept in ``keep`` for the rule)."""
    if probs is None:
        return logits.argmax(-1, keepdim=True)
    p = probs(logits)
    if keep is not None:
        keep.append(p)
    return torch.multinomial(p, 1, generator=gen)


def _accept(logits, drafts, qs, probs, gen, done) -> tuple[int, torch.Tensor]:
    """Accepted draft length common to the unfinished rows, and each row's own token after it."""
    kk = len(drafts)
    b = logits.shape[0]
    if kk == 0:
        return 0, _pick(logits[:, 0], probs, gen)[:, 0]
    d = torch.cat(drafts, dim=1)  # [B, kk]
    if probs is None:
        target = logits.argmax(-1)  # [B, kk + 1]: the full model's greedy token at each position
        ok = d == target[:, :kk]
        own_at = target
    else:
        p = probs(logits)  # [B, kk + 1, V]
        u = torch.rand(b, kk, generator=gen, device=logits.device)
        ok = torch.zeros(b, kk, dtype=torch.bool, device=logits.device)
        own_at = torch.empty(b, kk + 1, dtype=torch.long, device=logits.device)
        for j in range(kk):
            ok[:, j], own_at[:, j] = accept_or_resample(p[:, j], qs[j], d[:, j], u[:, j], gen)
        own_at[:, kk] = torch.multinomial(p[:, kk], 1, generator=gen)[:, 0]
    run = ok.long().cumprod(-1).sum(-1)  # leading accepted drafts per row
    live = ~done
    n = int(run[live].min()) if bool(live.any()) else kk
    return n, own_at[:, n]


def _eos_set(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])}


def _hit(tok: torch.Tensor, eos: set[int]) -> torch.Tensor:
    return _hit_any(tok, eos)


def _hit_any(tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    if not eos:
        return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    return torch.isin(tokens, torch.tensor(sorted(eos), device=tokens.device)).any(-1)


def _pad_after_eos(new: torch.Tensor, eos: set[int], pad: int) -> torch.Tensor:
    """Tokens after a row's first EOS become ``pad`` (``generate``'s convention)."""
    if not eos:
        return new
    is_eos = torch.isin(new, torch.tensor(sorted(eos), device=new.device))
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    new = new.masked_fill(after, pad)
    if bool(is_eos.any(-1).all()):  # generate stops once every row has finished
        new = new[:, :int(is_eos.long().argmax(-1).max()) + 1]
    return new


def _add_stats(total: dict | None, s: dict) -> dict:
    """Token-weighted running mean of the draft's skipping statistics."""
    keys = ("tokens_skipped", "compute_saved")
    if total is None:
        return {**{k: s[k] for k in keys}, "calls": 1}
    n = total["calls"]
    return {**{k: (total[k] * n + s[k]) / (n + 1) for k in keys}, "calls": n + 1}
