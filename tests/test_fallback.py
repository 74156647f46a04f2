"""Fallbacks (fallback.py): a skipped token gets g * fallback(x) instead of 0, on every path."""

import pytest
import torch
from conftest import FAMILIES, VOCAB, generate_then_recompute, left_padded, path_grads, positions
from safetensors.torch import load_file, save_file
from torch import nn

import gateskip
from gateskip import GateSkipConfig, GateSkipError
from gateskip.core import gate_modules, gate_state
from gateskip.fallback import fallback_modules, fallback_parameters
from gateskip.models import tiny_model

KINDS = ["mean", "linear", "lowrank", "lowrank/linear", "lowrank/neurons"]  # "a/b": attention a, MLP b
TOL = 1e-4


def _cfg(kind="zero", **kw):
    """``kind``: "a/b" (attention a, MLP b), "a/b@R": MLP fallbacks of rank R."""
    kind, _, mlp_rank = kind.partition("@")
    attn, _, mlp = kind.partition("/")
    return GateSkipConfig(init_std=0.3, init_bias=0.0, fallback=attn, fallback_mlp=mlp or None, fallback_rank=8,
                          fallback_neurons=4, fallback_rank_mlp=int(mlp_rank) if mlp_rank else None, **kw)


def _data(n=3, b=4, t=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (b, t), generator=g) for _ in range(n)]


def _fitted(family, kind, **fit_kw):
    m = gateskip.add_gates(tiny_model(family), _cfg(kind))
    gateskip.calibrate(m, _data(), ratio=0.3)
    gateskip.fit_fallback(m, _data(seed=2), **fit_kw)
    return m


def _logits(m, ids, mask=None):
    kw = {} if mask is None else {"attention_mask": mask, "position_ids": positions(mask)}
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False, **kw).logits


def _same_gates(dst, src):
    for name, g in gate_modules(dst).items():
        g.load_state_dict(gate_modules(src)[name].state_dict())
    gate_state(dst).loaded.calibration = gate_state(src).loaded.calibration


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_zero_fallback_is_the_paper_bit_for_bit(family):
    """fallback="zero" builds no fallback module and leaves every path's outputs exactly as they were."""
    ref = gateskip.add_gates(tiny_model(family), GateSkipConfig(init_std=0.3, init_bias=0.0))
    m = gateskip.add_gates(tiny_model(family), _cfg("zero"))
    _same_gates(m, ref)
    gateskip.calibrate(ref, _data(), ratio=0.3)
    _same_gates(m, ref)
    assert not fallback_modules(m) and not fallback_parameters(m)
    ids, mask = left_padded([20, 11, 17])
    for path in ("masked", "physical"):
        outs = []
        for model in (ref, m):
            with torch.no_grad(), gateskip.skipping(model, ratio=0.4, policy="threshold", path=path):
                padded = _logits(model, ids, mask)
                gen = model.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0,
                                     output_logits=True, return_dict_in_generate=True)
                outs.append((padded, torch.stack(gen.logits), gateskip.stats(model)["flops_executed"]))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        assert outs[0][2] == outs[1][2]


