"""Gates folders: what a trained run leaves behind, and how it is loaded back safely.

A gates folder holds
- ``gates.safetensors``: gate weights (``gates.<branch>.<param>``), fitted fallbacks
  (``fallback.<branch>.<param>``, kind and rank in the config), calibration quantiles
  (``calibration.grid``) and, for LoRA runs, the low-rank backbone deltas (``lora.<module>.A/B``);
- ``gateskip.json``: the gate config, the base model it was trained on (so ``--model`` can be
  left out), calibration and training facts;
- ``backbone.safetensors`` only for full fine-tuning (the changed backbone weights).

Only safetensors is ever read (no pickle, so no code execution from a file). Every file is
written to a temporary name and renamed, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gateskip.arch import decoder_layers, text_config
from gateskip.config import GateSkipConfig
from gateskip.core import add_gates, gate_modules, gate_state, is_gated, remove_gates
from gateskip.errors import GateSkipError
from gateskip.fallback import fallback_modules
from gateskip.files import atomic_write
from gateskip.quantize import is_quantized_linear, merge_delta
from gateskip.record import peek
from gateskip.version import __version__

GATES_FILE, META_FILE, BACKBONE_FILE = "gates.safetensors", "gateskip.json", "backbone.safetensors"
FORMAT = 1


def model_identity(model: nn.Module) -> dict:
    c = text_config(model)
    return {
        "source": peek(model).source or getattr(model.config, "_name_or_path", None),
        "model_type": model.config.model_type,
        "hidden_size": c.hidden_size,
        "num_layers": len(decoder_layers(model)),
        "vocab_size": c.vocab_size,
    }


def pruning_meta(model) -> dict:
    from gateskip.prune import pruning_meta as meta

    return meta(model)


def apply_recorded_pruning(model, meta: dict) -> None:
    from gateskip.prune import apply_recorded_pruning as apply

    apply(model, meta)


SAVE_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_gates(model: nn.Module, directory: str | os.PathLike, *, extra_tensors: dict | None = None,
               extra_meta: dict | None = None, dtype: str = "float32") -> Path:
    """Write gates, calibration and config to ``directory`` (created if needed).

    ``dtype``: how gate, fallback and LoRA weights are stored: float32 (as trained; float64 fallbacks of a
    float64 model stay float64), or float16 / bfloat16 to halve the folder (loading casts them back to
    the model's dtype; calibration thresholds stay float32; ``gateskip train --backbone full`` stores the backbone file
    in the same dtype)."""
    if dtype not in SAVE_DTYPES:
        raise GateSkipError(f"unknown storage dtype {dtype!r}: choose from {', '.join(SAVE_DTYPES)}")
    store = SAVE_DTYPES[dtype]
    st = gate_state(model)
    d = Path(directory)
    tensors = {f"gates.{name}.{k}": v.detach().to(store or torch.float32).cpu().contiguous()
               for name, g in gate_modules(model).items() for k, v in g.state_dict().items()}
    # float32, or float64 for a float64 model: as the fallback keeps them (fallback.make_fallback)
    tensors.update({f"fallback.{name}.{k}": (v.detach().to(store) if store else v.detach()).cpu().contiguous()
                    for name, fb in fallback_modules(model).items() for k, v in fb.state_dict().items()})
    meta = {"format": FORMAT, "gateskip_version": __version__, "config": st.cfg.to_dict(),
            "base_model": model_identity(model), "backbone": "frozen"}
    cal = st.loaded.calibration
    if cal is not None:
        tensors["calibration.grid"] = cal["grid"].float().cpu().contiguous()
        meta["calibration"] = {"ratio": cal["ratio"], "tokens": cal["tokens"]}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().float().cpu().contiguous()
    meta.update(pruning_meta(model))  # load_gates prunes a full base model the same way
    backbone = None if "backbone" in (extra_meta or {}) else _loaded_backbone(model, tensors, meta)
    if store:  # LoRA deltas too (loading computes B @ A in float32)
        tensors.update({k: v.to(store) for k, v in tensors.items() if k.startswith("lora.")})
    meta.update(extra_meta or {})
    d.mkdir(parents=True, exist_ok=True)
    if backbone:
        atomic_write(d / BACKBONE_FILE, lambda p: save_file(backbone, p))
    atomic_write(d / GATES_FILE, lambda p: save_file(tensors, p, metadata={"format": "gateskip"}))
    atomic_write(d / META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return d


def _loaded_backbone(model: nn.Module, tensors: dict, meta: dict) -> dict | None:
    """Re-saving gates that came with a backbone change (LoRA deltas, full fine-tune) keeps that change:
    without it the folder would load onto the base model as different weights, silently."""
    loaded = gate_state(model).loaded.backbone
    if not loaded:
        return None
    if pruning_meta(model) != loaded["pruning"]:  # the saved deltas name the layers as they were
        raise GateSkipError("cannot re-save gates whose backbone was changed by their folder (LoRA / full) after "
                            "pruning: prune the base model, then load and save, or keep the original folder")
    meta["backbone"] = loaded["kind"]
    if loaded["kind"] == "lora":
        tensors.update(loaded["tensors"])
        return None
    params = dict(model.named_parameters())
    if any(is_quantized_linear(m) for m in model.modules()):
        raise GateSkipError("cannot re-save full-backbone gates from a quantized model (its weights are rounded): "
                            "save them before quantizing, or keep the original folder")
    return {k: params[k].detach().float().cpu().contiguous() for k in loaded["params"]}


def read_meta(directory: str | os.PathLike) -> dict:
    d = Path(directory)
    f = d / META_FILE
    if not d.is_dir():
        raise GateSkipError(f"gates folder {str(d)!r} does not exist: pass the --out folder of `gateskip train`")
    if not f.is_file():
        raise GateSkipError(f"{str(d)!r} is not a gates folder (no {META_FILE}): pass the --out folder of `gateskip train`")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise GateSkipError(f"{f} is corrupt (not JSON): re-create the gates folder") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise GateSkipError(f"{f} is not a gateskip v{FORMAT} gates config: re-create the gates folder")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise GateSkipError(f"{path} is corrupt or not a safetensors file ({str(e).splitlines()[0][:80]}): "
                            "re-create the gates folder") from None


def load_gates(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the gates stored in ``directory`` to ``model`` (which must be the same base model)."""
    d = Path(directory)
    meta = read_meta(d)
    apply_recorded_pruning(model, meta)
    want, have = meta.get("base_model", {}), model_identity(model)
    for key in ("model_type", "hidden_size", "num_layers", "vocab_size"):
        if key in want and want[key] != have[key]:
            raise GateSkipError(
                f"gates in {str(d)!r} were trained for another model ({key} {want[key]} vs {have[key]} here; "
                f"trained on {want.get('source')!r}): load that model or train gates for this one")
    cfg = GateSkipConfig.from_dict(meta["config"])
    tensors = _read_tensors(d / GATES_FILE)
    if is_gated(model):
        remove_gates(model)
    add_gates(model, cfg)
    try:
        _load_gate_tensors(model, tensors, d)
        if "calibration.grid" in tensors:
            grid = tensors["calibration.grid"]
            if grid.shape[0] != len(gate_state(model).branches):
                raise GateSkipError(f"calibration in {str(d)!r} has {grid.shape[0]} branches, the model "
                                    f"{len(gate_state(model).branches)}: re-run calibration")
            cal = meta.get("calibration", {})
            gate_state(model).loaded.calibration = {"grid": grid, "ratio": cal.get("ratio"), "tokens": cal.get("tokens")}
        applied = _apply_backbone(model, tensors, d, meta)
        gate_state(model).loaded.backbone = applied and {**applied, "pruning": pruning_meta(model)}
    except BaseException:
        remove_gates(model)
        raise
    gate_state(model).loaded.meta = meta
    return model


