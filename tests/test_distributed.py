"""Data-parallel training: 2 gloo ranks x batch b == 1 process x batch 2b (same seed, same data)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import tiny_folder
from safetensors.torch import load_file

from gateskip.commands.train import train
from gateskip.distributed import SINGLE, Dist, mean_over_ranks, shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_takes_disjoint_equal_slices():
    batch = torch.arange(12).view(6, 2)
    parts = [shard(batch, Dist(rank=r, world=3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch)  # disjoint and together the whole batch
    assert shard(batch, SINGLE) is batch
    assert mean_over_ranks({"a": 1.0}, SINGLE) == {"a": 1.0}


# Skipping is off (max_ratio 0): a quantile over b rows differs from one over 2b rows, so with
# skipping on, ranks skip (slightly) different tokens than one big batch would; see docs/distributed.md.
# New vector gates on a frozen backbone (--init none: --fsdp starts from new gates), as the paper's.
ARGS = ["--steps", "5", "--seq-len", "32", "--lr", "0.05", "--lam", "0.5", "--objective", "ce",
        "--max-ratio", "0.0", "--warmup", "1", "--calibrate-batches", "1", "--save-every", "2", "--seed", "3",
        "--init", "none", "--gate", "vector", "--fallback", "zero", "--backbone", "frozen", "--protect-first", "0"]


def test_two_ranks_match_one_process_with_double_batch(tmp_path):
    d, data = tiny_folder(tmp_path)
    common = ["--model", str(d), "--data", str(data), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    def launch(name, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "gateskip", "train", *common, "--batch-size", "2", "--out", str(tmp_path / name), *extra]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = {"ddp": launch("ddp"), "fsdp": launch("fsdp", "--fsdp")}
    # The single-process run goes on meanwhile.
    train(model=str(d), data=str(data), out=str(tmp_path / "one"), batch_size=4,
          **{a[2:].replace("-", "_"): type_(v) for a, v, type_ in zip(ARGS[::2], ARGS[1::2], _types(ARGS))})
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"2-rank {name} run did not finish in time")
        assert proc.returncode == 0, err[-3000:]

    one = load_file(tmp_path / "one" / "gates.safetensors")
    keys = [k for k in one if k.startswith("gates.")]
    assert any((one[k] - tiny_gates_at_init(k, one[k])).abs().max() > 1e-3 for k in keys)  # they did train
    for name in procs:
        other = load_file(tmp_path / name / "gates.safetensors")
        assert keys and set(keys) == {k for k in other if k.startswith("gates.")}
        diff = max((one[k] - other[k]).abs().max().item() for k in keys)
        # Summation order differs (two half-batch means averaged vs one mean), and Adam divides by
        # sqrt(v), which magnifies float noise in near-zero gradients: 1e-4 against moves of ~0.1.
        assert diff < 1e-4, (name, diff)

    log1 = [json.loads(x) for x in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    log2 = [json.loads(x) for x in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log2] == [1, 2, 3, 4, 5]  # rank 0 alone writes the log
    for a, b in zip(log1, log2):  # logged values are means over ranks == the big batch's means
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["gate_mean"] == pytest.approx(b["gate_mean"], abs=1e-4)
    meta = json.loads((tmp_path / "ddp" / "gateskip.json").read_text())
    assert meta["training"]["world_size"] == 2
    ckpts = sorted(p.name for p in (tmp_path / "ddp" / "checkpoint").iterdir())
    assert ckpts == ["step-00000004.pt", "step-00000004.pt.sha256", "step-00000005.pt", "step-00000005.pt.sha256"]

    # FSDP checkpoints hold full (gathered) tensors and resume into shards: 2 more steps.
    proc = launch("fsdp", "--fsdp", "--steps", "7")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "5/7" in err  # the progress bar started at the checkpoint's step: it resumed
    log3 = [json.loads(x) for x in (tmp_path / "fsdp" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log3] == list(range(1, 8))
    assert log3[5]["loss"] < log3[0]["loss"]


def tiny_gates_at_init(key, t):
    # Gates start with bias 5 and weights ~N(0, 0.01): a trained bias has moved away from 5.
    return torch.full_like(t, 5.0) if key.endswith("bias") else torch.zeros_like(t)


def _types(args):
    ints = {"--steps", "--seq-len", "--warmup", "--calibrate-batches", "--save-every", "--seed", "--protect-first"}
    floats = {"--lr", "--lam", "--max-ratio"}
    return [int if a in ints else float if a in floats else str for a in args[::2]]
