"""The residual oracle (policy="oracle") and gates fitted in closed form to rank tokens by skipping cost."""

import pytest
import torch
from conftest import FAMILIES, VOCAB

import gateskip
from gateskip import GateSkipConfig, GateSkipError
from gateskip.core import gate_modules, gate_state
from gateskip.gatefit import fit_gates
from gateskip.gates import importance
from gateskip.models import tiny_model


def _data(n=3, b=4, t=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (b, t), generator=g) for _ in range(n)]


def _model(family="llama", fallback="lowrank", gate="lowrank", **kw):
    cfg = GateSkipConfig(**{"gate": gate, "init_std": 0.3, "init_bias": 0.0, "fallback": fallback, "fallback_rank": 8,
                            "kv": "compute", **kw})
    m = gateskip.add_gates(tiny_model(family), cfg)
    if fallback != "zero":
        gateskip.fit_fallback(m, _data(seed=2))
    return m


def _branch_io(m, name, ids, **plan):
    """(input, output) of one gated branch in a call under ``plan``."""
    b = next(b for b in gate_state(m).branches if b.name == name)
    seen = {}
    h1 = b.register_forward_pre_hook(lambda _m, a, k: seen.__setitem__("x", a[0] if a else k["hidden_states"]),
                                     with_kwargs=True)
    h2 = b.register_forward_hook(lambda _m, _a, o: seen.__setitem__("y", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad(), gateskip.skipping(m, **plan):
            m(input_ids=ids, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    return b, seen["x"], seen["y"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fallback", ["zero", "lowrank"])
def test_oracle_skips_the_tokens_whose_output_moves_least(family, fallback):
    m = _model(family, fallback)
    ids = _data(1, 2, 24, seed=5)[0]
    name = "layers.1.mlp"
    b, x, y = _branch_io(m, name, ids, ratio={name: 0.4}, policy="oracle", kv="compute")
    with torch.no_grad():
        raw = b.run_module(x, (), {})
        g = b.gate(x).to(x.dtype)
        alt = torch.zeros_like(raw) if b.fallback is None else b.fallback(x)
        score = ((raw - alt) * g).norm(dim=-1)
        k = round(0.4 * score.numel())
        skip = torch.zeros(score.numel(), dtype=torch.bool)
        skip[score.flatten().argsort(stable=True)[:k]] = True
        expected = torch.where(skip.view_as(score).unsqueeze(-1), alt * g, raw * g)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_oracle_at_ratio_zero_is_the_gated_model_and_counts_its_skips():
    m = _model()
    ids = _data(1, 2, 16, seed=3)[0]
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=False).logits
        with gateskip.skipping(m, ratio=0.0, policy="oracle", kv="compute"):
            out = m(input_ids=ids, use_cache=False).logits
        with gateskip.skipping(m, ratio=0.5, policy="oracle", kv="compute", protect_first=0):
            m(input_ids=ids, use_cache=False)
            s = gateskip.stats(m)
    torch.testing.assert_close(out, ref)
    assert s["tokens_skipped"] == pytest.approx(0.5)


def test_oracle_needs_kv_compute():
    m = _model()
    with pytest.raises(GateSkipError, match="kv='compute'"):
        with gateskip.skipping(m, ratio=0.3, policy="oracle", kv="copy"):
            pass


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_threshold_oracle_skips_per_token_what_it_was_calibrated_to(family):
    """calibrate(score="oracle") fits the oracle's thresholds without touching the gates'; under
    policy "oracle_threshold" a token skips exactly when its score is under its branch's threshold, the
    calibration text skips about the calibrated share, and cached decode equals recompute (per-token
    decisions are causal)."""
    from conftest import generate_then_recompute, left_padded, positions

    m = _model(family)
    data = _data(4, 4, 32, seed=9)
    gateskip.calibrate(m, data, ratio=0.3)
    gates_grid = gate_state(m).loaded.calibration["grid"].clone()
    with pytest.raises(GateSkipError, match="score='oracle'"):
        with gateskip.skipping(m, ratio=0.3, policy="oracle_threshold", kv="compute"):
            pass
    gateskip.calibrate(m, data, ratio=0.3, score="oracle")
    assert torch.equal(gate_state(m).loaded.calibration["grid"], gates_grid)
    with torch.no_grad(), gateskip.skipping(m, ratio=0.3, policy="oracle_threshold", kv="compute", protect_first=0):
        for ids in data:
            m(input_ids=ids, use_cache=False)
        s = gateskip.stats(m)
    assert s["tokens_skipped"] == pytest.approx(0.3, abs=0.03)
    name = "layers.1.mlp"
    ids = _data(1, 2, 24, seed=5)[0]
    b, x, y = _branch_io(m, name, ids, ratio={name: 0.4}, policy="oracle_threshold", kv="compute", protect_first=0)
    with torch.no_grad(), gateskip.skipping(m, ratio={name: 0.4}, policy="oracle_threshold", kv="compute") as plan:
        raw = b.run_module(x, (), {})
        g = b.gate(x).to(x.dtype)
        alt = b.fallback(x)
        skip = ((raw - alt) * g).norm(dim=-1) < plan.thresholds[b.index]
        expected = torch.where(skip.unsqueeze(-1), alt * g, raw * g)
    assert 0 < int(skip.sum()) < skip.numel()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    ids, mask = left_padded([9, 5])
    out, recomputed, t0 = generate_then_recompute(m, ids, mask, 6, lambda mm, seq, am: mm(
        input_ids=seq, attention_mask=am, position_ids=positions(am), use_cache=False).logits, ratio=0.3, policy="oracle_threshold", kv="compute")
    for step, step_logits in enumerate(out.logits):
        assert (step_logits - recomputed[:, t0 - 1 + step]).abs().max() < 1e-4
    with pytest.raises(GateSkipError, match="score='typo'"):
        gateskip.calibrate(m, data, score="typo")


@pytest.mark.parametrize("fallback", ["zero", "linear"])
def test_fitted_gates_rank_tokens_by_their_skipping_cost(fallback):
    """On the fit data, the tokens the fitted gates skip cost less (sum of ||g (y - fb)||) than a random choice."""
    m = _model("llama", fallback)
    cal = _data(4, 4, 32, seed=7)
    info = fit_gates(m, cal)
    assert set(info["r2"]) == {b.name for b in gate_state(m).branches}
    ids = cal[0]
    better = 0
    names = [b.name for b in gate_state(m).branches if b.kind == "mlp"]
    for name in names:
        b, x, _ = _branch_io(m, name, ids)
        with torch.no_grad():
            raw = b.run_module(x, (), {})
            alt = torch.zeros_like(raw) if b.fallback is None else b.fallback(x)
            cost = (raw - alt).norm(dim=-1).flatten()
            imp = importance(b.gate(x)).flatten()
        k = cost.numel() // 2
        gate_cost = cost[imp.argsort(stable=True)[:k]].sum()
        random_cost = cost.mean() * k
        better += bool(gate_cost < random_cost)
    assert better == len(names)


@pytest.mark.parametrize("gate", ["vector", "scalar", "lowrank"])
def test_every_gate_kind_holds_the_same_predictor_and_stays_near_one(gate):
    m = _model("qwen2", "mean", gate=gate, init_std=0.0)  # gates equal before the fit, so are the fallbacks
    cal = _data(3, 4, 32, seed=4)
    fit_gates(m, cal)
    b, x, _ = _branch_io(m, "layers.0.mlp", cal[0])
    with torch.no_grad():
        g = b.gate(x)
    assert 0.99 < float(g.mean()) < 1.0 and float(g.min()) > 0.9
    if gate != "scalar":
        torch.testing.assert_close(g.min(-1).values, g.max(-1).values)  # every unit holds the same logit
    # the same fit in another kind of gate ranks the same way
    ref = _model("qwen2", "mean", gate="vector", init_std=0.0)
    fit_gates(ref, cal)
    rb, rx, _ = _branch_io(ref, "layers.0.mlp", cal[0])
    with torch.no_grad():
        torch.testing.assert_close(importance(g), importance(rb.gate(rx)), rtol=1e-5, atol=1e-6)


def test_fit_gates_errors():
    with pytest.raises(GateSkipError, match="gate='mlp'"):
        fit_gates(_model(gate="mlp"), _data())
    with pytest.raises(GateSkipError, match="no batches"):
        fit_gates(_model(), [])


def test_a_gate_fit_on_few_tokens_for_its_width_warns():
    import warnings

    with pytest.warns(UserWarning, match="tokens for 64-wide inputs"):
        fit_gates(_model(), _data(1, 1, 32))  # 31 tokens past BOS for 64-wide inputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_gates(_model(), _data(4, 4, 32))  # 496 tokens


def test_fitted_gates_survive_save_and_load(tmp_path):
    m = _model()
    fit_gates(m, _data())
    gateskip.save_gates(m, tmp_path / "g")
    m2 = gateskip.load_gates(tiny_model("llama"), tmp_path / "g")
    for (n1, g1), (n2, g2) in zip(gate_modules(m).items(), gate_modules(m2).items()):
        assert n1 == n2
        for p1, p2 in zip(g1.parameters(), g2.parameters()):
            torch.testing.assert_close(p1, p2)


def test_fit_under_a_plan_refits_on_the_inputs_skipping_gives():
    """The first branch sees the same inputs either way; a later one sees upstream skipping under the plan."""
    cal = _data(2, 4, 32, seed=9)
    a, b = _model(init_std=0.0), _model(init_std=0.0)
    fit_gates(a, cal)
    fit_gates(b, cal, under_plan={"ratio": 0.5, "policy": "quantile"})
    ga, gb = gate_modules(a), gate_modules(b)
    first, later = "layers.0.attn", "layers.2.mlp"
    for p, q in zip(ga[first].parameters(), gb[first].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(p, q, rtol=1e-3, atol=1e-4) for p, q in zip(ga[later].parameters(),
                                                                               gb[later].parameters()))
    with pytest.raises(GateSkipError, match="unknown branch"):
        fit_gates(a, cal, branches=["layers.7.mlp"])


@pytest.mark.parametrize("family,mlp", [(f, None) for f in FAMILIES] + [("llama", "neurons")])
def test_refit_under_a_plan_in_one_pass_equals_the_two_separate_fits(family, mlp):
    """refit_under_plan (one pass per branch: fallback, then gate, each pass started at the branch's layer from
    the states kept for it) = fit_fallback then fit_gates, branch by branch, each running the whole model
    (neurons fallbacks too: both pick their neurons from the MLP activations seen under the plan)."""
    from gateskip.gatefit import refit_under_plan

    cal = _data(2, 4, 32, seed=11)
    plan = {"ratio": 0.4, "policy": "quantile"}
    kw = {"init_std": 0.0, "fallback_mlp": mlp, "fallback_neurons": 4}
    a, b = _model(family, **kw), _model(family, **kw)
    out = refit_under_plan(a, cal, plan, progress=False)
    for br in gate_state(b).branches:
        gateskip.fit_fallback(b, cal, under_plan=plan, branches=[br.name])
        fit_gates(b, cal, under_plan=plan, branches=[br.name])
    assert set(out["fallback_r2"]) == set(out["gate_r2"]) == {br.name for br in gate_state(a).branches}
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mlp", [None, "neurons"])
def test_closed_form_recipe_skips_the_one_pass_fit_that_its_refit_replaces(mlp):
    """fit_closed_form with ``sequential`` installs the fallbacks and fits everything in the refit: the same
    parameters as the one-pass fits followed by the refit (what it ran before), and the same summary keys."""
    from gateskip.gatefit import fit_closed_form, refit_under_plan

    cal = _data(3, 4, 32, seed=12)
    kw = {"init_std": 0.0, "fallback": "zero"}
    a, b = _model(**kw), _model(**kw)
    s = fit_closed_form(a, cal, fallback="lowrank", fallback_rank=8, fallback_mlp=mlp, fallback_neurons=4,
                        sequential=0.4, sequential_batches=2)
    gateskip.fit_fallback(b, cal, kind="lowrank", rank=8, mlp_kind=mlp, neurons=4)
    fit_gates(b, cal)
    refit_under_plan(b, cal[:2], {"ratio": 0.4, "policy": "quantile"}, progress=False)
    assert gate_state(a).cfg == gate_state(b).cfg
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    assert s["fallback"]["kind"] == "lowrank" and s["fallback"]["batches"] == 2 and s["fallback"]["tokens"] > 0
    assert set(s["fallback_r2"]) == set(s["gate_r2"]) == {br.name for br in gate_state(a).branches}


def test_fit_command_writes_a_folder_allocations_and_the_bracket(tmp_path):
    import json

    from conftest import tiny_folder

    from gateskip.commands.fit import fit as fit_command

    d, data = tiny_folder(tmp_path)
    out = tmp_path / "f"
    s = fit_command(model=str(d), out=str(out), fallback="lowrank", fallback_rank=8, fallback_batches=2, seq_len=32,
                    batch_size=2, compare="0.3", compare_batches=1, data=str(data), fit_ratio=0.3, modules="attn,mlp",
                    allocate="0.1,0.2", sens_batches=1, sens_steps="0.5,1", baselines="1")
    rows = s["compare"]["rows"]
    assert [r["scope"] for r in rows] == ["attn", "mlp", "both", "alloc 0.1", "alloc 0.2"]
    assert all(r["random"] > 0 and r["gates"] > 0 and r["oracle"] > 0 for r in rows)
    assert [b["method"] for b in s["compare"]["baselines"]] == ["shortgpt", "shortgpt+linear"]
    for t in ("0.1", "0.2"):
        alloc = json.loads((out / f"alloc_{t}.json").read_text())
        assert alloc and all(0 < v <= 1 for v in alloc.values())
    assert (out / "compare.md").read_text().startswith("Held-out next-token CE")
    loaded = gateskip.load_gates(tiny_model("llama"), out)  # the folder loads, fallback and calibration with it
    assert gate_state(loaded).cfg.fallback == "lowrank" and gate_state(loaded).loaded.calibration is not None
    with pytest.raises(GateSkipError, match="needs a fallback"):
        fit_command(model=str(d), out=str(tmp_path / "z"), fallback="zero")
    # refit under an allocation instead of a uniform ratio
    s2 = fit_command(model=str(d), out=str(tmp_path / "g"), fallback="lowrank", fallback_rank=8, fallback_batches=2,
                     seq_len=32, batch_size=2, compare="", data=str(data), modules="attn,mlp",
                     fit_budget=str(out / "alloc_0.2.json"), compare_budgets=str(out / "alloc_0.2.json"))
    assert s2["sequential"]["ratio"] == json.loads((out / "alloc_0.2.json").read_text())
    assert [r["scope"] for r in s2["compare"]["rows"]] == ["alloc_0.2"]


def test_fit_command_keeps_a_folders_fallback_to_measure_it(tmp_path):
    from conftest import tiny_folder
    from safetensors.torch import load_file

    from gateskip.commands.fit import fit as fit_command

    d, data = tiny_folder(tmp_path)
    kw = dict(seq_len=32, batch_size=2, fallback_batches=2, compare_batches=1, data=str(data))
    fit_command(model=str(d), out=str(tmp_path / "a"), fallback="lowrank", fallback_rank=8, compare="",
                fit_ratio=0.3, modules="attn,mlp", **kw)
    s = fit_command(init=str(tmp_path / "a"), out=str(tmp_path / "b"), fit_gates=False, fit_ratio=0,
                    compare="0.3", **kw)  # no fallback flags: the folder's own are kept
    assert s["fallback"]["kept"] == str(tmp_path / "a") and "fallback_r2" not in s
    a, b = (load_file(str(tmp_path / x / "gates.safetensors")) for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("calibration"))  # nothing refitted
    assert [r["scope"] for r in s["compare"]["rows"]] == ["attn", "mlp", "both"]
    t = fit_command(init=str(tmp_path / "a"), out=str(tmp_path / "t"), fit_gates=False, fit_ratio=0,
                    compare="0.3", compare_policy="threshold", **kw)
    for q, th in zip(s["compare"]["rows"], t["compare"]["rows"], strict=True):  # only the gates' choice changes
        assert (q["random"], q["oracle"]) == (th["random"], th["oracle"])
    assert any(q["gates"] != th["gates"] for q, th in zip(s["compare"]["rows"], t["compare"]["rows"]))
    with pytest.raises(GateSkipError, match="compare_policy='exact'"):
        fit_command(init=str(tmp_path / "a"), out=str(tmp_path / "u"), compare_policy="exact")
    with pytest.raises(GateSkipError, match="pass --init fit"):
        fit_command(model=str(d), out=str(tmp_path / "c"), init="none")
    from gateskip.models import load_model

    gateskip.save_gates(gateskip.add_gates(load_model(str(d))[0]), tmp_path / "zero")
    with pytest.raises(GateSkipError, match="has no fallback"):
        fit_command(init=str(tmp_path / "zero"), out=str(tmp_path / "c"), **kw)


def test_matched_ce_interpolates_each_method_and_never_extrapolates():
    from gateskip.commands.fit import compare_markdown, matched_ce

    def row(scope, saved, ce):
        return {"scope": scope, "ratio": 0.3, "gap_closed": 0.5, **{f"{c}_saved": saved for c in
                ("random", "gates", "oracle")}, "random": ce + 1, "gates": ce, "oracle": ce - 0.5}

    res = {"dense": 3.0, "rows": [row("mlp", 0.15, 9.0), row("both", 0.1, 4.0), row("both", 0.3, 5.0)],
           "baselines": [{"method": "shortgpt", "layers": 2, "saved": 0.2, "ce": 6.0},
                         {"method": "shortgpt", "layers": 4, "saved": 0.4, "ce": 8.0}]}
    c = matched_ce(res)
    assert c["gateskip (fitted gates)"] == {0.1: 4.0, 0.2: 4.5, 0.3: 5.0, 0.4: None}  # the mlp-only row is not used
    assert c["random (same fallback)"][0.2] == 5.5 and c["oracle (same fallback)"][0.2] == 4.0
    assert c["shortgpt"] == {0.1: None, 0.2: 6.0, 0.3: 7.0, 0.4: 8.0}
    assert "| shortgpt | - | 6.000 | 7.000 | 8.000 |" in compare_markdown(res)


def test_fit_compare_scores_kl_to_the_dense_model(tmp_path):
    from conftest import tiny_folder

    from gateskip.commands.fit import fit as fit_command
    from gateskip.eval.fidelity import language_kl, reference_logprobs

    d, data = tiny_folder(tmp_path)
    kw = dict(seq_len=32, batch_size=2, fallback_batches=2, compare_batches=1, data=str(data))
    s = fit_command(model=str(d), out=str(tmp_path / "a"), fallback="lowrank", fallback_rank=8, compare="0,0.5",
                    compare_scopes="both", compare_metric="kl", baselines="1", fit_ratio=0, modules="attn,mlp", **kw)
    res = s["compare"]
    assert res["metric"] == "kl" and res["dense"] == 0.0
    zero, half = res["rows"]
    assert abs(zero["random"]) < 1e-6 and abs(zero["oracle"]) < 1e-6  # nothing skipped: the dense model itself
    assert all(half[c] > 0 for c in ("random", "gates", "oracle")) and res["baselines"][0]["kl"] > 0
    assert (tmp_path / "a" / "compare.md").read_text().startswith("Held-out KL(dense || setting)")
    # the row is language_kl of the loaded folder under the same plan
    from gateskip.data import fixed_batches, load_texts
    from gateskip.models import load_model

    net, tok = load_model(str(d))
    held = fixed_batches(tok, load_texts(str(data), "heldout"), 32, 2, 1)
    ref = reference_logprobs(net, held)
    gateskip.load_gates(net, tmp_path / "a")
    with gateskip.skipping(net, ratio=0.5, policy="oracle", modules=("attn", "mlp"), kv="compute"):
        assert language_kl(net, held, ref) == pytest.approx(half["oracle"], rel=1e-5)
    with pytest.raises(GateSkipError, match="compare_metric='bpb'"):
        fit_command(model=str(d), out=str(tmp_path / "b"), compare_metric="bpb", **kw)


def test_fit_command_resolves_the_chat_source(tmp_path, monkeypatch):
    """``gateskip fit --data mix,chat`` fits on the model's own chat answers, as ``gateskip train`` does (it once
    stopped with "the chat source is ..."): the file is written once and the summary names it."""
    pytest.importorskip("pyarrow")
    from conftest import tiny_folder
    from test_chat import chat_tokenizer

    from gateskip.commands.fit import fit as fit_command

    monkeypatch.setenv("GATESKIP_CACHE", str(tmp_path / "models"))
    d, data = tiny_folder(tmp_path)
    chat_tokenizer().save_pretrained(d)
    s = fit_command(model=str(d), out=str(tmp_path / "c"), fallback="lowrank", fallback_rank=8, fallback_batches=2,
                    seq_len=32, batch_size=2, compare="0.3", compare_batches=1, data=f"{data},chat", chat_texts=3,
                    modules="mlp")
    used = s["compare"]["data"].split(",")
    assert used[0] == str(data) and used[1].endswith(".jsonl") and len(open(used[1]).readlines()) == 3
    with pytest.raises(GateSkipError, match="chat_texts=0"):
        fit_command(model=str(d), out=str(tmp_path / "z"), data="chat", chat_texts=0)
