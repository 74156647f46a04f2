"""Dense recheck: a step whose next token skipping may have changed is computed again without skipping.

Skipping's most visible failure in generation is an answer that ends too soon: with the least important tokens
skipped, the end-of-turn token becomes the top next token where the model would go on. A recheck catches it at the
cost of one dense step: after each forward call under a plan with a recheck rule, the rows whose top next token is a
``recheck_tokens`` id (e.g. the tokenizer's stop tokens) or whose top probability is below ``recheck_below`` are run
again with every branch computed, and their logits and new K/V replace the skipped ones. An answer then ends only
where the model without skipping would end it, given the same prefix.

The recheck's compute is counted (``stats()["compute_saved"]`` includes it; ``"rechecked"`` counts the rows), so a
comparison at matched compute charges for it. The rows rerun alone (a batch of 16 with one row ending pays for one
row), on the model's full dynamic cache; other caches raise a one-line error.
"""

from __future__ import annotations

import dataclasses

import torch

from gateskip.compat import get_cache
from gateskip.errors import GateSkipError
from gateskip.record import peek


def check_recheck_tokens(ids) -> torch.Tensor | None:
    if ids is None:
        return None
    ids = sorted({int(i) for i in ids})
    if not ids or ids[0] < 0:
        raise GateSkipError(f"recheck_tokens={ids!r} is invalid: give token ids >= 0, e.g. gateskip.stop_ids(tok)")
    return torch.tensor(ids, dtype=torch.long)


def check_recheck_below(p: float) -> float:
    if not 0.0 <= float(p) < 1.0:
        raise GateSkipError(f"recheck_below={p!r} is invalid: use a probability in [0, 1), 0 for off")
    return float(p)


def needs_recheck(plan, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """[B] bool: live rows whose next-token logits (``[B, V]``) trigger the plan's recheck rule."""
    hit = torch.zeros_like(live)
    if plan.recheck_tokens is not None:
        stops = plan.recheck_tokens.to(logits.device)
        hit |= torch.isin(logits.argmax(-1), stops)
    if plan.recheck_below > 0.0:
        hit |= logits.float().softmax(-1).amax(-1) < plan.recheck_below
    return hit & live


def after_call(model, args, kwargs, output):
    """Model-level forward hook: rerun the triggered rows of this call without skipping (see the module doc)."""
    st = peek(model).state
    plan = st.plan if st is not None else None
    if plan is None or st.rechecking or not plan.rechecks or getattr(output, "logits", None) is None:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    b = ref.shape[0]
    live = (mask[:, -1].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2
            else torch.ones(b, dtype=torch.bool, device=ref.device))
    rows = torch.nonzero(needs_recheck(plan, output.logits[:, -1], live.to(output.logits.device))).flatten()
    if rows.numel() == 0:
        return None
    cache = get_cache(kwargs)
    t = ref.shape[1]
    cached = (cache.get_seq_length() - t) if cache is not None else 0
    sub = _select(kwargs, args, rows, b)
    if cache is not None:
        sub[_cache_key(kwargs)] = _sub_cache(cache, rows, cached)
    main = st.stats
    if main is not None:
        main.flush(st.call.ctx)
        if main.recheck is None:
            main.recheck = type(main)(len(st.branches))
        st.stats = main.recheck
        main.recheck.rows += rows.numel()
    previous = st.plan
    st.plan = dataclasses.replace(plan, ratios=[0.0] * len(plan.ratios))
    st.rechecking = True
    try:
        dense = model(**sub)
        if main is not None:
            st.stats.flush(st.call.ctx)
    finally:
        st.plan, st.rechecking, st.stats = previous, False, main
    if cache is not None:
        _write_back(cache, get_cache(sub), rows, cached, t)
    output.logits[rows.to(output.logits.device)] = dense.logits.to(output.logits.dtype)
    return output


def _cache_key(kwargs) -> str:
    from gateskip.compat import NAMES

    return next(n for n in NAMES if kwargs.get(n) is not None)


def _select(kwargs: dict, args: tuple, rows: torch.Tensor, b: int) -> dict:
    """The call's keyword arguments for ``rows`` only (per-row tensors sliced; the cache is set by the caller)."""
    sub = dict(kwargs)
    if args:
        sub["input_ids"] = args[0]
    for k, v in sub.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == b:
            sub[k] = v[rows.to(v.device)]
    return sub


def _layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(x).__name__ != "DynamicLayer" for x in layers):
        raise GateSkipError(f"the dense recheck needs a full dynamic KV cache, not {type(cache).__name__}: generate "
                            "without recheck_tokens / recheck_below for this model")
    return layers


def _sub_cache(cache, rows: torch.Tensor, cached: int):
    """A new dynamic cache holding ``rows``' first ``cached`` positions."""
    from transformers import DynamicCache

    sub = DynamicCache()
    if cached > 0:
        for i, layer in enumerate(_layers(cache)):
            r = rows.to(layer.keys.device)
            sub.update(layer.keys[r, :, :cached], layer.values[r, :, :cached], i)
    return sub


def _write_back(cache, sub, rows: torch.Tensor, cached: int, t: int) -> None:
    """Put the rerun's new K/V (positions ``cached`` to ``cached + t``) into ``rows`` of the main cache."""
    for layer, new in zip(_layers(cache), sub.layers):
        r = rows.to(layer.keys.device)
        layer.keys[r, :, cached:cached + t] = new.keys[:, :, cached:cached + t].to(layer.keys.dtype)
        layer.values[r, :, cached:cached + t] = new.values[:, :, cached:cached + t].to(layer.values.dtype)
