"""``gateskip.generate``: one prompt in, one answer out, with what it cost."""

import pytest
import torch

import gateskip
from gateskip.errors import GateSkipError
from gateskip.models import tiny_model, tiny_tokenizer


def test_without_a_budget_the_answer_is_the_model_without_gates():
    tok = tiny_tokenizer()
    plain = tiny_model("llama")
    m = tiny_model("llama")
    m.load_state_dict(plain.state_dict())
    gateskip.add_gates(m, gateskip.GateSkipConfig(init_std=0.3))
    out = gateskip.generate(m, tok, "the cat sat on the", max_new_tokens=8, chat=False)
    enc = tok("the cat sat on the", return_tensors="pt")
    with torch.no_grad():
        ref = plain.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.text == tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.compute_saved == 0.0 and out.new_tokens == ref.shape[1] - enc["input_ids"].shape[1]
    assert out.tokens_per_s > 0


def test_a_budget_in_compute_saved_is_reported_with_its_statistics():
    tok = tiny_tokenizer()
    m = gateskip.add_gates(tiny_model("llama"))
    out = gateskip.generate(m, tok, "the cat sat on the mat and the dog sat on the log " * 3, saved=0.3,
                            policy="random", max_new_tokens=24, chat=False, prompt_boost=1.0)
    assert out.compute_saved == pytest.approx(0.3, abs=0.05)
    # by default the prompt saves 1.5 times the budget up front; with a prompt this long against the answer, the
    # answer cannot give all of it back, and the run saves more than asked, never less
    boosted = gateskip.generate(m, tok, "the cat sat on the mat and the dog sat on the log " * 3, saved=0.3,
                                policy="random", max_new_tokens=24, chat=False)
    assert 0.3 - 0.03 < boosted.compute_saved < 0.3 * 1.5
    assert out.stats["compute_saved"] == out.compute_saved and out.tokens_skipped > 0


def test_bad_calls_fail_in_one_line():
    tok = tiny_tokenizer()
    with pytest.raises(GateSkipError, match="has no gates"):
        gateskip.generate(tiny_model("llama"), tok, "hello")
    m = gateskip.add_gates(tiny_model("llama"))
    with pytest.raises(GateSkipError, match="empty prompt"):
        gateskip.generate(m, tok, "  ")
    with pytest.raises(GateSkipError, match="max_new_tokens"):
        gateskip.generate(m, tok, "hello", max_new_tokens=0)


def test_the_command_warns_when_a_budget_is_not_reached(tmp_path, capsys):
    """Rechecking every step costs more than skipping saves: the run misses its budget and says so."""
    from conftest import tiny_folder

    from gateskip.commands.generate import generate as generate_command

    d, _ = tiny_folder(tmp_path)
    m, tok = gateskip.load_model(str(d))
    gateskip.add_gates(m)
    gateskip.save_gates(m, tmp_path / "g")
    generate_command("the cat sat on the", model=str(d), gates=str(tmp_path / "g"), saved=0.3, policy="random",
                     max_new_tokens=6, chat=False, recheck_below=0.999)
    assert "warning: saved" in capsys.readouterr().err
