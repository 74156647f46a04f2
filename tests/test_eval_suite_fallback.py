"""The suite sweep with fallbacks (gateskip+KIND rows), the shortgpt+linear baseline, merging suite runs
(--compare-with) and the who-wins reference (CPU, tiny models, synthetic results)."""

import json

import pytest
import torch
from conftest import VOCAB

import gateskip
from gateskip import GateSkipConfig, GateSkipError
from gateskip.baselines.shortgpt import pruned
from gateskip.core import gate_modules, is_gated
from gateskip.models import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")

from gateskip.baselines.shortgpt import linear_replaced  # noqa: E402
from gateskip.eval import suite_merge, suite_report  # noqa: E402
from gateskip.eval.suite import Item, SuiteTask  # noqa: E402
from gateskip.eval.suite_run import row_names, sweep  # noqa: E402

ITEMS = [Item(0, [("The cat sat on the", " mat"), ("The cat sat on the", " big red mat")], 0, [3.0, 11.0]),
         Item(1, [("Two plus two", " is four"), ("Two plus two", " x")], 0, [7.0, 1.0]),
         Item(2, [("A bird sang in", " the tree"), ("A bird sang in", " a cup")], 1, [8.0, 5.0])]
TASKS = [SuiteTask("t", "mc", "acc", ITEMS)]


class Bar:
    def __init__(self):
        self.lines = []

    def set_postfix_str(self, _s):
        pass

    def update(self, _n):
        pass

    def write(self, msg):
        self.lines.append(msg)


def _data(n=3, b=4, t=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (b, t), generator=g) for _ in range(n)]


def _gates_folder(path, fallback="zero"):
    m = gateskip.add_gates(tiny_model("llama"), GateSkipConfig(init_std=0.3, init_bias=0.0, fallback=fallback))
    gateskip.calibrate(m, _data(), ratio=0.3)
    if fallback != "zero":
        gateskip.fit_fallback(m, _data(seed=2))
    gateskip.save_gates(m, path)
    return str(path)


def _sweep(gates, methods, fallback=None, fit_batches=None, budgets=None, bar=None, policy="threshold",
           modules=("attn", "mlp")):
    budgets = budgets or {"gateskip": [0.3], "random": [0.3]}
    return sweep(tiny_model("llama"), tiny_tokenizer(), gates, TASKS, methods, budgets, policy, None, None, 0,
                 _data(seed=3), None, bar or Bar(), fallback=fallback, fit_batches=fit_batches, modules=modules)


def _never():
    raise AssertionError("no fit expected")


def test_fallback_rows_are_named_and_the_folders_fallback_is_reused_or_fitted(tmp_path):
    assert row_names(["gateskip", "random", "shortgpt", "shortgpt_linear"], "lowrank") == [
        "gateskip+lowrank", "random+lowrank", "shortgpt", "shortgpt+linear"]
    assert row_names(["random", "gateskip"]) == ["gateskip", "random"]
    assert row_names(["gateskip", "shortgpt"], "neurons", backbone="+lora") == ["gateskip+neurons+lora", "shortgpt"]
    lin, zero = _gates_folder(tmp_path / "lin", "linear"), _gates_folder(tmp_path / "zero")
    plain = _sweep(zero, ["gateskip", "random"])
    assert [r["method"] for r in plain["rows"]] == ["dense", "gateskip", "random"]
    assert plain["fallback"]["kind"] == "zero" and plain["fallback"]["source"] is None
    # the folder holds a linear fallback: used as it is, nothing fitted
    bar = Bar()
    reused = _sweep(lin, ["gateskip", "random"], {"kind": "linear", "rank": 64}, fit_batches=_never, bar=bar)
    assert [r["method"] for r in reused["rows"]] == ["dense", "gateskip+linear", "random+linear"]
    assert reused["fallback"]["source"] == "gates folder" and reused["fallback"]["r2"] is None
    assert "stored in" in bar.lines[0]
    # --fallback zero (the default) on that folder: it still runs with its own, and says so in the name
    default = _sweep(lin, ["gateskip"], {"kind": "zero", "rank": 64}, fit_batches=_never)
    assert default["rows"][1]["method"] == "gateskip+linear"
    # another kind than the folder's: fitted once, announced with the mean R^2 per branch kind
    bar = Bar()
    calls = []
    fitted = _sweep(zero, ["gateskip", "random"], {"kind": "lowrank", "rank": 8},
                    fit_batches=lambda: calls.append(1) or _data(seed=2), bar=bar)
    assert calls == [1]
    assert [r["method"] for r in fitted["rows"]] == ["dense", "gateskip+lowrank", "random+lowrank"]
    fb = fitted["fallback"]
    assert fb["source"] == "fitted" and fb["kind"] == "lowrank" and fb["rank"] == 8 and fb["tokens"] == 3 * 4 * 32
    assert set(fb["r2"]) == {f"layers.{i}.{k}" for i in range(3) for k in ("attn", "mlp")}
    assert set(fb["r2_mean"]) == {"attn", "mlp"}
    assert len(bar.lines) == 1 and "lowrank (rank 8)" in bar.lines[0] and "R² attn" in bar.lines[0]
    # random rows draw the same tokens whatever the hidden states; the fallback's FLOPs are charged
    g0, g1 = plain["rows"][2], fitted["rows"][2]
    assert g0["tokens_skipped"] == g1["tokens_skipped"] > 0
    assert g1["compute_saved"] < g0["compute_saved"]


