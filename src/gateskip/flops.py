"""A per-token FLOP model of a decoder layer, used to report compute saved honestly.

Counts 2 FLOPs per multiply-add for every matmul that runs per token: attention projections,
attention scores and the weighted sum over the context (QK^T and AV), the MLP, the gates, and the
LM head rows actually computed, and the fallback a skipped token gets instead of its branch (a
skipped token saves the branch minus its fallback). Norms, rotary and softmax are ignored (< 1% here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def branch_costs(f: LayerFlops, kinds: list[str], kv: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(executed, dense): [branches, 4] FLOPs per unit of each column of the statistics' per-branch counts
    ``[skipped, valid, kept_ctx, valid_ctx]`` (state.Stats), for branches of ``kinds`` (in order), so that
    ``(counts * executed).sum()`` is what a physical run executes and ``(counts * dense).sum()`` what the dense model
    without gates does on the same tokens (LM head rows aside).

    A kept token runs its branch and gate; a skipped one its gate and fallback, and under ``kv="compute"`` its K/V
    projections. Attention over the context costs per position attended (kept tokens' context for the executed side).
    When only one kind has gates, the layer's other branch runs densely on both sides (an MLP branch's ``valid_ctx``
    is the context its layer's attention attends to: Stats.queue)."""
    gated = set(kinds)
    qkv = f.attn_qo + f.attn_kv
    executed, dense = [], []
    for kind in kinds:
        if kind == "attn":
            saved = f.attn_qo + (f.attn_kv if kv == "copy" else 0)
            e = [f.fallback_for(kind) - saved, qkv + f.gate, f.attn_ctx, 0.0]
            d = [0.0, qkv, 0.0, f.attn_ctx]
        else:
            e = [f.fallback_for(kind) - f.mlp, f.mlp + f.gate, 0.0, 0.0]
            d = [0.0, f.mlp, 0.0, 0.0]
        if "attn" not in gated:  # the ungated other branch, the same on both sides
            extra = [0.0, qkv, 0.0, f.attn_ctx]
        elif "mlp" not in gated:
            extra = [0.0, f.mlp, 0.0, 0.0]
        else:
            extra = [0.0] * 4
        executed.append([a + b for a, b in zip(e, extra)])
        dense.append([a + b for a, b in zip(d, extra)])
    return torch.tensor(executed, dtype=torch.float64), torch.tensor(dense, dtype=torch.float64)


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
    from gateskip.fallback import FALLBACK

    return FALLBACK[cfg.fallback_of(kind)].flops(hidden, cfg.rank_of(kind), cfg.fallback_neurons)
