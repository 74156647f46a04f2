"""gateskip inspect --fallback: fallback R² and gate-vs-skip-cost ranking (residuals.py), checked against
hand-built values, a recompute from the branches' own outputs, and the CLI's three files."""

import json
import math

import pytest
import torch
from conftest import VOCAB, left_padded, tiny_folder

import gateskip
from gateskip import GateSkipConfig
from gateskip.analysis.residuals import (
    average_ranks,
    fallback_stats,
    markdown_table,
    overlap,
    r2,
    save_plot,
    spearman,
)
from gateskip.commands.cli import main
from gateskip.commands.inspect import inspect
from gateskip.core import gate_state
from gateskip.gates import importance
from gateskip.models import tiny_model

NAMES = [f"layers.{i}.{k}" for i in range(3) for k in ("attn", "mlp")]


def _data(n, b=4, t=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (b, t), generator=g) for _ in range(n)]


def _gated(fallback, family="llama", fit=True, **cfg):
    torch.manual_seed(0)  # the same gates whatever the fallback
    m = gateskip.add_gates(tiny_model(family), GateSkipConfig(init_std=0.3, init_bias=0.0, fallback=fallback, **cfg))
    if fit and fallback != "zero":
        gateskip.fit_fallback(m, _data(8, seed=2))
    return m


# ---- pure helpers on hand-built tensors -----------------------------------------------------------

def test_r2_by_hand():
    y = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    assert r2(y, torch.tensor([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0]])) == pytest.approx(0.5)  # SSE 1, SST 2
    assert r2(y, y) == pytest.approx(1.0)
    assert r2(y, torch.zeros_like(y)) == pytest.approx(1 - 14 / 2)  # zero fallback: SSE = sum y², below 0
    assert r2(y, y.mean(0).expand_as(y)) == pytest.approx(0.0)  # the mean: exactly 0
    assert math.isnan(r2(torch.ones(3, 2), torch.zeros(3, 2)))  # constant y: no variance to explain


def test_ranks_and_spearman_by_hand():
    assert average_ranks(torch.tensor([3.0, 1.0, 2.0, 1.0])).tolist() == [3.0, 0.5, 2.0, 0.5]
    a = torch.tensor([1.0, 2.0, 2.0, 3.0])
    b = torch.tensor([1.0, 3.0, 2.0, 4.0])
    # ranks [0, 1.5, 1.5, 3] and [0, 2, 1, 3]: centered dot 4.5, norms sqrt(4.5) and sqrt(5)
    assert spearman(a, b) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert spearman(x, x.exp()) == pytest.approx(1.0)  # any increasing map
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.ones(5), x[:5]))  # constant gates: undefined, not 0
    scipy_stats = pytest.importorskip("scipy.stats")
    y = torch.randn(50, generator=torch.Generator().manual_seed(1)).round(decimals=1)  # with ties
    assert spearman(x, y) == pytest.approx(float(scipy_stats.spearmanr(x.numpy(), y.numpy())[0]), abs=1e-12)


def test_overlap_by_hand():
    gate = torch.arange(10.0)
    cost = torch.tensor([0.0, 1, 9, 8, 7, 6, 5, 4, 3, 2])
    assert overlap(gate, cost, 0.3) == pytest.approx(2 / 3)  # lowest 3: {0, 1, 2} vs {0, 1, 9}
    assert overlap(cost, cost, 0.3) == 1.0  # a gate ranking tokens like the oracle
    assert overlap(-cost, cost, 0.3) == 0.0
    assert overlap(gate, cost, 0.5) == pytest.approx(2 / 5)  # {0..4} vs {0, 1, 9, 8, 7}


# ---- the figures against a recompute from the branches' outputs -----------------------------------