@pytest.mark.parametrize("kind", KINDS)
def test_unfitted_fallback_outputs_zero_and_ratio_zero_changes_nothing(kind):
    ref = gateskip.add_gates(tiny_model("qwen2"), _cfg("zero"))
    gateskip.calibrate(ref, _data(), ratio=0.3)
    m = gateskip.add_gates(tiny_model("qwen2"), _cfg(kind))
    _same_gates(m, ref)
    ids = torch.randint(1, VOCAB, (2, 24))
    with torch.no_grad(), gateskip.skipping(ref, ratio=0.4, policy="threshold"):
        skipped = _logits(ref, ids)
    with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy="threshold"):
        assert torch.equal(_logits(m, ids), skipped)  # before fitting a fallback is 0
    gateskip.fit_fallback(m, _data(seed=2))
    with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy="threshold"):
        assert not torch.equal(_logits(m, ids), skipped)  # fitted, it changes what skipped tokens get
    with gateskip.skipping(m, ratio=0.0):
        fitted = _logits(m, ids)
    with gateskip.skipping(ref, ratio=0.0):
        assert torch.equal(fitted, _logits(ref, ids))
    assert torch.equal(_logits(m, ids), _logits(ref, ids))  # no plan at all


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_physical_equals_masked_and_cache_equals_recompute(family, kind):
    """Threshold policy after calibrate: prefill (padded batch, unpadded row), batched generate with the
    physical path against the masked one, and cached decode (batch 1 through the one-token path, batch 2
    with padding) against a recompute without cache; both KV modes."""
    if kind == "lowrank/linear":
        # under seed 0 one llama decode token's importance sits 1e-6 from its threshold: float noise between
        # cached decode and recompute flips it (a tie, not a path difference)
        torch.manual_seed(1)
    m = _fitted(family, kind, under_plan={"ratio": 0.3, "policy": "quantile"} if kind.startswith("lowrank") else None)
    ids, mask = left_padded([20, 11, 17])
    for kv in ("copy", "compute"):
        out = {}
        for path in ("masked", "physical"):
            with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy="threshold", kv=kv, path=path):
                padded, row = _logits(m, ids, mask), _logits(m, ids[:1])
                gen = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
                out[path] = (padded, row, gen)
                s = gateskip.stats(m)
        (pm, um, gm), (pp, up, gp) = out["masked"], out["physical"]
        assert (pm - pp)[mask.bool()].abs().max() < TOL and (um - up).abs().max() < TOL
        assert torch.equal(gm.sequences, gp.sequences)
        assert max((a - b).abs().max() for a, b in zip(gm.logits, gp.logits)) < TOL
        assert s["path_calls"]["physical"] > 0 and s["tokens_skipped"] > 0.2
        for lengths in ([9], [9, 5]):
            i2, m2 = left_padded(lengths, seed=4)
            gen, again, t0 = generate_then_recompute(m, i2, m2, 6, _logits, ratio=0.4, policy="threshold", kv=kv)
            for step, step_logits in enumerate(gen.logits):
                assert (step_logits - again[:, t0 - 1 + step]).abs().max() < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_decode_batch1_skipping_a_whole_branch_gets_its_fallback(kind):
    """A branch skipped by the one decode token is not called (physical.skip_all): it adds g * fallback(x)."""
    m = _fitted("qwen3", kind)
    ids = torch.randint(1, VOCAB, (1, 10))
    ratio = {"attn": 0.3, "mlp": 0.3, "layers.1.attn": 1.0, "layers.1.mlp": 1.0}
    res = {}
    for path in ("masked", "physical"):
        with torch.no_grad(), gateskip.skipping(m, ratio=ratio, policy="threshold", path=path):
            gen = m.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
            res[path] = torch.stack(gen.logits)
    assert (res["masked"] - res["physical"]).abs().max() < TOL


def test_physical_backward_matches_masked_and_fallback_is_trainable():
    m = _fitted("mistral", "lowrank")
    ids = torch.randint(1, VOCAB, (2, 12))
    fb = m.model.layers[1].mlp.fallback
    grads = path_grads(m, ids, lambda m: (m.model.layers[1].self_attn.module.q_proj.weight.grad.clone(),
                                          fb.A.grad.clone(), fb.bias.grad.clone()))
    assert all(p.requires_grad for p in fallback_parameters(m))
    assert grads["masked"][1].abs().sum() > 0
    for a, b in zip(grads["masked"], grads["physical"]):
        assert (a - b).abs().max() < TOL
    m.zero_grad()  # straight-through training: the fallback still gets gradients through skipped tokens
    with gateskip.skipping(m, ratio=0.4, straight_through=True):
        m(input_ids=ids, labels=ids).loss.backward()
    assert m.model.layers[1].mlp.fallback.bias.grad.abs().sum() > 0


