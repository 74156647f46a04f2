"""The gate modules: g = sigmoid(f(x)), one value per hidden unit (or one per token).

Token importance for a branch is the mean gate value over hidden units (the paper's ranking key).
Gates are kept in float32 whatever the backbone's dtype, so that bf16 or 4-bit backbones do not
quantise the ranking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gateskip.config import GateSkipConfig


class Gate(nn.Module):
    """sigmoid(f(x)) with f linear (vector/scalar), low-rank, or a small MLP."""

    def __init__(self, hidden: int, cfg: GateSkipConfig):
        super().__init__()
        self.kind = cfg.gate
        if cfg.gate == "vector":
            self.proj = nn.Linear(hidden, hidden)
        elif cfg.gate == "scalar":
            self.proj = nn.Linear(hidden, 1)
        elif cfg.gate == "lowrank":
            self.proj = nn.Sequential(nn.Linear(hidden, cfg.rank, bias=False), nn.Linear(cfg.rank, hidden))
        else:  # "mlp": H -> 2H -> ReLU -> H (the paper's MLP-gate ablation)
            self.proj = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))
        self.reset(cfg)
        self.float()
        # Linear layers held in a plain tuple (not registered twice) and called functionally: indexing
        # nn.Sequential and nested module calls cost ~3 us each, a measurable share of a decode step at
        # batch 1 (60 gates per token). The small-MLP gate keeps its Sequential.
        self._linears = None if cfg.gate == "mlp" else (
            (self.proj,) if isinstance(self.proj, nn.Linear) else (self.proj[0], self.proj[1]))

    @torch.no_grad()
    def reset(self, cfg: GateSkipConfig) -> None:
        linears = [m for m in self.proj.modules() if isinstance(m, nn.Linear)]
        for m in linears:
            nn.init.normal_(m.weight, 0.0, cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        last = linears[-1]
        last.bias.fill_(cfg.init_bias)
        if self.kind == "lowrank":
            # down ~ N(0, 1/H) keeps |down x| ~ |x|; up ~ N(0, std^2 H / rank) then gives the gate
            # logits the same spread as a vector gate with weights N(0, std^2). An all-zero `up` would
            # make every token's importance equal at the start, and ties are broken by position, so
            # the first tokens (the attention sink) would be the ones skipped.
            h, r = linears[0].in_features, linears[0].out_features
            nn.init.normal_(linears[0].weight, 0.0, h ** -0.5)
            nn.init.normal_(last.weight, 0.0, cfg.init_std * (h / r) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate values in (0, 1), shape ``x.shape[:-1] + (H or 1,)``, float32."""
        if x.dtype != torch.float32:
            x = x.float()
        # sigmoid in place on the fresh logits: one large allocation less per call (prefill, low-rank gate:
        # ~2.3 -> ~1.7 ms at 4 x 512 tokens); autograd allows it, linear's backward does not need its output
        lin = self._linears
        if lin is None:
            return self.proj(x).sigmoid_()
        # parameters read from ``_parameters`` directly: ``lin[0].weight`` goes through Module.__getattr__,
        # a Python frame per read (~1 us of the ~8 us a gate costs at decode batch 1)
        p = lin[0]._parameters
        if len(lin) == 1:
            return F.linear(x, p["weight"], p["bias"]).sigmoid_()
        q = lin[1]._parameters
        return F.linear(F.linear(x, p["weight"]), q["weight"], q["bias"]).sigmoid_()


def importance(g: torch.Tensor) -> torch.Tensor:
    """Per-token importance: mean gate value over hidden units, shape ``g.shape[:-1]``."""
    if g.shape[-1] == 1:  # scalar gate: the value itself (a view, no reduction kernel)
        return g.squeeze(-1)
    return g.mean(dim=-1)


def gate_flops(hidden: int, cfg: GateSkipConfig) -> int:
    """Multiply-add FLOPs (2 per MAC) one token spends in one gate."""
    if cfg.gate == "vector":
        return 2 * hidden * hidden
    if cfg.gate == "scalar":
        return 2 * hidden
    if cfg.gate == "lowrank":
        return 2 * 2 * hidden * cfg.rank
    return 2 * 2 * hidden * 2 * hidden
