"""From a model and a gates folder to a model ready to run: the steps every command shares.

Above the kernel (core, checkpoint, quantize): nothing below imports this module.
"""

from __future__ import annotations

from torch import nn

from gateskip.checkpoint import load_gates, read_meta
from gateskip.errors import GateSkipError
from gateskip.quantize import check_quant, quantize

DEFAULT_MODEL = "smollm2-135m"


def base_model_name(model: str | None, gates: str | None) -> str:
    """The model to load: ``model`` if given, else the base model a gates folder records, else the default."""
    if model:
        return model
    if not gates:
        return DEFAULT_MODEL
    name = read_meta(gates).get("base_model", {}).get("source")
    if not name:
        raise GateSkipError(f"{gates!r} does not record its base model: pass --model")
    return name


def load_named(name: str, dtype: str = "float32", tiny_tokenizer: bool = True):
    """(model, tokenizer) of an alias, hub id or folder; ``tiny-<family>``: a tiny random model (its
    tokenizer a small stand-in, or None with ``tiny_tokenizer=False``)."""
    from gateskip import models

    if name.startswith("tiny-"):
        return models.tiny_model(name[len("tiny-"):]), models.tiny_tokenizer() if tiny_tokenizer else None
    return models.load_model(name, dtype=dtype)


def load_for_inference(model: str | None, gates: str | None, dtype: str = "float32"):
    """Base model (from ``model``, or the one a gates folder records) with those gates attached."""
    net, tok = load_named(base_model_name(model, gates), dtype=dtype)
    if gates:
        load_gates(net, gates)
    return net, tok


def quantize_for_run(model: nn.Module, quant: str, gates: str | None = None) -> nn.Module:
    """``--quant`` of eval / bench: quantize the backbone before the run (in place).

    The full-precision weights are kept only when the gates folder changes the backbone (LoRA / full),
    so its deltas are merged before rounding each time the run loads the gates.
    """
    bits = check_quant(quant)
    if bits is None:
        return model
    keep = gates is not None and read_meta(gates).get("backbone", "frozen") != "frozen"
    return quantize(model, bits=bits, keep_float=keep)
