"""The scored oracles (oracle_scores.py): each token's measured effect on the outputs, checked against the library's
own skipping path (marginal) and against the exact quantity in the regime its approximation is for (Fisher)."""

import pytest
import torch
from conftest import VOCAB

import gateskip
from gateskip import GateSkipConfig, GateSkipError
from gateskip.core import gate_state
from gateskip.heldout import language_kl, reference_logprobs
from gateskip.models import tiny_model
from gateskip.oracle_scores import fisher_scores, given_scores, marginal_scores


def _model(init_bias=0.0):
    cfg = GateSkipConfig(init_std=0.3, init_bias=init_bias, fallback="lowrank", fallback_rank=8, modules=("mlp",))
    m = gateskip.add_gates(tiny_model("llama"), cfg)
    g = torch.Generator().manual_seed(2)
    gateskip.fit_fallback(m, [torch.randint(1, VOCAB, (4, 32), generator=g) for _ in range(2)])
    return m


def _ids(t=12, seed=1):
    return torch.randint(1, VOCAB, (1, t), generator=torch.Generator().manual_seed(seed))


def _rest(m, ids, t):
    """Marginal scores at token ``t`` over every prediction after it (the horizon that reaches the row's end)."""
    return {i: v[0, t] for i, v in marginal_scores(m, ids, horizon=ids.shape[1] - 1 - t, chunk=5,
                                                   progress=False).items()}


def test_marginal_score_is_the_kl_of_skipping_that_token_alone_through_skipping():
    """The hook that measures each (branch, token) alone equals the library's own skipping path: the oracle_given
    policy, that branch alone skipping one token (the one given the lowest score), KL summed over the row."""
    m, ids = _model(), _ids()
    st = gate_state(m)
    ref = reference_logprobs(m, [ids])
    t_len = ids.shape[1]
    branch = st.branches[1]
    for t in (2, 7, t_len - 2):
        pick = {b.index: torch.ones(1, t_len) for b in st.branches}
        pick[branch.index][0, t] = 0.0
        n = t_len - st.cfg.protect_first - int(st.cfg.protect_last)  # the tokens that may skip
        with gateskip.skipping(m, ratio={branch.name: 1.0 / n}, policy="oracle_given", kv="compute", modules=("mlp",),
                               protect_last=False), given_scores(m, pick):
            kl = language_kl(m, [ids], ref) * (t_len - 1)
            assert int(gate_state(m).counts[branch.index, 0]) == 1
        assert float(_rest(m, ids, t)[branch.index]) == pytest.approx(kl, rel=1e-3, abs=1e-6)


def test_marginal_scores_share_one_horizon_and_never_skip_the_row_end():
    m, ids = _model(), _ids()
    scores = marginal_scores(m, ids, horizon=4, progress=False)
    for v in scores.values():
        assert bool(torch.isinf(v[0, -4:]).all()) and bool(torch.isfinite(v[0, :-4]).all()) and bool((v >= 0).all())
    short = marginal_scores(m, ids, horizon=1, progress=False)  # a prediction the skip does not reach adds nothing
    longer = marginal_scores(m, ids, horizon=2, progress=False)
    for i in short:
        assert bool((longer[i][0, :-2] >= short[i][0, :-2] - 1e-7).all())
    with pytest.raises(GateSkipError, match="horizon"):
        marginal_scores(m, ids, horizon=ids.shape[1], progress=False)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_packed_marginal_scores_equal_one_copy_of_the_row_per_token(family):
    """The packed measurement (windows after the row's prefix, a custom 4-D mask) gives the plain one's scores, with
    sliding-window layers (gemma3: a window of 16 on 40 tokens) and windows split over several sequences."""
    cfg = GateSkipConfig(init_std=0.3, fallback="lowrank", fallback_rank=8, modules=("mlp",))
    m = gateskip.add_gates(tiny_model(family), cfg)
    gateskip.fit_fallback(m, [torch.randint(1, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))])
    ids = _ids(t=40)
    for horizon in (1, 5):
        plain = marginal_scores(m, ids, horizon=horizon, chunk=9, progress=False, method="copies")
        packed = marginal_scores(m, ids, horizon=horizon, progress=False, pack_tokens=70)
        for i in plain:
            assert torch.equal(torch.isinf(plain[i]), torch.isinf(packed[i]))
            finite = torch.isfinite(plain[i])
            torch.testing.assert_close(packed[i][finite], plain[i][finite], rtol=0.03, atol=2e-6)
    with pytest.raises(GateSkipError, match="method"):
        marginal_scores(m, ids, progress=False, method="rows")


