"""Faults and hostile input: checkpoints survive kills, NaNs and full disks; bad files and flags fail clearly.

Each test here backs one promise in docs/reliability.md.
"""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TEXT, tiny_folder
from safetensors.torch import load_file, save_file

import gateskip
import gateskip.train as gtrain
import gateskip.train_state as gstate
from gateskip.checkpoint import save_gates
from gateskip.commands.cli import main
from gateskip.errors import GateSkipError
from gateskip.models import tiny_model, tiny_tokenizer
from gateskip.train import fit
from gateskip.train_state import load_train_state

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _stream(seed=0):
    from gateskip.data import pack

    return pack(tiny_tokenizer(), [TEXT * 3 + f"line {i}." for i in range(60)], seq_len=32, batch_size=2, seed=seed)


def _fit(out, steps, **kw):
    m = gateskip.add_gates(tiny_model("llama"), gateskip.GateSkipConfig(init_bias=2.0))
    fit(m, _stream(), steps=steps, lr=1e-2, lam=0.5, objective="ce", warmup=1, save_every=2, out=out, **kw)
    return m


class _Evil:
    """Unpickling this creates ``marker``: proof that a loader executed code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_line_error(capsys, match):
    # Progress bars (loading weights, training) may come first; the error is the one last line.
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("gateskip: error:") == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("gateskip: error:") and match in last, err


# ---- checkpoints ---------------------------------------------------------------------------------

def test_checkpoint_holds_full_state_with_checksum(tmp_path):
    _fit(tmp_path, steps=6)
    ck = tmp_path / "checkpoint"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000004.pt", "step-00000004.pt.sha256",
                                                    "step-00000006.pt", "step-00000006.pt.sha256"]
    state, path = load_train_state(ck)
    assert path.name == "step-00000006.pt" and state["step"] == 6
    assert state["trainable"] and state["optimizer"]["state"]  # gates and AdamW moments
    assert state["data"]["position"] == 6 and state["schedule"]["steps"] == 6
    assert {"torch", "python", "numpy"} <= set(state["rng"])


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_checksum"])
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, capsys, damage):
    _fit(tmp_path, steps=4)
    latest = tmp_path / "checkpoint" / "step-00000004.pt"
    raw = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        latest.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    else:
        latest.with_name(latest.name + ".sha256").unlink()  # killed between the rename and the checksum
    capsys.readouterr()
    _fit(tmp_path, steps=6)
    err = capsys.readouterr().err
    assert "step-00000004.pt is damaged" in err and "previous good one, step-00000002.pt" in err
    steps = [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 2; rows 3-4 of the first run were dropped, not doubled


def test_all_checkpoints_damaged_is_a_clear_error(tmp_path):
    _fit(tmp_path, steps=4)
    for p in (tmp_path / "checkpoint").glob("*.pt"):
        p.write_bytes(b"garbage")
    with pytest.raises(GateSkipError, match="no usable checkpoint.*--no-resume"):
        _fit(tmp_path, steps=6)


def test_pickle_posing_as_checkpoint_never_runs(tmp_path, capsys):
    import hashlib

    _fit(tmp_path, steps=2)
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint" / "step-00000099.pt"
    torch.save({"step": 99, "trainable": _Evil(marker)}, evil)
    # Even with a matching checksum (an attacker can compute one), nothing is executed.
    evil.with_name(evil.name + ".sha256").write_text(hashlib.sha256(evil.read_bytes()).hexdigest())
    _fit(tmp_path, steps=3)
    assert not marker.exists()
    assert "step-00000099.pt is damaged (unreadable" in capsys.readouterr().err


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = gtrain._ce

    def poisoned(logits, ids, pos=None):
        calls["n"] += 1
        loss = real(logits, ids, pos)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(gtrain, "_ce", poisoned)
    with pytest.raises(GateSkipError, match=r"non-finite .* at step 5.*last good checkpoint \(step 4\)"):
        _fit(tmp_path, steps=8)
    state, path = load_train_state(tmp_path / "checkpoint")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["trainable"].values())


def test_absurd_lr_stops_cleanly(tmp_path):
    m = gateskip.add_gates(tiny_model("llama"))
    with pytest.raises(GateSkipError, match="non-finite"):
        fit(m, _stream(), steps=6, lr=1e30, backbone="full", backbone_lr=1e30, objective="ce", warmup=1,
            save_every=2, out=tmp_path)


def _full_disk_after(limit):
    def write(state, path):
        with open(path, "wb") as f:  # half a file reaches the disk, then it is full
            f.write(b"\0" * limit)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real = gstate._write_state
    saves = {"n": 0}

    def flaky(state, path):
        saves["n"] += 1
        return real(state, path) if saves["n"] == 1 else _full_disk_after(1000)(state, path)

    monkeypatch.setattr(gstate, "_write_state", flaky)
    with pytest.raises(GateSkipError, match=r"step 4 \(No space left on device\).*last good checkpoint \(step 2\)"):
        _fit(tmp_path, steps=6)
    ck = tmp_path / "checkpoint"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000002.pt", "step-00000002.pt.sha256"]  # no temp files
    assert load_train_state(ck)[0]["step"] == 2


def test_disk_full_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    d, data = tiny_folder(tmp_path)
    monkeypatch.setattr(gstate, "_write_state", _full_disk_after(10))
    capsys.readouterr()
    assert main(["train", "--model", str(d), "--data", str(data), "--steps", "2", "--seq-len", "32",
                 "--batch-size", "2", "--save-every", "1", "--out", str(tmp_path / "g")]) == 2
    _one_line_error(capsys, "No space left on device")
    assert list((tmp_path / "g" / "checkpoint").iterdir()) == []


_SLOW_TRAIN = """
import sys, time
import gateskip.train as t
real = t.lr_at
def slow(*a):
    time.sleep(0.1)  # so that the test can kill the process in the middle of the run
    return real(*a)
