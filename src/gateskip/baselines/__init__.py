"""Baselines that GateSkip is compared with at matched FLOP-weighted compute.

- random token skipping: the same gates with ``policy="random"`` (no module needed here);
- ``gatefree``: the fine-tuned backbone without gates (gates forced fully open), random skipping;
- ``shortgpt``: layer pruning by Block Influence;
- ``static``: whole branches skipped for every token, the ones with the lowest mean gate value.
"""

from __future__ import annotations

from collections.abc import Sequence


def match_prefix(savings: Sequence[float], target: float, offset: float = 0.0) -> int:
    """How many of ``savings`` (taken in order) to apply so that ``offset + their sum`` is
    closest to ``target``; ties go to the smaller number."""
    best_n, best_gap, total = 0, abs(offset - target), offset
    for n, s in enumerate(savings, 1):
        total += s
        if abs(total - target) < best_gap:
            best_n, best_gap = n, abs(total - target)
    return best_n
