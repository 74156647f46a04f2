"""One prompt in, one answer out, with skipping: ``gateskip.generate`` (what ``gateskip generate`` runs).

The prompt goes into the tokenizer's chat template (when it has one), the model generates with ``model.generate``
inside ``skipping(...)``, and the answer comes back with what it cost: compute saved (FLOP-weighted, gates,
fallbacks and rechecks counted), tokens skipped, seconds and tokens per second. By default a step whose top token
ends the answer is computed again without skipping (recheck.py), so the answer ends where the model would end it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gateskip.errors import GateSkipError
from gateskip.saved import GENERATION_PROMPT_BOOST


@dataclass
class Generation:
    text: str  # the answer, special tokens removed
    compute_saved: float  # FLOP-weighted, gates, fallbacks and rechecks counted (0 without skipping)
    tokens_skipped: float  # the paper's measure: (token, branch) pairs skipped
    new_tokens: int
    seconds: float
    stats: dict  # gateskip.stats() of the run ({} without skipping)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def generate(model, tok, prompt: str, saved: float | None = None, ratio: float = 0.0, policy: str | None = None,
             max_new_tokens: int = 64, chat: bool = True, recheck_stops: bool = True, sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, dense: bool = True,
             prompt_boost: float = GENERATION_PROMPT_BOOST, **skip) -> Generation:
    """Answer ``prompt`` with a gated model (``load_gates`` / ``add_gates``), greedy unless ``sample``.

    ``saved``: a budget in compute saved (e.g. 0.25); or ``ratio``: the paper's per-branch skip ratio; neither: the
    original model (gates bypassed, a healed backbone's original weights), the answer to compare with (``dense``
    False: the gated model at ratio 0 instead, the gates' cost included). ``recheck_stops``: a step whose top token ends the answer is computed again
    without skipping. ``prompt_boost`` (with ``saved``): the prompt aims at this times the budget, the answer makes up
    the rest (saved.py). Other keyword arguments go to ``gateskip.skipping`` (``modules``, ``kv``, ``protect_first``,
    ``recheck_below`` ...)."""
    from gateskip.chat import stop_ids
    from gateskip.core import is_gated, original_backbone, skipping, stats
    from gateskip.data import encode_prompt

    if not prompt or not prompt.strip():
        raise GateSkipError("empty prompt: give the text to answer, e.g. \"Explain photosynthesis.\"")
    if max_new_tokens < 1:
        raise GateSkipError(f"max_new_tokens={max_new_tokens} is invalid: use a positive integer")
    if not is_gated(model):
        raise GateSkipError("the model has no gates: gateskip.load_gates(model, FOLDER) or gateskip.add_gates(model) "
                            "first")
    enc = encode_prompt(tok, prompt, chat, getattr(model.config, "max_position_embeddings", None), max_new_tokens)
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": sample,
              "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    plan = {"ratio": ratio, "saved": saved, "policy": policy, "seed": seed, **skip}
    if saved:
        plan["prompt_boost"] = prompt_boost
    if recheck_stops:
        plan["recheck_tokens"] = stop_ids(tok)
    # no budget: the original model (gates bypassed, a healed backbone put back), the reference to compare with
    original = not (saved or ratio) and dense
    block = original_backbone(model) if original else skipping(model, **plan)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad(), block:
        out = model.generate(**enc, **kwargs)
        s = {"compute_saved": 0.0, "tokens_skipped": 0.0} if original else stats(model)
    seconds = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1]:]
    return Generation(tok.decode(new, skip_special_tokens=True), float(s["compute_saved"]), float(s["tokens_skipped"]),
                      new.numel(), seconds, s)