def _planted(kind, rank=None):
    """A float64 tiny Llama whose layer-1 MLP is a known linear map (of rank ``rank`` if given)."""
    m = tiny_model("llama").double()
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(64, 64).double()
    with torch.no_grad():
        w = torch.randn(64, 64, generator=g, dtype=torch.float64) / 8
        if rank is not None:
            u, s, vt = torch.linalg.svd(w)
            w = u[:, :rank] @ torch.diag(s[:rank]) @ vt[:rank]
        lin.weight.copy_(w)
        lin.bias.copy_(torch.randn(64, generator=g, dtype=torch.float64))
    m.model.layers[1].mlp = lin
    gateskip.add_gates(m, _cfg(kind, modules=("mlp",)) if rank is None else
                       GateSkipConfig(fallback=kind, fallback_rank=rank, modules=("mlp",)))
    return m, lin


@pytest.mark.parametrize("kind,rank", [("linear", None), ("lowrank", 4)])
def test_closed_form_recovers_a_planted_linear_branch(kind, rank):
    m, lin = _planted(kind, rank)
    summary = gateskip.fit_fallback(m, _data(n=2, b=4, t=32), ridge=1e-12)
    fb = m.model.layers[1].mlp.fallback
    w = fb.weight if kind == "linear" else fb.A @ fb.B
    assert (w - lin.weight.T).abs().max() < 1e-6
    assert (fb.bias - lin.bias).abs().max() < 1e-6
    assert summary["r2"]["layers.1.mlp"] > 1 - 1e-9 and summary["tokens"] == 2 * 4 * 32


def test_streaming_fit_does_not_depend_on_the_batch_split_and_ignores_padding():
    m, _ = _planted("linear")
    ids = torch.randint(1, VOCAB, (8, 24), generator=torch.Generator().manual_seed(3))

    def fitted(batches, **kw):
        gateskip.fit_fallback(m, batches, **kw)
        return {k: v.clone() for k, v in fallback_modules(m)["layers.0.mlp"].state_dict().items()}

    one = fitted([ids])
    four = fitted(list(ids.split(2)))
    assert all((one[k] - four[k]).abs().max() < 1e-8 for k in one)
    assert one["weight"].dtype == torch.float64
    padded, mask = left_padded([24, 10, 17], seed=5)
    with_pad = fitted([{"input_ids": padded, "attention_mask": mask}])
    rows = [padded[i, -n:][None] for i, n in enumerate([24, 10, 17])]
    alone = fitted(rows)
    assert all((with_pad[k] - alone[k]).abs().max() < 1e-8 for k in one)


def test_fit_under_a_plan():
    """Branch by branch under the plan: the first branch sees what it sees without skipping; later ones see
    their inputs under skipping upstream (with the upstream fallbacks fitted). A plan at ratio 0 is no plan."""
    m = gateskip.add_gates(tiny_model("llama"), _cfg("linear"))
    gateskip.calibrate(m, _data(), ratio=0.3)

    def fitted(**kw):
        s = gateskip.fit_fallback(m, _data(seed=2), **kw)
        return s, {n: f.weight.clone() for n, f in fallback_modules(m).items()}

    s0, plain = fitted()
    s1, zero_plan = fitted(under_plan={"ratio": 0.0})
    s2, planned = fitted(under_plan={"ratio": 0.4, "policy": "threshold", "kv": "compute"})
    assert s0["passes"] == 1 and s1["passes"] == s2["passes"] == 6
    assert all(torch.equal(plain[n], zero_plan[n]) for n in plain)
    assert torch.equal(plain["layers.0.attn"], planned["layers.0.attn"])
    assert not torch.equal(plain["layers.2.mlp"], planned["layers.2.mlp"])
    assert gate_state(m).plan is None


