"""Flat flags into typed argument groups (args.py), and a gates folder's settings as a starting point.

``apply(flags, groups)``: each flag (``--steps 200``, ``steps=200`` from Python, a recipe's key) is replaced into
the one group of the command that has that field. ``start_config``: with ``--init DIR`` the folder's
``GateSkipConfig`` with the gate settings the caller gave (``given_fields``) replaced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields

from gateskip.args import StartArgs
from gateskip.errors import GateSkipError


def field_names(group) -> list[str]:
    """The fields of a group (a dataclass or its type)."""
    return [f.name for f in fields(group)]


def apply(flags: dict, groups: dict[str, object], command: str = "this command") -> dict[str, object]:
    """``groups`` (name -> dataclass instance) with the flat ``flags`` (field -> value) replaced into the group
    that has each field, every changed group built (and so checked) again; a field a group lists in ``FOLLOWS``
    is reset with the field it follows unless given too. An unknown name is a one-line error.
    A value for a group name itself (a whole ``TrainArgs`` ...) replaces that group."""
    owner = {}
    for gname, group in groups.items():
        for f in field_names(group):
            owner.setdefault(f, gname)
    per: dict[str, dict] = {}
    out = dict(groups)
    for key, value in flags.items():
        if key in groups and dataclasses.is_dataclass(value):
            out[key] = value
            continue
        if key not in owner:
            known = sorted(owner)
            raise GateSkipError(f"{command} has no option {key!r}: valid options are {', '.join(known)}")
        per.setdefault(owner[key], {})[key] = value
    for gname, changes in per.items():
        follows = getattr(out[gname], "FOLLOWS", {})  # e.g. fallback_mlp follows fallback unless given too
        changes.update({f: None for f, general in follows.items() if set(general) & set(changes) and f not in changes})
        out[gname] = dataclasses.replace(out[gname], **changes)
    return out


def given_fields(flags: dict, passed, default) -> set[str]:
    """The gate settings a caller chose: every field when a whole config was passed (``passed`` is not the
    default object, or ``flags`` holds one), else the gate fields among ``flags``."""
    from gateskip.config import GateSkipConfig

    names = set(field_names(GateSkipConfig))
    whole = passed is not default or dataclasses.is_dataclass(flags.get("gates"))
    return names if whole else set(flags) & names


def start_config(gates, start: StartArgs, given: set[str]) -> tuple:
    """(config, kinds that skip, the given fields): ``gates`` (a copy) for new gates; with ``--init DIR`` the
    folder's config with the ``given`` gate settings replaced (``modules``: the subset of its kinds that skip)."""
    from pathlib import Path

    from gateskip.checkpoint import read_meta
    from gateskip.config import GateSkipConfig

    gates = dataclasses.replace(gates)  # a copy: the default object is shared
    if start.folder is None:
        return gates, tuple(gates.modules), given
    if not Path(start.folder, "gateskip.json").is_file():
        raise GateSkipError(f"--init {start.folder!r} is not a gates folder (no gateskip.json): pass a folder "
                            "written by gateskip fit / train, fit (closed-form start) or none")
    own = GateSkipConfig.from_dict(read_meta(start.folder)["config"])
    skip = tuple(gates.modules) if "modules" in given else tuple(own.modules)
    if set(skip) - set(own.modules):
        raise GateSkipError(f"--modules {','.join(skip)}: the folder {start.folder!r} has gates on "
                            f"{','.join(own.modules)} only; pass --modules {','.join(own.modules)} (or a subset)")
    changes = {k: getattr(gates, k) for k in given - {"modules"}}
    return (dataclasses.replace(own, **changes) if changes else own), skip, given


FALLBACK_FIELDS = {"fallback", "fallback_rank", "fallback_mlp", "fallback_neurons", "fallback_rank_mlp"}


def fit_ranks(cfg, net, given: set[str]):
    """The recommended MLP fallback rank (128), at most the hidden size of a small model when not given."""
    from gateskip.arch import text_config

    hidden = text_config(net).hidden_size
    if "fallback_rank_mlp" not in given and cfg.fallback_rank_mlp is not None and cfg.fallback_rank_mlp > hidden:
        return dataclasses.replace(cfg, fallback_rank_mlp=hidden)
    return cfg