t.lr_at = slow
from gateskip.commands.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    d, data = tiny_folder(tmp_path)
    args = ["train", "--model", str(d), "--data", str(data), "--steps", "24", "--seq-len", "32",
            "--batch-size", "2", "--save-every", "3", "--lr", "0.02", "--lam", "0.5", "--objective", "ce",
            "--warmup", "2", "--calibrate-batches", "1", "--seed", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_TRAIN, *args, "--out", str(killed)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 7):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows = len(log.read_text().splitlines())
    assert 7 <= rows < 24, rows  # killed in the middle of the run
    assert main([*args, "--out", str(killed)]) == 0  # resume is the default
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    a, b = load_file(killed / "gates.safetensors"), load_file(tmp_path / "straight" / "gates.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == list(range(1, 25))


# ---- hostile gates folders ---------------------------------------------------------------------------

@pytest.fixture
def gates_dir(tmp_path):
    m = gateskip.add_gates(tiny_model("llama"))
    return save_gates(m, tmp_path / "gates")


def _rewrite(d: Path, change):
    tensors = load_file(d / "gates.safetensors")
    change(tensors)
    save_file(tensors, d / "gates.safetensors")


def _first(tensors, suffix="weight"):
    return next(k for k in sorted(tensors) if k.startswith("gates.") and k.endswith(suffix))


@pytest.mark.parametrize("attack, match", [
    ("truncated", "corrupt or not a safetensors"),
    ("int_dtype", "expected"),
    ("wrong_shape", "expected"),
    ("extra_key", "unexpected gate tensors"),
    ("missing_key", "lacks"),
    ("other_model", "another model"),
    ("other_gate_config", "expected"),
    ("config_not_json", "not JSON"),
    ("config_unknown_key", "unknown keys"),
])
def test_bad_gates_folders_fail_clearly(gates_dir, attack, match):
    f, meta_f = gates_dir / "gates.safetensors", gates_dir / "gateskip.json"
    meta = json.loads(meta_f.read_text())
    if attack == "truncated":
        f.write_bytes(f.read_bytes()[:300])
    elif attack == "int_dtype":
        _rewrite(gates_dir, lambda t: t.update({_first(t): t[_first(t)].to(torch.int32)}))
    elif attack == "wrong_shape":
        _rewrite(gates_dir, lambda t: t.update({_first(t): t[_first(t)][:3]}))
    elif attack == "extra_key":
        _rewrite(gates_dir, lambda t: t.update({"gates.layers.99.mlp.weight": torch.zeros(2)}))
    elif attack == "missing_key":
        _rewrite(gates_dir, lambda t: t.pop(_first(t, "bias")))
    elif attack == "other_model":
        meta["base_model"]["hidden_size"] = 2048
        meta_f.write_text(json.dumps(meta))
    elif attack == "other_gate_config":
        meta["config"]["gate"] = "scalar"  # a config that does not describe these tensors
        meta_f.write_text(json.dumps(meta))
    elif attack == "config_not_json":
        meta_f.write_bytes(b"\x80\x04not json")
    else:
        meta["config"]["exec"] = "rm -rf /"
        meta_f.write_text(json.dumps(meta))
    m = tiny_model("llama")
    with pytest.raises(GateSkipError, match=match):
        gateskip.load_gates(m, gates_dir)
    assert not gateskip.is_gated(m)  # a failed load leaves the model as it was


def test_pickle_posing_as_safetensors_never_runs(gates_dir, tmp_path):
    marker, proof = tmp_path / "pwned", tmp_path / "payload_is_live"
    pickle.loads(pickle.dumps(_Evil(proof)))  # the payload really runs when unpickled ...
    assert proof.exists()
    (gates_dir / "gates.safetensors").write_bytes(pickle.dumps(_Evil(marker)))
    torch.save({"w": _Evil(marker)}, gates_dir / "backbone.safetensors")
    with pytest.raises(GateSkipError, match="not a safetensors file"):
        gateskip.load_gates(tiny_model("llama"), gates_dir)
    assert not marker.exists()  # ... but never from a gates folder


# ---- CLI input ---------------------------------------------------------------------------------------

def test_cli_bad_input_is_one_line(tmp_path, capsys):
    d, data = tiny_folder(tmp_path)
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, bos_token_id=1, eos_token_id=2)).save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("\n\n  \n")
    binary.write_bytes(bytes(range(256)) * 8)
    train = ["train", "--model", str(d), "--data", str(data), "--seq-len", "32", "--batch-size", "2",
             "--out", str(tmp_path / "o")]
    cases = [
        (["train", "--model", "/no/such/model", "--steps", "1"], "is not an alias"),
        (["train", "--model", str(gpt2), "--data", str(data), "--steps", "1", "--out", str(tmp_path / "o2")],
         "gpt2"),
        ([*train, "--max-ratio", "1.5"], "out of range"),
        ([*train, "--max-ratio", "-0.1"], "out of range"),
        ([*train, "--steps", "0"], "steps=0"),
        ([*train, "--batch-size", "0"], "batch_size=0"),
        ([*train, "--save-every", "0"], "save_every"),
        ([*train, "--fsdp"], "--fsdp shards over several processes"),
        (["train", "--model", str(d), "--data", str(empty), "--steps", "1"], "gave no train texts"),
        (["train", "--model", str(d), "--data", str(binary), "--steps", "1"], "not UTF-8 text"),
        (["train", "--model", str(d), "--data", str(tmp_path / "missing.txt"), "--steps", "1"], "does not exist"),
        (["generate", "--model", str(d), "--max-new-tokens", "0", "hi"], "max_new_tokens=0"),
        (["generate", "--model", str(d), "--no-chat", "   "], "empty prompt"),
        (["generate", "--model", str(d), "--no-chat", "x" * 300], "exceeds"),
        (["generate", "--model", str(d), "--ratio", "2", "--policy", "random", "hi"], "out of range"),
    ]
    for argv, match in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        _one_line_error(capsys, match)


