"""4-bit (or 8-bit) weight-only quantization of the backbone, combined with gates.

Only the linear layers inside the decoder layers are quantized (optimum-quanto ``QLinear``, weights
packed two per byte with a float scale and shift per group); the embeddings, the LM head, the norms
and every gate stay in full precision. ``docs/quantization.md`` says why optimum-quanto (measured
on this CPU) and how it runs on a GPU.

Both orders work: ``add_gates`` then ``quantize`` (the gates' wrappers hold the original attention /
MLP modules, whose linears are swapped in place; the gates are skipped), or ``quantize`` then
``add_gates`` / ``load_gates``. Gates folders that also change the backbone (LoRA deltas or full
fine-tuning) must be merged into full-precision weights *before* quantizing: 4-bit rounding of an
already-quantized weight would erase small deltas. So either load such gates first and quantize
after, or quantize with ``keep_float=True`` (the full-precision weights stay in memory and
``load_gates`` merges into them and re-quantizes the sum, giving the same weights as loading first);
otherwise ``load_gates`` refuses with a GateSkipError. ``remove_gates`` restores the quantized
original weights in either case.
"""

from __future__ import annotations

import torch
from torch import nn

from gateskip.errors import GateSkipError
from gateskip.record import model_record, peek

LIBRARIES = ("quanto",)
INSTALL = "pip install 'gateskip[quant]' (optimum-quanto)"


def quantize(model: nn.Module, bits: int = 4, group_size: int = 64, library: str = "quanto",
             keep_float: bool = False, optimizer: str = "minmax") -> nn.Module:
    """Quantize the weights of the decoder layers' linear layers in place; returns ``model``.

    ``group_size``: input features sharing one scale/shift (must divide every layer's input size;
    64 suits SmolLM2's 576). ``keep_float``: keep the full-precision weights in memory so gates
    folders with backbone deltas can be loaded afterwards (see the module docstring). ``optimizer``:
    how int4 scales and shifts are chosen: ``minmax`` (round to nearest, seconds) or ``hqq``
    (half-quadratic optimisation: lower error, ~15x slower to quantize; docs/quantization.md).
    """
    if library not in LIBRARIES:
        raise GateSkipError(f"quantization library {library!r} is not supported: choose {', '.join(LIBRARIES)}")
    if bits not in (4, 8):
        raise GateSkipError(f"bits={bits} is not supported: choose 4 (int4, grouped) or 8 (int8, per channel)")
    if optimizer not in ("minmax", "hqq"):
        raise GateSkipError(f"optimizer={optimizer!r} is not supported: choose minmax or hqq")
    if is_quantized(model):
        raise GateSkipError("this model is already quantized: load it again to quantize with other settings")
    quanto = _quanto()
    targets = [t for t in _targets(model) if type(t[2]) is nn.Linear]
    if not targets:
        raise GateSkipError(f"cannot quantize {type(model).__name__}: its decoder layers hold no nn.Linear layers")
    if bits == 4:
        bad = sorted({m.in_features for _, _, m in targets if m.in_features % group_size})
        if group_size < 1 or bad:
            raise GateSkipError(f"group_size={group_size} does not divide the input sizes {bad}: pick a divisor "
                                "of every layer's input size (e.g. 32 or 64)")
    qtype = quanto.qint4 if bits == 4 else quanto.qint8
    opt = quanto.HqqOptimizer() if optimizer == "hqq" and bits == 4 else None  # None: quanto's default
    full = {} if keep_float else None
    with torch.no_grad():
        for layer, name, lin in targets:
            q = quanto.QLinear.from_module(lin, weights=qtype, optimizer=opt)
            q.weight_group_size = group_size if bits == 4 else None
            q.freeze()
            q.requires_grad_(False)
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, q)
            if full is not None:  # on the CPU: on a GPU the float copy would take the memory int4 saves
                full[id(q)] = lin.weight.detach().cpu()
    model_record(model).quant = {"library": library, "bits": bits, "group_size": group_size if bits == 4 else None,
                                 "optimizer": optimizer if bits == 4 else "absmax", "float": full}
    _requantize_backup(model)
    return model


def is_quantized(model: nn.Module) -> bool:
    return peek(model).quant is not None


def is_quantized_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "QLinear" and getattr(module, "weight_qtype", None) is not None


