"""Execution choices (execution.py): gather, blend or not call a branch, chosen from measured costs; every choice gives
the masked path's outputs; the cost cache is keyed by model and machine, and a stale or corrupt one is measured again."""

import json

import pytest
import torch
from conftest import VOCAB, left_padded

import gateskip
from gateskip.errors import GateSkipError
from gateskip.execution import ExecutionCosts, cache_path, cost_key, execution_costs
from gateskip.models import tiny_model

DIVERSE = gateskip.GateSkipConfig(init_std=0.3, init_bias=0.0, fallback="lowrank", fallback_rank=4)


def _calibrated():
    m = gateskip.add_gates(tiny_model("llama"), DIVERSE)
    g = torch.Generator().manual_seed(1)
    gateskip.calibrate(m, [torch.randint(1, VOCAB, (4, 32), generator=g) for _ in range(3)], ratio=0.3)
    return m


def _always(gather: bool) -> ExecutionCosts:
    """A table that says gathering is always (or never) faster, at every size and share."""
    rows = [[n, s, 1.0 if gather else 0.0, 0.0 if gather else 1.0] for n in (2, 64) for s in (0.25, 0.75)]
    return ExecutionCosts(key={}, table={"attn": rows, "mlp": rows})


@pytest.mark.parametrize("lengths", [[9], [7, 10], [10, 7, 9, 12, 6, 11, 8, 10]])
def test_every_execution_gives_the_masked_outputs(lengths):
    m = _calibrated()
    ids, mask = left_padded(lengths, seed=3)
    out, paths = {}, {}
    for name, opts in {"masked": {"path": "masked"}, "gather": {"execution": _always(True)},
                       "blend": {"execution": _always(False)}, "rule": {"execution": "rule"}}.items():
        with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy="threshold", **opts):
            out[name] = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            paths[name] = gateskip.stats(m)["path_calls"]
    for name in ("gather", "blend", "rule"):
        assert torch.equal(out[name].sequences, out["masked"].sequences), name
        for a, b in zip(out[name].logits, out["masked"].logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if len(lengths) > 1:  # batched decode: the rule blends small calls; the tables decide it either way
        assert paths["gather"].get("physical", 0) > paths["rule"].get("physical", 0)
        assert paths["blend"].get("physical", 0) < paths["gather"].get("physical", 0)


def test_gather_faster_reads_the_nearest_size_and_interpolates_the_share():
    c = ExecutionCosts(key={}, table={"mlp": [[8, 0.25, 1.0, 1.2], [8, 0.75, 1.0, 0.6],  # gathering pays past 0.5
                                              [512, 0.25, 1.0, 0.9], [512, 0.75, 1.0, 0.5]]})
    assert not c.gather_faster("mlp", 2, 8) and c.gather_faster("mlp", 6, 8)
    assert not c.gather_faster("mlp", 3, 10) and c.gather_faster("mlp", 7, 10)  # 10 tokens read as 8
    assert c.gather_faster("mlp", 100, 400)  # 400 tokens read as 512
    assert c.gather_faster("attn", 1, 8) is None  # not measured: the rule decides


def test_the_cache_is_keyed_by_model_and_machine_and_never_trusted_when_stale_or_corrupt(tmp_path, monkeypatch):
    m = gateskip.add_gates(tiny_model("llama"), gateskip.GateSkipConfig(modules=("mlp",)))
    small = {"repeats": 1, "decode_sizes": (2,), "prompt_sizes": (8,), "shares": (0.5,)}
    calls = []
    import gateskip.execution as ex
    real = ex.measure
    monkeypatch.setattr(ex, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = execution_costs(m, root=tmp_path, **small)
    assert len(calls) == 1 and set(first.table) == {"mlp"} and len(first.table["mlp"]) == 2
    assert execution_costs(m, root=tmp_path, **small).table == first.table and len(calls) == 1  # cached
    path = cache_path(cost_key(m), tmp_path)
    # another machine's (or model's) table under this name: measured again, not trusted
    data = json.loads(path.read_text())
    data["key"]["machine"]["threads"] = 999
    path.write_text(json.dumps(data))
    execution_costs(m, root=tmp_path, **small)
    assert len(calls) == 2 and json.loads(path.read_text())["key"] == cost_key(m)
    for corrupt in ("{not json", json.dumps({"format": 1, "key": cost_key(m), "table": {"mlp": [[1, "x"]]}})):
        path.write_text(corrupt)
        execution_costs(m, root=tmp_path, **small)
    assert len(calls) == 4
    # the key follows the model and the machine
    other = gateskip.add_gates(tiny_model("qwen2"), gateskip.GateSkipConfig(modules=("mlp",)))
    assert cache_path(cost_key(other), tmp_path) != path
    torch.set_num_threads(torch.get_num_threads() + 1)
    assert cache_path(cost_key(m), tmp_path) != path


def test_a_bad_execution_is_a_clear_error():
    m = gateskip.add_gates(tiny_model("llama"))
    with pytest.raises(GateSkipError, match="execution='fast' is invalid"), gateskip.skipping(m, ratio=0.3,
                                                                                             execution="fast"):
        pass


def test_cached_uses_a_valid_table_and_otherwise_the_rule_without_measuring(tmp_path, monkeypatch, capsys):
    import gateskip.execution as ex

    monkeypatch.setenv("GATESKIP_EXECUTION_CACHE", str(tmp_path))
    monkeypatch.setattr(ex, "measure", lambda *a, **k: pytest.fail("cached mode measured"))
    m = _calibrated()
    ids, mask = left_padded([7, 10], seed=3)

    def physical_calls():
        with torch.no_grad(), gateskip.skipping(m, ratio=0.4, policy="threshold"):  # execution="cached"
            m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
            return gateskip.stats(m)["path_calls"].get("physical", 0)

    rule = physical_calls()  # nothing cached: the rule
    path = cache_path(cost_key(m))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**_always(True).to_json(), "key": cost_key(m)}))
    assert physical_calls() > rule  # the cached table says gather everywhere
    path.write_text("{corrupt")
    assert physical_calls() == rule and "unreadable: using the built-in rule" in capsys.readouterr().err