def test_shortgpt_linear_replaces_layers_with_fitted_linear_maps():
    assert torch.sigmoid(torch.tensor(1e4, dtype=torch.float32)).item() == 1.0
    net, batches, drop = tiny_model("llama"), _data(seed=2), [1]
    ids = _data(n=1, b=2, t=24, seed=5)[0]
    with torch.no_grad():
        dense = net(input_ids=ids).logits
        with pruned(net, drop):
            cut = net(input_ids=ids).logits
        with linear_replaced(net, drop, batches) as (plan, fit):
            assert plan["protect_first"] == 0 and plan["policy"] == "random"
            assert set(plan["ratio"]) == {"layers.1.attn", "layers.1.mlp"} and set(plan["ratio"].values()) == {1.0}
            for g in gate_modules(net).values():  # every gate is exactly 1, whatever its input
                assert torch.equal(g(10 * torch.randn(2, 5, 64)), torch.ones(2, 5, 1))
            assert fit["kind"] == "linear" and fit["passes"] == 2  # only the replaced branches are fitted
            outs = {}
            for path in ("masked", "physical"):
                with gateskip.skipping(net, **plan, path=path):
                    outs[path] = net(input_ids=ids).logits
                    per = gateskip.stats(net)["per_module"]
            # the dropped layer's branches skip every token (BOS too), the others none
            assert {k: v["skipped"] for k, v in per.items()} == {
                f"layers.{i}.{k}": 1.0 if i in drop else 0.0 for i in range(3) for k in ("attn", "mlp")}
        assert not is_gated(net)
    replaced = outs["masked"]
    torch.testing.assert_close(outs["physical"], replaced, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(replaced, cut, atol=1e-3) and not torch.allclose(replaced, dense, atol=1e-3)
    # the fitted maps stand in for the layer better than nothing does
    assert (replaced - dense).pow(2).mean() < (cut - dense).pow(2).mean()
    # as sweep rows: the same layer dropped; the maps and gates are charged, so less is saved
    res = _sweep(None, ["shortgpt", "shortgpt_linear"], fit_batches=batches,
                 budgets={"shortgpt": [1], "shortgpt_linear": [1]})
    dense_row, short, lin = res["rows"]
    assert (short["method"], lin["method"]) == ("shortgpt", "shortgpt+linear")
    assert short["setting"]["layers_dropped"] == lin["setting"]["layers_dropped"]
    assert set(lin["setting"]["r2"]) == {f"layers.{i}.{k}" for i in lin["setting"]["layers_dropped"]
                                         for k in ("attn", "mlp")}
    assert 0 < lin["compute_saved"] < short["compute_saved"]
    assert lin["tasks"]["t"]["flops_dense"] == pytest.approx(dense_row["tasks"]["t"]["flops_dense"])


# ---- merging and the reference (synthetic results.json) ---------------------------------------------

def _row(method, budget, saved, correct):
    tasks = {t: {"acc": sum(c) / len(c), "stderr": 0.1, "n": len(c), "metric": "acc", "chance": 0.25,
                 "correct": c, "tokens_skipped": saved, "compute_saved": saved, "flops_dense": 1.0,
                 "flops_executed": 1 - saved} for t, c in correct.items()}
    return {"method": method, "budget": budget, "setting": {}, "tokens_skipped": saved, "compute_saved": saved,
            "mean_acc": sum(v["acc"] for v in tasks.values()) / len(tasks), "tasks": tasks}


def _scores(seed, p):
    g = torch.Generator().manual_seed(seed)
    return {t: (torch.rand(20, generator=g) < p).int().tolist() for t in ("a", "b")}


DENSE = {t: [1] * 16 + [0] * 4 for t in ("a", "b")}


def _run(path, methods, fallback="zero", dense=DENSE, limit=20):
    rows = [_row("dense", "-", 0.0, dense)]
    for k, m in enumerate(methods):
        rows += [_row(m, f"ratio {r}", s, _scores(10 * k + j, p))
                 for j, (r, s, p) in enumerate([(0.1, 0.05, 0.8), (0.3, 0.25, 0.6), (0.5, 0.45, 0.4)])]
    res = {"rows": rows, "config": {"model": "tiny", "gates": "g", "tasks": ["a", "b"], "limit": limit,
                                    "policy": "threshold", "seconds": 1.0, "fallback": {"kind": fallback}}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(res))
    return res


def test_report_brackets_a_method_between_random_and_oracle(tmp_path):
    a = _run(tmp_path / "a", ["gateskip+lowrank", "random+lowrank", "oracle+lowrank", "shortgpt"], "lowrank")
    md = suite_report.write(suite_report.analyse(a, iters=50), tmp_path / "a")
    head = "## gateskip+lowrank between its floor (random+lowrank) and its ceiling (oracle+lowrank)"
    assert head in md and "gap closed [95%]" in md
    entries = a["analysis"]["gap_closed"]
    assert {e["method"] for e in entries} == {"gateskip+lowrank"}
    assert [e["level"] for e in entries] == list(suite_report.BRACKET_LEVELS)
    assert all("method_retention" in e for e in entries)  # every curve runs from 5% to 45% saved
    assert "| 25% | " in md and "| 40% | - |" not in md


def test_same_curve_joins_a_renamed_copy_and_survives_a_new_merge(tmp_path):
    a = _run(tmp_path / "a", ["gateskip+lowrank", "random+lowrank"], "lowrank")
    b = _run(tmp_path / "b", ["random+lowrank"], "lowrank")
    b["config"]["policy"] = "quantile"  # another policy: not the same curves, so the merge renames
    for r in b["rows"][1:]:
        r["budget"] = r["budget"].replace("ratio 0.", "ratio 0.0")
    (tmp_path / "b" / "results.json").write_text(json.dumps(b))
    suite_merge.merge(a, str(tmp_path / "b" / "results.json"))
    assert "random+lowrank@b" in {r["method"] for r in a["rows"]}
    for bad, msg in [("x", "is not A=B"), ("nope=random+lowrank", "names no method"),
                     ("random+lowrank@b=gateskip+lowrank", "not copies of one method")]:
        with pytest.raises(GateSkipError, match=msg):
            suite_merge.same_curve(a, bad)
    suite_merge.same_curve(a, "random+lowrank@b=random+lowrank")
    assert [r["budget"] for r in a["rows"] if r["method"] == "random+lowrank"] == [
        "ratio 0.1", "ratio 0.3", "ratio 0.5", "ratio 0.01", "ratio 0.03", "ratio 0.05"]
    assert a["config"]["same_curve"] == {"random+lowrank@b": "random+lowrank"}
    suite_merge.same_curve(a, "random+lowrank@b=random+lowrank")  # again (the report written again): no change
    assert sum(r["method"] == "random+lowrank" for r in a["rows"]) == 6
    suite_merge.merge(a, str(tmp_path / "b" / "results.json"))  # merged again: the join is kept
    assert not any("@" in r["method"] for r in a["rows"])
    assert "Declared one curve" in suite_report.write(suite_report.analyse(a, iters=20), tmp_path / "a")
    c = _run(tmp_path / "c", ["random+lowrank"], "lowrank")  # the same budgets as this run's own
    c["config"]["policy"] = "quantile"
    (tmp_path / "c" / "results.json").write_text(json.dumps(c))
    suite_merge.merge(a, str(tmp_path / "c" / "results.json"))
    with pytest.raises(GateSkipError, match="both have a row at"):
        suite_merge.same_curve(a, "random+lowrank@c=random+lowrank")


def test_merge_renames_collisions_and_refuses_other_items(tmp_path, monkeypatch):

    monkeypatch.setattr(suite_report, "ITERS", 50)
    a = _run(tmp_path / "a", ["gateskip+lowrank", "random+lowrank", "shortgpt+linear"], "lowrank")
    _run(tmp_path / "b", ["gateskip", "shortgpt+linear"])
    suite_merge.merge(a, str(tmp_path / "b" / "results.json"))
    methods = list(dict.fromkeys(r["method"] for r in a["rows"]))
    assert methods == ["dense", "gateskip+lowrank", "random+lowrank", "shortgpt+linear", "gateskip",
                       "shortgpt+linear@b"]
    assert all(r.get("from") == str(tmp_path / "b" / "results.json") for r in a["rows"][10:])
    assert a["config"]["compare_with"][0]["renamed"] == {"shortgpt+linear": "shortgpt+linear@b"}
    suite_report.analyse(a, iters=50)
    assert a["analysis"]["reference"] == "gateskip+lowrank"  # the run's fallback row by default
    assert {e["method"] for e in a["analysis"]["who_wins"]} == set(methods[2:])
    md = suite_report.write(a, tmp_path / "a")
    assert "## Who wins: gateskip+lowrank minus each method" in md and "| shortgpt+linear@b |" in md
    assert "Rows merged from other runs" in md and (tmp_path / "a" / "curve.png").stat().st_size > 0
    style = suite_report.styles(methods[1:])
    assert len({(s["color"], s["marker"]) for s in style.values()}) == len(methods) - 1
    assert style["shortgpt+linear@b"]["linestyle"] == "--"
    # the report again from the folder: another reference, the merge replaced rather than repeated
    argv = [str(tmp_path / "a"), "--compare-with", str(tmp_path / "b" / "results.json"), "--reference", "gateskip"]
    assert suite_report.main(argv) == 0
    again = json.loads((tmp_path / "a" / "results.json").read_text())
    assert len(again["rows"]) == len(a["rows"]) and again["analysis"]["reference"] == "gateskip"
    assert "## Who wins: gateskip minus each method" in (tmp_path / "a" / "report.md").read_text()
    with pytest.raises(GateSkipError, match="names no method"):
        suite_report.analyse(again, reference="mod")
    # other items: refused with one line naming what differs
    other = {**DENSE, "b": [0] + DENSE["b"][1:]}
    _run(tmp_path / "c", ["gateskip"], dense=other)
    _run(tmp_path / "d", ["gateskip"], limit=50)
    dev = _run(tmp_path / "e", ["gateskip"])
    dev["config"]["offset"] = 500  # the same dense scores, but other items (a dev split)
    (tmp_path / "e" / "results.json").write_text(json.dumps(dev))
    for folder, what in (("c", "dense row scores b differently"), ("d", "limit=50"), ("e", "offset=500")):
        with pytest.raises(GateSkipError, match=what) as e:
            suite_merge.merge(a, str(tmp_path / folder / "results.json"))
        assert "\n" not in str(e.value)


def test_a_run_of_the_same_curves_adds_budgets_instead_of_a_renamed_method(tmp_path):
    x = _run(tmp_path / "x", ["gateskip"])
    more = _run(tmp_path / "y", ["gateskip", "random"])
    for r in more["rows"][1:]:  # other budgets of the same curves, with their own scores
        r["budget"] = r["budget"].replace("ratio 0.", "ratio 0.0")
        r["tasks"]["a"]["correct"] = [1 - c for c in r["tasks"]["a"]["correct"]]
    (tmp_path / "y" / "results.json").write_text(json.dumps(more))
    suite_merge.merge(x, str(tmp_path / "y" / "results.json"))
    assert [r["method"] for r in x["rows"]] == ["dense"] + ["gateskip"] * 6 + ["random"] * 3
    assert x["config"]["compare_with"][0]["renamed"] == {}
    for key, value in (("policy", "quantile"), ("gates", "other"), ("protect_first", 1)):  # other curves: renamed
        y = _run(tmp_path / "z", ["gateskip"])
        y["config"][key] = value
        for r in y["rows"][1:]:
            r["tasks"]["a"]["correct"] = [1 - c for c in r["tasks"]["a"]["correct"]]
        (tmp_path / "z" / "results.json").write_text(json.dumps(y))
        got = suite_merge.merge(_run(tmp_path / "x2", ["gateskip"]), str(tmp_path / "z" / "results.json"))
        assert [r["method"] for r in got["rows"]] == ["dense"] + ["gateskip"] * 3 + ["gateskip@z"] * 3, key


def test_a_merged_report_brings_the_rows_it_merged_each_once(tmp_path, monkeypatch):
    monkeypatch.setattr(suite_report, "ITERS", 20)
    b = _run(tmp_path / "b", ["gateskip+lowrank"], "lowrank")
    report = _run(tmp_path / "report", ["random+lowrank"], "lowrank")  # a committed report (docs/results)
    suite_merge.merge(report, str(tmp_path / "b" / "results.json"))
    (tmp_path / "report" / "results.json").write_text(json.dumps(report))
    new = _run(tmp_path / "new", ["gateskip+neurons"], "neurons")
    paths = [str(tmp_path / "report" / "results.json"), str(tmp_path / "b" / "results.json")]
    suite_merge.merge(new, ",".join(paths))
    got = [(r["method"], r["budget"]) for r in new["rows"]]
    # the report's own rows and the rows it had merged from b; b given again adds nothing
    assert got == [("dense", "-")] + [(m, f"ratio {x}") for m in ("gateskip+neurons", "random+lowrank",
                                                                   "gateskip+lowrank") for x in (0.1, 0.3, 0.5)]
    assert [r["tasks"] for r in new["rows"][7:]] == [r["tasks"] for r in b["rows"][1:]]
    assert new["config"]["compare_with"][1]["methods"] == []
    # merging again replaces, and a run that merged this one does not bring this run's rows back
    suite_merge.merge(new, ",".join(paths))
    assert len(new["rows"]) == 10
    (tmp_path / "new" / "results.json").write_text(json.dumps(new))
    again = _run(tmp_path / "again", ["gateskip+neurons"], "neurons")
    suite_merge.merge(again, str(tmp_path / "new" / "results.json"))
    assert len(again["rows"]) == 10 and not any("@" in r["method"] for r in again["rows"])
    # per-task compute recorded: the report reads each task at its own compute saved; not recorded: no table
    for r in again["rows"]:
        for v in r["tasks"].values():
            del v["compute_saved"]
    assert "## Per task at" not in suite_report.write(suite_report.analyse(again, iters=20), tmp_path / "again")
    for r in again["rows"]:
        for t, v in r["tasks"].items():
            v["compute_saved"] = r["compute_saved"] * (2 if t == "b" else 1)
    md = suite_report.write(suite_report.analyse(again, iters=20), tmp_path / "again")
    assert "## Per task at 20% saved on the task's own text" in md
    assert again["analysis"]["task_matched"]["gateskip+neurons"]["b"] is not None


def test_reference_choice():
    cfg = {"fallback": {"kind": "lowrank"}}
    assert suite_report.default_reference(["random+lowrank", "gateskip", "gateskip+lowrank"], cfg) == \
        "gateskip+lowrank"
    assert suite_report.default_reference(["random", "gateskip", "gateskip+lowrank"], {}) == "gateskip"
    assert suite_report.default_reference(["shortgpt", "gateskip+mean@x"], cfg) == "gateskip+mean@x"
    assert suite_report.default_reference(["shortgpt", "random"], cfg) == "shortgpt"


def test_suite_flags_are_checked_before_the_model_loads(tmp_path):
    from gateskip.commands.cli import build_parser
    from gateskip.commands.eval import evaluate

    args = build_parser().parse_args(["eval", "--suite", "core", "--fallback", "lowrank", "--fallback-rank", "32",
                                      "--fallback-batches", "3", "--reference", "gateskip", "--compare-with", "a,b"])
    assert (args.fallback, args.fallback_rank, args.fallback_batches, args.reference, args.compare_with) == (
        "lowrank", 32, 3, "gateskip", ["a", "b"])
    kw = {"suite": "core", "out": str(tmp_path / "o"), "model": "no-such-model"}
    with pytest.raises(GateSkipError, match="--fallback 'cubic'"):
        evaluate(fallback="cubic", **kw)
    with pytest.raises(GateSkipError, match="--fallback-batches"):
        evaluate(fallback="linear", fallback_batches=0, **kw)
    with pytest.raises(GateSkipError, match="--reference 'gateskip' names no method"):
        evaluate(methods="shortgpt,shortgpt_linear", reference="gateskip", **kw)
    _run(tmp_path / "b", ["gateskip"], limit=20)
    with pytest.raises(GateSkipError, match="was run with tasks="):
        evaluate(methods="shortgpt", compare_with=str(tmp_path / "b" / "results.json"), limit=50, **kw)
    with pytest.raises(GateSkipError, match="apply to suite runs"):
        evaluate(fallback="linear", out=str(tmp_path / "o"), model="no-such-model")
    with pytest.raises(GateSkipError, match="--offset applies to suite runs"):
        evaluate(offset=500, out=str(tmp_path / "o"), model="no-such-model")
    with pytest.raises(GateSkipError, match="offset=-1 is invalid"):
        evaluate(offset=-1, **kw)
    assert build_parser().parse_args(["eval", "--suite", "core", "--offset", "500"]).offset == 500


def test_an_interrupted_sweep_resumes_from_its_partial_scores(tmp_path, monkeypatch):
    """Every task score is written as it is measured; a rerun with the same settings reuses them (no scoring),
    and a run with other settings starts over."""
    from gateskip.eval import scoring

    gates = _gates_folder(tmp_path / "g")
    tasks = [SuiteTask("t", "mc", "acc", ITEMS), SuiteTask("u", "mc", "acc", ITEMS[:2])]
    path = str(tmp_path / "partial.json")

    def run(fp, bar=None):
        return sweep(tiny_model("llama"), tiny_tokenizer(), gates, tasks, ["gateskip"], {"gateskip": [0.3]},
                     "threshold", None, None, 0, _data(seed=3), None, bar or Bar(), resume=(path, fp))

    real = scoring.Scorer.loglikelihoods
    calls = []

    def dies_on_the_third_task(self, items):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, items)

    monkeypatch.setattr(scoring.Scorer, "loglikelihoods", dies_on_the_third_task)
    with pytest.raises(KeyboardInterrupt):
        run({"v": 1})
    saved = json.load(open(path))["rows"]
    assert sum(len(r["tasks"]) for r in saved.values()) == 2  # dense t, u
    monkeypatch.setattr(scoring.Scorer, "loglikelihoods", real)
    bar = Bar()
    resumed = run({"v": 1}, bar)
    assert any("resuming: 2 task scores" in line for line in bar.lines)
    fresh = sweep(tiny_model("llama"), tiny_tokenizer(), gates, tasks, ["gateskip"], {"gateskip": [0.3]},
                  "threshold", None, None, 0, _data(seed=3), None, Bar())
    for a, b in zip(resumed["rows"], fresh["rows"]):
        assert (a["method"], a["budget"]) == (b["method"], b["budget"])
        for t in a["tasks"]:
            assert a["tasks"][t]["correct"] == b["tasks"][t]["correct"]
            assert a["tasks"][t]["compute_saved"] == pytest.approx(b["tasks"][t]["compute_saved"])
    bar = Bar()
    run({"v": 2}, bar)
    assert any("another sweep" in line for line in bar.lines)


