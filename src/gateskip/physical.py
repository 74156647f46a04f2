"""Physical skipping: a branch computes its kept tokens only.

The masked path (wrap.py) runs a branch on every token and zeroes the skipped outputs. Here the kept
tokens are gathered, the untouched original module runs on them, and their gated outputs are
scattered back into zeros, so a skipped token's hidden state passes unchanged through the residual
add. Same results as the masked path, less compute.

- MLP: token-wise, so the kept tokens of the whole batch are flattened into one row.
- Attention: queries for the kept tokens only. Each row is padded to the largest kept count; the
  padding slots hold skipped tokens of that row and their outputs are dropped. The original
  attention gets the gathered hidden states, the gathered rotary cos/sin, and the rows of the
  attention mask for those queries (always an explicit mask: sdpa's ``is_causal`` would align a
  shortened query block wrongly). Keys/values must exist for every token so the cache stays
  complete: the attention computes them for its gathered tokens and calls ``cache.update``, which
  ``kv.GatheredKV`` intercepts to fill in the skipped tokens (see kv.py). Rows without any kept
  token (decode, batch > 1) are left out of the call.
- A branch that skips every token of the call (decode at batch 1) is not called at all; attention
  then only writes the skipped token's K/V into the cache.

Sync-free (``skipping(sync_free=...)``, on by default off the CPU). Sizing a gather from the skip
mask (``nonzero``, a per-row maximum) reads the device: on a GPU, one sync per branch, which stalls
the kernel queue. Under the quantile policy the number skipped is known on the host (``round(r * n)``,
n read once per forward call), so every gather is sized from it: kept indices by a stable sort of the
mask, attention queries padded to ``min(t, kept)``, rows never dropped. Thresholds and random skipping
have a data-dependent count: under ``sync_free`` their branches run the masked path rather than read it;
without it they read it (free on CPU; ``stats()["sync_calls"]`` counts the reads).

Fallback (fallback.py): skipped tokens are scattered as ``g * fallback(x)`` instead of zeros, the
fallback computed for the skipped tokens only (attention too: its K/V handling is unchanged). Without
a fallback (the paper's zero) the path is the one above, op for op.

When only a few tokens skip, gather/scatter costs more than it saves: ``MIN_SKIP`` (measured, see
docs/benchmark-log.md) sends such calls down the masked path instead.
"""

from __future__ import annotations

import torch

from gateskip.compat import cache_key
from gateskip.fallback import gated_fallback
from gateskip.kv import GatheredKV, flat_positions, skipped_kv, take_positions

# Below this fraction of skipped tokens in a call, the masked path is faster. Measured per branch on
# SmolLM2-135M (layer 10, 4 x 512 tokens, 1 CPU thread, CPU time, medians of 6; a one-off timing script):
# attention physical vs masked 84 vs 77 ms at 10% skipped, 85 vs 80 at 20%, 76-77 vs 80-83 at 30%, in
# both KV modes (an explicit mask instead of sdpa's causal flag, plus the K/V bookkeeping); the MLP was
# already faster at 2-5% (138 vs 142, 135 vs 151 ms). See docs/benchmark-log.md. Decode at batch 1 skips all
# or nothing, so the rule only matters for prefill and batched decode.
MIN_SKIP = {"attn": 0.25, "mlp": 0.02}
# A call with fewer tokens than this (batched decode) is bound by reading the weights, not by rows:
# running 4 of 8 rows costs what 8 cost (profile of SmolLM2 decode at batch 8: linear time -12% at
# 55% skipped, while gather/scatter added more). Such calls run masked unless every token skips.
MIN_TOKENS = 16
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # others (flash, flex) take the masked path


def faster(kind: str, n_skip: int, n: int, costs=None) -> bool:
    """``path="auto"``: is the physical path faster for this call? From ``costs`` (execution.ExecutionCosts, measured
    on this model and machine) when it has this kind, else the rule measured on SmolLM2-135M."""
    if costs is not None:
        choice = costs.gather_faster(kind, n_skip, n)
        if choice is not None:
            return choice
    return n >= MIN_TOKENS and n_skip >= MIN_SKIP[kind] * n


