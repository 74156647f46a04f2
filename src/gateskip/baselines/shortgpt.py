"""ShortGPT layer pruning (Men et al., 2024): remove the decoder layers that change their input least.

Block Influence of layer i: ``BI_i = 1 - mean_t cos(h_in[t], h_out[t])`` on calibration text.
``pruned`` removes layers from the decoder's ModuleList and renumbers what the KV cache relies on
(each attention's ``layer_idx``, the config's ``num_hidden_layers`` and ``layer_types``), so cached
generation keeps working; leaving the ``with`` block restores the model exactly (same objects).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from gateskip.arch import arch_spec, decoder_layers, text_config
from gateskip.core import is_gated
from gateskip.errors import GateSkipError


@torch.no_grad()
def block_influence(model, batches: Iterable[torch.Tensor]) -> list[float]:
    """BI of every decoder layer, averaged over all tokens of ``batches`` (input_ids tensors)."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def before(i):
        def hook(_m, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def after(i):
        def hook(_m, _a, _k, out):
            h_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).float(), h_out.float(), dim=-1)
            sums[i] += cos.double().sum().cpu()
        return hook

    handles = [h for i, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(before(i), with_kwargs=True),
        layer.register_forward_hook(after(i), with_kwargs=True))]
    device = next(model.parameters()).device
    try:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise GateSkipError("block_influence got no calibration batches: pass input_ids tensors")
    return (1.0 - sums / count).tolist()


def least_influential(influence: list[float], n: int) -> list[int]:
    """Indices of the ``n`` layers with the lowest Block Influence, lowest first."""
    return sorted(range(len(influence)), key=lambda i: (influence[i], i))[:n]


@contextlib.contextmanager
def pruned(model, drop: Iterable[int]):
    """Run ``model`` without the decoder layers ``drop`` inside the ``with`` block."""
    if is_gated(model):
        raise GateSkipError("ShortGPT prunes the model without gates: call gateskip.remove_gates(model) first")
    drop = sorted(set(drop))
    layers = decoder_layers(model)
    if any(not 0 <= i < len(layers) for i in drop) or len(drop) >= len(layers):
        raise GateSkipError(f"cannot drop layers {drop} of {len(layers)}: keep at least one valid layer")
    path = arch_spec(model).layers.split(".")
    parent = model
    for part in path[:-1]:
        parent = getattr(parent, part)
    cfg = text_config(model)
    keep = [i for i in range(len(layers)) if i not in drop]
    saved_cfg = {k: getattr(cfg, k) for k in ("num_hidden_layers", "layer_types") if hasattr(cfg, k)}
    renumbered = []  # (module, original layer_idx): attention modules index the KV cache by it
    for new, old in enumerate(keep):
        for mod in layers[old].modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                renumbered.append((mod, mod.layer_idx))
                mod.layer_idx = new
    setattr(parent, path[-1], torch.nn.ModuleList([layers[i] for i in keep]))
    cfg.num_hidden_layers = len(keep)
    if saved_cfg.get("layer_types") is not None:
        cfg.layer_types = [saved_cfg["layer_types"][i] for i in keep]
    try:
        yield keep
    finally:
        setattr(parent, path[-1], layers)
        for k, v in saved_cfg.items():
            setattr(cfg, k, v)
        for mod, idx in renumbered:
            mod.layer_idx = idx
