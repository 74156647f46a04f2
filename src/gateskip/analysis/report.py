"""Reports of what the gates learned on one text (`report_text`: heatmap, page, JSON) and the inputs of `gateskip inspect` (commands/inspect.py)."""

from __future__ import annotations

import json
from pathlib import Path

from gateskip.analysis.heatmap import save_heatmap
from gateskip.analysis.html import write_html
from gateskip.analysis.importance import branch_importances, encode, token_labels, token_texts
from gateskip.core import gate_state
from gateskip.errors import GateSkipError
from gateskip.record import peek


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
    cal = st.loaded.calibration
    grid = cal["grid"] if cal is not None else None
    source = (st.loaded.meta or {}).get("base_model", {}).get("source") or (peek(model).source or "")
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
