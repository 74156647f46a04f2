"""``gateskip inspect``: what the gates learned, for one text or for a corpus sample (``--stats``, ``--fallback``).

The pieces are library functions of analysis/ (importances, heatmaps, pages, category statistics, the
fallback residuals); this command loads the model and gates, picks the inputs and writes the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gateskip.analysis.report import corpus_rows, read_prompts, report_text
from gateskip.errors import GateSkipError
from gateskip.policies import check_ratio


def _check_args(text, file, stats, gates, ratio, max_tokens, seq_len, fallback=False) -> None:
    if stats and fallback:
        raise GateSkipError("--stats and --fallback are two separate corpus analyses: drop one of them (run "
                            "inspect twice for both)")
    corpus = "--stats" if stats else "--fallback" if fallback else None
    if corpus and (text is not None or file is not None):
        raise GateSkipError(f"{corpus} reads a corpus sample (--data), not --text/--file: drop one of them")
    if not corpus:
        if text is not None and file is not None:
            raise GateSkipError("give either --text or --file, not both")
        if file is None and (text is None or not text.strip()):
            raise GateSkipError("empty text: pass --text \"...\" or --file prompts.txt (or --stats / --fallback for "
                                "a corpus sample)")
    if not gates:
        raise GateSkipError("inspect needs trained gates: pass --gates DIR (the --out folder of gateskip train)")
    check_ratio(ratio)
    if fallback and not 0.0 < ratio < 1.0:
        raise GateSkipError(f"--fallback measures the gate's overlap with the oracle at --ratio, so --ratio {ratio:g} "
                            "must be strictly between 0 and 1: pass e.g. --ratio 0.3")
    if max_tokens < 2 or seq_len < 2:
        raise GateSkipError(f"max_tokens={max_tokens} and seq_len={seq_len} must be at least 2")


def inspect(text: str | None = None, gates: str | None = None, file: str | None = None, model: str | None = None,
            out: str = "inspect", ratio: float = 0.3, chat: bool = True, stats: bool = False, data: str = "mix",
            max_tokens: int = 4096, seq_len: int = 256, fallback: bool = False) -> dict | list[dict[str, Path]]:
    """Show what the gates learned: per-token importance heatmap, HTML page and JSON, category statistics, or
    how good the fallbacks are and how well the gates rank tokens by skip cost.

    Args:
        text: the text to inspect.
        gates: a gates folder written by ``gateskip train``.
        file: a text file with one prompt per line (instead of --text).
        model: base model; default: the one recorded in --gates.
        out: folder for the outputs (created if needed).
        ratio: initial skip ratio of the page's skip mask; with --fallback, the share of tokens the
            gate-vs-oracle overlap is measured at.
        chat: wrap each prompt in the tokenizer's chat template when it has one.
        stats: importance by token category and layer over a held-out corpus sample (--data).
        data: corpus for --stats / --fallback: mix, boolq, lambada, shakespeare or a file (held-out split).
        max_tokens: about how many tokens --stats / --fallback reads.
        seq_len: row length for --stats / --fallback.
        fallback: per gated branch, over a held-out corpus sample (--data), run densely: the held-out R²
            of its fallback (zero fallback: y^ = 0), the mean skip cost ||g*(y - y^)|| relative to ||g*y||,
            and how well the gate ranks tokens by that cost (Spearman, overlap at --ratio with the oracle's
            choice). Writes fallback.md / .json / .png.
    """
    from gateskip.loading import load_for_inference

    _check_args(text, file, stats, gates, ratio, max_tokens, seq_len, fallback)
    # read before the slow load
    prompts = [] if stats or fallback else (read_prompts(file) if file is not None else [text])
    net, tok = load_for_inference(model, gates)
    if stats:
        return _run_stats(net, tok, data, max_tokens, seq_len, Path(out))
    if fallback:
        return _run_fallback(net, tok, data, max_tokens, seq_len, ratio, Path(out))
    written = []
    for i, prompt in enumerate(prompts, 1):
        paths = report_text(net, tok, prompt, out, stem=f"prompt-{i:02d}", ratio=ratio, chat=chat)
        for p in paths.values():
            print(p)
        written.append(paths)
    return written


def _run_stats(net, tok, data: str, max_tokens: int, seq_len: int, out_dir: Path) -> dict:
    from gateskip.analysis.stats import category_stats, markdown_tables, save_lines

    rows = corpus_rows(tok, data, max_tokens, seq_len)
    s = category_stats(net, tok, rows, progress=True)
    return _write(out_dir, "categories", markdown_tables(s), s, save_lines)


def _run_fallback(net, tok, data: str, max_tokens: int, seq_len: int, ratio: float, out_dir: Path) -> dict:
    import torch

    from gateskip.analysis.residuals import fallback_stats, markdown_table, save_plot

    rows = corpus_rows(tok, data, max_tokens, seq_len)
    s = fallback_stats(net, list(torch.stack(rows).split(8)), ratio=ratio, progress=True)  # rows: seq_len each
    return _write(out_dir, "fallback", markdown_table(s), s, save_plot)


def _write(out_dir: Path, stem: str, md: str, s: dict, plot) -> dict:
    """``{stem}.md``, ``.json`` and ``.png`` of a corpus analysis; the md printed, the paths to stderr."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(md, encoding="utf-8")
    (out_dir / f"{stem}.json").write_text(json.dumps(s), encoding="utf-8")
    png = plot(s, out_dir / f"{stem}.png")
    print(md)
    for name in (f"{stem}.md", f"{stem}.json"):
        print(out_dir / name, file=sys.stderr)
    print(png, file=sys.stderr)
    return s