def supports(branch) -> bool:
    if branch.kind == "mlp":
        return True
    return getattr(getattr(branch.module, "config", None), "_attn_implementation", None) in ATTN_IMPLEMENTATIONS


def run(branch, x: torch.Tensor, g: torch.Tensor | None, skip: torch.Tensor, n_skip: int, args, kwargs,
        static: bool = False):
    """The branch output for every token, computed for the kept tokens only (``g``: gate to apply, or None).

    ``static``: size every gather from ``n_skip`` (a host int) alone, never from the mask's contents,
    so that nothing is read back from the device (see "Sync-free" above).
    """
    if n_skip == skip.numel():
        return skip_all(branch, x, kwargs, skip, g)
    if branch.kind == "mlp":
        fb = branch.fast_fallback
        out = _mlp(branch, x, g, skip, n_skip, args, kwargs, static, filled=fb is not None)
        return out if fb is None else _with_fallback(branch, out, x, g, skip, n_skip, static)
    out, w = _attention(branch, x, g, skip, n_skip, kwargs, static)
    return (out if branch.fast_fallback is None else _with_fallback(branch, out, x, g, skip, n_skip, static)), w


def _with_fallback(branch, out, x, g, skip, n_skip, static):
    """``out`` ([B, T, H], 0 at skipped tokens) with the gated fallback of the skipped tokens put there."""
    b, t, h = x.shape
    flat = skip.reshape(-1)
    if static:  # skipped tokens last in a stable sort of the mask: no size read from the device
        sidx = torch.argsort(flat.to(torch.uint8), stable=True)[b * t - n_skip:]
    else:
        sidx = flat.nonzero().squeeze(1)
    v = gated_fallback(branch.fast_fallback, x.reshape(b * t, h).index_select(0, sidx),
                       None if g is None else g.reshape(b * t, -1).index_select(0, sidx))
    # in place: ``out`` is the fresh tensor _mlp / _attention built, so no second B x T x H copy
    return out.view(b * t, h).index_copy_(0, sidx, v.to(out.dtype)).view(b, t, h)


def _mlp(branch, x, g, skip, n_skip, args, kwargs, static, filled: bool = False):
    """The kept tokens' gated outputs in a [B, T, H] tensor, 0 at the skipped ones; ``filled``: the caller writes
    every skipped token (a fallback), so they are left unset instead of zeroed (one B x T x H fill less)."""
    b, t, h = x.shape
    if static:  # kept tokens first, in order: the first b*t - n_skip of a stable sort of the mask
        idx = torch.argsort(skip.reshape(-1).to(torch.uint8), stable=True)[:b * t - n_skip]
    else:  # nonzero: cheaper on CPU, but its size is data-dependent (a sync on GPU)
        idx = (~skip).reshape(-1).nonzero().squeeze(1)
    o = branch.run_module(x.reshape(b * t, h).index_select(0, idx).unsqueeze(0), args, kwargs)[0]
    if g is not None:
        o = o * g.reshape(b * t, -1).index_select(0, idx)
    out = x.new_empty(b * t, h) if filled else x.new_zeros(b * t, h)
    return out.index_copy_(0, idx, o).view(b, t, h)


def skip_all(branch, x: torch.Tensor, kwargs, skip: torch.Tensor, g: torch.Tensor | None = None):
    """The branch output when every token of the call skips (decode at batch 1): the module is not called.

    MLP: zeros (or ``g * fallback(x)``). Attention: the same, and the skipped tokens' K/V (kv.py)
    written to the cache and kept for the layer above. ``skip``: the (all-True) skip mask; ``g``: the
    gate values (None when the gate sat before the branch), only read by a fallback.
    """
    fb = branch.fast_fallback
    if branch.kind == "mlp":
        return x.new_zeros(x.shape) if fb is None else gated_fallback(fb, x, g)
    attn, st = branch.module, branch.state
    layer = attn.layer_idx
    cos, sin = kwargs["position_embeddings"]
    k, v = skipped_kv(st, attn, layer, x, cos, sin, skip, x.shape[1])
    st.call.prev_kv = (layer, k, v)
    cache = kwargs.get(cache_key(kwargs))
    if cache is not None:
        cache.update(k, v, layer)
    return (x.new_zeros(x.shape) if fb is None else gated_fallback(fb, x, g)), None