def describe(model: nn.Module) -> str:
    q = peek(model).quant
    if q is None:
        return "full precision"
    group = f", group {q['group_size']}, {q['optimizer']}" if q["group_size"] else ""
    return f"int{q['bits']} weight-only ({q['library']}{group})"


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(decoder layer, name in it, module) of every linear layer quantize() handles (gates excluded)."""
    from gateskip.arch import decoder_layers

    try:
        layers = decoder_layers(model)
    except GateSkipError as e:
        raise GateSkipError(f"cannot quantize this model: {e}") from None
    gates = {id(m) for b in getattr(peek(model).state, "branches", []) for m in b.gate.modules()}
    return [(layer, name, m) for layer in layers for name, m in layer.named_modules()
            if (type(m) is nn.Linear or is_quantized_linear(m)) and id(m) not in gates]


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the weights as stored (``total``) and of the decoder layers' linears (``linears``,
    quantized or not): quantized linears count their packed data, scales and shifts."""
    linears = {id(m) for _, _, m in _targets(model)}
    seen, total, quant = set(), 0, 0
    for m in model.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if id(t) in seen:
                continue
            seen.add(id(t))
            n = _tensor_bytes(t)
            total += n
            quant += n if id(m) in linears else 0
    return {"total": total, "linears": quant}


def _tensor_bytes(t: torch.Tensor) -> int:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is None:
        return t.numel() * t.element_size()
    attrs, _ = inner()
    return sum(_tensor_bytes(getattr(t, a)) for a in attrs)


# ---- eval / bench --quant ------------------------------------------------------------------------

QUANT_BITS = {"none": None, "int4": 4, "int8": 8}


def check_quant(quant: str) -> int | None:
    """Bits of a ``--quant`` value (none, int4, int8)."""
    if quant not in QUANT_BITS:
        raise GateSkipError(f"quant={quant!r} is not supported: choose {', '.join(QUANT_BITS)}")
    return QUANT_BITS[quant]


# ---- backbone deltas (load_gates / remove_gates) ------------------------------------------------

def _owner(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    mod, _, attr = param_name.rpartition(".")
    return model.get_submodule(mod), attr


@torch.no_grad()
def merge_delta(model: nn.Module, module: nn.Module, delta: torch.Tensor | None = None,
                new: torch.Tensor | None = None) -> torch.Tensor:
    """Backbone change on a quantized linear: ``W + delta`` or ``new``, re-quantized from full precision.

    Returns the quantized weight it replaced (what ``remove_gates`` puts back).
    """
    full = peek(model).quant["float"]
    if full is None:
        raise GateSkipError("these gates change the backbone (LoRA / full fine-tune), which must be merged before "
                            "quantizing: load the gates first and quantize after, or quantize with keep_float=True")
    base = full[id(module)]
    w = new.to("cpu", base.dtype) if new is not None else base + delta.to("cpu", base.dtype)
    old = module.weight
    _set_float(module, w)
    return old


@torch.no_grad()
def restore_weight(model: nn.Module, param_name: str, original: torch.Tensor) -> None:
    """Put a backed-up weight back (``remove_gates``): quantized weights are swapped, others copied."""
    module, attr = _owner(model, param_name)
    if is_quantized_linear(module) and attr == "weight":
        if _is_qtensor(original):
            module.weight = original
        else:  # a full-precision original backed up before quantizing: quantized as quantize() would
            _set_float(module, original)
        return
    getattr(module, attr).copy_(original)


def _set_float(module: nn.Module, w: torch.Tensor) -> None:
    module.weight = nn.Parameter(w.to(module.weight.device, copy=True), requires_grad=False)
    module.freeze()
    module.weight.requires_grad_(False)


def _is_qtensor(t) -> bool:
    return isinstance(t, _quanto().QTensor)


@torch.no_grad()
def _requantize_backup(model: nn.Module) -> None:
    """Gates already merged deltas: their float backups become quantized, so remove_gates gives Q(original)."""
    st = peek(model).state
    if st is None:
        return
    for name, original in list(st.loaded.backup.items()):
        module, attr = _owner(model, name)
        if is_quantized_linear(module) and attr == "weight":
            current = module.weight
            _set_float(module, original)
            st.loaded.backup[name] = module.weight  # Q(original)
            module.weight = current  # Q(original + delta), what quantize() just made
            if peek(model).quant["float"] is not None:
                peek(model).quant["float"][id(module)] = original.detach().cpu()


def _quanto():
    try:
        import optimum.quanto as quanto
    except ImportError:
        raise GateSkipError(f"quantization needs optimum-quanto, which is not installed: {INSTALL}") from None
    return quanto
