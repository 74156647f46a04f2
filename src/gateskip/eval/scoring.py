"""Fast scoring of suite items: the shared context once, the continuations from its KV cache.

lm-eval scores a multiple-choice item by running context + continuation once per choice. Here the
tokens the choices share (the context, or in Winogrande the sentence start) run once, and the
choices continue from that run's KV cache, batched. Several items run together: their prefixes
left-padded into one call, their continuations right-padded into a second.

This is exact wherever a token's skip decision depends only on the token and what precedes it (the
``threshold`` policy, and no skipping at all): the prefix tokens are decided and computed as in the
full sequence, and a continuation token sees the same cached K/V. It is not exact under the batch
``quantile`` policy, which ranks all tokens of a call together, so there every request runs alone,
whole, as lm-eval does at batch size 1 (``shared=False``). Random skipping draws per call, so its
decisions differ from the full run's draws though not in distribution.

Tokenisation is lm-eval's own (``HFLM._encode_pair`` / ``tok_encode``), so the token sequences are
those ``gateskip eval --tasks`` scores through lm-eval.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from gateskip.compat import model_cache_arg, output_cache

MAX_ROWS_TOKENS = 4096  # continuation tokens (rows x longest) per call: bounds the logits' memory


class Scorer:
    """Scores items of a suite on ``net`` (with whatever skipping is active around the call)."""

    def __init__(self, net, tok, shared: bool = True, batch_items: int = 8):
        from lm_eval.models.huggingface import HFLM

        self.net, self.tok, self.shared, self.batch_items = net, tok, shared, batch_items
        self.enc = HFLM(pretrained=net, tokenizer=tok, batch_size=1)  # lm-eval's tokenisation, nothing else
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    # ---- encoding --------------------------------------------------------------------------------

    def pair(self, ctx: str, cont: str) -> tuple[list[int], list[int]]:
        if ctx == "":  # lm-eval scores a context-free continuation after its prefix token
            return [self.enc.prefix_token_id], self.enc.tok_encode(cont)
        return self.enc._encode_pair(ctx, cont)

    # ---- log-likelihood --------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihoods(self, items) -> list[list[tuple[float, bool]]]:
        """(log-likelihood, is-greedy) of every request of every item, in order."""
        encoded = [[self.pair(c, k) for c, k in it.requests] for it in items]
        if not self.shared:
            return [[self._whole(c, k) for c, k in reqs] for reqs in encoded]
        out = []
        for start in range(0, len(encoded), self.batch_items):
            out.extend(self._shared_batch(encoded[start:start + self.batch_items]))
        return out

    def _whole(self, c: list[int], k: list[int]) -> tuple[float, bool]:
        seq = (c + k)[-(self.enc.max_length + 1):]
        logits = self.net(torch.tensor([seq[:-1]])).logits[0, -len(k):]
        return _ll(logits, k)

    def _shared_batch(self, batch: list[list[tuple[list[int], list[int]]]]) -> list[list[tuple[float, bool]]]:
        # per item: inputs (context + continuation minus the last token) and the shared prefix
        prefixes, rows = [], []  # rows: (item, full input tokens, continuation tokens, context length)
        for j, reqs in enumerate(batch):
            inputs = [(c + k)[:-1] for c, k in reqs]
            p = min(_common_prefix(inputs), *(len(c) for c, _ in reqs))
            p = max(p, 1)
            prefixes.append(inputs[0][:p])
            rows.extend((j, inp, k, len(c)) for inp, (c, k) in zip(inputs, reqs))
        ids, mask = _left_pad(prefixes, self.pad)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.net(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        last = out.logits[:, -1].float()  # the prefix's last position predicts the first token after it
        cache = output_cache(out)
        lens = [len(p) for p in prefixes]
        suffixes = [inp[lens[j]:] for j, inp, _, _ in rows]
        results: list[tuple[float, bool]] = [None] * len(rows)  # type: ignore[list-item]
        todo = [r for r in range(len(rows)) if suffixes[r]]
        for r in range(len(rows)):
            if not suffixes[r]:  # one continuation token right after the prefix
                results[r] = _ll(last[rows[r][0]][None], rows[r][2])
        if todo:
            longest = max(len(suffixes[r]) for r in todo)
            chunk = max(1, MAX_ROWS_TOKENS // longest)
            for s in range(0, len(todo), chunk):
                part = todo[s:s + chunk]
                self._suffixes(part, rows, suffixes, lens, last, cache, mask, results, reuse=len(part) == len(todo))
        out_items: list[list[tuple[float, bool]]] = [[] for _ in batch]
        for r, (j, _, _, _) in enumerate(rows):
            out_items[j].append(results[r])
        return out_items

    def _suffixes(self, part, rows, suffixes, lens, last, cache, prefix_mask, results, reuse: bool) -> None:
        import copy

        items = torch.tensor([rows[r][0] for r in part])
        c = cache if reuse else copy.deepcopy(cache)
        c.reorder_cache(items)  # one cache row per continuation row
        ids, smask = _right_pad([suffixes[r] for r in part], self.pad)
        mask = torch.cat([prefix_mask[items], smask], dim=1)
        pos = torch.tensor([lens[rows[r][0]] for r in part])[:, None] + torch.arange(ids.shape[1])
        logits = self.net(input_ids=ids, attention_mask=mask, position_ids=pos, **{model_cache_arg(self.net): c},
                          use_cache=True).logits.float()
        for n, r in enumerate(part):
            j, inp, k, ctx_len = rows[r]
            p = lens[j]
            first = ctx_len - 1  # position whose logits predict the first continuation token
            parts = []
            if first < p:  # the first continuation token is predicted by the prefix's last position
                parts.append(last[j][None])
                first = p
            parts.append(logits[n, first - p:first - p + len(k) - len(parts)])
            results[r] = _ll(torch.cat(parts), k)

    # ---- greedy generation -----------------------------------------------------------------------

    @torch.no_grad()
    def greedy(self, items, batch: int = 8) -> list[str]:
        """Greedy continuations (skipping active at every decode step), cut at the items' stop strings."""
        out = []
        if not self.shared:
            batch = 1  # the quantile policy ranks a call's tokens together: one request per call
        for s in range(0, len(items), batch):
            part = items[s:s + batch]
            ctxs = [self.enc.tok_encode(it.requests[0][0]) for it in part]
            ids, mask = _left_pad(ctxs, self.pad)
            n = max(it.max_new_tokens for it in part)
            gen = self.net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                    pad_token_id=self.pad)
            for it, row in zip(part, gen[:, ids.shape[1]:]):
                text = self.tok.decode(row[:it.max_new_tokens], skip_special_tokens=True)
                for stop in it.until:
                    text = text.split(stop)[0]
                out.append(text)
        return out


