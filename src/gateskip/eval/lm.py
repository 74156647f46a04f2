"""``gateskip``: lm-eval's Hugging Face model wrapper with token-wise skipping switched on.

We subclass ``HFLM`` and change nothing about how it tokenises, batches or scores: each request
method runs inside ``gateskip.skipping(...)``, so skipping applies to every forward pass, including
every greedy decode step (``generate`` runs with the KV cache on). The statistics of each request
call are read inside its ``skipping`` block (they depend on the active KV mode) and pooled over the
whole run by ``stats()``.

lm-eval right-pads log-likelihood batches and calls the model without an attention mask. Padding
would then count as tokens, and a padded token could skip or be ranked. We record each row's length
as lm-eval pads the batch (``_padding_recorded``) and pass the matching mask (``_model_call``).
Right padding sits after every real token, so the real tokens' logits do not change. With the
``threshold`` policy, results and statistics are the same at any batch size. The ``quantile`` policy
ranks the tokens of the whole call, so its decisions still depend on what is batched together; it is
exact at ``batch_size=1`` (the default here). Generation batches carry their own mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from gateskip.core import gate_state, is_gated, skipping, stats
from gateskip.errors import GateSkipError
from gateskip.flopcount import merge_stats
from gateskip.policies import check_policy


@register_model("gateskip")
class GateSkipLM(HFLM):
    """HFLM over a (gated) causal LM.

    Args:
        pretrained: a model name for ``gateskip.load_model`` or an already-loaded model object.
        gates: a gates folder to attach (``gateskip.load_gates``); a model object that already has
            gates can be passed with ``gates=None``.
        ratio, policy, modules, kv, seed, allocation, saved: passed to ``gateskip.skipping`` (``saved``: a budget
            in compute saved instead of ``ratio``).
        uncounted_gates: branch names (or "all") whose gate FLOPs are left out of ``compute_saved``:
            gates a real implementation would not compute (always-skipped branches, open stand-ins).
        tokenizer: needed with a model object; loaded with the model for a name.
    """

    def __init__(self, pretrained="smollm2-135m", gates: str | None = None, ratio: float | Mapping = 0.0,
                 policy: str | None = None, modules="attn,mlp", kv: str | None = None, seed: int = 0,
                 allocation: str = "uniform", uncounted_gates=None, tokenizer=None, batch_size=1,
                 saved: float | None = None, **kwargs):
        if isinstance(pretrained, str):
            from gateskip.models import load_model

            pretrained, loaded_tok = load_model(pretrained)
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None:
            raise GateSkipError("a model object needs its tokenizer: pass tokenizer=<the model's tokenizer>")
        if gates:
            from gateskip.checkpoint import load_gates

            load_gates(pretrained, gates)
        mods = tuple(m.strip() for m in modules.split(",")) if isinstance(modules, str) else tuple(modules)
        # ratio: a float, or a mapping from branch names / kinds to ratios (as gateskip.skipping takes)
        ratio = dict(ratio) if isinstance(ratio, Mapping) else float(ratio)
        saved = float(saved) if saved not in (None, "", "None") else None
        skips = bool(saved) or (any(r > 0 for r in ratio.values()) if isinstance(ratio, dict) else ratio > 0)
        check_policy(policy)  # fail at construction, not at the first request
        if not skips:  # nothing is skipped, so no policy applies (and uncalibrated gates are fine)
            policy = "quantile"
        self.plan = {"ratio": ratio, "policy": policy, "modules": mods, "kv": kv, "seed": int(seed)}
        if allocation != "uniform":  # passed only when asked: older gateskip.skipping has no such argument
            self.plan["allocation"] = allocation
        if saved:
            self.plan["saved"] = saved
        if not is_gated(pretrained) and skips:
            raise GateSkipError(f"ratio={ratio} needs gates: pass gates=<gates folder> or use ratio=0 (dense)")
        self.uncounted_gates = uncounted_gates
        self._runs: list[dict] = []
        GateSkipLM.last_stats = None  # what the command line prints at the end (lm_eval_cli.py): no model reference
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size, **kwargs)

    @contextlib.contextmanager
    def _measured(self):
        if not is_gated(self.model):  # dense: nothing to skip, nothing to count here
            yield
            return
        with skipping(self.model, **self.plan):
            yield
            st = gate_state(self.model)
            if st.counts is not None and st.stats.calls:
                self._runs.append(stats(self.model))
                GateSkipLM.last_stats = self.stats()

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        with self._measured(), self._padding_recorded():
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        with self._measured(), self._padding_recorded():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    @contextlib.contextmanager
    def _padding_recorded(self):
        """Record the real length of every row as lm-eval right-pads a log-likelihood batch.

        lm-eval pads with ``pad_and_concat`` from ``lm_eval.models.huggingface``'s namespace. If a
        release moves it, nothing is recorded, and batches run unmasked as before.
        """
        import lm_eval.models.huggingface as hf

        real = getattr(hf, "pad_and_concat", None)
        if real is None:
            yield
            return

        def recording(max_length, tensors, padding_side="right"):
            if padding_side == "right":  # lengths first: pad_and_concat replaces the list's items
                self._row_lengths = [t.shape[-1] for t in tensors]
            return real(max_length, tensors, padding_side=padding_side)

        hf.pad_and_concat = recording
        try:
            yield
        finally:
            hf.pad_and_concat = real
            self._row_lengths = None

    def _model_call(self, inps, attn_mask=None, labels=None):
        lengths, self._row_lengths = getattr(self, "_row_lengths", None), None
        b, t = inps.shape[:2]
        if attn_mask is not None or labels is not None or lengths is None or len(lengths) != b \
                or min(lengths) >= t or max(lengths) > t:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)  # nothing padded, or not ours
        mask = (torch.arange(t, device=inps.device) < torch.tensor(lengths, device=inps.device)[:, None]).long()
        dtype = getattr(self, "mixed_precision_dtype", None)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None):
            return self.model(input_ids=inps, attention_mask=mask).logits

    def generate_until(self, requests, disable_tqdm: bool = False):
        with self._measured():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def stats(self) -> dict | None:
        """``gateskip.stats`` pooled over every request call since creation or ``reset_stats``."""
        return merge_stats(self._runs, self.uncounted_gates) if self._runs else None

    def reset_stats(self) -> None:
        self._runs = []
