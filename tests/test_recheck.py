"""The dense recheck (recheck.py): a rechecked step is the model without skipping, in prefill and cached decode, at
batch 1 and in a left-padded batch; its compute is counted; bad settings fail in one line."""

import pytest
import torch
from conftest import left_padded

import gateskip
from gateskip.chat import greedy_answers
from gateskip.core import gate_state
from gateskip.errors import GateSkipError
from gateskip.models import tiny_model


def gated(family="llama"):
    m = tiny_model(family)
    gateskip.add_gates(m, gateskip.GateSkipConfig())
    return m


def greedy(m, ids, mask, n=8, **plan):
    with torch.no_grad(), gateskip.skipping(m, **plan):
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
        return out, gateskip.stats(m)


@pytest.mark.parametrize("path", ["masked", "physical"])
def test_rechecking_every_step_is_the_model_without_skipping(path):
    m = gated()
    ids, mask = left_padded([9, 5, 7])
    dense, _ = greedy(m, ids, mask)
    out, s = greedy(m, ids, mask, ratio=0.8, policy="random", path=path, recheck_below=0.999)
    assert torch.equal(out.sequences, dense.sequences)
    for a, b in zip(out.logits, dense.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert s["rechecked"] == 3 * 8  # every live row at every step (nothing ends: no EOS in 8 steps)
    skipped, _ = greedy(m, ids, mask, ratio=0.8, policy="random", path=path)
    assert not torch.equal(skipped.sequences, dense.sequences), "skipping must change something to test"


def test_a_rechecked_token_is_chosen_by_the_model_without_skipping():
    """Every emitted recheck token is the argmax of the model without skipping on the same (skipped) prefix."""
    m = gated()
    ids, mask = left_padded([10])
    free, _ = greedy(m, ids, mask, n=12, ratio=0.9, policy="random")
    watched = sorted(set(free.sequences[0, 10:].tolist()))[:3]  # tokens the skipped run emits
    out, s = greedy(m, ids, mask, n=12, ratio=0.9, policy="random", recheck_tokens=watched)
    seq = out.sequences[0]
    hits = 0
    for i in range(10, seq.numel()):
        if int(seq[i]) in watched:
            hits += 1
            with torch.no_grad():
                ref = m(input_ids=seq[None, :i]).logits[0, -1]
            assert int(ref.argmax()) == int(seq[i])
    assert s["rechecked"] >= hits


def test_recheck_compute_is_counted_and_batch_rows_rerun_alone():
    m = gated()
    ids, mask = left_padded([9, 5, 7, 6])
    _, plain = greedy(m, ids, mask, ratio=0.8, policy="random")
    _, every = greedy(m, ids, mask, ratio=0.8, policy="random", recheck_below=0.999)
    assert every["compute_saved"] < plain["compute_saved"] - 0.5  # a dense rerun on top of every skipped step
    assert every["flops_dense"] == pytest.approx(plain["flops_dense"])  # the reference: the calls as asked
    st = gate_state(m)
    assert st.plan is None and not st.rechecking


def test_greedy_answers_equal_under_recheck_at_batch_1_and_in_a_batch():
    m = gated()
    prompts = [[5, 9, 11, 3], [7, 8], [12, 13, 14, 15, 16, 17]]
    rows = []
    for batch in (1, 3):
        with torch.no_grad(), gateskip.skipping(m, ratio=0.5, policy="quantile",
                                                recheck_below=0.999):
            rows.append(greedy_answers(m, prompts, 6, stop_ids=[1], pad_id=0, batch=batch).tokens)
    assert rows[0] == rows[1]  # every step rerun densely: batching cannot change it


def test_bad_recheck_settings_fail_in_one_line():
    m = gated()
    with pytest.raises(GateSkipError, match="recheck_below"):
        with gateskip.skipping(m, ratio=0.3, recheck_below=1.5):
            pass
    with pytest.raises(GateSkipError, match="recheck_tokens"):
        with gateskip.skipping(m, ratio=0.3, recheck_tokens=[-1]):
            pass
