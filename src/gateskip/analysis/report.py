"""``gateskip inspect``: what the gates learned, for one text or for a corpus sample (``--stats``, ``--fallback``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gateskip.analysis.heatmap import save_heatmap
from gateskip.analysis.html import write_html
from gateskip.analysis.importance import branch_importances, encode, token_labels, token_texts
from gateskip.core import gate_state
from gateskip.errors import GateSkipError
from gateskip.policies import check_ratio


def report_text(model, tok, text: str, out_dir: str | Path, stem: str = "prompt-01", ratio: float = 0.3,
                chat: bool = False) -> dict[str, Path]:
    """Write ``{stem}.heatmap.png``, ``{stem}.html`` and ``{stem}.importance.json`` for ``text``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    input_ids = encode(tok, text, chat=chat)
    imp = branch_importances(model, input_ids)[0]
    ids = input_ids[0].tolist()
    texts, labels = token_texts(tok, ids), token_labels(tok, ids)
    st = gate_state(model)
    names = [b.name for b in st.branches]
    grid = st.calibration["grid"] if st.calibration is not None else None
    source = (st.meta or {}).get("base_model", {}).get("source") or getattr(model, "gateskip_source", "")
    title = f"GateSkip importance: {source}, {len(ids)} tokens" + (" (chat template)" if chat else "")
    record = {
        "model": source,
        "text": text,
        "chat": chat,
        "tokens": texts,
        "labels": labels,
        "raw_tokens": tok.convert_ids_to_tokens(ids),
        "token_ids": ids,
        "modules": names,
        "importance": imp.tolist(),  # [tokens][modules], full float32 precision
        "calibrated": grid is not None,
    }
    paths = {"png": out / f"{stem}.heatmap.png", "html": out / f"{stem}.html", "json": out / f"{stem}.importance.json"}
    paths["json"].write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
    save_heatmap(imp, labels, names, paths["png"], title=title)
    write_html(paths["html"], imp, labels, texts, names, grid=grid, ratio=ratio, title=title)
    return paths


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GateSkipError(f"cannot read prompts file {path!r} ({type(e).__name__}): pass a UTF-8 text file, "
                            "one prompt per line") from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise GateSkipError(f"prompts file {path!r} has no text: put one prompt per line")
    return prompts


def corpus_rows(tok, data: str, max_tokens: int, seq_len: int) -> list:
    """Held-out rows packed like training rows, about ``max_tokens`` tokens in all."""
    from gateskip.data import fixed_batches, load_texts

    texts = load_texts(data, split="heldout")
    n_rows = max(1, max_tokens // seq_len)
    return list(fixed_batches(tok, texts, seq_len=seq_len, batch_size=n_rows, n_batches=1)[0])


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
