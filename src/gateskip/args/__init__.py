"""Typed argument groups, one dataclass per concern, shared by the library, the recipes and the CLI.

Each default is written once: here (training.py: text, start, loop, calibration, run; measuring.py: skipping,
suites, harness, comparison, allocation, timing, speculation) and, for the gates, in ``config.RECOMMENDED``.
``gateskip.train.fit`` takes a ``TrainArgs``, ``gateskip train`` takes the training groups, the CLI makes one flag
per field (commands/cli.py, help from each class's ``Args:``), and a recipe YAML (recipes/) is a flat or per-group
mapping of fields. Each group checks its own values on construction, so a command and the library never check
the same thing twice. gateskip/flags.py turns a flat set of flags (``--steps 200``, ``steps=200`` from Python or a
YAML) into groups: a name belongs to exactly one group of a command.
"""

from __future__ import annotations

from gateskip.args.measuring import (
    AllocateArgs,
    CompareArgs,
    HarnessArgs,
    RandomGatesArgs,
    SkipArgs,
    SpeculativeArgs,
    SuiteArgs,
    TimingArgs,
)
from gateskip.args.training import (
    BACKBONES,
    FITTED_GATES_RAMP,
    NEW_GATES_RAMP,
    OBJECTIVES,
    CalibrationArgs,
    RunArgs,
    StartArgs,
    TextArgs,
    TrainArgs,
)

__all__ = ["AllocateArgs", "BACKBONES", "CalibrationArgs", "CompareArgs", "FITTED_GATES_RAMP", "HarnessArgs",
           "NEW_GATES_RAMP", "OBJECTIVES", "RandomGatesArgs", "RunArgs", "SkipArgs", "SpeculativeArgs", "StartArgs", "SuiteArgs",
           "TextArgs", "TimingArgs", "TrainArgs"]
