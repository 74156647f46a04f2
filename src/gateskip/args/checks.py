"""Checks the argument groups share: a lower bound, a skip ratio, a choice among names."""

from __future__ import annotations

from gateskip.config import _choice
from gateskip.errors import GateSkipError

__all__ = ["_at_least", "_choice", "_ratio"]


def _at_least(group: object, **least) -> None:
    for name, low in least.items():
        value = getattr(group, name)
        if value is not None and value < low:
            raise GateSkipError(f"{name}={value} is invalid: use a value >= {low}")


def _ratio(name: str, value: float | None) -> None:
    if value is not None:
        from gateskip.policies import check_ratio

        check_ratio(value, name)
