"""Chat requests from the offline question sets, and batched greedy answers to them.

The requests are questions that no training source of gateskip contains (Natural Questions, SciQ,
CommonsenseQA, ARC and BoolQ questions; TriviaQA is left out because the ``qa`` source trains on it), each
phrased as a user would send it (one of a few request forms, picked by a hash of the question). A question's
hash also puts it in the ``heldout`` split (about 10%: what chat fidelity measures, never fitted, calibrated
or healed on) or the ``train`` split (self-distillation text: the model's own answers, ``chat_texts``).

``greedy_answers`` decodes a batch of left-padded prompts itself instead of calling ``generate``: a row that has
ended gets attention-mask 0 from then on, so it is no longer a token (not counted, not skipped) and the compute
statistics of the block are those of the real answers only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gateskip.data import is_heldout, olmo_root, table_rows
from gateskip.errors import GateSkipError

CHAT_TEXTS = 1200  # self-distillation answers written for ``--data chat``
CHAT_TOKENS = 96  # at most this many tokens per answer
FORMS = ("{q}", "Answer the following question. {q}", "{q} Please explain your answer.", "Can you tell me: {q}",
         "Answer in one or two sentences: {q}", "I'm curious about something. {q}")
_WH = ("what", "when", "where", "who", "whom", "whose", "which", "why", "how", "is", "are", "was", "were", "do",
       "does", "did", "can", "could", "will", "would", "should", "has", "have", "had")


def _question(q: str) -> str:
    q = " ".join(q.strip().split())
    if not q:
        return q
    q = q[0].upper() + q[1:]
    if q[-1] not in "?.!" and q.split()[0].lower() in _WH:
        q += "?"
    return q


def _questions() -> list[str]:
    hf = olmo_root() / "hf_datasets"
    groups = [
        [d["question"] for d in table_rows(hf / "nq_open" / "none" / "validation")],
        [d["question"] for d in table_rows(hf / "sciq" / "none" / "validation")],
        [d["question"] for d in table_rows(hf / "tau" / "commonsense_qa" / "none" / "validation")],
        [d["question"] for part in ("ARC-Easy", "ARC-Challenge")
         for d in table_rows(hf / "ai2_arc" / part / "validation")],
        [d["question"] for d in table_rows(hf / "boolq" / "none" / "validation")],
    ]
    out, seen = [], set()
    for i in range(max(map(len, groups))):  # interleaved: every prefix mixes the sets
        for g in groups:
            if i < len(g):
                q = _question(g[i])
                if q and q.lower() not in seen:
                    seen.add(q.lower())
                    out.append(q)
    return out


def chat_requests(split: str = "heldout", n: int | None = None) -> list[str]:
    """User requests of one split (``heldout``: measure; ``train``: self-distillation), the first ``n``."""
    if split not in ("train", "heldout"):
        raise GateSkipError(f"unknown split {split!r}: use 'train' or 'heldout'")
    if n is not None and n < 1:
        raise GateSkipError(f"chat prompts={n} is invalid: use a positive number")
    want = split == "heldout"
    out = []
    for q in _questions():
        if is_heldout(q) != want:
            continue
        form = FORMS[int.from_bytes(hashlib.blake2b(q.encode(), digest_size=2).digest(), "big") % len(FORMS)]
        out.append(form.format(q=q))
        if n is not None and len(out) == n:
            return out
    if n is not None:
        raise GateSkipError(f"the {split} chat split has only {len(out)} requests: ask for at most that many")
    return out


def template_ids(tok, request: str) -> list[int]:
    """``request`` as a user message in the tokenizer's chat template, ready for the answer (plain text, BOS first,
    for a tokenizer without a template)."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(request)["input_ids"]


@dataclass
class Answers:
    tokens: list[list[int]]  # per prompt, the answer without its end token
    stopped: list[bool]  # the answer ended with an end token (not cut at max_new_tokens)
    seconds: float = 0.0
    decode_seconds: float = 0.0  # the steps after the prefill of each batch


def _new_cache(net):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=net.config)
    except TypeError:  # older transformers
        return DynamicCache()


@torch.no_grad()
def greedy_answers(net, prompts: list[list[int]], max_new_tokens: int, stop_ids, pad_id: int, batch: int = 16,
                   progress: Callable[[int], None] | None = None) -> Answers:
    """Greedy answers to token-id prompts, ``batch`` at a time (similar lengths together, left-padded), each ending at
    the first of ``stop_ids`` or after ``max_new_tokens``. Ended rows are masked out of later steps."""
    import time

    from gateskip.compat import model_cache_arg

    if max_new_tokens < 1:
        raise GateSkipError(f"max_new_tokens={max_new_tokens} is invalid: use a positive integer")
    limit = getattr(net.config, "max_position_embeddings", None)
    longest = max(map(len, prompts))
    if limit and longest + max_new_tokens > limit:
        raise GateSkipError(f"a prompt has {longest} tokens; with {max_new_tokens} new tokens it exceeds the model's "
                            f"context of {limit}: shorten the prompts or lower max_new_tokens")
    dev = next(net.parameters()).device
    stops = torch.tensor(sorted({int(s) for s in stop_ids}), device=dev)
    key = model_cache_arg(net)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokens: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    t_all = time.perf_counter()
    t_decode = 0.0
    for s in range(0, len(order), batch):
        rows = order[s:s + batch]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        cache = _new_cache(net)
        live = torch.ones(len(rows), dtype=torch.bool, device=dev)
        step_ids, pos = ids, (mask.cumsum(-1) - 1).clamp(min=0)
        for step in range(max_new_tokens):
            if step == 1:
                t0 = time.perf_counter()
            out = net(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True, **{key: cache},
                      logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1)
            ended = torch.isin(nxt, stops) & live
            for r in torch.nonzero(live & ~ended).flatten().tolist():
                tokens[rows[r]].append(int(nxt[r]))
            for r in torch.nonzero(ended).flatten().tolist():
                stopped[rows[r]] = True
            live = live & ~ended
            if not bool(live.any()) or step == max_new_tokens - 1:
                break
            step_ids = torch.where(live, nxt, torch.full_like(nxt, pad_id)).unsqueeze(1)
            pos = pos[:, -1:] + live.long().unsqueeze(1)
            mask = torch.cat([mask, live.long().unsqueeze(1)], dim=1)
        if max_new_tokens > 1 and step >= 1:
            t_decode += time.perf_counter() - t0
        if progress is not None:
            progress(len(rows))
    return Answers(tokens, stopped, time.perf_counter() - t_all, t_decode)


