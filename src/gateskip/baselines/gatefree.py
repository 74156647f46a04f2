"""The fine-tuned backbone without gates: the gates folder's backbone changes, gates fully open.

``load_gates`` applies a folder's LoRA or full fine-tuning deltas along with its gates; forcing
every gate to output exactly 1.0 then leaves that backbone as it would run without gates, while
``gateskip.skipping(policy="random")`` can still skip tokens. For gates trained on a frozen
backbone this is random skipping on the original model.
"""

from __future__ import annotations

import torch
from torch import nn

from gateskip.core import gate_modules


@torch.no_grad()
def open_gates(model) -> None:
    """Make every gate output exactly 1.0 (weights 0, bias 50: sigmoid(50) is 1.0 in float32)."""
    for gate in gate_modules(model).values():
        last = [m for m in gate.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.zero_()
        last.bias.fill_(50.0)