@pytest.mark.parametrize("kind,per_token", [("mean", 64), ("linear", 2 * 64 * 64), ("lowrank", 2 * 2 * 64 * 8)])
def test_flop_accounting_charges_the_fallback(kind, per_token):
    m = gateskip.add_gates(tiny_model("llama"), _cfg(kind))
    ids = torch.randint(1, VOCAB, (2, 16))
    with gateskip.skipping(m, ratio={"mlp": 0.5}):
        _logits(m, ids)
        s = gateskip.stats(m)
    mlp = 2 * 3 * 64 * 128  # gate, up, down projections of the tiny model (H 64, I 128)
    gate = 2 * 64 * 64  # a vector gate
    skipped = 16 * 3  # half of 32 tokens skip the MLP in each of 3 layers
    assert gate_state(m).flops.fallback == per_token
    assert s["gate_flops"] == 32 * 6 * gate
    assert s["flops_dense"] - s["flops_executed"] == pytest.approx(skipped * (mlp - per_token) - 32 * 6 * gate)


def test_flop_accounting_per_branch_kind():
    """attn lowrank / mlp linear: each skipped token is charged its own branch kind's fallback."""
    m = gateskip.add_gates(tiny_model("llama"), _cfg("lowrank/linear"))
    fb = {b.kind: type(b.fallback).__name__ for b in gate_state(m).branches}
    assert fb == {"attn": "LowRankFallback", "mlp": "LinearFallback"}
    ids = torch.randint(1, VOCAB, (2, 16))
    res = {}
    for scope in ("attn", "mlp"):
        with gateskip.skipping(m, ratio={scope: 0.5}, kv="compute"):
            _logits(m, ids)
            res[scope] = gateskip.stats(m)
    ref = {scope: gateskip.add_gates(tiny_model("llama"), _cfg("lowrank" if scope == "attn" else "linear"))
           for scope in ("attn", "mlp")}
    for scope, r in ref.items():
        _same_gates(r, m)  # the same tokens skip: a kept token's attention cost depends on its position
        with gateskip.skipping(r, ratio={scope: 0.5}, kv="compute"):
            _logits(r, ids)
            assert gateskip.stats(r)["flops_executed"] == res[scope]["flops_executed"]
    f = gate_state(m).flops
    assert (f.fallback, f.fallback_mlp) == (2 * 2 * 64 * 8, 2 * 64 * 64)


def test_fallback_mlp_config_checks():
    assert GateSkipConfig(fallback="linear", fallback_mlp="linear").fallback_mlp is None
    with pytest.raises(GateSkipError, match="fallback_mlp"):
        GateSkipConfig(fallback="lowrank", fallback_mlp="quadratic")
    with pytest.raises(GateSkipError, match="above the hidden size"):
        gateskip.add_gates(tiny_model("llama"), GateSkipConfig(fallback="zero", fallback_mlp="lowrank",
                                                               fallback_rank=65))


@pytest.mark.parametrize("kind", KINDS + ["lowrank/neurons@16"])
def test_save_load_roundtrip(tmp_path, kind):
    m = _fitted("gemma2", kind)
    ids = torch.randint(1, VOCAB, (2, 16))
    with gateskip.skipping(m, ratio=0.3, policy="threshold"):
        ref = _logits(m, ids)
    gateskip.save_gates(m, tmp_path / "g")
    keys = load_file(str(tmp_path / "g" / "gates.safetensors"))
    assert "fallback.layers.0.mlp.bias" in keys
    fresh = gateskip.load_gates(tiny_model("gemma2"), tmp_path / "g")
    assert gate_state(fresh).cfg.to_dict() == gate_state(m).cfg.to_dict() and gate_state(fresh).cfg.fallback_rank == 8
    with gateskip.skipping(fresh, ratio=0.3, policy="threshold"):
        assert torch.equal(_logits(fresh, ids), ref)


