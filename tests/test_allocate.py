"""Allocation by sensitivity per FLOP (allocate.py): the pure greedy on hand cases, the measurement on a tiny model."""

import pytest
import torch
from conftest import VOCAB

import gateskip
from gateskip import GateSkipConfig, GateSkipError
from gateskip.allocate import allocate, dense_per_token, saved_per_token, sensitivity
from gateskip.models import tiny_model

SENS = {"base": 1.0, "steps": [0.5, 1.0], "ce": {"a": [1.2, 1.5], "b": [1.01, 1.02], "c": [0.99, 1.3]}}
SAVED = {"a": 1.0, "b": 1.0, "c": 1.0}


def _saved(r):
    return sum(SAVED[k] * v for k, v in r.items())


def test_cheapest_increments_first_and_the_target_is_met_exactly():
    # prices per unit saved: c step 1 is negative (-0.02), b steps 0.02, 0.02, a step 1 0.4, c step 2 0.62
    assert allocate(SENS, SAVED, dense=10.0, target=0.05) == {"c": 0.5}
    assert allocate(SENS, SAVED, dense=10.0, target=0.15) == {"c": 0.5, "b": 1.0}
    r = allocate(SENS, SAVED, dense=10.0, target=0.17)
    assert r["a"] == pytest.approx(0.2) and r["b"] == 1.0 and r["c"] == 0.5
    assert _saved(r) == pytest.approx(1.7)


def test_unreachable_target_takes_every_step_and_bad_target_is_refused():
    assert allocate(SENS, SAVED, dense=10.0, target=0.5) == {"a": 1.0, "b": 1.0, "c": 1.0}
    with pytest.raises(GateSkipError, match="target"):
        allocate(SENS, SAVED, dense=2.0, target=1.5)


def test_a_branch_that_saves_nothing_is_never_chosen():
    r = allocate(SENS, {**SAVED, "c": 0.0}, dense=10.0, target=0.1)
    assert "c" not in r and r == {"b": 1.0}


def test_sensitivity_on_a_tiny_model_feeds_skipping():
    m = gateskip.add_gates(tiny_model("llama"), GateSkipConfig(init_std=0.3, init_bias=0.0, fallback="mean"))
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(1, VOCAB, (2, 16), generator=g)]
    gateskip.fit_fallback(m, data)
    s = sensitivity(m, data, steps=(0.5, 1.0), progress=False)
    names = [b.name for b in gateskip.core.gate_state(m).branches]
    assert list(s["ce"]) == names and all(len(v) == 2 for v in s["ce"].values())
    saved = saved_per_token(m, context=16)
    assert all(v > 0 for v in saved.values())
    dense = dense_per_token(m, context=16)
    mlp_only = gateskip.add_gates(tiny_model("llama"), GateSkipConfig(modules=("mlp",)))
    assert dense_per_token(mlp_only, context=16) == dense  # the ungated attention is part of the dense model
    r = allocate(s, saved, dense, target=0.2)
    assert sum(saved[k] * v for k, v in r.items()) == pytest.approx(0.2 * dense)
    with torch.no_grad(), gateskip.skipping(m, ratio=r, policy="quantile"):
        m(input_ids=data[0])
    with pytest.raises(GateSkipError, match="steps"):
        sensitivity(m, data, steps=(1.0, 0.5), progress=False)
