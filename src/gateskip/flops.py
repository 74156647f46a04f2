"""A per-token FLOP model of a decoder layer, used to report compute saved honestly.

Counts 2 FLOPs per multiply-add for every matmul that runs per token: attention projections,
attention scores and the weighted sum over the context (QK^T and AV), the MLP, the gates, and the
LM head rows actually computed, and the fallback a skipped token gets instead of its branch (a
skipped token saves the branch minus its fallback). Norms, rotary and softmax are ignored (< 1% here).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateskip.arch import text_config
from gateskip.config import GateSkipConfig
from gateskip.gates import gate_flops


@dataclass(frozen=True)
class LayerFlops:
    attn_qo: int  # q and o projections, per token
    attn_kv: int  # k and v projections, per token (needed for every token unless K/V are copied)
    attn_ctx: int  # QK^T + AV per token per context position attended
    mlp: int  # per token
    gate: int  # one gate, per token
    lm_head: int  # per computed logits row
    windows: tuple[int | None, ...]  # per layer: sliding window or None (full causal)
    fallback: int = 0  # one attention branch's fallback (fallback.py), per skipped token: 0 for the paper's zero
    fallback_mlp: int = 0  # one MLP branch's fallback, per skipped token

    def fallback_for(self, kind: str) -> int:
        """FLOPs a skipped token of a ``kind`` branch spends in its fallback."""
        return self.fallback_mlp if kind == "mlp" else self.fallback


def model_flops(model, cfg: GateSkipConfig) -> LayerFlops:
    c = text_config(model)
    h = c.hidden_size
    n_heads = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    head_dim = getattr(c, "head_dim", None) or h // n_heads
    inter = c.intermediate_size
    layer_types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    window = getattr(c, "sliding_window", None)
    windows = tuple(window if (t == "sliding_attention" and window) else None for t in layer_types)
    return LayerFlops(
        attn_qo=2 * h * n_heads * head_dim * 2,
        attn_kv=2 * h * n_kv * head_dim * 2,
        attn_ctx=2 * 2 * n_heads * head_dim,
        mlp=2 * 3 * h * inter,  # gate, up and down projections (SwiGLU / GeGLU)
        gate=gate_flops(h, cfg),
        lm_head=2 * h * c.vocab_size,
        windows=windows,
        fallback=fallback_flops(h, cfg, "attn"),
        fallback_mlp=fallback_flops(h, cfg, "mlp"),
    )


def fallback_flops(hidden: int, cfg: GateSkipConfig, kind: str = "attn") -> int:
    """FLOPs one skipped token of a ``kind`` branch spends in its fallback: mean adds a vector (H), linear
    is a H x H matmul (2 H^2), lowrank two thin ones (2 * 2 H R), neurons the gate and up projections of K
    neurons (2 * 2 H K) and a rank-R map of the H + K features (2 (H + K) R + 2 R H). Bias adds and the
    activation are ignored, as for the gates."""
    what = cfg.fallback_of(kind)
    if what == "mean":
        return hidden
    if what == "linear":
        return 2 * hidden * hidden
    if what == "lowrank":
        return 2 * 2 * hidden * cfg.rank_of(kind)
    if what == "neurons":
        k, r = cfg.fallback_neurons, cfg.rank_of(kind)
        return 2 * 2 * hidden * k + 2 * (hidden + k) * r + 2 * r * hidden
    return 0
