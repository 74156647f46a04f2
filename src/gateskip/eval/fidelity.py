"""Generation fidelity: how close a skipping model's text stays to the dense model's.

Multiple choice compares a few fixed continuations, so it can hide a model that no longer writes
what the dense one writes. Here the dense model greedily continues held-out prompts once
(``reference``), and every setting is measured against that:

- teacher-forced KL(dense || setting) and the setting's cross-entropy on the dense continuation,
  per token, with the dense model's own continuation as input (one forward pass per setting);
- next-token agreement (``agree_next``): along the dense continuation, the fraction of positions
  where the setting's most likely token is the dense model's. It is what a greedy speculative
  verifier accepts per token, and unlike free-running agreement it does not collapse to chance
  once the two texts part (after a divergence both continue different texts);
- greedy agreement: the setting generates as many tokens from the same prompts; ``prefix``
  is the fraction of tokens produced before its first divergence from dense, ``tokens`` the
  fraction of positions equal overall;
- the compute the setting saved while generating (``gen_compute_saved``), FLOP-weighted like the
  suite's, since generation text is not the multiple-choice text and is skipped differently.

``per_prompt`` keeps each prompt's KL and agreements, for paired comparisons across rows.

Every prompt has the same length in tokens, so no call is padded. The dense model against itself
scores KL 0 and agreement 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gateskip.errors import GateSkipError
from gateskip.heldout import language_ce, language_kl, reference_logprobs  # noqa: F401 (re-exported)

CHUNK = 8  # prompts per teacher-forced call: bounds the (prompts x tokens x vocab) logits


@dataclass
class Reference:
    prompts: torch.Tensor  # [N, P] token ids
    continuation: torch.Tensor  # [N, T] the dense model's greedy tokens
    logp: torch.Tensor  # [N, T, V] the dense model's log-probabilities at those positions


def heldout_prompts(tok, n: int, length: int, source: str = "mix") -> torch.Tensor:
    """``n`` prompts of exactly ``length`` tokens: the starts of held-out texts (never trained on)."""
    from gateskip.data import load_texts

    if n < 1 or length < 1:
        raise GateSkipError(f"fidelity prompts={n} x {length} tokens is invalid: use positive numbers")
    rows = []
    for text in load_texts(source, split="heldout"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == n:
            return torch.tensor(rows)
    raise GateSkipError(f"the held-out {source} text has only {len(rows)} texts of {length} tokens: "
                        "ask for fewer or shorter fidelity prompts")


@torch.no_grad()
def greedy(net, prompts: torch.Tensor, new_tokens: int, pad_id: int, batch: int = 16) -> torch.Tensor:
    """Exactly ``new_tokens`` greedy tokens per prompt (end-of-text suppressed until then), as ``generate`` makes them."""
    out = []
    for s in range(0, len(prompts), batch):
        ids = prompts[s:s + batch]
        gen = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        out.append(gen[:, ids.shape[1]:])
    return torch.cat(out)


@torch.no_grad()
def forced_logp(net, prompts: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Log-probabilities at the positions that predict each continuation token: [N, T, V]."""
    t = continuation.shape[1]
    seq = torch.cat([prompts, continuation], dim=1)[:, :-1]
    parts = []
    for s in range(0, len(seq), CHUNK):
        logits = net(input_ids=seq[s:s + CHUNK], logits_to_keep=t).logits
        parts.append(F.log_softmax(logits.float(), dim=-1))
    return torch.cat(parts)


def reference(net, prompts: torch.Tensor, new_tokens: int, pad_id: int) -> Reference:
    """The dense model's greedy continuation of ``prompts`` and its log-probabilities along it."""
    cont = greedy(net, prompts, new_tokens, pad_id)
    return Reference(prompts, cont, forced_logp(net, prompts, cont))


def per_prompt_agreement(ref: torch.Tensor, gen: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per prompt (row): the fraction of tokens before the first divergence, and of equal tokens overall."""
    same = ref == gen
    t = same.shape[1]
    first = torch.where(same.all(1), torch.full((len(same),), t), (~same).float().argmax(1))
    return {"prefix": first.float() / t, "tokens": same.float().mean(1)}


def agreement(ref: torch.Tensor, gen: torch.Tensor) -> dict[str, float]:
    """``per_prompt_agreement``, as means over prompts."""
    return {k: float(v.mean()) for k, v in per_prompt_agreement(ref, gen).items()}


def summary(ref: Reference, logp: torch.Tensor, gen: torch.Tensor, compute: dict | None = None) -> dict:
    """Fidelity figures from a setting's log-probabilities along the dense continuation (``forced_logp``)
    and its own greedy tokens (``greedy``); ``compute``: the stats of the generation (``tokens_skipped``,
    ``compute_saved``), recorded as ``gen_tokens_skipped`` / ``gen_compute_saved``."""
    kl = (ref.logp.exp() * (ref.logp - logp)).sum(-1).clamp(min=0)  # KL(dense || setting) per position
    ce = -logp.gather(-1, ref.continuation[..., None]).squeeze(-1)
    nxt = (logp.argmax(-1) == ref.continuation).float()
    rows = {"kl": kl.mean(1), "agree_next": nxt.mean(1),
            **{f"agree_{k}": v for k, v in per_prompt_agreement(ref.continuation, gen).items()}}
    out = {"ce": float(ce.mean()), **{k: float(v.mean()) for k, v in rows.items()}}
    if compute is not None:
        out["gen_tokens_skipped"] = float(compute["tokens_skipped"])
        out["gen_compute_saved"] = float(compute["compute_saved"])
    out["per_prompt"] = {k: v.tolist() for k, v in rows.items()}
    return out


def measure(net, ref: Reference, pad_id: int) -> dict:
    """Fidelity of ``net`` (with whatever skipping is active) against the dense reference (``summary``,
    without the generation's compute: ``eval.suite_run`` measures that in a skipping block of its own)."""
    logp = forced_logp(net, ref.prompts, ref.continuation)
    return summary(ref, logp, greedy(net, ref.prompts, ref.continuation.shape[1], pad_id))