def test_half_precision_storage_loads_as_the_rounded_weights(tmp_path):
    m = _fitted("llama", "lowrank")
    gateskip.save_gates(m, tmp_path / "f32")
    gateskip.save_gates(m, tmp_path / "f16", dtype="float16")
    half = load_file(str(tmp_path / "f16" / "gates.safetensors"))
    assert half["fallback.layers.0.mlp.A"].dtype == torch.float16 and half["calibration.grid"].dtype == torch.float32
    assert (tmp_path / "f16" / "gates.safetensors").stat().st_size < 0.6 * (
        tmp_path / "f32" / "gates.safetensors").stat().st_size
    # reference: the float32 folder's weights rounded to float16 by hand
    ref = gateskip.load_gates(tiny_model("llama"), tmp_path / "f32")
    with torch.no_grad():
        for mod in [*gate_modules(ref).values(), *fallback_modules(ref).values()]:
            for p in mod.parameters():
                p.copy_(p.half().float())
    fresh = gateskip.load_gates(tiny_model("llama"), tmp_path / "f16")
    ids = torch.randint(1, VOCAB, (2, 16))
    with gateskip.skipping(fresh, ratio=0.3, policy="threshold"):
        got = _logits(fresh, ids)
    with gateskip.skipping(ref, ratio=0.3, policy="threshold"):
        assert torch.equal(got, _logits(ref, ids))
    with pytest.raises(GateSkipError, match="unknown storage dtype 'int8'"):
        gateskip.save_gates(m, tmp_path / "bad", dtype="int8")


def test_a_fallback_that_does_not_fit_is_refused(tmp_path):
    other = gateskip.add_gates(tiny_model("llama", hidden_size=96), _cfg("linear"))
    gateskip.save_gates(other, tmp_path / "other")
    with pytest.raises(GateSkipError, match="another model"):
        gateskip.load_gates(tiny_model("llama"), tmp_path / "other")
    m = gateskip.add_gates(tiny_model("llama"), _cfg("linear"))
    gateskip.save_gates(m, tmp_path / "g")
    f = tmp_path / "g" / "gates.safetensors"
    tensors = load_file(str(f))
    theirs = load_file(str(tmp_path / "other" / "gates.safetensors"))
    tensors["fallback.layers.1.mlp.weight"] = theirs["fallback.layers.1.mlp.weight"]  # 96 x 96
    save_file(tensors, str(f))
    with pytest.raises(GateSkipError, match=r"fallback\.layers\.1\.mlp\.weight has shape \(96, 96\)") as e:
        gateskip.load_gates(tiny_model("llama"), tmp_path / "g")
    assert "\n" not in str(e.value)
    del tensors["fallback.layers.1.mlp.weight"]
    save_file(tensors, str(f))
    with pytest.raises(GateSkipError, match="lacks fallback.layers.1.mlp.weight"):
        gateskip.load_gates(tiny_model("llama"), tmp_path / "g")
    zero = gateskip.add_gates(tiny_model("llama"), _cfg("zero"))
    gateskip.save_gates(zero, tmp_path / "z")
    save_file({**load_file(str(tmp_path / "z" / "gates.safetensors")), "fallback.layers.0.mlp.bias": torch.zeros(64)},
              str(tmp_path / "z" / "gates.safetensors"))
    with pytest.raises(GateSkipError, match="unexpected fallback tensors"):
        gateskip.load_gates(tiny_model("llama"), tmp_path / "z")


