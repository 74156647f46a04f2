"""What a sweep and a suite run check and load before evaluating: lm-eval present, the output folder,
the model (an alias or a model object, with its tokenizer) and the calibration text."""

from __future__ import annotations

import os

import torch

from gateskip.errors import GateSkipError
from gateskip.loading import base_model_name, load_named
from gateskip.record import peek

CALIB_SEQ_LEN, CALIB_BATCH = 256, 4


def prepare_run(limit, out: str) -> None:
    """Checks made before the model loads (fail now, not after an hour of evaluation)."""
    if limit is not None and limit < 0:
        raise GateSkipError(f"limit={limit} is invalid: give a number of items per task, or 0 for all")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise GateSkipError(f"cannot create output folder {out!r} ({e.strerror}): pass a writable --out") from None


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise GateSkipError("gateskip eval needs lm-evaluation-harness: run `pip install 'gateskip[eval]'`") from None


def resolve_model(model, tokenizer, gates):
    if model is None or isinstance(model, str):
        name = base_model_name(model, gates)
        net, tok = load_named(name)
        return net, tok, name
    folder = getattr(model.config, "_name_or_path", "")
    if tokenizer is None and folder and os.path.isdir(folder):
        tokenizer = folder  # load_model reads aliases from a local cache folder that holds the tokenizer
    if tokenizer is None:
        raise GateSkipError("a model object needs its tokenizer: pass tokenizer=<the model's tokenizer>")
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, peek(model).source or model.config.model_type


def calibration_batches(tok, n: int) -> list[torch.Tensor]:
    from gateskip.data import fixed_batches, load_texts

    if n < 1:
        raise GateSkipError(f"calib_batches={n} is invalid: static and shortgpt need at least 1 batch")
    return fixed_batches(tok, load_texts("mix", split="train"), CALIB_SEQ_LEN, CALIB_BATCH, n)
