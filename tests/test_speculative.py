"""Self-speculative decoding is lossless: its output is the full model's, whatever the draft does."""

import pytest
import torch
from conftest import FAMILIES, VOCAB, left_padded

import gateskip
from gateskip import GateSkipConfig
from gateskip.compat import output_cache
from gateskip.errors import GateSkipError
from gateskip.models import tiny_model
from gateskip.speculative import (
    accept_or_resample,
    acceptance_needed,
    predicted_speedup,
    speculative_generate,
    tokens_per_cycle,
    warp,
)

DIVERSE = GateSkipConfig(init_std=0.3, init_bias=0.0)


def _gated(family, seed=0):
    # A sharper random model (larger init) so greedy decoding has clear argmaxes, not near-ties.
    m = gateskip.add_gates(tiny_model(family, seed=seed, initializer_range=0.2), DIVERSE)
    g = torch.Generator().manual_seed(1)
    gateskip.calibrate(m, [torch.randint(3, VOCAB, (4, 32), generator=g) for _ in range(3)], ratio=0.3)
    return m


def _dense_greedy(m, ids, mask=None, n=16):
    with torch.no_grad():
        return m.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                          max_new_tokens=n, do_sample=False, pad_token_id=0, temperature=None, top_p=None, top_k=None)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_dense_greedy(family):
    m = _gated(family)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    ref = _dense_greedy(m, ids, n=24)
    for k, ratio, policy in [(1, 0.5, "threshold"), (3, 0.5, "threshold"), (4, 0.9, "random"), (6, 0.3, "threshold")]:
        res = speculative_generate(m, ids, max_new_tokens=24, k=k, draft_ratio=ratio, draft_policy=policy)
        assert torch.equal(res.sequences, ref), (family, k, ratio, policy)
        assert res.drafted > 0 and res.cycles > 0


def test_rejections_leave_the_full_models_cache():
    """After rejections the cache holds exactly the emitted tokens' full-model K/V (draft K/V rolled back)."""
    m = _gated("llama")
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    res = speculative_generate(m, ids, max_new_tokens=20, k=4, draft_ratio=0.9, draft_policy="random",
                               eos_token_id=[])
    assert res.accepted < res.drafted, "the draft must be rejected sometimes for this test to mean anything"
    seq = res.sequences
    cache = res.past_key_values
    assert cache.get_seq_length() == seq.shape[1] - 1  # every token but the last has been fed
    with torch.no_grad():
        fresh = output_cache(m(seq[:, :-1], use_cache=True))
    for layer, ref in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(layer.keys, ref.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.values, ref.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_batched_left_padded_greedy_equals_dense(family):
    m = _gated(family, seed=1)
    ids, mask = left_padded([5, 9, 7], seed=4)
    ids = ids.clamp(min=3) * mask  # no EOS (id 2) inside prompts; padding stays 0
    ref = _dense_greedy(m, ids, mask, n=20)
    res = speculative_generate(m, ids, mask, max_new_tokens=20, k=3, draft_ratio=0.5, pad_token_id=0)
    assert torch.equal(res.sequences, ref)


def test_eos_stops_and_pads_like_generate():
    m = _gated("qwen2")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    free = _dense_greedy(m, ids, n=12)
    stop = int(free[0, 6 + 4])  # make the 5th greedy token of row 0 an EOS
    ref = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                     eos_token_id=stop, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    res = speculative_generate(m, ids, max_new_tokens=12, k=3, draft_ratio=0.5, eos_token_id=stop, pad_token_id=0)
    assert torch.equal(res.sequences, ref)


def test_ungated_verifier_is_the_original_model():
    base = tiny_model("mistral", initializer_range=0.2)
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    ref = _dense_greedy(base, ids, n=16)  # before gates are added
    m = _gated_from(base)
    res = speculative_generate(m, ids, max_new_tokens=16, k=4, draft_ratio=0.5, verify="ungated")
    assert torch.equal(res.sequences, ref)
    assert not torch.equal(_dense_greedy(m, ids, n=16), ref), "the gates should change this model's output"


def _gated_from(base):
    m = gateskip.add_gates(base, DIVERSE)
    gateskip.calibrate(m, [torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))], ratio=0.3)
    return m


def test_bad_input_is_a_clear_error():
    m = _gated("llama")
    ids = torch.randint(3, VOCAB, (1, 5))
    with pytest.raises(GateSkipError, match="k=0"):
        speculative_generate(m, ids, k=0)
    with pytest.raises(GateSkipError, match="verify"):
        speculative_generate(m, ids, verify="teacher")
    with pytest.raises(GateSkipError, match="empty prompt"):
        speculative_generate(m, ids[:, :0])
    with pytest.raises(GateSkipError, match="gates"):
        speculative_generate(tiny_model("llama"), ids)


# ---- sampling -----------------------------------------------------------------------------------