def test_bad_fallback_settings_fail_clearly():
    cases = [
        (lambda: GateSkipConfig(fallback="median"), "fallback='median' is not supported: choose one of zero"),
        (lambda: GateSkipConfig(fallback_rank=0), "fallback_rank=0 is invalid"),
        (lambda: GateSkipConfig(fallback_rank=2.5), "fallback_rank=2.5 is invalid"),
        (lambda: gateskip.add_gates(tiny_model("llama"), GateSkipConfig(fallback="lowrank", fallback_rank=65)),
         "fallback_rank=65 is above the hidden size 64"),
    ]
    m = gateskip.add_gates(tiny_model("llama"))
    ids, mask = left_padded([6, 4])
    cases += [
        (lambda: gateskip.fit_fallback(m, [], kind="linear"), "no batches"),
        (lambda: gateskip.fit_fallback(m, iter([]), kind="mean"), "no batches"),
        (lambda: gateskip.fit_fallback(m, [{"input_ids": ids, "attention_mask": mask * 0}], kind="mean"),
         "no real tokens"),
        (lambda: gateskip.fit_fallback(m, [ids]), "nothing to fit for fallback='zero'"),
        (lambda: gateskip.fit_fallback(m, [ids], kind="lowrank", rank=100), "fallback_rank=100 is above the hidden"),
        (lambda: gateskip.fit_fallback(m, [ids], kind="cubic"), "fallback='cubic' is not supported"),
        (lambda: gateskip.fit_fallback(m, [ids], kind="mean", under_plan=0.3), "under_plan must be a dict"),
    ]
    for fn, message in cases:
        with pytest.raises(GateSkipError, match=message.replace("(", r"\(")) as e:
            fn()
        assert "\n" not in str(e.value)
    assert gate_state(m).cfg.fallback == "zero" and not fallback_modules(m)  # failed fits changed nothing


def test_fit_with_another_kind_updates_config_flops_and_folder(tmp_path):
    m = gateskip.add_gates(tiny_model("llama"), _cfg("zero"))
    summary = gateskip.fit_fallback(m, _data(n=1), kind="lowrank", rank=4)
    assert summary["kind"] == "lowrank" and summary["rank"] == 4
    st = gate_state(m)
    assert st.cfg.fallback == "lowrank" and st.cfg.fallback_rank == 4 and st.flops.fallback == 2 * 2 * 64 * 4
    assert fallback_modules(m)["layers.2.attn"].A.shape == (64, 4)
    gateskip.save_gates(m, tmp_path / "g")
    fresh = gateskip.load_gates(tiny_model("llama"), tmp_path / "g")
    assert torch.equal(fallback_modules(fresh)["layers.2.attn"].B, fallback_modules(m)["layers.2.attn"].B)


def test_sync_free_physical_fallback_reads_nothing_back():
    """The fallback's scatter is sized from the host-known count under sync_free quantile: no device read."""
    from test_physical import _HostReads

    m = _fitted("llama", "linear")
    ids, mask = left_padded([20, 11, 17])

    def reads(**kw):
        with torch.no_grad(), gateskip.skipping(m, path="physical", **kw), _HostReads() as h:
            out = _logits(m, ids, mask)
        return h.n, out

    base, _ = reads(ratio=0.0)
    n, out = reads(ratio=0.5, policy="quantile", sync_free=True)
    with torch.no_grad(), gateskip.skipping(m, path="masked", ratio=0.5, policy="quantile"):
        ref = _logits(m, ids, mask)
    assert n <= base + 1 and (out - ref)[mask.bool()].abs().max() < TOL