def test_the_dense_row_of_a_run_to_merge_is_reused_after_a_spot_check(tmp_path):
    def run(dense_from=None, bar=None):
        return sweep(tiny_model("llama"), tiny_tokenizer(), None, TASKS, [], {}, "threshold", None, None, 0,
                     _data(seed=3), None, bar or Bar(), dense_from=dense_from)

    cfg = {"model": "tiny", "tasks": ["t"], "limit": 3, "shared_prefix": True, "fidelity": None}
    first = {"config": cfg, "rows": run()["rows"]}
    bar = Bar()
    again = run(("a/results.json", first, cfg), bar)
    assert any("dense row taken from a/results.json" in m for m in bar.lines)
    assert again["rows"][0]["tasks"] == first["rows"][0]["tasks"]
    # another model, or scores that the spot check does not reproduce: scored again, not taken
    bar = Bar()
    run(("a/results.json", first, {**cfg, "model": "other"}), bar)
    assert not any("taken" in m for m in bar.lines)
    wrong = json.loads(json.dumps(first))
    c = wrong["rows"][0]["tasks"]["t"]["correct"]
    c[0] = 1.0 - c[0]
    wrong["rows"][0]["tasks"]["t"]["acc"] = -1.0
    bar = Bar()
    rescored = run(("a/results.json", wrong, cfg), bar)
    assert any("scores t differently" in m for m in bar.lines)
    assert rescored["rows"][0]["tasks"]["t"]["correct"] == first["rows"][0]["tasks"]["t"]["correct"]


