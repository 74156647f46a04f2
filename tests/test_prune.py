"""Layer pruning of a gated model: the layers are gone, the other gates stay, logits match by hand."""

import pytest
import torch
from conftest import VOCAB

import gateskip
from gateskip import GateSkipConfig
from gateskip.arch import decoder_layers
from gateskip.errors import GateSkipError
from gateskip.models import tiny_model
from gateskip.prune import prune_layers

DIVERSE = GateSkipConfig(init_std=0.3, init_bias=0.0)


def _gated(family, n_layers=5):
    m = gateskip.add_gates(tiny_model(family, num_hidden_layers=n_layers,
                                      **({"layer_types": None} if family == "gemma3_text" else {})), DIVERSE)
    gateskip.calibrate(m, [torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))], ratio=0.3)
    return m


def _by_hand(m, ids, keep):
    """Reference: the unpruned gated model run layer by layer through ``keep`` only."""
    inner = m.model
    h = inner.embed_tokens(ids)
    t = ids.shape[1]
    pos = torch.arange(t)[None]
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]  # causal, additive; no padding
    pe = inner.rotary_emb(h, pos)
    for i in keep:
        out = decoder_layers(m)[i](h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return m.lm_head(inner.norm(h))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_pruned_gated_model_matches_hand_built_reference(family):
    m = _gated(family)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _by_hand(m, ids, keep=[0, 2, 4])
        gates_kept = {n: g for n, g in gateskip.core.gate_modules(m).items() if n.split(".")[1] in "024"}
        grid = gateskip.core.gate_state(m).loaded.calibration["grid"].clone()
        prune_layers(m, [1, 3])
        out = m(ids).logits
    assert len(decoder_layers(m)) == 3 and m.config.num_hidden_layers == 3
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    st = gateskip.core.gate_state(m)
    assert [b.name for b in st.branches] == [f"layers.{i}.{k}" for i in range(3) for k in ("attn", "mlp")]
    renamed = dict(zip(["layers.0", "layers.2", "layers.4"], ["layers.0", "layers.1", "layers.2"]))
    for old, g in gates_kept.items():
        new = renamed[old.rsplit(".", 1)[0]] + "." + old.rsplit(".", 1)[1]
        assert gateskip.core.gate_modules(m)[new] is g  # the surviving gates themselves, untouched
    torch.testing.assert_close(st.loaded.calibration["grid"], grid[[0, 1, 4, 5, 8, 9]])


def test_pruned_gated_model_skips_generates_and_round_trips(tmp_path):
    m = _gated("llama")
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    prune_layers(m, [3])
    with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy="threshold"):
        logits = m(ids).logits
        s = gateskip.stats(m)
        gen = m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert s["tokens_skipped"] > 0 and len(s["per_module"]) == 8
    assert gen.shape[1] == 16
    gateskip.save_gates(m, tmp_path / "g")
    fresh = tiny_model("llama", num_hidden_layers=5)  # the full base model: load_gates prunes it the same way
    gateskip.load_gates(fresh, tmp_path / "g")
    assert len(decoder_layers(fresh)) == 4
    with torch.no_grad(), gateskip.skipping(fresh, ratio=0.4, policy="threshold"):
        torch.testing.assert_close(fresh(ids).logits, logits)


def test_prune_bad_input():
    m = _gated("llama", n_layers=3)
    with pytest.raises(GateSkipError, match="cannot prune"):
        prune_layers(m, [0, 1, 2])
    with pytest.raises(GateSkipError, match="cannot prune"):
        prune_layers(m, [7])


def test_eval_sweep_pruned_gateskip_row(tmp_path):
    """The sweep's pruned_gateskip rows: layers removed, compute counted against the full dense model."""
    pytest.importorskip("lm_eval")
    import warnings

    from gateskip.commands.eval import evaluate
    from gateskip.models import tiny_tokenizer

    torch.set_num_threads(1)
    m, tok = tiny_model("llama", num_hidden_layers=4), tiny_tokenizer()
    gateskip.add_gates(m, DIVERSE)
    gateskip.calibrate(m, [torch.randint(3, 99, (2, 24))], ratio=0.3)
    gateskip.save_gates(m, tmp_path / "gates")
    gateskip.remove_gates(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evaluate(model=m, tokenizer=tok, gates=str(tmp_path / "gates"), tasks="piqa", ratios="0,0.5",
                       methods="gateskip,shortgpt,pruned_gateskip", prune=1, limit=3, out=str(tmp_path / "out"),
                       calib_batches=1)
    rows = res["methods"]["pruned_gateskip"]
    dense = res["methods"]["dense"][0]["tasks"]["piqa"]["flops_dense"]
    assert [r["tasks"]["piqa"]["flops_dense"] for r in rows] == pytest.approx([dense, dense])  # full model
    assert res["config"]["pruned_layers"] == [res["config"]["block_influence"].index(min(res["config"]["block_influence"]))]
    # one of 4 layers removed: ~a quarter of the layer FLOPs saved (minus gate cost) before any skipping
    assert 0.1 < rows[0]["compute_saved"] < rows[1]["compute_saved"]
    assert rows[0]["tokens_skipped"] == pytest.approx(0.25)
    assert len(decoder_layers(m)) == 4 and not gateskip.is_gated(m)  # the caller's model is untouched
