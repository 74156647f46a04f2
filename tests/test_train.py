"""Training on tiny models: the loss and the gates move the right way, resume is exact, train() end to end."""

import json

import pytest
import torch
from conftest import TEXT, tiny_folder

import gateskip
from gateskip.core import gate_state
from gateskip.errors import GateSkipError
from gateskip.models import tiny_model, tiny_tokenizer
from gateskip.taps import logging_gates
from gateskip.train import fit, lr_at, ramp_ratio


def _stream(n_batches=200, seed=0):
    from gateskip.data import pack

    texts = [TEXT * 3 + f"line {i}." for i in range(60)]
    return pack(tiny_tokenizer(), texts, seq_len=48, batch_size=4, seed=seed)


def _gate_mean(model, ids):
    with torch.no_grad(), logging_gates(model) as log:
        model(input_ids=ids, use_cache=False)
    return float(torch.stack([g.mean() for g, _ in log.entries]).mean())


def _train(lam, steps=40, backbone="full", objective="ce", out=None, **kw):
    m = gateskip.add_gates(tiny_model("llama"), gateskip.GateSkipConfig(init_bias=2.0))
    stream = _stream()
    probe = next(_stream(seed=1))
    before = _gate_mean(m, probe)
    fit(m, stream, steps=steps, lr=3e-2, backbone=backbone, backbone_lr=3e-3, objective=objective, lam=lam,
        max_ratio=0.2, warmup=2, out=out, **kw)
    return m, before, _gate_mean(m, probe), out


def test_training_lowers_loss_and_gates(tmp_path):
    m, before, after, out = _train(lam=1.0, out=tmp_path / "a")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 40 and log[-1]["ratio"] == pytest.approx(0.2)
    first = sum(r["task"] for r in log[:5]) / 5
    last = sum(r["task"] for r in log[-5:]) / 5
    assert last < 0.7 * first  # the model learns the text while skipping ramps up
    assert after < before - 0.05  # the sparsity penalty closes gates ...
    _, before0, after0, _ = _train(lam=0.0)
    assert after < after0  # ... more than training without it


def test_frozen_backbone_trains_only_gates():
    m = gateskip.add_gates(tiny_model("qwen2"), gateskip.GateSkipConfig(init_bias=2.0))
    ref = {k: v.clone() for k, v in m.named_parameters() if ".gate." not in k}
    gates_before = [p.clone() for p in gateskip.gate_parameters(m)]
    fit(m, _stream(), steps=5, lr=1e-2, objective="distill", lam=0.5, warmup=1)
    assert all(torch.equal(v, dict(m.named_parameters())[k]) for k, v in ref.items())
    assert any(not torch.equal(a, b) for a, b in zip(gates_before, gateskip.gate_parameters(m)))


class _Crash(Exception):
    pass


def _crashing(stream, after):
    class S:
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            if self.n > after:
                raise _Crash
            return next(stream)

        def state_dict(self):
            return stream.state_dict()

        def load_state_dict(self, s):
            stream.load_state_dict(s)
    return S()


def test_resume_after_crash_matches_uninterrupted(tmp_path):
    def run(out, crash_after=None):
        torch.manual_seed(0)
        m = gateskip.add_gates(tiny_model("llama"), gateskip.GateSkipConfig(init_bias=2.0))
        s = _stream()
        kw = dict(steps=8, lr=1e-2, lam=0.5, objective="ce", warmup=2, save_every=3, out=out)
        if crash_after is not None:
            with pytest.raises(_Crash):
                fit(m, _crashing(s, crash_after), **kw)
            m = gateskip.add_gates(tiny_model("llama"), gateskip.GateSkipConfig(init_bias=5.0))  # fresh process
            s = _stream()
        fit(m, s, **kw)
        return [p.detach().clone() for p in gateskip.gate_parameters(m)]

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", crash_after=5)  # dies during step 6; the step-3 checkpoint is reloaded
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(straight, resumed))


def test_schedules():
    assert ramp_ratio(0, 10, 0.2) == 0.0 and ramp_ratio(5, 10, 0.2) == pytest.approx(0.1)
    assert ramp_ratio(50, 10, 0.2) == pytest.approx(0.2)
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.1)


def test_budget_ladder_draws_every_ratio_in_range_and_repeats_on_resume():
    drawn = [ramp_ratio(s, 10, 0.6, 0.2, seed=3) for s in range(10, 400)]
    assert min(drawn) >= 0.2 and max(drawn) <= 0.6
    assert min(drawn) < 0.25 and max(drawn) > 0.55  # the whole ladder is visited, not one rung
    assert drawn == [ramp_ratio(s, 10, 0.6, 0.2, seed=3) for s in range(10, 400)]  # a function of (seed, step)
    assert drawn != [ramp_ratio(s, 10, 0.6, 0.2, seed=4) for s in range(10, 400)]
    assert ramp_ratio(5, 10, 0.6, 0.6) == pytest.approx(0.3)  # min == max: the plain ramp
    with pytest.raises(GateSkipError, match="min_ratio"):
        fit(None, iter(()), steps=1, min_ratio=0.7, max_ratio=0.5)


