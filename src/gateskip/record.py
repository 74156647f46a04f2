"""One record on a model of everything gateskip did to it: ``model.gateskip`` (a ``ModelRecord``).

Loading, gating, quantizing and pruning each leave what they must undo or save later here, in one place
instead of loose attributes: ``save_gates`` reads the source and the pruning, ``remove_gates`` and
``load_gates`` read the quantization, and every runtime call goes through ``state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTR = "gateskip"


@dataclass
class ModelRecord:
    source: str | None = None  # the name or folder the model was loaded from (models.load_model)
    state: Any = None  # the GateState while gates are attached (core.add_gates / remove_gates)
    quant: dict | None = None  # weight-only quantization of the backbone (quantize.py)
    pruned: list[int] | None = None  # original indices of the removed layers (prune.py)
    layers_before_pruning: int | None = None


def model_record(model) -> ModelRecord:
    """``model``'s record, created empty on first use."""
    rec = getattr(model, ATTR, None)
    if rec is None:
        rec = ModelRecord()
        setattr(model, ATTR, rec)
    return rec


def peek(model) -> ModelRecord:
    """``model``'s record, or an empty one (not attached) if gateskip never touched it."""
    rec = getattr(model, ATTR, None)
    return rec if rec is not None else ModelRecord()
