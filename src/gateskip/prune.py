"""Structured layer pruning of a gated (or plain) model: whole decoder layers removed for good.

GateSkip and layer pruning are two axes: pruning removes the layers that matter least for every
token (ShortGPT's Block Influence picks them, see baselines/shortgpt.py), the gates then skip
token by token in the layers that remain. ``prune_layers`` removes layers in place and keeps the
gates (and calibration rows) of the rest, renumbered like the layers, so ``skipping``/``stats``/
``save_gates`` work unchanged. A gates folder saved from a pruned model records which layers of
the base model were removed; ``load_gates`` on the full base model prunes it the same way first.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateskip.arch import decoder_layers, keep_layers
from gateskip.errors import GateSkipError
from gateskip.record import model_record, peek


def prune_layers(model, drop: Iterable[int], recalibrate=None, ratio: float | None = None):
    """Remove decoder layers ``drop`` (current numbering) from ``model`` in place; returns ``model``.

    Args:
        drop: indices of the layers to remove.
        recalibrate: optional calibration batches (as for ``gateskip.calibrate``): the remaining
            gates see different inputs once layers are gone, so their thresholds can be re-fitted.
        ratio: calibration ratio for ``recalibrate`` (default: the one the gates were calibrated at).
    """
    from gateskip.core import calibrate, gate_state, is_gated

    layers = decoder_layers(model)
    drop = sorted({int(i) for i in drop})
    if any(not 0 <= i < len(layers) for i in drop) or len(drop) >= len(layers):
        raise GateSkipError(f"cannot prune layers {drop} of {len(layers)}: give valid indices and keep at least one")
    if not drop:
        return model
    keep = [i for i in range(len(layers)) if i not in drop]
    new_of = {old: new for new, old in enumerate(keep)}
    keep_layers(model, keep)  # for good: the undo is not kept
    original = _original_indices(model, len(layers))
    rec = model_record(model)
    rec.pruned = sorted(set(original) - {original[i] for i in keep})
    rec.layers_before_pruning = rec.layers_before_pruning or len(layers)
    if is_gated(model):
        st = gate_state(model)
        _prune_state(model, st, new_of)
        if recalibrate is not None:
            r = ratio if ratio is not None else (st.loaded.calibration or {}).get("ratio") or 0.3
            calibrate(model, recalibrate, ratio=r)
    return model


def _original_indices(model, n: int) -> list[int]:
    """Base-model index of each current layer (a model can be pruned more than once)."""
    pruned = set(peek(model).pruned or ())
    return [i for i in range(n + len(pruned)) if i not in pruned]


def _prune_state(model, st, new_of: dict[int, int]) -> None:
    """Drop the removed layers' branches from the gate state; renumber the rest like their layers."""
    from gateskip.flops import model_flops

    kept = [b for b in st.branches if b.layer in new_of]
    rows = [b.index for b in kept]
    st.flops = model_flops(model, st.cfg)
    for i, b in enumerate(kept):
        b.layer, b.index = new_of[b.layer], i
        b.name = f"layers.{b.layer}.{b.kind}"
        if b.kind == "attn":
            b.window = st.flops.windows[b.layer]
    st.branches = kept
    cal = st.loaded.calibration
    if cal is not None:
        st.loaded.calibration = {**cal, "grid": cal["grid"][rows]}
    st.call.prev_kv, st.plan, st.stats = None, None, None


def pruning_meta(model) -> dict:
    """What ``save_gates`` records about pruning (empty for an unpruned model)."""
    rec = peek(model)
    if not rec.pruned:
        return {}
    return {"pruned_layers": list(rec.pruned), "layers_before_pruning": rec.layers_before_pruning}


def apply_recorded_pruning(model, meta: dict) -> None:
    """Prune a full base model as the gates folder's model was (no-op if it already is)."""
    pruned = meta.get("pruned_layers") or []
    if not pruned:
        return
    n = len(decoder_layers(model))
    if n == meta["layers_before_pruning"] and not peek(model).pruned:
        prune_layers(model, pruned)
    elif list(peek(model).pruned or []) != list(pruned):
        raise GateSkipError(f"these gates belong to the base model with layers {pruned} pruned; this model has "
                            f"{n} layers: load the full base model")
