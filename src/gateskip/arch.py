"""Architecture map: where each family keeps its decoder layers and branches.

We never copy a transformers forward. We only need to know, per family:
- where the list of decoder layers is;
- the attribute names of the attention and MLP branches (what gets wrapped);
- which norm (if any) sits between a branch and the residual add. Gemma 2/3 normalise the branch
  output (``post_attention_layernorm`` / ``post_feedforward_layernorm``) before adding it. A gate
  placed before such an RMS norm is largely cancelled by it (the norm rescales g * o back to unit
  RMS), so the gate must act after the norm: the wrapper takes that norm inside itself and the
  layer's attribute becomes an ``nn.Identity`` until ``remove_gates`` puts it back.
  (Careful: in Llama, ``post_attention_layernorm`` is the MLP's *pre*-norm; it is not touched.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gateskip.errors import GateSkipError


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_post_norm: str | None = None  # norm applied to the attention output before the residual add
    mlp_post_norm: str | None = None


_PRE_NORM = ArchSpec(layers="model.layers")
_GEMMA = ArchSpec(layers="model.layers", attn_post_norm="post_attention_layernorm",
                  mlp_post_norm="post_feedforward_layernorm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _PRE_NORM,
    "mistral": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "qwen3": _PRE_NORM,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gemma3": ArchSpec(layers="model.language_model.layers", attn_post_norm="post_attention_layernorm",
                       mlp_post_norm="post_feedforward_layernorm"),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GateSkipError(
            f"unsupported architecture {model_type!r}: gateskip supports {', '.join(sorted(ARCHITECTURES))} "
            "(add an ArchSpec to gateskip.arch.ARCHITECTURES for another pre-norm decoder)")
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    obj = model
    for part in arch_spec(model).layers.split("."):
        obj = getattr(obj, part)
    return obj


def keep_layers(model: nn.Module, keep: list[int]):
    """Keep only the decoder layers ``keep`` (current indices, in order); returns a function that puts the model
    back exactly. The one way layers are removed (prune.py for good, ShortGPT for the length of a run): the
    attention modules are renumbered (they index the KV cache by ``layer_idx``) and the configs' layer count and
    per-layer types follow."""
    layers = decoder_layers(model)
    path = arch_spec(model).layers.split(".")
    parent = model
    for part in path[:-1]:
        parent = getattr(parent, part)
    renumbered = []  # (module, its layer_idx before)
    for new, old in enumerate(keep):
        for mod in layers[old].modules():
            if isinstance(getattr(mod, "layer_idx", None), int) and "layer_idx" in vars(mod):
                renumbered.append((mod, mod.layer_idx))
                mod.layer_idx = new
    cfgs = list({id(c): c for c in (text_config(model), model.config)}.values())
    saved = [(c, {k: getattr(c, k) for k in ("num_hidden_layers", "layer_types") if hasattr(c, k)}) for c in cfgs]
    setattr(parent, path[-1], nn.ModuleList([layers[i] for i in keep]))
    n = len(layers)
    for c in cfgs:
        if getattr(c, "layer_types", None) is not None and len(c.layer_types) == n:
            c.layer_types = [c.layer_types[i] for i in keep]
        if getattr(c, "num_hidden_layers", None) == n:
            c.num_hidden_layers = len(keep)

    def undo() -> None:
        setattr(parent, path[-1], layers)
        for c, values in saved:
            for k, v in values.items():
                setattr(c, k, v)
        for mod, idx in renumbered:
            mod.layer_idx = idx

    return undo


def text_config(model: nn.Module):
    """The config holding the decoder's sizes (multimodal Gemma 3 nests it)."""
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def project_kv(attn: nn.Module, x, cos, sin):
    """The K/V (after ``k_norm`` where the family has one, and rotary) that ``attn`` computes for ``x``.

    ``x``: [B, T, H] branch input; ``cos``/``sin``: [B, T, D]. Returns [B, H_kv, T, D] each. Used where
    a skipped token's K/V must be computed without running the whole attention (``kv="compute"``).
    The family's own ``apply_rotary_pos_emb`` is used, so only the projection names are assumed.
    """
    import sys

    shape = (*x.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape)
    if getattr(attn, "k_norm", None) is not None:  # Qwen3, Gemma 3: RMS norm over the head dim
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    _, k = rotary(k, k, cos, sin)  # the query slot is unused (rotary is cheap next to the projections)
    return k, v