def first_word(text: str) -> str:
    """The first word of a generation, trailing punctuation removed (LAMBADA's exact-word check)."""
    words = text.strip().split()
    return re.sub(r"[^\w'-]+$", "", words[0]) if words else ""


def item_scores(task, lls=None, texts=None) -> dict[str, list[float]]:
    """Per-item scores of one task: acc (and acc_norm for multiple choice), lm-eval's definitions."""
    if task.kind == "gen":
        return {"acc": [float(first_word(t) == it.target) for t, it in zip(texts, task.items)]}
    if task.kind == "ll":
        return {"acc": [float(r[0][1]) for r in lls]}
    acc, norm = [], []
    for it, r in zip(task.items, lls):
        ll = torch.tensor([x[0] for x in r], dtype=torch.float64)
        acc.append(float(int(ll.argmax()) == it.gold))
        norm.append(float(int((ll / torch.tensor(it.choice_chars, dtype=torch.float64)).argmax()) == it.gold))
    return {"acc": acc, "acc_norm": norm}


def _ll(logits: torch.Tensor, target: list[int]) -> tuple[float, bool]:
    logp = F.log_softmax(logits.float(), dim=-1)
    t = torch.tensor(target)
    return float(logp.gather(-1, t[:, None]).sum()), bool((logp.argmax(-1) == t).all())


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (n - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def _right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    return ids, mask