def test_fit_only_the_named_branches():
    m = gateskip.add_gates(tiny_model("llama"), _cfg("linear"))
    info = gateskip.fit_fallback(m, _data(), branches=["layers.1.mlp"])
    assert list(info["r2"]) == ["layers.1.mlp"]
    for name, fb in fallback_modules(m).items():
        fitted = any(bool(p.abs().sum() > 0) for p in fb.parameters())
        assert fitted == (name == "layers.1.mlp")
    with pytest.raises(GateSkipError, match="no gated branch named 'layers.9.mlp'"):
        gateskip.fit_fallback(m, _data(), branches=["layers.9.mlp"])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_neurons_fallback_finds_and_recovers_a_planted_sparse_mlp(family):
    """An MLP whose output comes from 3 of its 128 neurons: a neurons fallback with K=3 and full rank picks
    exactly those (their gate and up projections copied) and reproduces the branch (R^2 ~1); a linear map of x
    cannot. Gemma's branch output passes its post-norm too, so there only the R^2 rises, not to 1."""
    m = tiny_model(family).double()
    live = torch.tensor([5, 40, 99])
    with torch.no_grad():
        for layer in m.model.layers:
            keep = torch.zeros(layer.mlp.down_proj.weight.shape[1], dtype=torch.bool)
            keep[live] = True
            layer.mlp.down_proj.weight[:, ~keep] = 0
    cfg = GateSkipConfig(fallback="lowrank", fallback_mlp="neurons", fallback_neurons=3, fallback_rank=64)
    gateskip.add_gates(m, cfg)
    data = _data(n=4, b=4, t=32)
    r2 = gateskip.fit_fallback(m, data, ridge=1e-12)["r2"]
    lin = gateskip.fit_fallback(m, data, kind="lowrank", mlp_kind="linear", ridge=1e-12)["r2"]
    gateskip.fit_fallback(m, data, kind="lowrank", mlp_kind="neurons", neurons=3, rank=64, ridge=1e-12)
    mlp = m.model.layers[1].mlp
    fb = mlp.fallback
    assert type(fb).__name__ == "NeuronFallback" and fb.G.shape == (64, 3) and fb.A.shape == (67, 64)
    assert torch.equal(fb.G, mlp.module.gate_proj.weight[live].T.to(fb.G))
    assert torch.equal(fb.U, mlp.module.up_proj.weight[live].T.to(fb.U))
    for i in range(3):
        name = f"layers.{i}.mlp"
        assert r2[name] > lin[name] + 0.05
        if family == "llama":
            assert r2[name] > 1 - 1e-6
            x = torch.randn(7, 64, dtype=torch.float64)
            branch = m.model.layers[i].mlp
            assert (branch.fallback(x) - branch.module(x)).abs().max() < 1e-5


def test_neurons_fallback_flops_and_checks():
    m = gateskip.add_gates(tiny_model("llama"), _cfg("lowrank/neurons"))  # K 4, R 8, H 64
    f = gate_state(m).flops
    assert f.fallback_mlp == 2 * 2 * 64 * 4 + 2 * (64 + 4) * 8 + 2 * 8 * 64 and f.fallback == 2 * 2 * 64 * 8
    assert gate_state(m).cfg.fallback_name() == "attn lowrank8 / mlp neurons4r8"
    assert not {"fallback_neurons", "fallback_rank_mlp"} & set(GateSkipConfig(fallback="lowrank").to_dict())
    wide = gateskip.add_gates(tiny_model("llama"), _cfg("lowrank/neurons@16"))  # the MLP maps' own rank
    fb = {b.kind: b.fallback for b in gate_state(wide).branches}
    assert fb["attn"].A.shape == (64, 8) and fb["mlp"].A.shape == (68, 16)
    assert gate_state(wide).flops.fallback_mlp == 2 * 2 * 64 * 4 + 2 * (64 + 4) * 16 + 2 * 16 * 64
    assert gate_state(wide).cfg.fallback_name() == "attn lowrank8 / mlp neurons4r16"
    cases = [
        (lambda: GateSkipConfig(fallback="neurons"), "fallback='neurons' computes some of an MLP's neurons"),
        (lambda: GateSkipConfig(fallback_mlp="neurons", fallback_neurons=0), "fallback_neurons=0 is invalid"),
        (lambda: GateSkipConfig(fallback_rank_mlp=0), "fallback_rank_mlp=0 is invalid"),
        (lambda: gateskip.add_gates(tiny_model("llama"), GateSkipConfig(fallback_mlp="lowrank", fallback_rank_mlp=65)),
         "fallback_rank_mlp=65 is above the hidden size 64"),
        (lambda: gateskip.add_gates(tiny_model("llama"), GateSkipConfig(fallback_mlp="neurons", fallback_neurons=129)),
         "fallback_neurons=129 is above the MLP's 128 neurons"),
    ]
    for fn, message in cases:
        with pytest.raises(GateSkipError, match=message) as e:
            fn()
        assert "\n" not in str(e.value)
    only_mlp = GateSkipConfig(fallback="neurons", modules=("mlp",))  # no attention branch: fine
    assert only_mlp.fallback_of("mlp") == "neurons"
