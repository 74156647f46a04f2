"""List-valued options, one way: a list or tuple from Python or YAML, or a comma-separated string from a
command line or an older call (``"0.15,0.3"``). Commands annotate such parameters ``list[float]``,
``list[int]`` or ``list[str]``; the CLI (commands/cli.py) parses the flag with ``as_list``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gateskip.errors import GateSkipError

_KIND = {float: "number", int: "whole number", str: "name"}


def as_list(value: str | Iterable | None, cast: Callable = str, what: str = "value") -> list:
    """``value`` as a list of ``cast`` items; None or an empty string is the empty list. A bad item is a
    one-line error naming ``what`` and the item."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int | float) else list(value)
    out = []
    for v in items:
        if isinstance(v, str):
            v = v.strip()
            if not v:
                continue
        try:
            out.append(cast(v))
        except (TypeError, ValueError):
            raise GateSkipError(f"{what}: {v!r} is not a {_KIND.get(cast, cast.__name__)}: give a comma-separated "
                                f"list, e.g. 1,2") from None
    return out