def test_cli_errors_have_no_traceback_in_a_real_process(tmp_path):
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\x00\xff" * 100)
    runs = [["train", "--steps", "0"], ["generate", "--max-new-tokens", "0", "hi"],
            ["train", "--model", "/no/such/model", "--data", str(binary)]]
    procs = [subprocess.Popen([sys.executable, "-m", "gateskip", *a], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in runs]
    for p in procs:
        _, err = p.communicate(timeout=120)
        lines = [x for x in err.splitlines() if x.strip()]
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("gateskip: error:"), err


# ---- property: random configs never crash, stay in bounds, never touch padding -----------------------

import tempfile  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "gateskip-hypothesis"))  # keep the repo clean
from hypothesis import strategies as hs  # noqa: E402

from gateskip import one_token  # noqa: E402
from gateskip.config import GATE_KINDS  # noqa: E402
from gateskip.core import gate_state  # noqa: E402
from gateskip.state import Plan  # noqa: E402


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(family=hs.sampled_from(["llama", "qwen3", "gemma2"]), gate=hs.sampled_from(GATE_KINDS),
       placement=hs.sampled_from(["after", "before"]), shared=hs.booleans(),
       gated=hs.sampled_from([("attn",), ("mlp",), ("attn", "mlp")]),
       skip_modules=hs.sampled_from([("attn",), ("mlp",), ("attn", "mlp")]),
       ratio=hs.floats(0.0, 1.0), policy=hs.sampled_from(["quantile", "random", "threshold"]),
       path=hs.sampled_from(["auto", "masked", "physical"]),
       lengths=hs.lists(hs.integers(1, 20), min_size=1, max_size=4))