def chat_texts(net, tok, n: int, max_new_tokens: int = CHAT_TOKENS, batch: int = 32, split: str = "train",
               progress: Callable[[int], None] | None = None) -> list[str]:
    """Self-distillation text: ``n`` requests of ``split`` in the chat template, each followed by the model's own
    greedy answer (run it on the original model: gates bypassed or not yet added)."""
    prompts = [template_ids(tok, r) for r in chat_requests(split, n)]
    limit = getattr(net.config, "max_position_embeddings", None)
    if limit:  # training text: a request that leaves no room for its answer is left out, not cut
        prompts = [p for p in prompts if len(p) + max_new_tokens <= limit]
        if not prompts:
            raise GateSkipError(f"no chat request fits the model's context of {limit} with {max_new_tokens} new "
                                "tokens: use a model with a longer context")
    ans = greedy_answers(net, prompts, max_new_tokens, stop_ids=stop_ids(tok), pad_id=pad_id(tok), batch=batch,
                         progress=progress)
    return [tok.decode(p + a, skip_special_tokens=False) for p, a in zip(prompts, ans.tokens)]


def stop_ids(tok) -> list[int]:
    """The tokens that end an answer: EOS (``<|im_end|>`` in ChatML templates)."""
    ids = {tok.eos_token_id} | {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")
                                if t in tok.get_vocab()}
    return sorted(i for i in ids if i is not None)


def answer_markers(tok) -> tuple[list[int], list[int]]:
    """(header, ends): the token ids that open an assistant answer in ``tok``'s chat template (its generation prompt,
    e.g. ``<|im_start|>assistant\\n``) and the ids that end one (``stop_ids``): what ``losses.answer_positions``
    finds answers by."""
    if not getattr(tok, "chat_template", None):
        raise GateSkipError("loss_on='answers' scores the assistant's answers of chat-formatted text, but the "
                            "tokenizer has no chat template: use loss_on='all'")
    msgs = [{"role": "user", "content": "x"}]
    asked = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    plain = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    if not asked.startswith(plain) or asked == plain:
        raise GateSkipError("the tokenizer's chat template has no generation prompt that opens an answer: use "
                            "loss_on='all'")
    header = tok(asked[len(plain):], add_special_tokens=False)["input_ids"]
    return header, stop_ids(tok)


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def chat_data_file(net, tok, source: str, n: int = CHAT_TEXTS, max_new_tokens: int = CHAT_TOKENS, cache_dir: str | Path | None = None,
                   log: Callable[[str], None] | None = None) -> Path:
    """The self-distillation texts of ``chat_texts`` as a ``.jsonl`` training file (field ``text``), written once per
    model, size and length into the gateskip cache (``GATESKIP_CHAT_CACHE``, else ``chat/`` beside the models) and
    reused afterwards (write, then rename)."""
    from gateskip.files import atomic_write
    from gateskip.models import cache_root

    folder = Path(cache_dir or os.environ.get("GATESKIP_CHAT_CACHE") or cache_root(None).parent / "chat")
    name = "".join(c if c.isalnum() or c in "-._" else "_" for c in str(source))
    path = folder / f"{name}-n{n}-t{max_new_tokens}.jsonl"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if log is not None and (done[0] % 256 < k or done[0] == n):
            log(f"self-distillation answers {done[0]}/{n}")

    texts = chat_texts(net, tok, n, max_new_tokens=max_new_tokens, progress=tick)
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    atomic_write(path, lambda p: Path(p).write_text(body, encoding="utf-8"))
    return path


def resolve_chat_source(data: str, net, tok, model: str, n: int = CHAT_TEXTS,
                        log: Callable[[str], None] | None = None) -> str:
    """``data`` with each ``chat`` part replaced by the self-distillation file of ``model`` (``n`` answers:
    ``chat_data_file``, made once with ``net`` as it is: call it before gates are added or changed)."""
    parts = [p.strip() for p in str(data).split(",")]
    if "chat" not in parts:
        return data
    path = chat_data_file(net, tok, model, n=n, log=log)
    return ",".join(str(path) if p == "chat" else p for p in parts)
