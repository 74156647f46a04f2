"""Recipes shipped with the package: YAML files of a command's flags, used as ``--config NAME``.

``gateskip train --config paper`` trains the paper's gates; ``--config best`` writes out the defaults
(the best measured recipe) so they can be read and copied. A path to any YAML file works the same way.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gateskip.errors import GateSkipError


def names() -> list[str]:
    """The shipped recipes (``paper``, ``best``, ...)."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def recipe_path(name_or_path: str) -> Path:
    """A YAML path as given, or the shipped recipe of that name."""
    p = Path(name_or_path)
    if p.is_file() or p.suffix in (".yaml", ".yml") or len(p.parts) > 1:  # a path (read errors name it)
        return p
    if name_or_path in names():
        return Path(str(resources.files(__name__) / f"{name_or_path}.yaml"))
    raise GateSkipError(f"config {name_or_path!r} is neither a YAML file nor a shipped recipe: pass a path, or one "
                        f"of {', '.join(names())}")


def load_recipe(name_or_path: str) -> dict:
    """The flags of a recipe as a flat dict (keys with ``_``, as the command's keyword arguments); the recipe may
    group them by argument group (``loop: {steps: 150}``)."""
    import yaml

    path = recipe_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise GateSkipError(f"cannot read config {str(path)!r}: {e.strerror}") from None
    except yaml.YAMLError:
        raise GateSkipError(f"config {str(path)!r} is not valid YAML: fix its syntax") from None
    if not isinstance(values, dict):
        raise GateSkipError(f"config {str(path)!r} must be a mapping of flag names to values")
    flat = {}
    for key, value in values.items():  # a mapping is one argument group's fields (``loop: {steps: 3}``)
        flat.update(value if isinstance(value, dict) else {key: value})
    return {str(k).replace("-", "_"): v for k, v in flat.items()}