def test_random_configs_stay_in_bounds_and_never_skip_padding(family, gate, placement, shared, gated, skip_modules,
                                                              ratio, policy, path, lengths):
    torch.manual_seed(0)
    cfg = gateskip.GateSkipConfig(gate=gate, placement=placement, shared=shared, modules=gated, rank=4,
                                  init_std=0.5, init_bias=0.0)  # spread-out importances, not all ~equal
    m = gateskip.add_gates(tiny_model(family), cfg)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):  # left padding, as in batched generation
        ids[i, t - n:] = torch.randint(4, 128, (n,))
        mask[i, t - n:] = 1
    if policy == "threshold":
        gateskip.calibrate(m, [torch.randint(4, 128, (2, 16))], ratio=0.3)
    seen = []
    real = Plan.decide

    def spy(self, index, imp, valid, n_valid=None):
        skip, k = real(self, index, imp, valid, n_valid)
        seen.append((mask.bool() if valid is None else valid.clone(), None if skip is None else skip.clone()))
        if valid is None:  # "every token may skip": only said when there is no padding
            assert mask.bool().all()
        if k is not None and skip is not None:
            assert int(skip.sum()) == k  # the count known on the host is the mask's
        return skip, k

    real_one = one_token.decide

    def spy_one(st, branch, g):  # one token under thresholds: decided on the host, without Plan.decide
        skip = real_one(st, branch, g)
        seen.append((st.call.valid.clone(), None if skip is None else skip.clone()))
        assert skip is None or bool(skip.all())  # one token: skipped whole or kept
        return skip

    Plan.decide, one_token.decide = spy, spy_one
    try:
        with torch.no_grad(), gateskip.skipping(m, ratio=ratio, policy=policy, modules=skip_modules, path=path):
            out = m(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=False).logits
            s = gateskip.stats(m)
            counts = gate_state(m).counts
    finally:
        Plan.decide, one_token.decide = real, real_one
    n_valid = int(mask.sum())
    assert torch.isfinite(out[mask.bool()]).all()
    assert torch.all(counts[:, 1] == n_valid)  # padding is never counted
    assert torch.all((counts[:, 0] >= 0) & (counts[:, 0] <= counts[:, 1]))
    assert 0.0 <= s["tokens_skipped"] <= 1.0
    if set(gated) & set(skip_modules) and ratio > 0:
        assert seen  # the spy did watch the decisions
    for valid, skip in seen:
        if valid.shape == mask.shape:
            assert torch.equal(valid, mask.bool())  # the padding the policy sees is the real padding
        if skip is not None:
            assert not (skip & ~valid).any()  # padding is never skipped
    for b in gate_state(m).branches:
        n_skipped = int(counts[b.index, 0])
        if b.kind not in skip_modules:
            assert n_skipped == 0
        elif policy == "quantile":
            assert n_skipped == round(ratio * n_valid) or abs(n_skipped - ratio * n_valid) <= 0.5 + 1e-6


def test_every_command_prints_its_help(capsys):
    """Help texts come from docstrings; a '%' in one ("80% of steps") used to crash argparse."""
    from gateskip.commands.cli import _commands

    for name in _commands():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert "--" in capsys.readouterr().out


def test_base_model_of_a_gates_folder(tmp_path):
    """loading.base_model_name: the flag wins, else the folder's record, else the default; no record is one line."""
    import json

    import pytest

    from gateskip import GateSkipConfig, GateSkipError, add_gates, save_gates
    from gateskip.loading import DEFAULT_MODEL, base_model_name
    from gateskip.models import tiny_model

    m = tiny_model("llama")
    add_gates(m, GateSkipConfig())
    folder = save_gates(m, tmp_path / "g")
    meta_path = folder / "gateskip.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"]["source"] = "some/model"
    meta_path.write_text(json.dumps(meta))
    assert base_model_name(None, str(folder)) == "some/model"
    assert base_model_name("other", str(folder)) == "other" and base_model_name(None, None) == DEFAULT_MODEL
    del meta["base_model"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(GateSkipError, match="does not record its base model: pass --model"):
        base_model_name(None, str(folder))


def test_a_full_backbone_is_stored_in_the_save_dtype_and_loads_back(tmp_path):
    d, data = tiny_folder(tmp_path)
    args = ["train", "--model", str(d), "--data", str(data), "--steps", "2", "--seq-len", "32", "--batch-size", "2",
            "--backbone", "full", "--calibrate-batches", "1", "--init", "none"]
    for dt in ("float32", "float16"):
        assert main([*args, "--save-dtype", dt, "--out", str(tmp_path / dt)]) == 0
    full, half = (load_file(str(tmp_path / dt / "backbone.safetensors")) for dt in ("float32", "float16"))
    assert {v.dtype for v in full.values()} == {torch.float32} and {v.dtype for v in half.values()} == {torch.float16}
    assert sorted(full) == sorted(half)
    for k, v in full.items():  # the same training, stored at half precision
        assert torch.allclose(half[k].float(), v, rtol=1e-3, atol=1e-4), k
    m = gateskip.load_gates(gateskip.models.load_model(str(d))[0], tmp_path / "float16")
    params = dict(m.named_parameters())
    assert all(torch.equal(params[k], v.float()) for k, v in half.items())
