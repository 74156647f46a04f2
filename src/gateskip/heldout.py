"""Scores of a model on held-out text: next-token cross-entropy, and KL to the dense model's next-token
distribution, per token. The fast local reference that ``gateskip fit`` and ``gateskip.allocate`` measure settings
with (run them inside ``gateskip.skipping``); eval/fidelity.py re-exports them."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gateskip.errors import GateSkipError


def _rows(ids: torch.Tensor) -> torch.Tensor:
    return ids if ids.dim() == 2 else ids.unsqueeze(0)


def _around(each, i: int):
    return contextlib.nullcontext() if each is None else each(i)


def _next_token_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits predicting tokens 1.. of each row of ``ids`` (no cache)."""
    return model(input_ids=ids, use_cache=False).logits[:, :-1].float()


@torch.no_grad()
def language_ce(model, batches, each=None) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` on ``batches`` of ``input_ids``, token-weighted.

    Run it inside ``gateskip.skipping`` to measure a setting on held-out text (the fast local
    reference that commands such as ``gateskip fit`` report between random and oracle choice). ``each(i)``: a
    context manager entered around batch i (e.g. the Fisher oracle's scores of that batch, oracle_scores.py)."""
    total, count = 0.0, 0
    for i, ids in enumerate(batches):
        ids = _rows(ids)
        with _around(each, i):
            logits = _next_token_logits(model, ids)
        target = ids[:, 1:].to(logits.device)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    if count == 0:
        raise GateSkipError("language_ce got no tokens: pass batches of input_ids with at least 2 tokens per row")
    return total / count


def reference_logprobs(model, batches) -> list[torch.Tensor]:
    """The model's next-token log-probabilities on ``batches`` (one [B, T-1, V] tensor per batch), the reference
    of ``language_kl``. Call it on the dense model (``original_backbone``, no skipping)."""
    out = []
    with torch.no_grad():
        for ids in batches:
            out.append(F.log_softmax(_next_token_logits(model, _rows(ids)), dim=-1))
    return out


def language_kl(model, batches, reference: list[torch.Tensor], each=None) -> float:
    """Mean KL(reference || model) per predicted token (nats) on ``batches``, against ``reference_logprobs`` of
    the same batches. Needs no labels and does not reward fitting the text itself: a setting that makes the model
    better at the held-out text than the dense model (a healed backbone on its own domain) scores above 0, not
    below the dense model as CE would have it. ``each``: as ``language_ce``'s."""
    if len(reference) != len(batches):
        raise GateSkipError(f"language_kl got {len(batches)} batches and {len(reference)} references: "
                            "compute reference_logprobs on the same batches")
    total, count = 0.0, 0
    with torch.no_grad():
        for i, (ids, ref) in enumerate(zip(batches, reference)):
            with _around(each, i):
                logp = F.log_softmax(_next_token_logits(model, _rows(ids)), dim=-1)
            if logp.shape != ref.shape:
                raise GateSkipError(f"language_kl: reference of shape {tuple(ref.shape)} for logits of shape "
                                    f"{tuple(logp.shape)}: compute reference_logprobs on the same batches")
            # per token KL >= 0; clamping removes float noise (a gated folder at ratio 0 gave -2e-8)
            total += float((ref.exp() * (ref - logp)).sum(-1).clamp(min=0).sum())
            count += logp.shape[0] * logp.shape[1]
    if count == 0:
        raise GateSkipError("language_kl got no tokens: pass batches of input_ids with at least 2 tokens per row")
    return total / count
