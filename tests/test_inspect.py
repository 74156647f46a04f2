"""gateskip inspect: importances, reports (JSON / PNG / HTML in a headless browser), categories, CLI errors."""

import json
import re
import shutil
import subprocess

import pytest
import torch

import gateskip
from gateskip.analysis import categories as cat
from gateskip.analysis.html import RATIO_STEPS, thresholds_by_kind
from gateskip.analysis.importance import visible
from gateskip.analysis.report import report_text
from gateskip.analysis.stats import category_stats, markdown_tables, save_lines
from gateskip.commands.cli import main
from gateskip.core import gate_state
from gateskip.models import tiny_model, tiny_tokenizer
from gateskip.policies import threshold_from_grid

TEXT = "Hello, world. The 42 cats sat!"


@pytest.fixture(scope="module")
def gated():
    torch.set_num_threads(1)
    model = tiny_model("llama")
    gateskip.add_gates(model)
    return model, tiny_tokenizer()


def test_importances_shape_range_and_dense(gated):
    model, tok = gated
    imp, tokens, names = gateskip.importances(model, tok, TEXT)
    assert imp.shape == (len(tokens), len(names)) == (len(TEXT) + 1, 6)  # characters + BOS
    assert tokens[0] == "<bos>" and "".join(tokens[1:]) == TEXT
    assert names == [f"layers.{i}.{k}" for i in range(3) for k in ("attn", "mlp")]
    assert ((imp > 0) & (imp < 1)).all()
    st = gate_state(model)
    assert st.taps.log is None and not st.taps.observers  # nothing left switched on or held
    with gateskip.skipping(model, ratio=0.5, policy="quantile"):  # importances are read densely anyway
        again, _, _ = gateskip.importances(model, tok, TEXT)
    torch.testing.assert_close(again, imp)


def test_report_json_png_html(gated, tmp_path):
    model, tok = gated
    paths = report_text(model, tok, TEXT, tmp_path, ratio=0.3)
    rec = json.loads(paths["json"].read_text())
    imp = torch.tensor(rec["importance"])
    assert imp.shape == (len(rec["tokens"]), len(rec["modules"]))
    assert ((imp > 0) & (imp < 1)).all()
    assert rec["modules"][0] == "layers.0.attn" and len(rec["labels"]) == len(rec["tokens"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    # self-contained: no external resource of any kind
    assert not re.search(r"https?://|\bsrc=|<link|@import|url\(", page)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no headless browser: `chromium` / `chromium-browser` is not on PATH (apt-get install chromium)")
def test_html_renders_one_element_per_token(gated, tmp_path):
    model, tok = gated
    paths = report_text(model, tok, TEXT, tmp_path, ratio=0.3)
    n_tokens = len(json.loads(paths["json"].read_text())["tokens"])
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          paths["html"].resolve().as_uri()], capture_output=True, text=True, timeout=60).stdout
    assert len(re.findall(r'<span class="tok[ "]', dom)) == n_tokens  # rendered by the page's script
    # quantile mask as in policies.quantile_skip: round(0.3 * n) tokens per branch
    pct = float(re.search(r"Skipped: ([\d.]+)%", dom).group(1))
    assert pct == pytest.approx(100 * round(0.3 * n_tokens) / n_tokens, abs=0.06)


def test_calibrated_thresholds_on_the_page(gated):
    model, tok = gated
    grid = torch.sort(torch.rand(6, 1001), dim=1).values
    names = [b.name for b in gate_state(model).branches]
    th = thresholds_by_kind(grid, names)
    assert len(th["attn"]) == len(th["mlp"]) == 3 and len(th["mlp"][0]) == RATIO_STEPS + 1
    assert th["mlp"][2][30] == pytest.approx(float(threshold_from_grid(grid[5], 0.30)))
    assert th["attn"][0][0] is None and th["attn"][0][RATIO_STEPS] is None


@pytest.mark.parametrize("text,first,special,want", [
    ("<bos>", True, True, cat.BOS),
    ("<|im_end|>", False, True, cat.SPECIAL),
    (",", False, False, cat.PUNCT),
    (" ...", False, False, cat.PUNCT),
    ("\n", False, False, cat.WHITESPACE),
    ("  ", False, False, cat.WHITESPACE),
    (" 42", False, False, cat.NUMBER),
    ("1,000", False, False, cat.NUMBER),
    (" The", False, False, cat.STOP),
    ("and", False, False, cat.STOP),
    (" cats", False, False, cat.CONTENT),
    ("ugging", False, False, cat.CONTENT),
    ("3rd", False, False, cat.CONTENT),
    ("\ufffd", False, False, cat.OTHER),
])
def test_categories(text, first, special, want):
    assert cat.categorize(text, first=first, special=special) == want


def test_whitespace_led_and_visible_labels():
    led = cat.whitespace_led
    assert led(" cat") and led("\n") and not led("cat") and not led("")
    assert visible(" a\n\tb") == "\u2423a\u21b5\u21e5b"


def test_category_stats_tables_and_plot(gated, tmp_path):
    model, tok = gated
    rows = [torch.tensor([1] + tok(t)["input_ids"]) for t in (TEXT, "The cat, 7 dogs.")]
    s = category_stats(model, tok, rows, progress=False)
    primary = sum(n for g, n in s["count"].items() if g != "whitespace-led")
    assert primary == s["tokens"] == sum(len(r) for r in rows)
    assert s["count"]["BOS"] == 2 and len(s["mean"]["punctuation"]) == 6
    assert all(0 <= v <= 1 for v in s["rank"]["content word"])
    md = markdown_tables(s)
    assert "### attn: mean importance" in md and "| 2 |" in md
    assert save_lines(s, tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "--text", "   "], "empty text"),
    (["inspect"], "empty text"),
    (["inspect", "--text", "hello"], "needs trained gates"),
    (["inspect", "hello"], "needs trained gates"),  # the text may be given positionally too
    (["inspect", "  "], "empty text"),
    (["inspect", "--text", "hello", "--gates", "{tmp}/missing"], "does not exist"),
    (["inspect", "--file", "{tmp}/empty.txt", "--gates", "{tmp}"], "has no text"),
    (["inspect", "--stats", "--text", "hello", "--gates", "{tmp}"], "drop one of them"),
])
def test_cli_one_line_errors(argv, needle, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("gateskip: error:")
