"""Fallbacks: what a skipped token's branch output becomes instead of zero.

In the paper a skipped token's branch update is 0: its hidden state passes unchanged. A fallback
gives it a cheap map of the branch input x (what the wrapped module receives, after the pre-norm)
instead, fitted in closed form to the branch output y (before the gate multiplies it; for Gemma after
the post-norm, where the gate multiplies):

- ``mean``: y ~ b (the mean branch output): ~H FLOPs per skipped token;
- ``linear``: y ~ x W + b, W H x H: 2 H^2 FLOPs;
- ``lowrank``: y ~ (x A) B + b, A H x R, B R x H: 2 * 2 H R FLOPs.

The gate multiplies the fallback too: a branch adds ``g * f(x)`` for a kept token and ``g * fb(x)``
for a skipped one, on every path (masked, physical, one-token decode), so the fallback replaces the
branch and nothing else changes. A skipped token's K/V are unchanged (kv.py).

Fallback parameters are kept at float32 precision at least (float64 models: float64), as gates are,
and are ordinary trainable parameters. Unfitted, every fallback outputs 0 (the paper's behaviour).
``fallback_fit.fit_fallback`` fits them in closed form from calibration text.
"""

from __future__ import annotations

import torch
from torch import nn

from gateskip.record import peek


class MeanFallback(nn.Module):
    """fb(x) = b: the branch's mean output, whatever the token."""

    kind = "mean"

    def __init__(self, hidden: int, dtype=torch.float32):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.to(x.dtype).expand(x.shape)  # a broadcast view: callers multiply or copy it

    def set(self, w: torch.Tensor | None, b: torch.Tensor) -> None:
        self.bias.copy_(b)


class LinearFallback(nn.Module):
    """fb(x) = x W + b with W [H, H] (input by output)."""

    kind = "linear"

    def __init__(self, hidden: int, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden, hidden, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        flat = x.reshape(-1, x.shape[-1]).to(w.dtype)
        return torch.addmm(self.bias, flat, w).to(x.dtype).view(x.shape)

    def set(self, w: torch.Tensor, b: torch.Tensor) -> None:
        self.weight.copy_(w)
        self.bias.copy_(b)


class LowRankFallback(nn.Module):
    """fb(x) = (x A) B + b with A [H, R], B [R, H].

    Before fitting, A is random and B zero (LoRA's init): the output is 0, yet gradient training can
    move both (with A and B both zero neither would ever get a gradient).
    """

    kind = "lowrank"

    def __init__(self, hidden: int, rank: int, dtype=torch.float32):
        super().__init__()
        self.A = nn.Parameter(torch.randn(hidden, rank, dtype=dtype) * hidden ** -0.5)
        self.B = nn.Parameter(torch.zeros(rank, hidden, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.A
        flat = x.reshape(-1, x.shape[-1]).to(a.dtype)
        return torch.addmm(self.bias, flat @ a, self.B).to(x.dtype).view(x.shape)

    def set(self, w: torch.Tensor, b: torch.Tensor) -> None:
        self.A.copy_(w[0])
        self.B.copy_(w[1])
        self.bias.copy_(b)


def make_fallback(cfg, hidden: int, dtype: torch.dtype, device, kind: str = "attn") -> nn.Module | None:
    """The (unfitted: output 0) fallback module of a ``kind`` branch (``cfg.fallback_of(kind)``), or None
    for ``zero``.

    ``dtype``: the model's; parameters are kept at float32 precision at least."""
    what = cfg.fallback_of(kind)
    if what == "zero":
        return None
    dt = torch.promote_types(torch.float32, dtype) if dtype.is_floating_point else torch.float32
    if what == "mean":
        m = MeanFallback(hidden, dt)
    elif what == "linear":
        m = LinearFallback(hidden, dt)
    else:
        m = LowRankFallback(hidden, cfg.fallback_rank, dt)
    return m.to(device)


def gated_fallback(fb: nn.Module, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """What skipped tokens ``x`` add to the residual stream: g * fb(x) (``g``: None when the gate sat before)."""
    v = fb(x)
    return v * g if g is not None else v.contiguous()


def fallback_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Fallback modules by branch name (``layers.{i}.{kind}``); empty for ``fallback="zero"``."""
    return {b.name: b.fallback for b in peek(model).state.branches if b.fallback is not None}


def fallback_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in fallback_modules(model).values() for p in m.parameters()]