def _load_gate_tensors(model: nn.Module, tensors: dict, d: Path) -> None:
    _load_modules(gate_modules(model), "gates", "gate", tensors, d)
    _load_modules(fallback_modules(model), "fallback", "fallback", tensors, d)


def _load_modules(modules: dict[str, nn.Module], prefix: str, what: str, tensors: dict, d: Path) -> None:
    """Load ``<prefix>.<name>.<param>`` into each module, refusing any missing, extra or misshapen tensor."""
    for name, g in modules.items():
        sd = {}
        for k, ref in g.state_dict().items():
            key = f"{prefix}.{name}.{k}"
            if key not in tensors:
                raise GateSkipError(f"{d / GATES_FILE} lacks {key}: the file does not match its config; re-create it")
            t = tensors[key]
            if t.shape != ref.shape or not t.is_floating_point():
                raise GateSkipError(f"{d / GATES_FILE}: {key} has shape {tuple(t.shape)} {t.dtype}, expected "
                                    f"{tuple(ref.shape)} float: {what}s for another model or config")
            sd[k] = t
        g.load_state_dict(sd)
    expected = {f"{prefix}.{n}.{k}" for n, g in modules.items() for k in g.state_dict()}
    extra = {k for k in tensors if k.startswith(prefix + ".")} - expected
    if extra:
        raise GateSkipError(f"{d / GATES_FILE} has unexpected {what} tensors ({sorted(extra)[:2]}...): "
                            f"{what}s for another model or config")


