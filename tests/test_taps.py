"""The taps (taps.py): the training log, the calibration record and the teacher bypass, each on only inside its
context, compared against the model without gates and against the gates' own importances."""

import pytest
import torch

import gateskip
from gateskip.analysis.importance import branch_importances
from gateskip.core import gate_state
from gateskip.errors import GateSkipError
from gateskip.gates import importance
from gateskip.models import tiny_model
from gateskip.taps import gates_bypassed, logging_gates, recording_importance


def _gated(seed=0):
    torch.manual_seed(seed)
    return gateskip.add_gates(tiny_model("llama"), gateskip.GateSkipConfig(init_bias=0.5))


def test_teacher_runs_as_the_model_without_gates():
    ids = torch.randint(0, 64, (2, 12))
    plain = tiny_model("llama").eval()
    gated = _gated().eval()
    gated.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        ref = plain(input_ids=ids).logits
        scaled = gated(input_ids=ids).logits
        with gates_bypassed(gated), gateskip.skipping(gated, ratio=0.5, policy="quantile"):
            teacher = gated(input_ids=ids).logits
        after = gated(input_ids=ids).logits
    torch.testing.assert_close(teacher, ref)
    assert not torch.allclose(scaled, ref)  # the gates do change the output, so the bypass did something
    torch.testing.assert_close(after, scaled)  # and it is off again
    assert gate_state(gated).taps.teacher is None


def test_log_and_record_see_every_branch_once_per_call_and_leave_nothing_behind():
    m = _gated().eval()
    st = gate_state(m)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad(), logging_gates(m) as log, recording_importance(m) as rec:
        m(input_ids=ids, use_cache=False)
    assert len(log.entries) == len(st.branches)
    assert all(len(r) == 1 and r[0].numel() == ids.numel() for r in rec.per_branch)
    for (g, valid), r in zip(log.entries, rec.per_branch):
        torch.testing.assert_close(importance(g.float())[valid].cpu(), r[0])
    assert rec.tokens() == ids.numel()
    assert st.taps.log is None and st.taps.record is None and st.taps.observers == ()


def test_taps_come_off_after_an_error_and_nest():
    m = _gated()
    st = gate_state(m)
    with pytest.raises(RuntimeError), logging_gates(m):
        raise RuntimeError("inside")
    assert st.taps.log is None and st.taps.observers == ()
    with gates_bypassed(m):
        with gates_bypassed(m):
            pass
        assert st.taps.teacher is not None  # the outer context still holds
    assert st.taps.teacher is None


def test_reading_importances_under_the_teacher_is_a_clear_error():
    m = _gated()
    with gates_bypassed(m), pytest.raises(GateSkipError, match="bypassed"):
        branch_importances(m, torch.randint(0, 64, (1, 6)))
    with pytest.raises(GateSkipError, match="no gates"), logging_gates(tiny_model("llama")):
        pass