def _manual(m, ids, mask, first):
    """Per branch: (y, fb(x), importance, skip cost, ||g * y||) of the kept tokens, read from each GatedBranch's own input
    and its dense output g * y (not from the hooks residuals.py uses)."""
    st = gate_state(m)
    got, handles = {}, []
    for b in st.branches:
        def pre(_mod, args, kwargs, b=b):
            got[b.name] = [args[0] if args else kwargs["hidden_states"]]

        def post(_mod, _args, out, b=b):
            got[b.name].append(out[0] if isinstance(out, tuple) else out)
        handles += [b.register_forward_pre_hook(pre, with_kwargs=True), b.register_forward_hook(post)]
    try:
        with torch.no_grad(), gateskip.skipping(m, ratio=0.0):
            m(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    keep = mask.bool() & (mask.cumsum(-1) > first)
    res = {}
    with torch.no_grad():
        for b in st.branches:
            x, gy = got[b.name]
            g = b.gate(x).double()
            fb = torch.zeros_like(x) if b.fallback is None else b.fallback(x)
            y = gy.double() / g  # placement "after": the branch adds g * y
            cost = (gy.double() - g * fb.double()).norm(dim=-1)
            res[b.name] = (y[keep], fb.double()[keep], importance(g)[keep], cost[keep], gy.double().norm(dim=-1)[keep])
    return res, int(keep.sum())


def test_figures_match_a_recompute_and_beat_the_zero_fallback():
    ids, mask = left_padded([40, 64, 64, 52], seed=3)  # held out: neither the fit's data nor its seed
    lin = _gated("linear", protect_first=1)
    s = fallback_stats(lin, [{"input_ids": ids, "attention_mask": mask}], ratio=0.3, progress=False)
    assert [b["name"] for b in s["branches"]] == NAMES
    assert s["fallback"] == "linear" and s["protect_first"] == 1 and s["rows"] == 4
    ref, n = _manual(lin, ids, mask, first=1)
    assert s["tokens"] == n == 40 + 64 + 64 + 52 - 4  # padding and each row's first token left out
    for b in s["branches"]:
        y, fb, imp, cost, full = ref[b["name"]]
        want_r2 = 1 - float(((y - fb) ** 2).sum()) / float(((y - y.mean(0)) ** 2).sum())
        assert b["r2"] == pytest.approx(want_r2, rel=1e-4, abs=1e-5)
        assert b["tokens"] == n and 0 < b["cost"] < 1
        assert b["cost"] == pytest.approx(float(cost.mean() / full.mean()), rel=1e-5)
        assert b["spearman"] == pytest.approx(spearman(imp, cost), abs=1e-6)
        k = round(0.3 * n)
        assert abs(b["overlap"] - overlap(imp, cost, 0.3)) <= 1 / k + 1e-9  # at most one near-tie swapped
    zero = _gated("zero", protect_first=1)
    z = fallback_stats(zero, [{"input_ids": ids, "attention_mask": mask}], ratio=0.3, progress=False)
    assert z["fallback"] == "zero"
    for bl, bz in zip(s["branches"], z["branches"]):
        assert bz["cost"] == pytest.approx(1.0)  # skipping costs the whole update
        assert bz["r2"] <= 1e-9 < bl["r2"] - bz["r2"]  # the fitted linear map explains what 0 cannot
        assert bl["cost"] < bz["cost"]
        # same gates, same inputs: under the zero fallback the skip cost is ||g * y||
        _, _, imp, _, full = ref[bl["name"]]
        assert bz["spearman"] == pytest.approx(spearman(imp, full), abs=1e-6)
    assert set(s["by_kind"]) == {"attn", "mlp"}
    for kind in ("attn", "mlp"):
        rows = [b for b in s["branches"] if b["kind"] == kind]
        assert s["by_kind"][kind]["branches"] == 3
        assert s["by_kind"][kind]["r2"] == pytest.approx(sum(b["r2"] for b in rows) / 3)
        assert s["by_kind"][kind]["overlap"] == pytest.approx(sum(b["overlap"] for b in rows) / 3)
    # nothing left attached or switched on
    st = gate_state(lin)
    assert all(not b._forward_pre_hooks and not b.module._forward_hooks and not b.module._forward_pre_hooks
               for b in st.branches) and st.plan is None


def test_dense_even_inside_a_skipping_context():
    m = _gated("linear")
    rows = _data(1, b=2, t=32, seed=5)
    base = fallback_stats(m, rows, progress=False)
    with gateskip.skipping(m, ratio=0.5, path="masked"):
        again = fallback_stats(m, rows, progress=False)
    assert again["branches"] == base["branches"]


@pytest.mark.parametrize("family,placement", [("gemma2", "after"), ("llama", "before")])
def test_post_norm_and_gate_before(family, placement):
    """Gemma: y after the post-norm; a gate placed before the branch: the cost is ||y - y^|| (no g outside)."""
    rows = _data(1, b=2, t=32, seed=6)
    zero = fallback_stats(_gated("zero", family, placement=placement), rows, progress=False)
    lin = fallback_stats(_gated("linear", family, placement=placement), rows, progress=False)
    assert zero["placement"] == placement
    for bz, bl in zip(zero["branches"], lin["branches"]):
        assert bz["cost"] == pytest.approx(1.0) and bz["r2"] <= 1e-9
        assert bl["r2"] > bz["r2"] and all(math.isfinite(bl[k]) for k in ("r2", "cost", "spearman", "overlap"))
    md = markdown_table(zero)
    assert ("‖g·y‖" in md) == (placement == "after")


def test_markdown_json_and_plot(tmp_path):
    s = fallback_stats(_gated("zero"), _data(1, b=2, t=32, seed=7), ratio=0.25, progress=False)
    md = markdown_table(s)
    assert "zero fallback" in md and "How to read" in md and "overlap@0.25" in md
    assert md.count("| layers.") == 6 and "| attn | 3 |" in md and "| mlp | 3 |" in md
    json.loads(json.dumps(s, allow_nan=False))  # strict JSON: no NaN
    assert save_plot(s, tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the CLI -------------------------------------------------------------------------------------

def test_inspect_fallback_writes_three_files(tmp_path, capsys):
    from gateskip.data import fixed_batches, load_texts

    d, data = tiny_folder(tmp_path)
    m, tok = gateskip.load_model(str(d))
    torch.manual_seed(0)
    gateskip.add_gates(m, GateSkipConfig(init_std=0.3, init_bias=0.0, fallback="linear"))
    gateskip.fit_fallback(m, fixed_batches(tok, load_texts(str(data)), seq_len=32, batch_size=8, n_batches=4))
    gateskip.save_gates(m, tmp_path / "g")
    out = tmp_path / "out"
    s = inspect(fallback=True, gates=str(tmp_path / "g"), data=str(data), max_tokens=128, seq_len=32, out=str(out))
    files = {p.name for p in out.iterdir()}
    assert files == {"fallback.md", "fallback.json", "fallback.png"}
    rec = json.loads((out / "fallback.json").read_text())
    assert rec == json.loads(json.dumps(s)) and rec["fallback"] == "linear" and rec["rows"] == 4
    assert [b["name"] for b in rec["branches"]] == NAMES and rec["tokens"] == 4 * 32
    assert all(b["r2"] > 0 for b in rec["branches"] if b["kind"] == "mlp")
    md = (out / "fallback.md").read_text()
    assert md.startswith("Fallback: linear fallback.") and "| layers.2.mlp |" in md
    printed = capsys.readouterr()
    assert md.strip() in printed.out and str(out / "fallback.png") in printed.err
    assert (out / "fallback.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the flag comes from the signature
    assert main(["inspect", "--fallback", "--gates", str(tmp_path / "g"), "--data", str(data), "--max-tokens", "64",
                 "--seq-len", "32", "--ratio", "0.5", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "fallback.json").read_text())["ratio"] == 0.5


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "--fallback", "--stats", "--gates", "{tmp}"], "drop one of them"),
    (["inspect", "--fallback", "--text", "hello", "--gates", "{tmp}"], "--fallback reads a corpus sample"),
    (["inspect", "--fallback", "--file", "{tmp}/p.txt", "--gates", "{tmp}"], "not --text/--file"),
    (["inspect", "--fallback", "--ratio", "0", "--gates", "{tmp}"], "strictly between 0 and 1"),
    (["inspect", "--fallback"], "needs trained gates"),
])
def test_cli_one_line_errors(argv, needle, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("gateskip: error:")
