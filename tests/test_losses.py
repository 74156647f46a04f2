"""The training losses alone (losses.py): each against a direct computation on a small hand-built case."""

import math

import pytest
import torch
import torch.nn.functional as F

from gateskip import GateSkipError
from gateskip.losses import distillation_kl, next_token_ce, sparsity, sparsity_kl, sparsity_l1, sparsity_l2


def _gates():
    g1 = torch.tensor([[[0.2, 0.4], [0.6, 0.8], [0.9, 0.9]]])  # [B=1, T=3, H=2], last token is padding
    v1 = torch.tensor([[True, True, False]])
    g2 = torch.tensor([[[0.5], [0.1], [0.3]]])  # [1, 3, 1], all valid
    v2 = torch.ones(1, 3, dtype=torch.bool)
    return [(g1, v1), (g2, v2)]


def test_sparsity_penalties_average_valid_tokens_then_branches():
    gates = _gates()
    b1 = [0.2, 0.4, 0.6, 0.8]  # padding excluded
    b2 = [0.5, 0.1, 0.3]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert sparsity_l2(gates).item() == pytest.approx((mean([x * x for x in b1]) + mean([x * x for x in b2])) / 2)
    assert sparsity_l1(gates).item() == pytest.approx((mean(b1) + mean(b2)) / 2)
    t = 0.3
    kl = [t * math.log(t / r) + (1 - t) * math.log((1 - t) / (1 - r)) for r in (mean(b1), mean(b2))]
    assert sparsity_kl(gates, t).item() == pytest.approx(sum(kl) / 2, rel=1e-5)
    assert sparsity_kl([(torch.full((1, 4, 3), 0.3), torch.ones(1, 4, dtype=torch.bool))], 0.3).item() == \
        pytest.approx(0.0, abs=1e-6)  # open rate at the target: no penalty
    assert sparsity(gates, "l2").item() == sparsity_l2(gates).item()
    assert sparsity(gates, "kl", 0.3).item() == sparsity_kl(gates, 0.3).item()


def test_an_unknown_sparsity_kind_is_refused_not_trained_as_kl():
    with pytest.raises(GateSkipError, match="sparsity kind 'L2' is not supported"):
        sparsity(_gates(), "L2")


def test_train_refuses_an_unknown_sparsity_kind_before_loading_anything(tmp_path):
    from gateskip.commands.train import train

    with pytest.raises(GateSkipError, match="sparsity kind 'k1'"):
        train(model="no-such-model", out=str(tmp_path), sparsity_kind="k1")


def test_next_token_ce_predicts_the_next_token_and_ignores_padding_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g)
    ids = torch.randint(0, 7, (2, 4), generator=g)
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    pairs = [(b, t) for b in range(2) for t in range(3) if valid[b, t + 1]]
    ref = sum(-F.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for b, t in pairs) / len(pairs)
    assert next_token_ce(logits, ids, valid).item() == pytest.approx(ref.item(), rel=1e-6)


def test_distillation_kl_is_zero_against_itself_and_matches_the_definition():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 5, generator=g)
    assert distillation_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    p, q = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    ref = (p * (p.log() - q.log())).sum(-1).mean() * 4
    assert distillation_kl(s, t, temperature=2.0).item() == pytest.approx(ref.item(), rel=1e-5)
    valid = torch.tensor([[True, False, True]])
    ref_v = (p * (p.log() - q.log())).sum(-1)[valid].mean() * 4
    assert distillation_kl(s, t, valid, temperature=2.0).item() == pytest.approx(ref_v.item(), rel=1e-5)


def test_answer_positions_score_each_answer_and_its_end():
    """Positions whose next token is an answer token or the end-of-turn that closes it; a request, the text before a
    row's first header (an answer cut by packing) and what follows an end are not scored."""
    from gateskip.losses import answer_positions

    H, E = [1, 5, 6], [2]
    ids = torch.tensor([[9, 9, 2, 1, 5, 6, 7, 8, 2, 1, 4, 4, 2, 1, 5, 6, 3],
                        [1, 5, 6, 1, 5, 7, 7, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4]])
    got = answer_positions(ids, H, E)
    want = torch.zeros_like(ids, dtype=torch.bool)
    want[0, 5:8] = True  # header ends at 5: predicts 7, 8 and the end (2 at 8)
    want[0, 15:] = True  # an answer running past the row's end
    want[1, 2:7] = True  # 1 5 (a broken header) 7 7 are answer text, then the end at 7
    assert torch.equal(got, want)
    assert not answer_positions(torch.tensor([[1, 5]]), H, E).any()  # shorter than the header
    with pytest.raises(GateSkipError, match="header"):
        answer_positions(ids, [], E)
