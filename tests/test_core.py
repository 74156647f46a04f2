"""Core behaviour on tiny random models of every supported family (CPU, seconds)."""

import pytest
import torch
from conftest import FAMILIES, VOCAB, generate_then_recompute, left_padded, positions

import gateskip
from gateskip import GateSkipConfig, GateSkipError
from gateskip.compat import model_cache_arg, output_cache
from gateskip.core import gate_state
from gateskip.models import tiny_model

DIVERSE = GateSkipConfig(init_std=0.3, init_bias=0.0)  # untrained but varied importances


def logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": mask, "position_ids": positions(mask)}
        return model(input_ids=ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_open_gates_reproduce_base_and_remove_is_exact(family):
    m = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 10))
    ref = logits(m, ids)
    gateskip.add_gates(m, GateSkipConfig(init_bias=50.0, init_std=0.0))
    assert (logits(m, ids) - ref).abs().max() < 1e-5
    gateskip.remove_gates(m)
    m2 = gateskip.add_gates(m, DIVERSE)  # gates that do change the output, and skipping
    with gateskip.skipping(m2, ratio=0.4):
        assert (logits(m2, ids) - ref).abs().max() > 1e-3
    gateskip.remove_gates(m)
    assert torch.equal(logits(m, ids), ref)
    assert not gateskip.is_gated(m)


def test_gemma_gate_sits_after_post_norm():
    m = tiny_model("gemma2")
    gateskip.add_gates(m, DIVERSE)
    layer = m.model.layers[0]
    assert isinstance(layer.post_attention_layernorm, torch.nn.Identity)
    assert layer.self_attn.post_norm is not None
    gateskip.remove_gates(m)
    assert not isinstance(layer.post_attention_layernorm, torch.nn.Identity)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.9])
def test_quantile_skips_exact_count_per_module(ratio):
    m = gateskip.add_gates(tiny_model("llama"), DIVERSE)
    ids, mask = left_padded([12, 7, 10])
    with gateskip.skipping(m, ratio=ratio, policy="quantile"):
        logits(m, ids, mask)
        counts = gate_state(m).counts
    n_valid = int(mask.sum())
    assert torch.all(counts[:, 1] == n_valid)  # padding is never counted
    assert torch.all(counts[:, 0] == round(ratio * n_valid))


def test_padding_never_skipped():
    from gateskip.policies import quantile_skip, random_skip, threshold_skip

    imp = torch.tensor([[0.0, 0.0, 0.5, 0.6, 0.7, 0.8]])
    valid = torch.tensor([[False, False, True, True, True, True]])
    assert not quantile_skip(imp, valid, 0.9)[~valid].any()
    assert not threshold_skip(imp, valid, torch.tensor(0.65))[~valid].any()
    assert not random_skip(imp, valid, 1.0, None)[~valid].any()
    assert quantile_skip(imp, valid, 0.5).sum() == 2


def _calibrated(family="llama", ratio=0.3, cfg=DIVERSE):
    m = gateskip.add_gates(tiny_model(family), cfg)
    g = torch.Generator().manual_seed(1)
    gateskip.calibrate(m, [torch.randint(1, VOCAB, (4, 32), generator=g) for _ in range(4)], ratio=ratio)
    return m


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
def test_threshold_hits_ratio_on_heldout(ratio):
    m = _calibrated(ratio=0.3)
    g = torch.Generator().manual_seed(99)  # held-out tokens, not seen by calibration
    with gateskip.skipping(m, ratio=ratio, policy="threshold"):
        for _ in range(3):
            logits(m, torch.randint(1, VOCAB, (4, 32), generator=g))
        s = gateskip.stats(m)
    assert abs(s["tokens_skipped"] - ratio) < 0.05


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_threshold_is_batch_independent(family):
    m = _calibrated(family)
    lengths = [11, 6, 9]
    ids, mask = left_padded(lengths)
    with gateskip.skipping(m, ratio=0.4, policy="threshold"):
        batched = logits(m, ids, mask)
        batched_counts = gate_state(m).counts.clone()
    alone_counts = torch.zeros_like(batched_counts)
    for i, n in enumerate(lengths):
        row = ids[i:i + 1, -n:]
        with gateskip.skipping(m, ratio=0.4, policy="threshold"):
            alone = logits(m, row)
            alone_counts += gate_state(m).counts
        assert (alone[0] - batched[i, -n:]).abs().max() < 1e-4
    assert torch.equal(alone_counts[:, :2], batched_counts[:, :2])  # same tokens skipped, same counted
    assert batched_counts[:, 0].sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv", ["copy", "compute"])
