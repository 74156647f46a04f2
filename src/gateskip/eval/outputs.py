"""Writing one evaluation's files: ``STEM.json``, ``STEM.md`` and (optionally) ``STEM.png``, each written, then
renamed, so an interrupted run never leaves half a file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_run(out: str | Path, stem: str, res: dict, markdown: str,
              plot: Callable[[dict, Path], None] | None = None) -> Path:
    """The results, their report and their plot (``plot(res, path)``; skipped when None or matplotlib is missing)
    in ``out``; returns the report's path."""
    from gateskip.files import atomic_write

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"{stem}.json", lambda p: Path(p).write_text(json.dumps(res, indent=1)))
    atomic_write(folder / f"{stem}.md", lambda p: Path(p).write_text(markdown))
    if plot is not None:
        try:
            atomic_write(folder / f"{stem}.png", lambda p: plot(res, Path(p)))
        except ImportError:
            pass
    return folder / f"{stem}.md"
