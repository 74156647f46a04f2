"""A budget in compute saved (saved.py): the ratio is steered so that stats()' FLOP-weighted saving lands at the
target on generation and on scoring, under every per-token policy, with one kind of gates or both."""

import pytest
import torch
from conftest import VOCAB, left_padded

import gateskip
from gateskip.core import gate_state
from gateskip.errors import GateSkipError
from gateskip.models import tiny_model


def gated(modules=("attn", "mlp"), calibrated=False):
    m = tiny_model("llama")
    gateskip.add_gates(m, gateskip.GateSkipConfig(modules=modules))
    if calibrated:  # thresholds fitted on other text than the one run: the saving must not depend on it
        g = torch.Generator().manual_seed(3)
        gateskip.calibrate(m, [torch.randint(1, VOCAB // 4, (4, 32), generator=g) for _ in range(4)], ratio=0.3)
    return m


def generated_saving(m, target, **plan):
    ids, mask = left_padded([30, 20, 25])
    with torch.no_grad(), gateskip.skipping(m, saved=target, **plan):
        m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
        return gateskip.stats(m)["compute_saved"]


@pytest.mark.parametrize("policy", ["random", "quantile", "threshold"])
@pytest.mark.parametrize("target", [0.1, 0.3])
def test_generation_lands_at_the_saving_asked(policy, target):
    m = gated(calibrated=policy == "threshold")
    assert generated_saving(m, target, policy=policy) == pytest.approx(target, abs=0.03)


@pytest.mark.parametrize("modules", [("mlp",), ("attn",)])
def test_one_kind_of_gates_lands_too(modules):
    m = gated(modules=modules)
    assert generated_saving(m, 0.2, policy="random") == pytest.approx(0.2, abs=0.02)


def test_scoring_many_calls_lands_and_rechecks_are_paid_for():
    m = gated()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad(), gateskip.skipping(m, saved=0.25, policy="random"):
        for _ in range(12):
            m(input_ids=torch.randint(1, VOCAB, (2, 24), generator=g))
        s = gateskip.stats(m)
    assert s["compute_saved"] == pytest.approx(0.25, abs=0.02)
    ids, mask = left_padded([12, 9])
    with torch.no_grad(), gateskip.skipping(m, saved=0.25, policy="random"):
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    watched = out[0, 17:18].tolist()  # a token it emits mid-answer: a recheck now and then, as a stop token would
    with torch.no_grad(), gateskip.skipping(m, saved=0.25, policy="random", recheck_tokens=watched):
        m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
        s = gateskip.stats(m)
    assert s["rechecked"] > 0 and s["compute_saved"] == pytest.approx(0.25, abs=0.03)


def test_the_plan_is_restored_and_bad_budgets_fail_in_one_line():
    m = gated()
    generated_saving(m, 0.2, policy="random")
    assert gate_state(m).plan is None
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(GateSkipError, match="saved="):
            with gateskip.skipping(m, saved=bad, policy="random"):
                pass
    with pytest.raises(GateSkipError, match="saved="):
        with gateskip.skipping(m, saved=0.2, ratio=0.3):
            pass


def test_a_prompt_boost_moves_the_saving_to_prompts_and_still_lands():
    """prompt_boost: prompts (calls with nothing cached) aim at a multiple of the budget, the answer's steps save
    less, the whole run still lands; prompts are ranked within their call, so they land without calibration."""
    from gateskip.accounting import run_flops

    m = gated(calibrated=True)
    ids, mask = left_padded([30, 28, 26])
    st = gate_state(m)
    with torch.no_grad(), gateskip.skipping(m, saved=0.2, policy="threshold", prompt_boost=2.0):
        m(input_ids=ids, attention_mask=mask)
        d, e = run_flops(st, st.plan.kv)
        assert 1 - e / d == pytest.approx(0.4, abs=0.06)  # the prompt alone: about twice the budget (from the prior)
        m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=60, do_sample=False, pad_token_id=0)
        assert gateskip.stats(m)["compute_saved"] == pytest.approx(0.2, abs=0.03)
    with pytest.raises(GateSkipError, match="prompt_boost"):
        with gateskip.skipping(m, saved=0.4, prompt_boost=3.0):
            pass


def test_a_boost_never_asks_more_than_short_answers_can_pay_back():
    """Long prompts with short answers (extractive questions): prompts at 1.5 times the budget would leave the
    answers nothing to pay back with; once answers have been seen, the prompts aim lower and the run lands."""
    m = gated(calibrated=True)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, VOCAB, (2, 120), generator=g) for _ in range(6)]
    with torch.no_grad(), gateskip.skipping(m, saved=0.25, policy="threshold", prompt_boost=1.5) as plan:
        for ids in prompts:
            m.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        saved = gateskip.stats(m)["compute_saved"]
        boost = gate_state(m).plan.budget.boost()
    assert plan is not None and boost < 1.2  # answers are a few percent of a prompt's compute
    assert saved == pytest.approx(0.25, abs=0.03)
