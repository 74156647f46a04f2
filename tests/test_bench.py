"""Smoke test of gateskip bench on a tiny model (no timing assertions)."""

import json

import pytest

from gateskip import GateSkipError
from gateskip.bench import bench


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "b.json"
    report = bench(model="tiny-llama", random_gates=True, gate="vector,scalar", ratios="0,0.5", prefill_batch=2,
                   prefill_len=16, decode_batches="1,2", prompt_len=4, new_tokens=3, repeats=1, warmup=0,
                   threads=1, json=str(out))
    assert json.loads(out.read_text())["results"] == report["results"]
    names = [r["setting"] for r in report["results"]]
    assert names == ["dense", "vector@0", "vector@0.5", "scalar@0", "scalar@0.5"]
    for r in report["results"]:
        for phase in ("prefill", "decode_b1", "decode_b2"):
            assert r[phase]["tokens_per_s"] > 0
    assert report["results"][2]["prefill"]["tokens_skipped"] > 0.2
    assert report["results"][1]["prefill"]["compute_saved"] < 0  # vector gates cost FLOPs
    assert "decode_b1" in capsys.readouterr().out


def test_bench_needs_gates():
    with pytest.raises(GateSkipError, match="random-gates"):
        bench(model="tiny-llama")
