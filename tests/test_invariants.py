"""The shared invariant matrix: every axis of a gated model (family x gate kind x placement x kv mode x policy x
fallback; the path is compared within each row) in a covering set of configurations, each held to the same
invariants against a reference:

- exact removal: ``remove_gates`` gives the original model's logits bit for bit;
- ratio 0 changes nothing: ``skipping(ratio=0)`` gives the gated model's own logits bit for bit;
- physical equals masked on a left-padded batch (the skipped tokens really are not computed);
- padding never counts or skips: each branch sees exactly the batch's real tokens;
- cached decode equals a recompute without cache (threshold policy: per-token, causal decisions).
"""

import pytest
import torch
from conftest import VOCAB, generate_then_recompute, left_padded, positions

import gateskip
from gateskip import GateSkipConfig
from gateskip.core import gate_state
from gateskip.models import tiny_model

TOL = 1e-4

# (family, gate, placement, kv, policy, fallback "attn/mlp"): every value of every axis appears at least once
MATRIX = [tuple(row.split()) for row in """
llama vector after copy threshold zero
qwen2 scalar after compute threshold lowrank
qwen3 lowrank before copy threshold mean
mistral mlp after compute threshold linear
gemma2 lowrank after compute threshold lowrank/linear
gemma3_text scalar before compute threshold zero
llama lowrank after compute quantile lowrank
gemma2 vector before copy quantile zero
qwen3 scalar after copy random linear
mistral lowrank after compute random mean
qwen2 vector after compute quantile lowrank/linear
gemma3_text lowrank after copy threshold linear
""".strip().splitlines()]


def _batches(n=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (3, 24), generator=g) for _ in range(n)]


def _logits(m, ids, mask=None):
    kw = {} if mask is None else {"attention_mask": mask, "position_ids": positions(mask)}
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("family,gate,placement,kv,policy,fallback", MATRIX,
                         ids=["-".join(row) for row in MATRIX])
def test_invariants(family, gate, placement, kv, policy, fallback):
    attn_fb, _, mlp_fb = fallback.partition("/")
    ids, mask = left_padded([16, 9, 13])
    base = tiny_model(family)
    dense = _logits(base, ids, mask)
    m = gateskip.add_gates(base, GateSkipConfig(gate=gate, placement=placement, kv=kv, rank=4, init_std=0.5,
                                                init_bias=0.0, fallback=attn_fb, fallback_mlp=mlp_fb or None,
                                                fallback_rank=8))
    gateskip.calibrate(m, _batches(), ratio=0.4)
    if gate_state(m).cfg.has_fallback:
        gateskip.fit_fallback(m, _batches(seed=6))
    gated = _logits(m, ids, mask)
    with gateskip.skipping(m, ratio=0.0, policy=policy):  # ratio 0: the gated model itself
        assert torch.equal(_logits(m, ids, mask), gated)

    out, real = {}, int(mask.sum())
    for path in ("masked", "physical"):
        with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy=policy, path=path, seed=3):
            out[path] = _logits(m, ids, mask)
            counts = gate_state(m).counts
            s = gateskip.stats(m)
        assert (counts[:, 1] == real).all()  # every branch saw the real tokens only, never the padding
        assert s["tokens_skipped"] > 0.05
    keep = mask.bool()
    assert (out["masked"] - out["physical"])[keep].abs().max() < TOL

    if policy == "threshold":
        i2, m2 = left_padded([9, 5], seed=4)
        gen, again, t0 = generate_then_recompute(m, i2, m2, 5, _logits, ratio=0.4, policy="threshold", kv=kv)
        for step, step_logits in enumerate(gen.logits):
            assert (step_logits - again[:, t0 - 1 + step]).abs().max() < TOL

    gateskip.remove_gates(m)
    assert torch.equal(_logits(m, ids, mask), dense)
