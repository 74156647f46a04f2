"""ShortGPT layer pruning (Men et al., 2024): remove the decoder layers that change their input least.

Block Influence of layer i: ``BI_i = 1 - mean_t cos(h_in[t], h_out[t])`` on calibration text.
``linear_replaced`` keeps the layers but replaces each dropped one by a fitted linear map of its input (the
strongest static baseline). ``pruned`` removes layers from the decoder's ModuleList and renumbers what the KV cache relies on
(each attention's ``layer_idx``, the config's ``num_hidden_layers`` and ``layer_types``), so cached
generation keeps working; leaving the ``with`` block restores the model exactly (same objects).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from gateskip.arch import decoder_layers, keep_layers
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
    undo = keep_layers(model, [i for i in range(len(layers)) if i not in drop])
    try:
        yield [i for i in range(len(layers)) if i not in drop]
    finally:
        undo()


LINEAR_GATES = {"gate": "scalar", "init_std": 0.0, "init_bias": 1e4, "fallback": "linear", "kv": "copy"}


@contextlib.contextmanager
def linear_replaced(net, drop, batches, seed: int = 0):
    """ShortGPT with the layers ``drop`` replaced by fitted linear maps; yields ``(plan, fit summary)``.

    Built from the library's own parts: scalar gates fixed at exactly 1 (weights 0, bias 1e4:
    sigmoid(1e4) is 1.0 in float32) with ``linear`` fallbacks on every branch, and a plan that skips
    every token of the dropped layers' attention and MLP (ratio 1 under the random policy: u < 1 for
    every draw u in [0, 1); nothing protected, BOS included) and none elsewhere. Each dropped branch then
    outputs x W + b (the gate multiplies it by 1), every other branch its exact output. The fallbacks
    are fitted in closed form branch by branch under that plan (``fit_fallback(under_plan=...)``, with
    ``kv="compute"`` so that an attention's target is its own output), each on the inputs it sees with
    the earlier replacements installed (only the replaced branches are fitted: one pass each, stopped at
    its branch). Inside the block ``gateskip.skipping(net, **plan)`` runs the replaced model and
    ``gateskip.stats`` charges the maps (2 H^2 FLOPs per token and branch) and the scalar gates of
    every branch. The gates are removed on exit.
    """
    from gateskip.config import GateSkipConfig
    from gateskip.core import add_gates, remove_gates
    from gateskip.fallback_fit import fit_fallback

    add_gates(net, GateSkipConfig(**LINEAR_GATES))
    try:
        ratio = {f"layers.{i}.{kind}": 1.0 for i in sorted(drop) for kind in ("attn", "mlp")}
        plan = {"ratio": ratio, "policy": "random", "protect_first": 0, "kv": "copy", "seed": seed}
        # Fitted with kv="compute": under "copy" the masked path runs a skipped token's attention with the
        # K/V of the layer below, so the output recorded as the target would not be the attention's own.
        # Scored with kv="copy": nothing attends at a replaced layer, so its K/V are never read, and
        # "compute" would charge projecting them.
        fit = fit_fallback(net, batches, kind="linear", under_plan={**plan, "kv": "compute"}, branches=list(ratio))
        yield plan, fit
    finally:
        remove_gates(net)