def test_fit_rejects_bad_settings():
    m = tiny_model("llama")
    with pytest.raises(GateSkipError, match="add_gates"):
        fit(m, _stream(), steps=1)
    gateskip.add_gates(m)
    with pytest.raises(GateSkipError, match="backbone"):
        fit(m, _stream(), steps=1, backbone="half")


def test_train_cli_then_generate_cli(tmp_path, capsys):
    from gateskip.commands.cli import main

    d, data = tiny_folder(tmp_path)
    out = tmp_path / "gates"
    assert main(["train", "--model", str(d), "--data", str(data), "--steps", "3", "--seq-len", "32",
                 "--batch-size", "2", "--gate", "lowrank", "--calibrate-batches", "2", "--out", str(out)]) == 0
    assert {"gates.safetensors", "gateskip.json", "train_log.jsonl"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "gateskip.json").read_text())
    assert meta["base_model"]["source"] == str(d) and meta["config"]["gate"] == "lowrank"
    capsys.readouterr()
    # --model is left out: the gates folder records its base model.
    assert main(["generate", "--gates", str(out), "--ratio", "0.3", "--max-new-tokens", "5", "--no-chat",
                 "the cat"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "tokens_skipped=" in captured.err and "compute_saved=" in captured.err


@pytest.mark.parametrize("argv, match", [
    (["generate", "  "], "empty prompt"),
    (["generate", "--ratio", "1.5", "hi"], "out of range"),
    (["generate", "--ratio", "0.3", "hi"], "needs trained gates"),
    (["generate", "--gates", "/nonexistent/dir", "hi"], "does not exist"),
    (["generate", "--model", "no/such-model!", "hi"], "not an alias"),
    (["train", "--backbone", "half"], "backbone"),
    (["train", "--config", "/nonexistent.yaml"], "cannot read config"),
])
def test_cli_errors_are_one_line(argv, match, capsys):
    from gateskip.commands.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gateskip: error:") and match in err and "\n" not in err


@pytest.mark.parametrize("backbone", ["lora", "full"])
def test_trained_backbone_roundtrips_through_gates_folder(tmp_path, backbone):
    from gateskip.commands.cli import main

    d, data = tiny_folder(tmp_path)
    out = tmp_path / backbone
    assert main(["train", "--model", str(d), "--data", str(data), "--steps", "3", "--seq-len", "32",
                 "--batch-size", "2", "--backbone", backbone, "--backbone-lr", "0.05", "--lam", "0.1",
                 "--calibrate-batches", "2", "--out", str(out)]) == 0
    ids = torch.randint(4, 100, (2, 12))
    base, _ = gateskip.load_model(str(d))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    gateskip.load_gates(base, out)
    with torch.no_grad(), gateskip.skipping(base, ratio=0.0):
        tuned = base(input_ids=ids).logits
    assert (tuned - ref).abs().max() > 1e-4  # the backbone change came back with the gates
    gateskip.save_gates(base, tmp_path / "resaved")  # a loaded folder saved again keeps its backbone change
    again, _ = gateskip.load_model(str(d))
    gateskip.load_gates(again, tmp_path / "resaved")
    with torch.no_grad(), gateskip.skipping(again, ratio=0.0):
        assert torch.allclose(again(input_ids=ids).logits, tuned, atol=1e-5)
    gateskip.remove_gates(base)
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, ref)  # and is undone exactly
    # gateskip bench gives each setting of a gates folder its own copy: the change must not reach the dense model
    from gateskip.commands.bench_timing import live_models

    live = live_models(base, {"folder": {"dir": str(out), "calibration": {}}},
                        [("dense", None, 0.0), ("folder@0", "folder", 0.0)])
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, ref)
        with gateskip.skipping(live["folder@0"], ratio=0.0):
            assert torch.allclose(live["folder@0"](input_ids=ids).logits, tuned, atol=1e-5)