def _attention(branch, x, g, skip, n_skip, kwargs, static):
    attn, st = branch.module, branch.state
    b, t, h = x.shape
    kwargs = dict(kwargs)
    key = cache_key(kwargs)
    cache = kwargs.pop(key, None)
    cos, sin = kwargs.pop("position_embeddings")
    mask = kwargs.pop("attention_mask", None)
    layer = attn.layer_idx
    if mask is None and n_skip < b * t:  # built before the cache grows: its sizes describe this call
        mask = causal_mask(attn, cache, t, branch.window, x.device, x.dtype)
    base_k, base_v = skipped_kv(st, attn, layer, x, cos, sin, skip, min(t, n_skip) if static else None)
    per_row = (~skip).sum(1)
    # queries per row: the largest kept count of a row. Sync-free: a bound known on the host (exact at
    # batch 1; at batch > 1 the rows share the kept tokens unevenly, so up to t).
    n = min(t, b * t - n_skip) if static else int(per_row.max())
    order = torch.argsort(skip.to(torch.uint8), dim=1, stable=True)  # per row: kept positions first, in order
    idx = order[:, :n]
    # slots past a row's kept count (padding) hold skipped tokens; none at batch 1, where n is the kept count
    slot_kept = None if b == 1 else torch.arange(n, device=x.device) < per_row[:, None]
    rows = None
    if b > 1 and n_skip >= t and not static:  # some rows may have no kept token at all: leave them out
        has = per_row > 0
        if not bool(has.all()):
            rows = has.nonzero().squeeze(1)
    pos = kwargs.get("position_ids")
    pos = pos.expand(b, -1) if isinstance(pos, torch.Tensor) and pos.shape[-1] == t else None
    if rows is not None:  # tensors shared by the batch (a leading 1) need no row selection
        pick = lambda z: z[rows] if z.shape[0] == b else z  # noqa: E731
        x, mask, cos, sin = pick(x), pick(mask), pick(cos), pick(sin)
        g = pick(g) if g is not None else None
        pos = pos[rows] if pos is not None else None
        idx_r, slot_r = idx[rows], slot_kept[rows]  # rows is None at batch 1
    else:
        idx_r, slot_r = idx, slot_kept
    r = idx_r.shape[0]
    flat = flat_positions(idx_r, t)  # kept slots in the flattened rows
    take = lambda z: take_positions(z, idx_r, flat)  # noqa: E731
    kwargs["position_embeddings"] = (take(cos), take(sin))
    kwargs["attention_mask"] = take(mask.transpose(1, 2)).transpose(1, 2)  # [R, heads or 1, n, K]
    if pos is not None:
        kwargs["position_ids"] = pos.gather(1, idx_r)
    kwargs[key] = GatheredKV(cache, st, base_k, base_v, idx, slot_kept, rows)
    o = branch.run_module(take(x), (), kwargs)[0]
    if g is not None:
        o = o * take(g)
    if slot_r is not None:
        o = o.masked_fill(~slot_r[..., None], 0.0)  # padding slots hold skipped tokens: their output is zero
    out = o.new_zeros(r * t, h).index_copy_(0, flat, o.reshape(r * n, h)).view(r, t, h)
    if rows is not None:
        out = o.new_zeros(b, t, h).index_copy_(0, rows, out)
    return out, None


def causal_mask(attn, cache, t: int, window: int | None, device, dtype) -> torch.Tensor:
    """The mask the model left implicit (``None``: causal, no padding) for ``t`` new tokens: [1, 1, t, K].

    Key positions come from the cache layer's own mask sizes (a sliding layer returns only its window).
    Boolean for sdpa, additive float for eager.
    """
    layers = getattr(cache, "layers", None)
    if layers is not None and attn.layer_idx < len(layers):
        kv_len, offset = layers[attn.layer_idx].get_mask_sizes(t)
    else:  # no cache, or a cache built empty (``DynamicCache()``) whose layer this call creates: nothing before
        kv_len, offset = t, 0
    q = torch.arange(kv_len - t, kv_len, device=device)[:, None] + offset
    k = torch.arange(kv_len, device=device)[None, :] + offset
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    allowed = allowed[None, None]
    if attn.config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
