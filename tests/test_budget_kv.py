"""Unit tests of budget.py (global allocation) and kv.py's helpers, each against a direct recompute."""

from types import SimpleNamespace

import pytest
import torch

from gateskip.budget import branch_cdf, check_allocation, global_ratios
from gateskip.errors import GateSkipError
from gateskip.kv import flat_positions, substitute_from_below, take_positions


def test_branch_cdf_matches_the_empirical_fraction_below():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(10_001, generator=g)
    grid = torch.quantile(values, torch.linspace(0, 1, 257))
    for t in (-2.0, -0.3, 0.0, 0.7, 1.9):
        assert branch_cdf(grid, t) == pytest.approx(float((values < t).double().mean()), abs=5e-3)
    assert branch_cdf(grid, float(grid[0]) - 1) == 0.0 and branch_cdf(grid, float(grid[-1]) + 1) == 1.0


def test_global_ratios_share_one_threshold_and_meet_the_weighted_budget():
    g = torch.Generator().manual_seed(1)
    samples = [torch.randn(4000, generator=g) * s + m for s, m in ((1.0, 0.0), (0.5, 1.0), (2.0, -1.0))]
    grids = torch.stack([torch.quantile(x, torch.linspace(0, 1, 129)) for x in samples])
    weights = [3.0, 1.0, 0.0]  # the last branch may not skip
    ratios = global_ratios(grids, weights, 0.3)
    assert ratios[2] == 0.0
    assert (weights[0] * ratios[0] + weights[1] * ratios[1]) / 4.0 == pytest.approx(0.3, abs=1e-3)
    # one threshold: each ratio is its branch's fraction below the same t
    t = float(torch.quantile(samples[0], ratios[0]))
    assert ratios[1] == pytest.approx(float((samples[1] < t).double().mean()), abs=0.02)
    assert global_ratios(grids, weights, 0.0) == [0.0, 0.0, 0.0] and global_ratios(grids, [0, 0, 0], 0.5) == [0.0] * 3


def test_check_allocation_names_the_choices():
    check_allocation("global")
    with pytest.raises(GateSkipError, match="uniform, global"):
        check_allocation("local")


def test_take_positions_and_flat_positions_equal_gather():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 7, 5, generator=g)
    idx = torch.stack([torch.randperm(7, generator=g)[:4] for _ in range(3)])
    ref = torch.gather(z, 1, idx[..., None].expand(-1, -1, 5))
    assert torch.equal(take_positions(z, idx, flat_positions(idx, 7)), ref)
    shared = z[:1]  # a tensor shared by the batch (e.g. rotary tables) is indexed per row, not expanded
    assert torch.equal(take_positions(shared, idx, flat_positions(idx, 7)), shared[0][idx])
    heads = torch.randn(3, 2, 7, 4, generator=g)
    rows = heads.reshape(-1, 4).index_select(0, flat_positions(idx, 7, heads=2)).view(3, 2, 4, 4)
    assert torch.equal(rows, torch.gather(heads, 2, idx[:, None, :, None].expand(-1, 2, -1, 4)))


def test_substitute_from_below_copies_only_skipped_tokens_of_the_next_layer():
    g = torch.Generator().manual_seed(3)
    k0, v0, k1, v1 = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(4))
    skip = torch.tensor([[False, True, False, False, True], [True, False, False, False, False]])
    state = SimpleNamespace(call=SimpleNamespace(prev_kv=None))
    assert substitute_from_below(state, 0, k0, v0, skip) == (k0, v0)  # nothing below layer 0
    k, v = substitute_from_below(state, 1, k1, v1, skip)
    m = skip[:, None, :, None]
    assert torch.equal(k, torch.where(m, k0, k1)) and torch.equal(v, torch.where(m, v0, v1))
    assert state.call.prev_kv[0] == 1 and state.call.prev_kv[1] is k
    k3, _ = substitute_from_below(state, 3, k1, v1, skip)  # layer 2 not seen: no copy across a gap
    assert torch.equal(k3, k1)
