"""The aligned serving policy: in a decode step of a batch a branch skips for every row or for none (by majority of
the rows' threshold decisions); at batch 1 it is the per-row threshold policy; physical equals masked."""

import pytest
import torch
from conftest import VOCAB, left_padded

import gateskip
from gateskip.models import tiny_model
from gateskip.policies import POLICY, aligned_rows

DIVERSE = gateskip.GateSkipConfig(init_std=0.3, init_bias=0.0)  # untrained but varied importances


def _calibrated():
    m = gateskip.add_gates(tiny_model("llama"), DIVERSE)
    g = torch.Generator().manual_seed(1)
    gateskip.calibrate(m, [torch.randint(1, VOCAB, (4, 32), generator=g) for _ in range(3)], ratio=0.3)
    return m


def test_majority_of_the_valid_rows_decides_a_decode_step():
    skip = torch.tensor([[True], [True], [False], [False]])
    assert not aligned_rows(skip, None).any()  # a tie is not a majority
    skip[2] = True
    assert aligned_rows(skip, None).all()
    valid = torch.tensor([[True], [True], [False], [True]])
    assert aligned_rows(skip, valid).tolist() == [[True], [True], [False], [True]]  # padding never skips
    prefill = torch.tensor([[True, False, True]])
    assert torch.equal(aligned_rows(prefill, None), prefill)  # more than one token per row: per token
    assert POLICY["aligned"].needs_calibration and POLICY["aligned"].uses_gates


def test_at_batch_1_aligned_is_threshold():
    m = _calibrated()
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    out = {}
    for policy in ("threshold", "aligned"):
        with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy=policy):
            out[policy] = m.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
            out[policy + "_stats"] = gateskip.stats(m)["tokens_skipped"]
    assert torch.equal(out["threshold"], out["aligned"])
    assert out["threshold_stats"] == pytest.approx(out["aligned_stats"])


def test_batched_decode_skips_branches_for_all_rows_and_physical_equals_masked():
    m = _calibrated()
    ids, mask = left_padded([10, 7, 9, 12], seed=3)
    st = gateskip.core.gate_state(m)
    decisions = []
    real = st.count_decision

    def spy(branch, skip, valid):
        if skip is not None and skip.shape[1] == 1:
            decisions.append((skip & valid).sum().item() in (0, int(valid.sum())))
        return real(branch, skip, valid)

    st.count_decision = spy
    seqs = {}
    for path in ("masked", "physical"):
        with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy="aligned", path=path):
            seqs[path] = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                    pad_token_id=0)
            if path == "physical":
                s = gateskip.stats(m)
    del st.count_decision
    assert decisions and all(decisions)  # every decode-step decision: all rows or none
    assert torch.equal(seqs["masked"], seqs["physical"])
    assert s["tokens_skipped"] > 0.05