@torch.no_grad()
def _apply_backbone(model: nn.Module, tensors: dict, d: Path, meta: dict) -> dict | None:
    """Backbone changes from training: merge LoRA deltas, or load full fine-tuned weights.

    Returns what was applied (``Loaded.backbone`` of the state), so that ``save_gates`` can write it again."""
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())
    backup = gate_state(model).loaded.backup  # originals, so that remove_gates restores the base model exactly
    for key in [k for k in tensors if k.startswith("lora.") and k.endswith(".A")]:
        name = key[len("lora."):-len(".A")]
        a, b = tensors[key].float(), tensors.get(f"lora.{name}.B")
        b = None if b is None else b.float()
        target = mods.get(name)
        if b is None or target is None or not hasattr(target, "weight") or \
                tuple(target.weight.shape) != (b.shape[0], a.shape[1]):
            raise GateSkipError(f"{d / GATES_FILE}: LoRA delta for {name!r} does not fit this model: "
                                "gates for another model")
        if is_quantized_linear(target):  # merged into the full-precision weight, then re-quantized
            backup.setdefault(f"{name}.weight", merge_delta(model, target, delta=b @ a))
            continue
        backup.setdefault(f"{name}.weight", target.weight.detach().clone())
        target.weight += (b @ a).to(target.weight.dtype)
    if meta.get("backbone") == "full":
        f = d / BACKBONE_FILE
        if not f.is_file():
            raise GateSkipError(f"{str(d)!r} was trained with a full backbone but {BACKBONE_FILE} is missing")
        weights = _read_tensors(f)
        for k, v in weights.items():
            if k not in params or params[k].shape != v.shape:
                raise GateSkipError(f"{f}: {k} does not fit this model: weights for another model")
            owner = mods[k.rpartition(".")[0]]
            if is_quantized_linear(owner) and k.endswith(".weight"):
                backup.setdefault(k, merge_delta(model, owner, new=v))
                continue
            backup.setdefault(k, params[k].detach().clone())
            params[k].copy_(v.to(params[k].dtype))
        return {"kind": "full", "params": sorted(weights)}
    lora = {k: v for k, v in tensors.items() if k.startswith("lora.")}
    return {"kind": "lora", "tensors": lora} if lora else None
