"""``make demo``'s workflow on a tiny model: the recipes run end to end and write what they announce."""

import pytest
from conftest import tiny_folder

import gateskip
from gateskip import GateSkipError
from gateskip.commands.demo import demo
from gateskip.core import gate_state
from gateskip.models import load_model


@pytest.mark.parametrize("recipe", ["fit", "best"])
def test_recipe_writes_a_folder_with_fallbacks_and_the_matched_compute_table(tmp_path, capsys, recipe):
    d, _ = tiny_folder(tmp_path)
    out = tmp_path / "demo"
    demo(out=str(out), model=str(d), recipe=recipe, fallback_batches=2, heal_steps=2, compare="0.3,0.6", baselines="1",
         prompts=1, max_new_tokens=4, threads=1)
    net, _ = load_model(str(d))
    gateskip.load_gates(net, out / "gates")
    st = gate_state(net)
    assert st.cfg.fallback == "lowrank"
    # both start from the recommended gates (config.RECOMMENDED): MLP branches only, each with a neurons fallback
    assert st.cfg.modules == ("mlp",) and st.cfg.fallback_of("mlp") == "neurons"
    assert not st.loaded.backup  # the backbone is untouched (best heals gates and fallbacks on a frozen backbone)
    md = (out / "compare" / "compare.md").read_text()
    assert "| both | 0.6 |" in md and "shortgpt+linear" in md
    # (on this tiny model a neurons fallback costs about what a skipped MLP token saves: no level of 10-40% is
    # reached, and the matched table is left out)
    assert "At matched compute" not in md
    printed = capsys.readouterr().out
    assert "--- dense (the original model)" in printed
    assert "--- policy=threshold saved=0.15 " in printed  # the examples run at a budget in compute saved


def test_unknown_recipe_is_refused_before_any_work(tmp_path):
    with pytest.raises(GateSkipError, match="unknown recipe 'nope'"):
        demo(out=str(tmp_path), recipe="nope")