def test_fisher_score_is_twice_the_kl_of_a_small_skip():
    """Where what skipping adds is small (gates nearly shut), KL ~ delta' F delta / 2: the Fisher estimate, from many
    sampled labels, is twice the exact marginal KL over every later prediction, token by token."""
    m, ids = _model(init_bias=-4.0), _ids(t=10)
    est = fisher_scores(m, ids, samples=400, seed=0)
    exact = {t: _rest(m, ids, t) for t in range(1, ids.shape[1] - 1)}
    for i in est:
        a = est[i][0, 1:-1]
        b = 2 * torch.stack([exact[t][i] for t in range(1, ids.shape[1] - 1)])
        assert float(a.sum()) == pytest.approx(float(b.sum()), rel=0.15)
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.9


def test_scored_oracle_errors_are_one_line():
    m, ids = _model(), _ids()
    with gateskip.skipping(m, ratio=0.3, policy="oracle_given", kv="compute"):
        with pytest.raises(GateSkipError, match="given_scores"):
            m(input_ids=ids)
        with pytest.raises(GateSkipError, match="outside gateskip.skipping"):
            fisher_scores(m, ids)
    with pytest.raises(GateSkipError, match="samples"):
        fisher_scores(m, ids, samples=0)
    zero = gateskip.add_gates(tiny_model("llama"), GateSkipConfig(modules=("mlp",)))
    with pytest.raises(GateSkipError, match="fallback"):
        marginal_scores(zero, ids, progress=False)


def test_fit_comparison_reports_the_scored_oracle_beside_the_residual_one():
    from gateskip.commands.fit import compare_choices, compare_markdown, held_out_score

    m = _model()
    held = [_ids(t=40, seed=s) for s in (3, 4)]
    res = compare_choices(m, held, [0.3], scopes={"mlp": ("mlp",)}, score=held_out_score(m, held, "kl"),
                          scored_oracle="marginal")
    row = res["rows"][0]
    assert row["scored_saved"] == pytest.approx(row["oracle_saved"])  # the same tokens' count, another choice
    assert row["scored"] >= 0 and "scored_gap_closed" in row
    assert "| marginal (horizon 32) oracle |" in compare_markdown(res)


def test_gates_fitted_to_given_scores_rank_tokens_by_them():
    """fit_gates_to_scores on planted costs (a log-linear function of each branch's input) recovers them: R^2 ~ 1,
    and each gate's importance orders the tokens as the costs do."""
    from gateskip.gatefit import fit_gates_to_scores
    from gateskip.gates import importance

    m = _model()
    st = gate_state(m)
    batches = [_ids(t=24, seed=s) for s in (5, 6, 7)]
    inputs: dict[int, list] = {b.index: [] for b in st.branches}
    hooks = [b.register_forward_pre_hook(lambda mod, a, kw, i=b.index: inputs[i].append(a[0] if a else
                                                                                      kw["hidden_states"]),
                                         with_kwargs=True) for b in st.branches]
    with torch.no_grad():
        for ids in batches:
            m(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    w = {i: torch.randn(x[0].shape[-1], generator=torch.Generator().manual_seed(i)) for i, x in inputs.items()}
    scores = [{i: torch.exp(inputs[i][k] @ w[i] / 10) for i in inputs} for k in range(len(batches))]
    out = fit_gates_to_scores(m, batches, scores, ridge=1e-6)
    assert min(out["r2"].values()) > 0.99
    for b in st.branches:
        x, cost = inputs[b.index][0][0, 1:], scores[0][b.index][0, 1:]
        with torch.no_grad():
            imp = importance(b.gate(x))
        ranks = torch.stack([imp.argsort().argsort(), cost.argsort().argsort()]).float()
        assert float(torch.corrcoef(ranks)[0, 1]) > 0.95


def test_closed_form_fit_to_the_marginal_oracle_and_its_one_line_errors():
    from gateskip.gatefit import fit_closed_form

    m = gateskip.add_gates(tiny_model("llama"), GateSkipConfig(init_std=0.3, modules=("mlp",)))
    rows = [_ids(t=16, seed=s) for s in (8, 9)]
    before = {b.index: [t.clone() for t in b.gate.state_dict().values()] for b in gate_state(m).branches}
    with pytest.raises(GateSkipError, match="fit-ratio 0"):
        fit_closed_form(m, rows, gate_target="marginal", sequential=0.3)
    with pytest.raises(GateSkipError, match="residual or marginal"):
        fit_closed_form(m, rows, gate_target="loss", sequential=0)
    out = fit_closed_form(m, rows, fallback="lowrank", fallback_rank=4, gate_target="marginal", horizon=4,
                          sequential=0)
    assert set(out["gate_r2"]) == {b.name for b in gate_state(m).branches}
    for b in gate_state(m).branches:  # every gate rewritten
        assert any(not torch.equal(x, y) for x, y in zip(before[b.index], b.gate.state_dict().values()))
