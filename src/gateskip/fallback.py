"""Fallbacks: what a skipped token's branch output becomes instead of zero.

In the paper a skipped token's branch update is 0: its hidden state passes unchanged. A fallback
gives it a cheap map of the branch input x (what the wrapped module receives, after the pre-norm)
instead, fitted in closed form to the branch output y (before the gate multiplies it; for Gemma after
the post-norm, where the gate multiplies):

- ``mean``: y ~ b (the mean branch output): ~H FLOPs per skipped token;
- ``linear``: y ~ x W + b, W H x H: 2 H^2 FLOPs;
- ``lowrank``: y ~ (x A) B + b, A H x R, B R x H: 2 * 2 H R FLOPs;
- ``neurons`` (MLP branches): y ~ ([x, h_S(x)] A) B + b, where h_S(x) = act(x G) * (x U) is the branch's own
  activation on K of its neurons (G, U: their gate and up projection columns) and A is (H + K) x R: a
  nonlinear fallback, the MLP cut to the K neurons that the linear map explains worst, at
  2 * 2 H K + 2 (H + K) R + 2 R H FLOPs (K = R = 64: ~6% of SmolLM2's MLP).

The gate multiplies the fallback too: a branch adds ``g * f(x)`` for a kept token and ``g * fb(x)``
for a skipped one, on every path (masked, physical, one-token decode), so the fallback replaces the
branch and nothing else changes. A skipped token's K/V are unchanged (kv.py).

Fallback parameters are kept at float32 precision at least (float64 models: float64), as gates are,
and are ordinary trainable parameters. Unfitted, every fallback outputs 0 (the paper's behaviour).
``fallback_fit.fit_fallback`` fits them in closed form from calibration text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gateskip.errors import GateSkipError
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


class NeuronFallback(nn.Module):
    """fb(x) = ([x, act(x G) * (x U)] A) B + b with G, U [H, K] (stored side by side), A [H + K, R], B [R, H].

    ``act``: the MLP's own activation (its ``act_fn``). Before fitting G, U and B are zero (output 0) and A
    random, as in LowRankFallback; ``fallback_fit`` copies G and U from the chosen neurons' projections."""

    kind = "neurons"

    def __init__(self, hidden: int, neurons: int, rank: int, act, dtype=torch.float32):
        super().__init__()
        self.GU = nn.Parameter(torch.zeros(hidden, 2 * neurons, dtype=dtype))  # [G | U]: one matmul per call
        self.A = nn.Parameter(torch.randn(hidden + neurons, rank, dtype=dtype) * (hidden + neurons) ** -0.5)
        self.B = nn.Parameter(torch.zeros(rank, hidden, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden, dtype=dtype))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.A
        flat = x.reshape(-1, x.shape[-1]).to(a.dtype)
        k = self.GU.shape[1] // 2
        gu = flat @ self.GU
        h = flat.shape[1]
        za = torch.addmm(flat @ a[:h], self.act(gu[:, :k]) * gu[:, k:], a[h:])  # [x, n] A without building [x, n]
        return torch.addmm(self.bias, za, self.B).to(x.dtype).view(x.shape)

    @property
    def G(self) -> torch.Tensor:
        return self.GU[:, : self.GU.shape[1] // 2]

    @property
    def U(self) -> torch.Tensor:
        return self.GU[:, self.GU.shape[1] // 2:]

    def set(self, w: tuple, b: torch.Tensor) -> None:
        g, u, a, bb = w
        self.GU.copy_(torch.cat([g, u], 1))
        self.A.copy_(a)
        self.B.copy_(bb)
        self.bias.copy_(b)


def mlp_parts(module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, object]:
    """(gate_proj, up_proj, down_proj, act_fn) of a gated (SwiGLU / GeGLU) MLP, or a one-line error."""
    parts = tuple(getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    if any(p is None for p in parts):
        raise GateSkipError(f"fallback 'neurons' needs a gated MLP with gate_proj, up_proj, down_proj and act_fn; "
                            f"{type(module).__name__} lacks them: use fallback_mlp='lowrank' or 'linear'")
    return parts


@dataclass(frozen=True)
class FallbackKind:
    """One kind of fallback: its module, its cost and what fitting it takes, together. A new kind is one module
    class and one entry in ``FALLBACK``; the rest of the library asks these attributes, never the name.

    ``module``: the module class (None: ``zero``, nothing computed). ``mlp_only``: it needs an MLP's own
    neurons. ``uses_rank``: it has an inner rank (``GateSkipConfig.rank_of``). ``fits_weights``: its closed-form
    fit solves for a weight (not only a bias). ``flops(hidden, rank, neurons)``: what one skipped token spends
    in it (bias adds and the activation ignored, as for the gates)."""

    name: str
    module: type[nn.Module] | None
    flops: Callable[[int, int, int], int]
    mlp_only: bool = False
    uses_rank: bool = False
    fits_weights: bool = True

    def label(self, rank: int, neurons: int) -> str:
        """``lowrank64``, ``neurons64r128``, ``linear``: the kind with its sizes."""
        if self.mlp_only:
            return f"{self.name}{neurons}r{rank}"
        return f"{self.name}{rank}" if self.uses_rank else self.name

    def build(self, cfg, hidden: int, dt: torch.dtype, kind: str, module: nn.Module | None) -> nn.Module | None:
        if self.module is None:
            return None
        if self.module is NeuronFallback:
            if module is None:
                raise GateSkipError("fallback 'neurons' needs the branch's MLP module (make_fallback(..., module=mlp))")
            gate_proj, _, _, act = mlp_parts(module)
            width = gate_proj.out_features
            if cfg.fallback_neurons > width:
                raise GateSkipError(f"fallback_neurons={cfg.fallback_neurons} is above the MLP's {width} neurons: "
                                    f"use at most {width}")
            return NeuronFallback(hidden, cfg.fallback_neurons, cfg.rank_of(kind), act, dt)
        return self.module(hidden, cfg.rank_of(kind), dt) if self.uses_rank else self.module(hidden, dt)


FALLBACK = {k.name: k for k in (
    FallbackKind("zero", None, lambda h, r, k: 0, fits_weights=False),
    FallbackKind("mean", MeanFallback, lambda h, r, k: h, fits_weights=False),
    FallbackKind("linear", LinearFallback, lambda h, r, k: 2 * h * h),
    FallbackKind("lowrank", LowRankFallback, lambda h, r, k: 2 * 2 * h * r, uses_rank=True),
    FallbackKind("neurons", NeuronFallback, lambda h, r, k: 2 * 2 * h * k + 2 * (h + k) * r + 2 * r * h,
                 mlp_only=True, uses_rank=True),
)}


def is_zero(kind: str) -> bool:
    """``kind`` is the paper's zero: nothing replaces a skipped token's branch output (a label of per-kind
    fallbacks such as ``lowrank/neurons`` is not)."""
    return kind in FALLBACK and FALLBACK[kind].module is None


def with_rank(kind: str, rank: int | None) -> str:
    """``lowrank (rank 64)`` for a kind with an inner rank, else the kind's name."""
    return f"{kind} (rank {rank})" if kind in FALLBACK and FALLBACK[kind].uses_rank else kind


def make_fallback(cfg, hidden: int, dtype: torch.dtype, device, kind: str = "attn",
                  module: nn.Module | None = None) -> nn.Module | None:
    """The (unfitted: output 0) fallback module of a ``kind`` branch (``cfg.fallback_of(kind)``), or None
    for ``zero``.

    ``dtype``: the model's; parameters are kept at float32 precision at least. ``module``: the branch's
    module (the MLP, whose activation and width a ``neurons`` fallback needs)."""
    dt = torch.promote_types(torch.float32, dtype) if dtype.is_floating_point else torch.float32
    m = FALLBACK[cfg.fallback_of(kind)].build(cfg, hidden, dt, kind, module)
    return None if m is None else m.to(device)


def gated_fallback(fb: nn.Module, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """What skipped tokens ``x`` add to the residual stream: g * fb(x) (``g``: None when the gate sat before)."""
    v = fb(x)
    return v * g if g is not None else v.contiguous()


def fallback_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Fallback modules by branch name (``layers.{i}.{kind}``); empty for ``fallback="zero"``."""
    return {b.name: b.fallback for b in peek(model).state.branches if b.fallback is not None}


def fallback_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in fallback_modules(model).values() for p in m.parameters()]
