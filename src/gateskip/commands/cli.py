"""One entry point; each sub-command is a plain function whose signature and docstring make its flags.

``gateskip train --steps 200 --out runs/s`` calls ``gateskip.commands.train.train(steps=200, out="runs/s")``.
Parameters without a default become positional arguments; ``bool`` parameters become
``--flag / --no-flag``; a parameter whose default is an argument group (a dataclass of gateskip/args.py, or
GateSkipConfig) gives one flag per field, with the group's defaults and its docstring's help, passed on by
name (the command replaces them into the group: ``args.apply``). ``--config file.yaml`` supplies values for
any flags, flat or nested by group (flags given on the command line win). Any ``GateSkipError`` is printed
as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable

from gateskip.errors import GateSkipError
from gateskip.options import as_list

_POSITIONAL = "_positional_"


def _commands() -> dict[str, Callable]:
    from gateskip.commands.bench import bench
    from gateskip.commands.demo import demo
    from gateskip.commands.eval import evaluate
    from gateskip.commands.fit import fit
    from gateskip.commands.generate import generate
    from gateskip.commands.inspect import inspect
    from gateskip.commands.quantize import quantize_command
    from gateskip.commands.reproduce import reproduce
    from gateskip.commands.train import train
    from gateskip.commands.train_mod import train_mod

    return {"train": train, "generate": generate, "demo": demo, "eval": evaluate, "bench": bench, "inspect": inspect,
            "reproduce": reproduce, "train-mod": train_mod, "quantize": quantize_command,
            "fit": fit}


def _doc_args(fn: Callable) -> tuple[str, dict[str, str]]:
    """Summary line and per-argument help from a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0].replace("\n", " ")
    helps, current = {}, None
    in_args = False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if in_args:
            m = re.match(r"^\s{4}(\w+):\s*(.*)$", line)
            if m:
                current = m.group(1)
                helps[current] = m.group(2)
            elif line.startswith("        ") and current:
                helps[current] += " " + line.strip()
            elif line.strip() and not line.startswith(" "):
                in_args = False
    return summary, helps


def _list_of(cast):
    """argparse type of a ``list[cast]`` parameter: a comma-separated flag value."""
    def parse(text: str) -> list:
        try:
            return as_list(text, cast)
        except GateSkipError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = f"list of {cast.__name__}"
    return parse


def _base_type(annotation):
    """int / float / str / bool, or a comma-list parser for ``list[X]`` (or ``tuple[X, ...]``), from an annotation
    such as ``int | None``."""
    if typing.get_origin(annotation) in (list, tuple):
        item = (typing.get_args(annotation) or (str,))[0]  # tuple[X, ...]: X
        return _list_of(item if item in (int, float, str) else str)
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation.split("|")[0].strip(), str)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if args else str
    return annotation if annotation in (int, float, str, bool) else str


def options(fn: Callable) -> list[tuple[str, object, object, str, bool]]:
    """Every option of command ``fn``: (name, annotation, default, help, positional), its plain parameters in
    order, each argument group's fields in place of the group. A name in two places is an error."""
    summary, helps = _doc_args(fn)
    hints = typing.get_type_hints(fn)
    out, seen = [], {}
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        default = param.default
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            _, group_help = _doc_args(type(default))
            group_hints = typing.get_type_hints(type(default))
            rows = [(f.name, group_hints[f.name], getattr(default, f.name), group_help.get(f.name, ""), False)
                    for f in dataclasses.fields(default)]
        else:
            rows = [(pname, hints.get(pname, str), default, helps.get(pname, ""),
                     default is inspect.Parameter.empty)]
        for row in rows:
            if row[0] in seen:
                raise RuntimeError(f"{fn.__name__}: option {row[0]!r} is in {seen[row[0]]} and {pname}")
            seen[row[0]] = pname
            out.append(row)
    return out


def group_names(fn: Callable) -> set[str]:
    """The parameters of ``fn`` that are argument groups."""
    return {n for n, p in inspect.signature(fn).parameters.items()
            if dataclasses.is_dataclass(p.default) and not isinstance(p.default, type)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateskip", description="GateSkip: learned token-wise layer skipping.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in _commands().items():
        summary, _ = _doc_args(fn)
        p = sub.add_parser(name, help=summary, description=summary)
        p.add_argument("--config", help="YAML file whose keys supply values for this command's flags, or a "
                       "shipped recipe of gateskip train: best, demo, paper")
        for i, (pname, annotation, default, h, positional) in enumerate(options(fn)):
            typ = _base_type(annotation)
            flag = "--" + pname.replace("_", "-")
            h = h.replace("%", "%%")  # argparse %-formats help ("80% of steps")
            if positional:
                p.add_argument(pname, type=typ, help=h)
            elif i == 0 and default is None and typ is str:
                # An optional first argument (`gateskip inspect "text"` or `--text "text"`).
                p.add_argument(_POSITIONAL + pname, nargs="?", type=typ, default=None, metavar=pname.upper(), help=h)
                p.add_argument(flag, dest=pname, type=typ, default=None, help=f"{h} (same as {pname.upper()})")
            elif typ is bool:
                p.add_argument(flag, dest=pname, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{h} (default: {default})")
            else:
                shown = default
                if isinstance(shown, list | tuple):  # a list parameter: shown as it is typed
                    shown = ",".join(str(v) for v in shown) or "none"
                p.add_argument(flag, dest=pname, type=typ, default=None, help=f"{h} (default: {shown})")
        p.set_defaults(_fn=fn)
    return parser


def _load_yaml(path: str, fn: Callable) -> dict:
    """A recipe's values for ``fn``'s options (flat, or a mapping per argument group: recipes.load_recipe)."""
    from gateskip.recipes import load_recipe

    values = load_recipe(path)
    known = {row[0] for row in options(fn)}
    unknown = set(values) - known
    if unknown:
        raise GateSkipError(f"config {path!r} has unknown keys {sorted(unknown)}: valid keys are {sorted(known)}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    fn = args.pop("_fn")
    args.pop("command")
    for key in [k for k in args if k.startswith(_POSITIONAL)]:
        value = args.pop(key)
        if value is not None:
            args[key[len(_POSITIONAL):]] = value
    config = args.pop("config")
    try:
        kwargs = _load_yaml(config, fn) if config else {}
        kwargs.update({k: v for k, v in args.items() if v is not None})
        fn(**kwargs)
    except GateSkipError as e:
        print(f"gateskip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gateskip: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