@pytest.mark.parametrize("lengths", [[9, 5], [9]], ids=["batch2", "batch1"])
def test_cached_generation_equals_recompute(family, kv, lengths):
    """Batch 1 decodes through the one-token host decision (one_token.py); the recompute ranks with masks."""
    m = _calibrated(family)
    ids, mask = left_padded(lengths)
    out, recomputed, t0 = generate_then_recompute(m, ids, mask, 8, logits, ratio=0.4, policy="threshold", kv=kv)
    seq = out.sequences
    for step, step_logits in enumerate(out.logits):
        assert (step_logits - recomputed[:, t0 - 1 + step]).abs().max() < 1e-4
    # Greedy tokens are the recomputed argmax, up to and including a row's first EOS (then padding).
    new = seq[:, t0:]
    live = (new == 2).long().cumsum(-1).roll(1, -1)
    live[:, 0] = 0
    live = live == 0
    assert torch.equal(recomputed[:, t0 - 1:-1].argmax(-1)[live], new[live])


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: sliding layers (window 16) clamp the context
def test_one_token_statistics_equal_the_mask_count(family, monkeypatch):
    """Decode at batch 1 counts its decisions on the host (one_token.py); the per-branch counts
    (skipped, tokens, attention context kept / seen) must equal what the mask-based path counts."""
    from gateskip.state import GateState

    m = _calibrated(family)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))

    def counts():
        with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy="threshold"):
            m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                       pad_token_id=0)
            return gate_state(m).counts.clone(), gateskip.stats(m)

    host, host_stats = counts()
    real = GateState.begin_call

    def mask_only(self, valid, ctx, **kw):
        real(self, valid, ctx, **kw)
        self.call.one_token = False

    monkeypatch.setattr(GateState, "begin_call", mask_only)
    masked, masked_stats = counts()
    assert host[:, 0].sum() > 0 and (host[:, 0] < host[:, 1]).any()  # some skipped, not all
    assert torch.equal(host, masked)
    assert host_stats["compute_saved"] == masked_stats["compute_saved"]


def test_copy_kv_uses_layer_below():
    """With kv=copy a skipped token's K/V at layer l equal its K/V at layer l-1 in the cache."""
    m = _calibrated("llama")
    ids = torch.randint(1, VOCAB, (1, 12))
    with torch.no_grad(), gateskip.skipping(m, ratio=0.5, policy="quantile", kv="copy"):
        out = m(input_ids=ids, use_cache=True)
    cache = output_cache(out)
    k1, k0 = cache.layers[1].keys, cache.layers[0].keys
    same = (k1 - k0).abs().amax(dim=(1, 3)) == 0  # [B, T]: tokens whose keys were copied
    assert 0 < same.sum() < 12


def test_random_policy_ratio_and_seed():
    m = gateskip.add_gates(tiny_model("llama"))
    ids = torch.randint(1, VOCAB, (4, 64))
    with gateskip.skipping(m, ratio=0.3, policy="random", seed=3):
        a = logits(m, ids)
        s = gateskip.stats(m)
    with gateskip.skipping(m, ratio=0.3, policy="random", seed=3):
        b = logits(m, ids)
    assert torch.equal(a, b)
    assert abs(s["tokens_skipped"] - 0.3) < 0.05


