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


def answer_positions(ids: torch.Tensor, header: list[int], ends: list[int]) -> torch.Tensor:
    """[B, T] True at the positions whose next token belongs to an assistant answer of chat-formatted text: from the
    last token of ``header`` (the template's generation prompt, e.g. ``<|im_start|>assistant\\n``) up to the position
    before the first of ``ends`` (end-of-turn ids) after it, so that the end of the answer is predicted too. What
    generation is judged on: ``TrainArgs.loss_on="answers"`` scores these positions only. Text before a row's first
    header (a request, plain text, or an answer cut by packing) is not an answer."""
    if not header:
        raise GateSkipError("answer_positions needs the header that opens an answer (the chat template's generation "
                            "prompt)")
    b, t = ids.shape
    n = len(header)
    at = torch.zeros(b, t, dtype=torch.bool, device=ids.device)
    if t >= n:  # the header's last token at position i + n - 1
        win = ids.unfold(1, n, 1)  # [B, T - n + 1, n]
        at[:, n - 1:] = (win == torch.tensor(header, device=ids.device)).all(-1)
    pos = torch.arange(t, device=ids.device).expand(b, t)
    none = torch.full_like(pos, -1)
    last_header = torch.where(at, pos, none).cummax(1).values
    last_end = torch.where(torch.isin(ids, torch.tensor(ends, device=ids.device)), pos, none).cummax(1).values
    return (last_header >= 0) & (last_header > last_end)


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
