"""What a skipped token leaves in the KV cache.

Later tokens attend to every earlier token, including those that skipped a layer's attention, so
a skipped token still needs K/V at that layer. Two modes:

- ``copy`` (paper): its K/V at layer l are its K/V at layer l-1. Layer 0 has no layer below: there
  the token's K/V are computed. The substitution is applied inside the attention call itself
  (before the cache stores them and before the kept tokens attend to them), so a prefill, a cached
  decode and a recompute without cache all see the same keys: cached generation equals
  recomputation.
- ``compute``: its K/V are computed as if it were not skipped; nothing to do here.

We never copy the attention forward. Every supported attention calls
``past_key_values.update(k, v, layer_idx)`` once with the new tokens' K/V (after rotary); we pass it
a ``KVProxy`` that substitutes the skipped rows, remembers this layer's K/V for the next layer, and
forwards to the real cache (or just returns them when there is no cache).
"""

from __future__ import annotations

import torch

from gateskip.arch import project_kv


class KVProxy:
    """Stands in for ``past_key_values`` inside one attention call."""

    __slots__ = ("cache", "state", "skip")

    def __init__(self, cache, state, skip: torch.Tensor | None):
        self.cache, self.state, self.skip = cache, state, skip

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        key_states, value_states = substitute_from_below(self.state, layer_idx, key_states, value_states, self.skip)
        if self.cache is None:
            return key_states, value_states
        return self.cache.update(key_states, value_states, layer_idx, *args, **kwargs)

    def __getattr__(self, name):  # anything else an attention might ask of the cache
        return getattr(self.cache, name)


def substitute_from_below(state, layer_idx: int, k: torch.Tensor, v: torch.Tensor, skip: torch.Tensor | None):
    """Replace skipped tokens' new K/V ([B, H_kv, T, D]) by those of layer ``layer_idx - 1``."""
    prev = state.call.prev_kv
    if skip is not None and prev is not None and prev[0] == layer_idx - 1 and prev[1].shape == k.shape:
        m = skip[:, None, :, None]
        k = torch.where(m, prev[1].to(k.dtype), k)
        v = torch.where(m, prev[2].to(v.dtype), v)
    state.call.prev_kv = (layer_idx, k, v)
    return k, v


def skipped_kv(state, attn, layer_idx: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               skip: torch.Tensor, per_row: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V ([B, H_kv, T, D]) whose rows at skipped tokens are what those tokens leave in the cache.

    ``copy``: the layer below's K/V (all rows). ``compute`` (and ``copy`` at layer 0): projected for
    the skipped tokens only (``per_row``: how many per row to project, if known on the host; some may
    then be kept tokens), other rows zero; the physical path overwrites the kept rows.
    """
    b, t = skip.shape
    prev = state.call.prev_kv
    if state.plan.copy_kv and prev is not None and prev[0] == layer_idx - 1 and prev[1].shape[0] == b \
            and prev[1].shape[2] == t:
        return prev[1], prev[2]
    s = int(skip.sum(1).max()) if per_row is None else per_row
    if s == t:
        return project_kv(attn, x, cos.expand(b, -1, -1), sin.expand(b, -1, -1))
    idx = torch.argsort((~skip).to(torch.uint8), dim=1, stable=True)[:, :s]  # skipped tokens first
    flat = flat_positions(idx, t)
    ks, vs = project_kv(attn, *(take_positions(z, idx, flat) for z in (x, cos, sin)))
    heads, d = ks.shape[1], ks.shape[3]
    at = flat_positions(idx, t, heads)
    zeros = ks.new_zeros(b * heads * t, d)
    return tuple(zeros.index_copy(0, at, z.reshape(b * heads * s, d)).view(b, heads, t, d) for z in (ks, vs))


def take_positions(z: torch.Tensor, idx: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``z`` [R or 1, t, ...] at positions ``idx`` [R, n] -> [R, n, ...] (``flat``: ``idx`` + row * t, flattened).

    ``index_select`` over the flattened rows: ~10x faster on CPU than ``gather`` with an expanded index
    (SmolLM2 prefill shapes, docs/benchmark-log.md). A tensor shared by the batch (leading 1) is not expanded.
    """
    r, n = idx.shape
    rest = z.shape[2:]
    if z.shape[0] == 1 and r > 1:
        return z[0].index_select(0, idx.reshape(-1)).view(r, n, *rest)
    return z.reshape(r * z.shape[1], *rest).index_select(0, flat).view(r, n, *rest)


def flat_positions(idx: torch.Tensor, t: int, heads: int = 1) -> torch.Tensor:
    """Positions ``idx`` [R, n] as rows of a [R, heads, t, ...] tensor flattened to [R * heads * t, ...], every head."""
    r = idx.shape[0]
    return (torch.arange(r * heads, device=idx.device).view(r, heads, 1) * t + idx[:, None, :]).reshape(-1)


class GatheredKV:
    """Stands in for ``past_key_values`` when an attention runs on gathered tokens (physical path).

    The attention hands over K/V of its gathered tokens ([R, H_kv, N, D]); we place the kept ones
    into ``base`` (the K/V of every token, skipped rows already right), store that full K/V for the
    next layer and in the real cache, and return the rows (``rows``) the attention runs on.
    """

    __slots__ = ("cache", "state", "base_k", "base_v", "idx", "slot_kept", "rows")

    def __init__(self, cache, state, base_k, base_v, idx, slot_kept, rows):
        self.cache, self.state, self.base_k, self.base_v = cache, state, base_k, base_v
        self.idx, self.slot_kept, self.rows = idx, slot_kept, rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self._fill(self.base_k, key_states), self._fill(self.base_v, value_states)
        self.state.call.prev_kv = (layer_idx, k, v)
        if self.cache is not None:
            k, v = self.cache.update(k, v, layer_idx, *args, **kwargs)
        if self.rows is not None:
            k, v = k[self.rows], v[self.rows]
        return k, v

    def _fill(self, base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        idx, slot = (self.idx, self.slot_kept) if rows is None else (self.idx[rows], self.slot_kept[rows])
        part = base if rows is None else base[rows]
        r, heads, t, d = part.shape
        n = idx.shape[1]
        # (row, head, position) flattened: index_select / index_copy, not gather / scatter (take_positions)
        at = flat_positions(idx, t, heads)
        flat = part.reshape(r * heads * t, d)
        # padding slots (skipped tokens the attention saw anyway) keep what skipping leaves them
        vals = new.to(base.dtype)
        if slot is not None:  # None: every slot holds a kept token (batch 1)
            vals = torch.where(slot[:, None, :, None], vals, flat.index_select(0, at).view(r, heads, n, d))
        full = flat.index_copy(0, at, vals.reshape(r * heads * n, d)).view(r, heads, t, d)
        return full if rows is None else base.index_copy(0, rows, full)

    def __getattr__(self, name):
        return getattr(self.cache, name)