def test_per_module_ratios_and_modules():
    m = gateskip.add_gates(tiny_model("llama"), DIVERSE)
    ids = torch.randint(1, VOCAB, (2, 20))
    with gateskip.skipping(m, ratio={"attn": 0.5, "layers.1.mlp": 0.25}):
        logits(m, ids)
        s = gateskip.stats(m)
    assert s["attn_skipped"] == 0.5
    assert s["per_module"]["layers.1.mlp"]["skipped"] == 0.25
    assert s["per_module"]["layers.0.mlp"]["skipped"] == 0.0
    with gateskip.skipping(m, ratio=0.5, modules=("mlp",)):
        logits(m, ids)
        s = gateskip.stats(m)
    assert s["attn_skipped"] == 0.0 and s["mlp_skipped"] == 0.5


def test_compute_accounting_counts_gates_and_skips():
    m = gateskip.add_gates(tiny_model("llama"), DIVERSE)
    ids = torch.randint(1, VOCAB, (2, 16))
    with gateskip.skipping(m, ratio=0.0):
        logits(m, ids)
        s0 = gateskip.stats(m)
    assert s0["flops_executed"] - s0["flops_dense"] == pytest.approx(s0["gate_flops"])
    assert s0["compute_saved"] < 0  # vector gates cost compute; nothing skipped
    f = gate_state(m).flops
    with gateskip.skipping(m, ratio={"mlp": 0.5}):
        logits(m, ids)
        s1 = gateskip.stats(m)
    saved_mlp = 0.5 * 32 * f.mlp * 3  # half of 32 tokens skip the MLP in each of 3 layers
    assert s1["flops_dense"] - s1["flops_executed"] == pytest.approx(saved_mlp - s1["gate_flops"])
    assert s1["tokens_skipped"] == pytest.approx(0.25)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kinds", [("mlp",), ("attn",)])
def test_branches_without_gates_count_as_dense_compute(family, kinds):
    """Gates on one branch kind only: the other kind runs densely and costs the same on both sides. The dense
    FLOPs equal the gate-free count of the same calls (padded prefill, cached decode, the batch-1 one-token
    path, sliding windows), and the saving is the gated kind's skipped tokens minus its gates, alone."""
    from gateskip.flopcount import TokenCounter

    m = _calibrated(family, ratio=0.4, cfg=GateSkipConfig(init_std=0.3, init_bias=0.0, modules=kinds))
    ids, mask = left_padded([20, 11, 17])
    f = gate_state(m).flops
    runs = [dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids[1:2, -11:])]  # batch 3, then batch 1
    for kw in runs:
        with torch.no_grad(), TokenCounter(m) as ref, gateskip.skipping(m, ratio=0.4, policy="threshold"):
            m.generate(**kw, max_new_tokens=5, do_sample=False, pad_token_id=0)
            s = gateskip.stats(m)
        assert s["flops_dense"] == pytest.approx(ref.stats()["flops_dense"], rel=1e-9)
        skipped = sum(v["skipped"] * v["tokens"] for v in s["per_module"].values())
        per_token = f.mlp - f.fallback_mlp if kinds == ("mlp",) else None
        assert s[f"{kinds[0]}_skipped"] > 0.1
        assert s["tokens_skipped"] == pytest.approx(s[f"{kinds[0]}_skipped"] / 2)  # the other kind never skips
        if per_token is not None:
            assert s["flops_dense"] - s["flops_executed"] == pytest.approx(skipped * per_token - s["gate_flops"])


def test_save_load_roundtrip(tmp_path):
    m = _calibrated("qwen2")
    ids = torch.randint(1, VOCAB, (2, 16))
    with gateskip.skipping(m, ratio=0.3, policy="threshold"):
        ref = logits(m, ids)
    gateskip.save_gates(m, tmp_path / "g")
    fresh = tiny_model("qwen2")
    gateskip.load_gates(fresh, tmp_path / "g")
    with gateskip.skipping(fresh, ratio=0.3, policy="threshold"):
        assert torch.equal(logits(fresh, ids), ref)


@pytest.mark.parametrize("other", [{"hidden_size": 96}, {"num_hidden_layers": 2}])
def test_load_for_another_model_fails_clearly(tmp_path, other):
    m = gateskip.add_gates(tiny_model("llama"))
    gateskip.save_gates(m, tmp_path / "g")
    with pytest.raises(GateSkipError, match="another model"):
        gateskip.load_gates(tiny_model("llama", **other), tmp_path / "g")