def test_acceptance_rule_yields_the_verifier_distribution():
    """Monte Carlo of the rule on hand-built p, q: the output follows p, not q."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])  # very different draft, even mass where p has none
    n = 200_000
    d = torch.multinomial(q, n, replacement=True, generator=g)
    u = torch.rand(n, generator=g)
    accepted, tok = accept_or_resample(p.expand(n, -1), q.expand(n, -1), d, u, g)
    freq = torch.bincount(tok, minlength=5).float() / n
    assert (freq - p).abs().max() < 0.005
    expected_accept = torch.minimum(p, q).sum()  # P(accept) = sum_x min(p, q)
    assert abs(accepted.float().mean() - expected_accept) < 0.005


def test_warp_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = logits.clone()
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        ref = w(None, ref)
    torch.testing.assert_close(warp(logits, 0.7, 20, 0.8), ref.softmax(-1))


def test_sampled_tokens_follow_the_full_model():
    """Second new token of 3000 sampled rows vs its exact marginal under the full model."""
    m = _gated("llama")
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    n, top_k = 3000, 4
    res = speculative_generate(m, prompt.expand(n, -1), max_new_tokens=3, k=2, draft_ratio=0.9,
                               draft_policy="random", sample=True, temperature=1.0, top_k=top_k, seed=1,
                               eos_token_id=[])
    # Rows advance together (the shortest acceptance), so each row's second token is its own
    # accept-or-resample outcome at draft position 1: both branches of the rule are exercised.
    second = res.sequences[:, 7]
    with torch.no_grad():
        p1 = warp(m(prompt).logits[:, -1], top_k=top_k)[0]
        firsts = torch.nonzero(p1).squeeze(-1)
        ctx = torch.cat([prompt.expand(len(firsts), -1), firsts[:, None]], dim=1)
        p2 = (p1[firsts, None] * warp(m(ctx).logits[:, -1], top_k=top_k)).sum(0)
    freq = torch.bincount(second, minlength=VOCAB).float() / n
    tv = 0.5 * (freq - p2).abs().sum()
    assert tv < 0.06, tv


def test_bench_speculative_reports_identity_and_acceptance(tmp_path, monkeypatch):
    import gateskip.commands.bench_timing as gb
    from gateskip.commands.bench import bench
    from gateskip.core import gate_state

    installed = set()  # (draft ratio, ratio of the calibration then in use)
    real = gb.use_calibration

    def spy(m, variant, ratio):
        real(m, variant, ratio)
        if ratio is not None:
            installed.add((ratio, gate_state(m).loaded.calibration["ratio"]))

    monkeypatch.setattr(gb, "use_calibration", spy)
    rep = bench(model="tiny-qwen2", random_gates=True, gate="lowrank", speculative=True, draft_ratio="0.3,0.7",
                k="1,3", prompts=2, new_tokens=12, repeats=1, warmup=0, threads=1, json=str(tmp_path / "b.json"),
                plot=str(tmp_path / "b.png"))
    rows = {r["setting"]: r for r in rep["results"]}
    assert set(rows) == {"dense", "spec r=0.3 k=1", "spec r=0.3 k=3", "spec r=0.7 k=1", "spec r=0.7 k=3"}
    for name, r in rows.items():
        if name != "dense":
            assert r["identical"] == "2/2"
            assert 0.0 <= r["acceptance_rate"] <= 1.0 and 1.0 <= r["mean_accepted_length"] <= r["k"] + 1
            assert r["flops_per_token_vs_dense"] > 0
            assert r["draft_step_vs_dense"] > 0 and r["verify_vs_dense"] > 0 and r["predicted_speedup"] > 0
            assert 0.0 <= r["per_token_acceptance"] <= 1.0
            need = r["acceptance_needed"]
            assert need is None or predicted_speedup(need, r["k"], 1.0, r["draft_step_vs_dense"],
                                                     r["verify_vs_dense"]) == pytest.approx(r["target_speedup"])
    assert (tmp_path / "b.json").exists() and (tmp_path / "b.png").stat().st_size > 0
    assert installed == {(0.3, 0.3), (0.7, 0.7)}  # each draft ratio drafts with thresholds calibrated at it


def test_cost_model_tokens_per_cycle_and_its_inverse():
    assert tokens_per_cycle(0.0, 4) == 1.0 and tokens_per_cycle(1.0, 4) == 5.0
    assert tokens_per_cycle(0.5, 2) == pytest.approx(1.75)  # 1 + 1/2 + 1/4
    # plain decoding costs 1 per token; 2 drafts at 0.3 and a verify at 1.2: a = 0 gives 1 / 1.8
    assert predicted_speedup(0.0, 2, 1.0, 0.3, 1.2) == pytest.approx(1 / 1.8)
    for k, draft, verify in [(2, 0.3, 1.2), (4, 0.5, 1.3), (1, 0.1, 1.05)]:
        a = acceptance_needed(1.3, k, 1.0, draft, verify)
        assert a is not None and 0.0 < a < 1.0
        assert predicted_speedup(a, k, 1.0, draft, verify) == pytest.approx(1.3, rel=1e-6)
        assert predicted_speedup(a - 0.01, k, 1.0, draft, verify) < 1.3
    # drafts costing a full step each: even perfect acceptance gives (k + 1) / (k + verify) < 1.3
    assert acceptance_needed(1.3, 4, 1.0, 1.0, 1.2) is None


def test_speculative_times_its_draft_and_verify_passes():
    m = _gated("llama")
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    res = speculative_generate(m, ids, max_new_tokens=12, k=3, draft_ratio=0.5, draft_policy="threshold",
                               eos_token_id=[])
    assert res.draft_seconds > 0 and res.verify_seconds > 0
    # every cycle either accepted all its drafts or ended at one rejection: the tokens add up
    assert 0 <= res.rejections <= res.cycles
    assert res.new_tokens == 1 + res.cycles + res.accepted  # the first token from the prompt, then per cycle
    assert res.acceptance_rate <= res.per_token_acceptance <= 1.0
    assert res.draft_seconds + res.verify_seconds <= res.seconds