def test_yaml_config_supplies_flags_and_flags_win(tmp_path, capsys):
    from gateskip.commands.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("ratio: 0.5\npolicy: best\n")
    assert main(["generate", "--config", str(cfg), "hi"]) == 2
    assert "policy='best'" in capsys.readouterr().err  # the YAML value reached the function
    assert main(["generate", "--config", str(cfg), "--policy", "random", "--ratio", "2", "hi"]) == 2
    assert "skip ratio 2.0 is out of range" in capsys.readouterr().err  # flags override the file
    cfg.write_text("stepz: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown keys ['stepz']" in capsys.readouterr().err


def test_straight_through_keeps_the_forward_and_gives_skipped_gates_the_task_gradient():
    """Forward values equal the plain masked path; a branch whose tokens all skip gets zero task
    gradient on its gate without straight-through, and the gradient of ``raw * g`` with it."""
    from conftest import VOCAB

    m = gateskip.add_gates(tiny_model("llama"), gateskip.GateSkipConfig(init_std=0.3, init_bias=0.0))
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    target = "layers.1.mlp"
    branch = next(b for b in gate_state(m).branches if b.name == target)

    def run(st):
        m.zero_grad()
        with gateskip.skipping(m, ratio={target: 1.0, "attn": 0.3}, path="masked", straight_through=st):
            logits = m(input_ids=ids, use_cache=False).logits
        logits.float().pow(2).mean().backward()  # a task loss only: no sparsity term
        grad = torch.cat([p.grad.flatten() for p in branch.gate.parameters() if p.grad is not None] or [torch.zeros(1)])
        return logits.detach(), grad

    plain, g_plain = run(False)
    st, g_st = run(True)
    assert torch.equal(plain, st)
    assert g_plain.abs().max() == 0  # every token skipped this branch: its gate learns nothing from the task
    assert g_st.abs().max() > 0
    for p in branch.module.parameters():  # no gradient reaches the branch through skipped tokens
        assert p.grad is None or p.grad.abs().max() == 0


def test_straight_through_needs_gates_after_the_branch(tmp_path):
    from gateskip.commands.train import train

    with pytest.raises(GateSkipError, match="placement=after"):
        train(model="tiny-llama", out=str(tmp_path / "g"), steps=1, placement="before", straight_through=True)


def test_train_straight_through_flag_reaches_the_training_forward(tmp_path, monkeypatch):
    import gateskip.train as T
    from gateskip.commands.cli import main

    seen = []
    real = T.skipping

    def spy(*args, **kwargs):
        seen.append(kwargs.get("straight_through"))
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "skipping", spy)
    d, data = tiny_folder(tmp_path)
    out = tmp_path / "gates"
    assert main(["train", "--model", str(d), "--data", str(data), "--steps", "2", "--seq-len", "32",
                 "--batch-size", "2", "--calibrate-batches", "1", "--straight-through", "--out", str(out)]) == 0
    assert seen and all(seen)
    assert json.loads((out / "gateskip.json").read_text())["training"]["straight_through"] is True


def test_fallback_trains_end_to_end_under_a_per_branch_budget(tmp_path):
    from gateskip.fallback import fallback_modules

    m = gateskip.add_gates(tiny_model("llama"), gateskip.GateSkipConfig(init_bias=2.0, fallback="linear"))
    gateskip.fit_fallback(m, [next(_stream(seed=2))])
    before = {k: [p.clone() for p in fb.parameters()] for k, fb in fallback_modules(m).items()}
    budget = {"layers.1.mlp": 1.0, "layers.0.attn": 0.5}
    fit(m, _stream(), steps=4, lr=1e-2, objective="distill", lam=0.0, warmup=1, ramp_steps=2, budget=budget,
        train_fallback=True, fallback_lr=1e-2, out=tmp_path / "a")
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["ratio"] == pytest.approx(1.0)  # the ramp reaches the budget itself
    # a branch skips only where the budget says: its fallback gets gradient, the never-skipped ones do not
    changed = {k for k, fb in fallback_modules(m).items()
               if any(not torch.equal(a, b) for a, b in zip(fb.parameters(), before[k]))}
    assert changed == set(budget)


def test_train_from_a_fit_folder_with_a_budget_file(tmp_path):
    from gateskip.allocate import read_budget
    from gateskip.commands.fit import fit as fit_command
    from gateskip.commands.train import train

    d, data = tiny_folder(tmp_path)
    fit_command(model=str(d), out=str(tmp_path / "f"), fallback="lowrank", fallback_rank=8, fallback_batches=2, seq_len=32,
                batch_size=2, compare="", data=str(data))
    budget = tmp_path / "b.json"
    budget.write_text(json.dumps({"layers.1.mlp": 0.5}))
    out = train(model=str(d), out=str(tmp_path / "t"), data=str(data), steps=2, seq_len=32, batch_size=2,
                init=str(tmp_path / "f"), budget=str(budget), train_fallback=True, calibrate_batches=1, warmup=1)
    meta = json.loads((out / "gateskip.json").read_text())
    assert meta["config"]["fallback"] == "lowrank" and meta["config"]["fallback_rank"] == 8
    assert meta["training"]["calibration"]["ratio"] == {"layers.1.mlp": 0.5}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GateSkipError, match="not valid JSON"):
        read_budget(str(tmp_path / "bad.json"))
    with pytest.raises(GateSkipError, match="does not exist"):
        read_budget(str(tmp_path / "missing.json"))
    with pytest.raises(GateSkipError, match="skip ratio for layers.1.mlp"):
        (tmp_path / "big.json").write_text(json.dumps({"layers.1.mlp": 2}))
        read_budget(str(tmp_path / "big.json"))


