"""Smoke test of gateskip bench on a tiny model (no timing assertions)."""

import json

import pytest

from gateskip import GateSkipError
from gateskip.commands.bench import bench


def test_bench_smoke(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    report = bench(model="tiny-llama", random_gates=True, gate="vector,scalar", ratios="0,0.5", prefill_batch=2,
                   prefill_len=16, decode_batches="1,2", prompt_len=4, new_tokens=3, repeats=1, warmup=0,
                   threads=1, json=str(out), plot=str(png))
    assert json.loads(out.read_text())["results"] == report["results"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [r["setting"] for r in report["results"]]
    assert names == ["dense", "vector@0", "vector@0.5", "scalar@0", "scalar@0.5"]
    for r in report["results"]:
        for phase in ("prefill", "decode_b1", "decode_b2"):
            assert r[phase]["tokens_per_s"] > 0
            by_round = r[phase]["speedup_by_round"]
            assert len(by_round) == 1 and by_round[0] == pytest.approx(r[phase]["speedup"])  # one round: the same
    assert report["results"][2]["prefill"]["tokens_skipped"] > 0.2
    assert report["results"][1]["prefill"]["compute_saved"] < 0  # vector gates cost FLOPs
    assert "decode_b1" in capsys.readouterr().out


def test_bench_needs_gates():
    with pytest.raises(GateSkipError, match="random-gates"):
        bench(model="tiny-llama")
    with pytest.raises(GateSkipError, match="decode-timing='steps' is not supported"):
        bench(model="tiny-llama", random_gates=True, decode_timing="steps")


def test_decode_phase_figures_exclude_the_prefill():
    """bench reports decode figures as (stats after decode) - (stats after prefill); the tokens-skipped
    figure must equal what a decode-only count gives (the same steps counted from a reset)."""
    import torch
    from conftest import VOCAB

    import gateskip
    from gateskip.commands.bench_timing import saved
    from gateskip.compat import model_cache_arg, output_cache
    from gateskip.core import gate_state
    from gateskip.models import tiny_model

    m = gateskip.add_gates(tiny_model("llama"), gateskip.GateSkipConfig(init_std=1.0))
    g = torch.Generator().manual_seed(0)
    gateskip.calibrate(m, [torch.randint(1, VOCAB, (2, 16), generator=g) for _ in range(2)], ratio=0.5)
    ids = torch.randint(1, VOCAB, (1, 12), generator=g)
    arg = model_cache_arg(m)

    def run(reset_after_prefill):
        with torch.no_grad(), gateskip.skipping(m, ratio=0.5, policy="threshold"):
            out = m(input_ids=ids, use_cache=True)
            first = gateskip.stats(m)
            if reset_after_prefill:
                gate_state(m).reset_stats()
            nxt, cache = out.logits[:, -1:].argmax(-1), output_cache(out)
            for _ in range(6):
                out = m(input_ids=nxt, use_cache=True, **{arg: cache})
                nxt, cache = out.logits[:, -1:].argmax(-1), output_cache(out)
            return first, gateskip.stats(m)

    first, total = run(False)
    _, decode_only = run(True)
    saved, skipped = saved(total, first)
    assert first["tokens_skipped"] != pytest.approx(decode_only["tokens_skipped"])  # the prefill differs
    assert skipped == pytest.approx(decode_only["tokens_skipped"], abs=1e-9)
    assert saved == pytest.approx(decode_only["compute_saved"], abs=1e-9)


def test_bench_calibrates_thresholds_at_each_measured_ratio():
    """A threshold calibration holds near the ratio it was made at (it records importances while
    skipping at that ratio), so bench calibrates at every ratio it measures and installs the match."""
    import torch
    from conftest import VOCAB

    import gateskip
    from gateskip.commands.bench_timing import install, variants
    from gateskip.core import gate_state, is_gated
    from gateskip.models import tiny_model

    m = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    rand_ids = lambda b, t: torch.randint(1, VOCAB, (b, t), generator=g)  # noqa: E731
    variant = variants(m, None, ["lowrank"], 4, 0, rand_ids, 32, "threshold", [0.0, 0.25, 0.5])["lowrank"]
    assert not is_gated(m) and sorted(variant["calibration"]) == [0.25, 0.5]
    held_out = rand_ids(8, 32)
    for ratio in (0.25, 0.5):
        install(m, variant, ratio)
        assert gate_state(m).loaded.calibration["ratio"] == ratio
        with torch.no_grad(), gateskip.skipping(m, ratio=ratio, policy="threshold"):
            m(input_ids=held_out)
            assert gateskip.stats(m)["tokens_skipped"] == pytest.approx(ratio, abs=0.06)
    install(m, variant, 0.0)  # ratio 0: any calibration will do, the gates stay installed
    assert is_gated(m)


def test_interleaved_decode_does_what_generate_does():
    """The step-interleaved decode timing runs each setting's greedy decoding by hand: per setting it must
    produce the decisions ``generate`` produces (same tokens skipped, same FLOPs saved), on gated copies
    that share the dense model's weights without changing them."""
    import time

    import torch
    from conftest import VOCAB

    from gateskip.commands.bench_timing import decode_generate, decode_interleaved, live_models, variants
    from gateskip.core import is_gated
    from gateskip.models import tiny_model

    m = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    rand_ids = lambda b, t: torch.randint(1, VOCAB, (b, t), generator=g)  # noqa: E731
    variants = variants(m, None, ["scalar"], 4, 0, rand_ids, 32, "threshold", [0.5])
    settings = [("dense", None, 0.0), ("scalar@0", "scalar", 0.0), ("scalar@0.5", "scalar", 0.5)]
    ids = rand_ids(2, 6)
    with torch.no_grad():
        dense_before = m(input_ids=ids).logits
    live = live_models(m, variants, settings)
    assert live["dense"] is m and not is_gated(m) and is_gated(live["scalar@0.5"])
    assert live["scalar@0.5"].model.embed_tokens.weight is m.model.embed_tokens.weight  # shared, not copied
    ctxs = {n: {} if k is None else dict(ratio=r, policy="threshold", kv="copy") for n, k, r in settings}
    for b in (1, 2):
        got = decode_interleaved(live, ctxs, ids[:b], 7, time.perf_counter)
        assert set(got) == set(live)
        for name in live:
            want = decode_generate(live[name], ctxs[name], ids[:b], 7, 0, time.perf_counter)[1]
            assert got[name][1] == pytest.approx(want, abs=1e-12), (b, name)
        assert got["scalar@0.5"][1][1] > 0.2  # it did skip
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, dense_before)


def test_bench_with_a_fallback_charges_it():
    """A lowrank fallback runs on the skipped tokens: the same skipping saves less compute than with zero."""
    kw = dict(model="tiny-llama", random_gates=True, gate="scalar", ratios="0.5", prefill_batch=2, prefill_len=16,
              decode_batches="1", prompt_len=4, new_tokens=3, repeats=1, warmup=0, threads=1)
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    zero = bench(**kw)["results"][1]["prefill"]
    assert hf_logging.get_verbosity() == before  # bench quiets transformers while it runs, not afterwards
    low = bench(**kw, fallback="lowrank", fallback_rank=8)["results"][1]["prefill"]
    assert low["tokens_skipped"] == pytest.approx(zero["tokens_skipped"])
    assert low["compute_saved"] < zero["compute_saved"]
    both = {r["setting"]: r["prefill"] for r in bench(**kw, fallback="zero,lowrank", fallback_rank=8)["results"]}
    assert set(both) == {"dense", "scalar+zero@0.5", "scalar+lowrank@0.5"}  # one run, one dense timing
    # each variant calibrates its thresholds on its own random tokens: the same skipping, not the same bits
    assert both["scalar+zero@0.5"]["tokens_skipped"] == pytest.approx(zero["tokens_skipped"], abs=0.03)
    assert both["scalar+lowrank@0.5"]["tokens_skipped"] == pytest.approx(low["tokens_skipped"], abs=0.03)
    assert both["scalar+lowrank@0.5"]["compute_saved"] < both["scalar+zero@0.5"]["compute_saved"]
    with pytest.raises(GateSkipError, match="fallback='half' is not supported"):
        bench(**kw, fallback="half")
    with pytest.raises(GateSkipError, match="brings its own fallback"):
        bench(model="tiny-llama", gates="x", fallback="mean")


def test_bench_measures_compute_saved_budgets():
    report = bench(model="tiny-llama", random_gates=True, gate="vector", ratios="0", saved="0.3", prefill_batch=2,
                   prefill_len=64, decode_batches="2", prompt_len=8, new_tokens=24, repeats=2, warmup=1, threads=1)
    row = {r["setting"]: r for r in report["results"]}["vector@saved0.3"]
    # the offset learned in the warm-up round carries over to the timed ones; the decode phase's steps also pay back
    # what its prompt (not counted in the phase) saved too little or too much: the budget is over the whole run
    assert row["prefill"]["compute_saved"] == pytest.approx(0.3, abs=0.03)
    assert row["decode_b2"]["compute_saved"] == pytest.approx(0.3, abs=0.06)


def test_bench_times_each_execution_in_one_run_and_measures_once(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    report = bench(model="tiny-llama", random_gates=True, gate="vector", ratios="0.5", prefill_batch=1,
                   prefill_len=16, decode_batches="2", prompt_len=4, new_tokens=3, repeats=1, warmup=0, threads=1,
                   execution="rule,measured")
    names = [r["setting"] for r in report["results"]]
    assert names == ["dense", "vector@0.5", "vector@0.5+measured"]
    assert report["results"][1]["prefill"]["tokens_skipped"] == report["results"][2]["prefill"]["tokens_skipped"]
    assert len(list(Path(os.environ["GATESKIP_EXECUTION_CACHE"]).glob("*.json"))) >= 1  # the table, cached
    with pytest.raises(GateSkipError, match="execution='fastest' is invalid"):
        bench(model="tiny-llama", random_gates=True, execution="fastest")