# ---- a task added to a finished sweep --------------------------------------------------------------

def test_joining_a_later_run_on_another_task_equals_scoring_both_at_once(tmp_path):
    other = SuiteTask("u", "mc", "acc", [Item(0, [("Snow is", " cold"), ("Snow is", " hot soup")], 0, [5.0, 9.0]),
                                         Item(1, [("Fish live in", " water"), ("Fish live in", " trees")], 0,
                                              [6.0, 6.0])])
    gates = _gates_folder(tmp_path / "g")
    budgets = {"gateskip": [0.3, 0.6]}

    def run(tasks, name):
        res = sweep(tiny_model("llama"), tiny_tokenizer(), gates, tasks, ["gateskip"], budgets, "threshold", None,
                    None, 0, None, None, Bar())
        res["config"] = {"model": "tiny", "gates": gates, "tasks": [t.name for t in tasks], "limit": 2,
                         "policy": "threshold", "methods": ["gateskip"], "budgets": budgets, "seconds": 1.0,
                         "scoring_seconds": 1.0}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
        return res

    both = run([TASKS[0], other], "both")
    first = run([TASKS[0]], "first")
    run([other], "second")
    joined = suite_merge.join_tasks(first, str(tmp_path / "second" / "results.json"))
    assert joined["config"]["tasks"] == ["t", "u"]
    for a, b in zip(joined["rows"], both["rows"], strict=True):
        assert (a["method"], a["budget"]) == (b["method"], b["budget"])
        assert {t: v["correct"] for t, v in a["tasks"].items()} == {t: v["correct"] for t, v in b["tasks"].items()}
        for key in ("compute_saved", "tokens_skipped", "mean_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12)
    assert both["rows"][1]["compute_saved"] > 0  # the joined rows really skip
    with pytest.raises(GateSkipError, match="also scores u"):  # joined twice
        suite_merge.join_tasks(joined, str(tmp_path / "second" / "results.json"))
    third = json.loads((tmp_path / "both" / "results.json").read_text())
    third["config"].update(tasks=["v"], policy="quantile")
    (tmp_path / "both" / "results.json").write_text(json.dumps(third))
    with pytest.raises(GateSkipError, match="policy differ"):
        suite_merge.join_tasks(run([TASKS[0]], "again"), str(tmp_path / "both" / "results.json"))


def test_a_comma_list_of_tasks_is_a_custom_suite():
    from gateskip.eval.suite import suite_tasks

    assert suite_tasks("commonsense_qa", None) == ["commonsense_qa"]
    assert suite_tasks("piqa, lambada", None) == ["piqa", "lambada"]
    with pytest.raises(GateSkipError, match="unknown suite 'piqa,nope'"):
        suite_tasks("piqa,nope", None)


def test_oracle_rows_follow_the_gateskip_rows_policy(tmp_path):
    """Under thresholds the oracle decides per token against thresholds calibrated on the fit batches
    (prefix sharing stays exact); under quantile it ranks each whole request. Ratio 0 is dense."""
    lin = _gates_folder(tmp_path / "lin", "linear")
    budgets = {"gateskip": [0.3], "oracle": [0.0, 0.5]}
    calls = []
    res = _sweep(lin, ["gateskip", "oracle"], {"kind": "linear", "rank": 64}, budgets=budgets,
                 fit_batches=lambda: calls.append(1) or _data(seed=2))
    assert calls == [1]  # the fallback is the folder's: the batches only calibrate the oracle
    dense, _, off, on = res["rows"]
    assert [r["method"] for r in res["rows"]] == ["dense", "gateskip+linear", "oracle+linear", "oracle+linear"]
    assert on["policy"] == "oracle_threshold" and on["exact_prefix_sharing"]
    assert on["setting"]["oracle_calibration"]["tokens"] == 3 * 4 * 32
    assert off["tasks"]["t"]["correct"] == dense["tasks"]["t"]["correct"] and off["tokens_skipped"] == 0
    assert on["tokens_skipped"] > 0.1  # (a linear fallback on the tiny model costs what it saves)
    res = _sweep(lin, ["oracle"], {"kind": "linear", "rank": 64}, fit_batches=_never, budgets=budgets,
                 policy="quantile")
    dense, off, on = res["rows"]
    assert off["policy"] == on["policy"] == "oracle" and not on["exact_prefix_sharing"]
    # ratio 0 changes nothing; at 0.5 half of every branch's eligible tokens are skipped (the first is protected)
    assert off["tasks"]["t"]["correct"] == dense["tasks"]["t"]["correct"] and off["tokens_skipped"] == 0
    assert 0.3 < on["tokens_skipped"] <= 0.5 and on["compute_saved"] > 0
    assert row_names(["oracle", "gateskip"], "lowrank") == ["gateskip+lowrank", "oracle+lowrank"]


def test_rows_that_skip_one_branch_kind_equal_a_budget_that_gives_the_other_kind_zero(tmp_path):
    """--modules mlp on a suite run: the gateskip and random rows skip MLP tokens only, named gateskip[mlp]...;
    scores and compute equal a per-branch budget file with ratio 0 for every attention branch."""
    from gateskip.eval.suite_run import check_modules

    lin = _gates_folder(tmp_path / "lin", "linear")
    budget = tmp_path / "mlp_only.json"
    budget.write_text(json.dumps({f"layers.{i}.{k}": 0.5 if k == "mlp" else 0.0 for i in range(3)
                                  for k in ("attn", "mlp")}))
    fb = {"kind": "linear", "rank": 64}
    scoped = _sweep(lin, ["gateskip", "random"], fb, fit_batches=_never, budgets={"gateskip": [0.5], "random": [0.5]},
                    modules=("mlp",))
    ref = _sweep(lin, ["gateskip"], fb, fit_batches=_never, budgets={"gateskip": [str(budget)]})
    assert [r["method"] for r in scoped["rows"]] == ["dense", "gateskip[mlp]+linear", "random[mlp]+linear"]
    a, b = scoped["rows"][1], ref["rows"][1]
    assert a["tasks"]["t"]["correct"] == b["tasks"]["t"]["correct"] and a["tokens_skipped"] == b["tokens_skipped"] > 0
    assert a["compute_saved"] == pytest.approx(b["compute_saved"])
    both = _sweep(lin, ["random"], fb, fit_batches=_never, budgets={"random": [0.5]})
    assert 0 < scoped["rows"][2]["tokens_skipped"] < both["rows"][1]["tokens_skipped"]
    assert row_names(["gateskip", "random"], "lowrank", ("mlp",)) == ["gateskip[mlp]+lowrank", "random[mlp]+lowrank"]
    assert check_modules("mlp,attn") == check_modules(["attn,mlp"]) == ("attn", "mlp")
    with pytest.raises(GateSkipError, match="modules=ffn is invalid"):
        check_modules("ffn")


# ---- generation fidelity: its own compute, per prompt, matched ----------------------------------------------

def test_fidelity_rows_record_the_generation_compute_and_per_prompt_scores(tmp_path, monkeypatch):
    from gateskip.core import skipping
    from gateskip.eval import fidelity

    prompts = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(fidelity, "heldout_prompts", lambda tok, n, length, source="mix": prompts[:n, :length])
    gates = _gates_folder(tmp_path / "g")
    res = sweep(tiny_model("llama"), tiny_tokenizer(), gates, TASKS, ["gateskip"], {"gateskip": [0.6]}, "threshold", None, None, 0,
                None, (3, 6, 5), Bar())
    dense, gated = (r["fidelity"] for r in res["rows"])
    assert dense["gen_compute_saved"] == pytest.approx(0.0, abs=1e-9) and dense["agree_next"] == 1.0
    assert gated["gen_compute_saved"] > 0 and gated["gen_tokens_skipped"] > 0
    for f in (dense, gated):  # equal-length prompts: the mean of per-prompt means is the overall mean
        for k in ("kl", "agree_next", "agree_tokens", "agree_prefix"):
            assert len(f["per_prompt"][k]) == 3
            assert sum(f["per_prompt"][k]) / 3 == pytest.approx(f[k], abs=1e-6)
    # the same figures as measuring under the row's plan in one block
    pad = tiny_tokenizer().pad_token_id or 0
    ref = fidelity.reference(tiny_model("llama"), prompts, 5, pad)
    gated_net = gateskip.load_gates(tiny_model("llama"), gates)
    with torch.no_grad(), skipping(gated_net, ratio=0.6, policy="threshold"):
        again = fidelity.measure(gated_net, ref, pad)
    for k in ("kl", "agree_next", "agree_tokens"):
        assert again[k] == pytest.approx(gated[k], abs=1e-6)


def test_next_token_agreement_counts_forced_argmax_matches():
    cont = torch.tensor([[1, 2], [0, 1]])
    logp = torch.log_softmax(torch.tensor([[[0.0, 5, 0], [0, 0, 5]], [[0, 5, 0], [0, 5, 0]]]), -1)
    ref = fidelity_ref(cont, logp)
    got = __import__("gateskip.eval.fidelity", fromlist=["summary"]).summary(ref, logp, cont)
    assert got["agree_next"] == pytest.approx(3 / 4) and got["per_prompt"]["agree_next"] == [1.0, 0.5]
    assert got["kl"] == 0.0 and "gen_compute_saved" not in got


def fidelity_ref(cont, logp):
    from gateskip.eval.fidelity import Reference

    return Reference(torch.zeros(len(cont), 1, dtype=torch.long), cont, logp)


def _fid_row(method, saved, agree, kl=0.5):
    return {"method": method, "budget": f"{saved}", "compute_saved": saved, "tasks": {},
            "fidelity": {"kl": kl, "gen_compute_saved": saved,
                         "per_prompt": {"kl": [kl] * len(agree), "agree_next": list(agree),
                                        "agree_tokens": list(agree)}}}


def test_generation_matched_interpolates_per_prompt_on_generation_compute_and_pairs_prompts():
    from gateskip.eval import paired

    rows = [{"method": "dense", "budget": "-", "compute_saved": 0.0, "tasks": {}},
            _fid_row("a", 0.2, [0.4, 0.6]), _fid_row("a", 0.3, [0.2, 0.4]),
            _fid_row("b", 0.1, [0.1, 0.3]), _fid_row("b", 0.5, [0.1, 0.1]),
            _fid_row("c", 0.3, [0.5, 0.5])]
    g = paired.generation_matched(rows, 0.25, reference="a", iters=200)
    assert g["methods"]["a"]["agree_next"] == pytest.approx(0.4)  # halfway: prompts 0.3 and 0.5
    assert g["methods"]["b"]["agree_next"] == pytest.approx((0.1 + (0.3 - 0.2 * 0.375)) / 2)
    assert g["methods"]["c"] is None  # one row at 30%: 25% is outside its range
    r = g["ratios"]["b"]["agree_next"]
    assert r["ratio"] == pytest.approx(0.4 / g["methods"]["b"]["agree_next"]) and r["lo"] <= r["ratio"] <= r["hi"]
    assert "c" not in g["ratios"]


def test_the_generation_plot_is_drawn_only_from_rows_that_recorded_generation_compute(tmp_path):
    rows = [{"method": "dense", "budget": "-", "compute_saved": 0.0, "tasks": {}},
            _fid_row("a", 0.2, [0.4, 0.6]), _fid_row("a", 0.3, [0.2, 0.4])]
    for r in rows[1:]:
        r["fidelity"].update(agree_next=0.5, agree_tokens=0.1)
    res = {"rows": rows, "config": {"fidelity": {"prompts": 2, "new_tokens": 4}}}
    assert suite_report.plot_generation(res, tmp_path / "g.png") and (tmp_path / "g.png").stat().st_size > 0
    for r in rows[1:]:
        del r["fidelity"]["gen_compute_saved"]  # a run before the generation's compute was recorded
    assert not suite_report.plot_generation(res, tmp_path / "h.png") and not (tmp_path / "h.png").exists()


def test_a_renamed_copy_of_an_own_row_is_not_merged_again(tmp_path):
    _run(tmp_path / "a", ["gateskip"])
    b = _run(tmp_path / "b", ["gateskip"])  # the same rows, merged as gateskip@a by a run of other curves
    b["config"]["policy"] = "quantile"
    for r in b["rows"][1:]:
        r["tasks"]["a"]["correct"] = [1 - c for c in r["tasks"]["a"]["correct"]]
    (tmp_path / "b" / "results.json").write_text(json.dumps(b))
    suite_merge.merge(b, str(tmp_path / "a" / "results.json"))
    assert [r["method"] for r in b["rows"]] == ["dense"] + ["gateskip"] * 3 + ["gateskip@a"] * 3
    (tmp_path / "b" / "results.json").write_text(json.dumps(b))
    again = suite_merge.merge(_run(tmp_path / "a2", ["gateskip"]), str(tmp_path / "b" / "results.json"))
    assert [r["method"] for r in again["rows"]] == ["dense"] + ["gateskip"] * 3 + ["gateskip@b"] * 3


def test_merged_rows_keep_fidelity_only_from_the_same_prompts(tmp_path, monkeypatch):
    gates = _gates_folder(tmp_path / "g")
    res = _sweep(gates, ["gateskip"])
    for r in res["rows"]:
        r["fidelity"] = {"kl": 0.1, "ce": 1.0, "agree_prefix": 0.5, "agree_tokens": 0.5}
    base = {"model": "tiny", "tasks": ["t"], "limit": 3, "fidelity": {"prompts": 16}}
    other = tmp_path / "o" / "results.json"
    other.parent.mkdir()
    for prompts, kept in ((16, True), (64, False)):
        other.write_text(json.dumps({"config": {**base, "fidelity": {"prompts": prompts}}, "rows": res["rows"]}))
        mine = {"config": dict(base), "rows": json.loads(json.dumps(res["rows"][:1]))}
        merged = suite_merge.merge(mine, str(other))["rows"]
        assert len(merged) == 2 and ("fidelity" in merged[1]) == kept


def test_saved_budget_rows_land_at_their_saving_on_the_suite_text(tmp_path):
    """--saved on a suite run: gateskip and random rows steered to a compute saved, labelled by it."""
    lin = _gates_folder(tmp_path / "lin", "zero")
    items = [Item(i, it.requests, it.gold, it.choice_chars) for i, it in enumerate(ITEMS * 16)]  # 6 batches of 8 items
    res = sweep(tiny_model("llama"), tiny_tokenizer(), lin, [SuiteTask("t", "mc", "acc", items)], ["gateskip", "random"],
                {"gateskip": [], "random": [], "saved": [0.3]}, "threshold", None, None, 0, _data(seed=3), None, Bar(),
                fallback={"kind": "zero", "rank": 64}, fit_batches=_never)
    rows = res["rows"][1:]
    assert [(r["method"], r["budget"]) for r in rows] == [("gateskip", "saved 0.3"), ("random", "saved 0.3")]
    for r in rows:
        assert r["compute_saved"] == pytest.approx(0.3, abs=0.03)