def test_corrupt_and_missing_gate_files(tmp_path):
    m = gateskip.add_gates(tiny_model("llama"))
    gateskip.save_gates(m, tmp_path / "g")
    (tmp_path / "g" / "gates.safetensors").write_bytes(b"\x80\x04\x95 not a safetensors file" * 4)
    with pytest.raises(GateSkipError, match="corrupt"):
        gateskip.load_gates(tiny_model("llama"), tmp_path / "g")
    with pytest.raises(GateSkipError, match="does not exist"):
        gateskip.load_gates(tiny_model("llama"), tmp_path / "nothing")


def test_bad_inputs_fail_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(GateSkipError, match="unsupported architecture 'gpt2'"):
        gateskip.add_gates(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    m = gateskip.add_gates(tiny_model("llama"))
    with pytest.raises(GateSkipError, match="already has gates"):
        gateskip.add_gates(m)
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(GateSkipError, match="skip ratio"):
            with gateskip.skipping(m, ratio=bad):
                pass
    with pytest.raises(GateSkipError, match="policy"):
        with gateskip.skipping(m, ratio=0.2, policy="best"):
            pass
    with pytest.raises(GateSkipError, match="calibrate"):
        with gateskip.skipping(m, ratio=0.2, policy="threshold"):
            pass
    with pytest.raises(GateSkipError, match="empty input"):
        gateskip.calibrate(m, [torch.zeros(1, 0, dtype=torch.long)])
    with pytest.raises(GateSkipError, match="no batches"):
        gateskip.calibrate(m, [])
    with pytest.raises(GateSkipError, match="gate="):
        GateSkipConfig(gate="huge")


@pytest.mark.parametrize("kind", ["scalar", "lowrank", "mlp"])
def test_gate_kinds_and_shared(kind):
    m = gateskip.add_gates(tiny_model("mistral"), GateSkipConfig(gate=kind, rank=4))
    ids = torch.randint(1, VOCAB, (2, 8))
    with gateskip.skipping(m, ratio=0.25):
        logits(m, ids)
        assert gateskip.stats(m)["tokens_skipped"] == pytest.approx(0.25)
    shared = gateskip.add_gates(tiny_model("llama"), GateSkipConfig(shared=True))
    assert len(gateskip.gate_parameters(shared)) == 4  # one vector gate (W, b) per module kind


@pytest.mark.parametrize("kind", ["vector", "scalar", "lowrank", "mlp"])
def test_gate_fast_path_uses_its_own_current_weights(kind):
    """The functional fast path of Gate.forward computes sigmoid(proj(x)) with the module's weights,
    also after they are changed in place and in a deep copy (the cached references must follow)."""
    import copy

    from gateskip.gates import Gate

    gate = Gate(16, GateSkipConfig(gate=kind, rank=4))
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    assert torch.allclose(gate(x), torch.sigmoid(gate.proj(x)), atol=1e-6)
    clone = copy.deepcopy(gate)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    assert torch.allclose(clone(x), torch.sigmoid(clone.proj(x)), atol=1e-6)
    assert not torch.allclose(clone(x), gate(x))
    assert torch.allclose(gate(x.double()), torch.sigmoid(gate.proj(x)), atol=1e-6)  # input cast to float32


@pytest.mark.parametrize("kind", ["vector", "scalar", "lowrank", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_gate_equals_forward_and_importance(kind, dtype):
    """one_token.gate_values (decode at batch 1: matrix-vector ops, importance read on the host) must give the
    values and the importance that forward + importance give the branch, in the branch's dtype."""
    import copy

    from gateskip import one_token
    from gateskip.gates import Gate, importance

    gate = Gate(16, GateSkipConfig(gate=kind, rank=4))
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    for g in (gate, copy.deepcopy(gate)):  # a copy must use its own weights
        x = torch.randn(1, 1, 16).to(dtype)
        with torch.no_grad():
            want = g(x).to(dtype)
            values = one_token.gate_values(g, x)
            imp = one_token.importance(values)
        assert values.dtype == dtype and values.shape == (want.shape[-1],)
        assert torch.allclose(values.float(), want.reshape(-1).float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
        assert imp == pytest.approx(float(importance(want)), abs=1e-6 if dtype == torch.float32 else 1e-2)
        with torch.no_grad():
            next(g.parameters()).add_(1.0)


def test_sampled_generation_with_cache_equals_recompute():
    m = _calibrated("qwen3")
    ids, mask = left_padded([8, 4])
    with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy="threshold", kv="copy"):
        torch.manual_seed(5)
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        torch.manual_seed(5)
        again = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0,
                           pad_token_id=0, eos_token_id=None)
        seq = out.sequences
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
        recomputed = logits(m, seq, full_mask)
    assert torch.equal(again, seq)
    for step, step_logits in enumerate(out.logits):
        assert (step_logits - recomputed[:, ids.shape[1] - 1 + step]).abs().max() < 1e-4


@pytest.mark.parametrize("kv", ["copy", "compute"])
def test_global_allocation_shares_one_threshold_and_meets_budget(kv):
    from gateskip.budget import global_ratios

    # Branch 0's importances are uniformly low, branch 1's high: a shared threshold skips mostly branch 0.
    grids = torch.stack([torch.linspace(0.0, 0.5, 1001), torch.linspace(0.4, 1.0, 1001)])
    r = global_ratios(grids, [1.0, 3.0], 0.3)
    assert (1.0 * r[0] + 3.0 * r[1]) / 4.0 == pytest.approx(0.3, abs=1e-3)
    assert r[0] > 0.9 and r[1] < 0.15
    m = _calibrated("llama")
    ids = torch.randint(1, VOCAB, (4, 32), generator=torch.Generator().manual_seed(7))
    with gateskip.skipping(m, ratio=0.3, policy="threshold", allocation="global", kv=kv) as plan:
        logits(m, ids)
        ratios = plan.ratios
    thresholds = [float(t) for t in plan.thresholds]
    assert max(thresholds) - min(thresholds) < 1e-3  # one importance threshold for every branch
    f = gate_state(m).flops
    # FLOPs a skipped token saves: with kv="compute" attention still projects its K/V
    attn = f.attn_qo + (f.attn_kv if kv == "copy" else 0.0)
    w = [attn if b.kind == "attn" else f.mlp for b in gate_state(m).branches]
    assert sum(a * b for a, b in zip(w, ratios)) / sum(w) == pytest.approx(0.3, abs=1e-3)
    with pytest.raises(GateSkipError, match="allocation"):
        with gateskip.skipping(m, ratio=0.3, allocation="best"):
            pass


def _skip_masks(m, fn):
    """Run ``fn()`` and return every branch's skip mask of that run (None where nothing was decided)."""
    st = gate_state(m)
    seen = []
    st.count_decision = lambda branch, skip, valid: seen.append(skip)  # instance attribute shadows the method
    try:
        fn()
    finally:
        del st.count_decision
    return seen


@pytest.mark.parametrize("policy", ["quantile", "threshold", "random"])
def test_protect_first_never_skips_the_first_real_token(policy):
    m = _calibrated(ratio=0.5)
    ids, mask = left_padded([9, 6, 12])
    first = mask.argmax(-1)  # the first real token of each left-padded row
    with gateskip.skipping(m, ratio=0.9, policy=policy):
        masks = _skip_masks(m, lambda: logits(m, ids, mask))
    assert any(s[torch.arange(3), first].any() for s in masks)  # without protection BOS does skip here
    with gateskip.skipping(m, ratio=0.9, policy=policy, protect_first=2):
        masks = _skip_masks(m, lambda: logits(m, ids, mask))
    for s in masks:
        assert not s[torch.arange(3), first].any() and not s[torch.arange(3), first + 1].any()
        assert s[mask.bool()].float().mean() > 0.5  # the rest still skips at the requested ratio
    if policy == "quantile":  # the budget is taken from the unprotected tokens: round(0.9 * (n_valid - 6))
        assert all(int(s.sum()) == round(0.9 * (int(mask.sum()) - 6)) for s in masks)


def test_protect_first_comes_from_the_gates_config_and_ends_in_decode():
    cfg = GateSkipConfig(init_std=0.3, init_bias=0.0, protect_first=1)
    m = gateskip.add_gates(tiny_model("qwen2"), cfg)
    ids = torch.randint(1, VOCAB, (1, 10))
    with torch.no_grad(), gateskip.skipping(m, ratio=1.0):  # everything would skip but the protected token
        masks = _skip_masks(m, lambda: m(input_ids=ids, use_cache=False))
        assert all(s[0, 0].item() is False and s[0, 1:].all() for s in masks)
        out = m(input_ids=ids, use_cache=True)
        cache = output_cache(out)
        step = _skip_masks(m, lambda: m(input_ids=ids[:, -1:], use_cache=True, **{model_cache_arg(m): cache}))
        assert all(s.all() for s in step)  # position 10 of the sequence is not protected
    with pytest.raises(GateSkipError, match="protect_first"):
        GateSkipConfig(protect_first=-1)
    with pytest.raises(GateSkipError, match="protect_first"), gateskip.skipping(m, ratio=0.2, protect_first=0.5):
        pass


def test_protect_tail_never_skips_a_prompts_last_tokens_and_ends_in_decode():
    """protect_tail=N: in a call with nothing cached, each row's last N real tokens never skip (left padding
    accounted for); a cached decode step is not protected."""
    m = gateskip.add_gates(tiny_model("llama"), GateSkipConfig(init_std=0.3, init_bias=0.0))
    ids, mask = left_padded([9, 6, 12])
    with torch.no_grad(), gateskip.skipping(m, ratio=1.0, policy="quantile", protect_tail=3):
        masks = _skip_masks(m, lambda: m(input_ids=ids, attention_mask=mask, use_cache=False))
    real = mask.bool()
    for s in masks:
        assert not s[:, -3:].any() and s[:, :-3][real[:, :-3]].all()
    with torch.no_grad(), gateskip.skipping(m, ratio=1.0, protect_tail=3):
        out = m(input_ids=ids[:1], use_cache=True)
        step = _skip_masks(m, lambda: m(input_ids=ids[:1, -1:], use_cache=True,
                                        **{model_cache_arg(m): output_cache(out)}))
        assert all(s.all() for s in step)
    with pytest.raises(GateSkipError, match="protect_tail"), gateskip.skipping(m, ratio=0.2, protect_tail=-1):
        pass


def test_a_state_subclass_is_the_extension_point_for_other_deciders():
    """add_gates(state_cls=...): a GateState subclass that overrides on_gate decides which tokens skip; skipping,
    statistics and remove_gates stay the same (here: every odd position skips every branch)."""
    from gateskip.state import GateState

    class OddTokens(GateState):
        one_token_fast = False

        def on_gate(self, branch, x, g, imp=None):
            valid = self.valid_for(x)
            skip = None
            if self.plan is not None and self.plan.ratios[branch.index] > 0:
                skip = (torch.arange(x.shape[1]) % 2 == 1).expand(x.shape[0], -1) & valid
            if self.plan is not None:
                self.count_decision(branch, skip, valid)
            return skip

    ids = torch.randint(3, 99, (2, 10))
    ref = tiny_model("llama")
    dense = ref(ids).logits
    m = gateskip.add_gates(tiny_model("llama"), GateSkipConfig(init_bias=50.0, init_std=0.0), state_cls=OddTokens)
    outs = {}
    for path in ("masked", "physical"):
        with torch.no_grad(), gateskip.skipping(m, ratio=0.5, path=path):
            outs[path] = m(ids).logits
            assert gateskip.stats(m)["tokens_skipped"] == pytest.approx(0.5)
    assert torch.allclose(outs["masked"], outs["physical"], atol=1e-5)
    assert torch.allclose(outs["masked"][:, 0], dense[:, 0], atol=1e-5)  # position 0 never skips here
    assert not torch.allclose(outs["masked"][:, 1], dense[:, 1], atol=1e-3)
    gateskip.remove_gates(m)
    assert torch.equal(m(ids).logits, dense)
    with pytest.raises(GateSkipError, match="not a GateState subclass"):
        gateskip.add_gates(tiny_model("llama"), state_cls=dict)
