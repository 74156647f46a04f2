"""What runs beside the skip decision, each its own object, installed on the gate state only while it is used.

- ``GateLog`` (training): every branch's gate values with the valid mask, for the sparsity loss.
- ``ImportanceRecord`` (calibration): every branch's importances of the real tokens, for the quantile grids.
- ``Teacher`` (self-distillation): while installed, every branch runs as the model without gates.

``GateState`` keeps the branches and the decision; ``state.taps`` holds these (None: off), and the context managers
below put one on and take it off again, whatever happens inside.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from gateskip.errors import GateSkipError
from gateskip.record import peek


class GateLog:
    """Training: ``entries`` holds (gate values, valid mask) of every gated branch call, in execution order."""

    wants_importance = False

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def see(self, branch, g: torch.Tensor, valid: torch.Tensor, imp: torch.Tensor | None) -> None:
        self.entries.append((g, valid))


class ImportanceRecord:
    """Calibration: ``per_branch[i]`` holds branch i's scores of the real tokens (importances, or what a subclassed
    state ranks by), one CPU tensor per call."""

    wants_importance = True

    def __init__(self, n_branches: int) -> None:
        self.per_branch: list[list[torch.Tensor]] = [[] for _ in range(n_branches)]

    def see(self, branch, g: torch.Tensor, valid: torch.Tensor, imp: torch.Tensor | None) -> None:
        self.per_branch[branch.index].append(imp[valid].detach().float().cpu())

    def tokens(self) -> int:
        return int(sum(r.numel() for r in self.per_branch[0])) if self.per_branch else 0


@dataclass(frozen=True)
class Teacher:
    """Self-distillation's teacher: while installed, every branch runs its module alone, without gate or skipping."""


@dataclass
class Taps:
    """The observers and the teacher of one gate state (None: off)."""

    log: GateLog | None = None
    record: ImportanceRecord | None = None
    teacher: Teacher | None = None
    observers: tuple = field(default=(), init=False)  # the log and the record that are on, for on_gate

    def set(self, name: str, value) -> object:
        previous = getattr(self, name)
        setattr(self, name, value)
        self.observers = tuple(o for o in (self.log, self.record) if o is not None)
        return previous


@contextlib.contextmanager
def _tapped(model, name: str, value):
    st = peek(model).state
    if st is None:
        raise GateSkipError("this model has no gates: call gateskip.add_gates(model) or load_gates(model, dir) first")
    previous = st.taps.set(name, value)
    try:
        yield value
    finally:
        st.taps.set(name, previous)


def logging_gates(model):
    """``with logging_gates(model) as log:`` every gated branch call appends (gate values, valid) to ``log.entries``."""
    return _tapped(model, "log", GateLog())


def recording_importance(model):
    """``with recording_importance(model) as rec:`` every gated branch call appends its real tokens' importances to
    ``rec.per_branch[index]``."""
    st = peek(model).state
    return _tapped(model, "record", ImportanceRecord(len(st.branches) if st is not None else 0))


def gates_bypassed(model):
    """Run the gated model as if it had no gates (the dense teacher for self-distillation)."""
    return _tapped(model, "teacher", Teacher())


def check_not_bypassed(st, what: str) -> None:
    if st.taps.teacher is not None:
        raise GateSkipError(f"gates are bypassed (gates_bypassed is active): leave that context to {what}")
