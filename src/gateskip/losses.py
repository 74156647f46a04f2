"""Training losses as small pure functions (each tested in isolation).

``gates`` below is the list of ``(g, valid)`` pairs one forward call logged, one per gated
branch: ``g`` [B, T, H or 1] gate values in (0, 1), ``valid`` [B, T] False at padding. Means run
over valid tokens, hidden units and branches, every branch weighted equally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gateskip.errors import GateSkipError


def _branch_means(gates, fn) -> torch.Tensor:
    per_branch = []
    for g, valid in gates:
        w = valid.to(g.dtype).unsqueeze(-1)
        per_branch.append((fn(g) * w).sum() / (w.sum() * g.shape[-1]).clamp(min=1))
    return torch.stack(per_branch).mean()


def sparsity_l2(gates) -> torch.Tensor:
    """mean(g^2): the paper's default sparsity penalty."""
    return _branch_means(gates, lambda g: g * g)


def sparsity_l1(gates) -> torch.Tensor:
    """mean|g| (= mean g, as gates are positive)."""
    return _branch_means(gates, lambda g: g.abs())


def sparsity_kl(gates, target: float) -> torch.Tensor:
    """KL(Bernoulli(target) || Bernoulli(mean gate)) per branch: pulls each branch's open-rate to ``target``."""
    rates = torch.stack([_branch_means([(g, v)], lambda x: x) for g, v in gates]).clamp(1e-6, 1 - 1e-6)
    t = torch.tensor(target, dtype=rates.dtype, device=rates.device)
    return (t * (t / rates).log() + (1 - t) * ((1 - t) / (1 - rates)).log()).mean()


SPARSITY_KINDS = ("l2", "l1", "kl")


def check_sparsity_kind(kind: str) -> str:
    """``kind`` if it names a sparsity penalty, else a one-line error (a typo must not train with another loss)."""
    if kind not in SPARSITY_KINDS:
        raise GateSkipError(f"sparsity kind {kind!r} is not supported: choose one of {', '.join(SPARSITY_KINDS)}")
    return kind


def sparsity(gates, kind: str = "l2", target: float = 0.5) -> torch.Tensor:
    """The sparsity penalty ``kind`` (l2: the paper's; l1; kl to the open rate ``target``)."""
    if check_sparsity_kind(kind) == "l2":
        return sparsity_l2(gates)
    if kind == "l1":
        return sparsity_l1(gates)
    return sparsity_kl(gates, target)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t (padding targets ignored)."""
    labels = input_ids[:, 1:].clone()
    if valid is not None:
        labels[~valid[:, 1:]] = -100
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over valid tokens (scaled by T^2 as usual)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)
    if valid is not None:
        kl = kl[valid]
    return kl.mean() * t * t