def test_training_one_branch_kind_gates_that_kind_alone(tmp_path):
    """--modules mlp --init fit: gates and fallbacks on the MLP branches only (a neurons fallback, which only MLPs
    can have, is then the fallback of every branch); the folder records it; a later run on that folder cannot ask
    for attention skipping."""
    from gateskip.commands.train import train

    d, data = tiny_folder(tmp_path)
    out = train(model=str(d), out=str(tmp_path / "t"), data=str(data), steps=1, seq_len=32, batch_size=2,
                init="fit", fallback="neurons", fallback_neurons=4, fallback_batches=2, fallback_rank=8,
                modules="mlp", calibrate_batches=1, warmup=1)
    for folder in (out / "fit", out):
        meta = json.loads((folder / "gateskip.json").read_text())
        assert meta["config"]["modules"] == ["mlp"] and meta["config"]["fallback"] == "neurons"
    assert json.loads((out / "gateskip.json").read_text())["training"]["modules"] == ["mlp"]
    loaded = gateskip.load_gates(tiny_model("llama"), out)
    assert [b.name for b in gate_state(loaded).branches] == [f"layers.{i}.mlp" for i in range(3)]
    with pytest.raises(GateSkipError, match="has gates on mlp only"):
        train(model=str(d), out=str(tmp_path / "u"), data=str(data), steps=1, init=str(out), modules="attn,mlp")
    # --modules unset: new gates on the MLPs (the best recipe), a folder's own kinds with --init DIR
    both = train(model=str(d), out=str(tmp_path / "b"), data=str(data), steps=1, seq_len=32, batch_size=2,
                 init="fit", fallback="lowrank", fallback_batches=2, fallback_rank=8, modules="attn,mlp",
                 calibrate_batches=1, warmup=1)
    again = train(model=str(d), out=str(tmp_path / "a"), data=str(data), steps=1, seq_len=32, batch_size=2,
                  init=str(both), calibrate_batches=1, warmup=1)
    assert json.loads((again / "gateskip.json").read_text())["training"]["modules"] == ["attn", "mlp"]


def test_shipped_recipes_best_is_trains_defaults_and_paper_is_the_papers(capsys):
    """best.yaml, loaded alone, gives train's default argument groups, and names every option of them (complete);
    paper.yaml's gates are GateSkipConfig()'s defaults (the paper's); demo.yaml is best with a shorter run."""
    import dataclasses
    import inspect

    from gateskip.commands.cli import main, options
    from gateskip.commands.train import train
    from gateskip.config import GateSkipConfig
    from gateskip.flags import apply
    from gateskip.recipes import load_recipe, names

    assert {"best", "demo", "paper"} <= set(names())
    groups = {k: p.default for k, p in inspect.signature(train).parameters.items() if dataclasses.is_dataclass(p.default)}
    assert set(groups) == {"text", "gates", "start", "loop", "calibration", "run"}
    best = load_recipe("best")
    assert set(best) == {f.name for g in groups.values() for f in dataclasses.fields(g)}  # complete
    assert apply(best, groups) == groups  # loaded alone: the defaults themselves
    assert set(best) <= {row[0] for row in options(train)}  # and every one of them is a flag
    demo = load_recipe("demo")  # make demo's training: train's defaults with a short run and fewer chat answers
    assert set(demo) == {"steps", "fallback_batches", "chat_texts"}
    assert demo["steps"] < groups["loop"].steps and demo["chat_texts"] < groups["text"].chat_texts
    paper = load_recipe("paper")
    assert apply(paper, groups)["gates"] == GateSkipConfig()  # the paper's gates are the config's defaults
    assert paper["objective"] == "ce" and paper["max_ratio"] == 0.2 and paper["lam"] > 0 and paper["init"] == "none"
    assert set(paper) == set(best)  # complete too
    from gateskip.commands.cli import _load_yaml

    assert _load_yaml("paper", train) == paper  # --config paper: a shipped name resolves like a path
    assert main(["train", "--config", "no-such-recipe"]) == 2
    assert "shipped recipe" in capsys.readouterr().err
