"""The package's import graph: no module imports (even inside a function) one that imports it back,
and nothing below the commands imports a command."""

from __future__ import annotations

import ast
from pathlib import Path

import gateskip

ROOT = Path(gateskip.__file__).parent
# commands still outside gateskip/commands/ (demo) count as commands
COMMAND_LAYER = ("gateskip.commands", "gateskip.__main__")


def _module_name(path: Path) -> str:
    parts = ["gateskip", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                # `from gateskip import physical` imports the submodule; `from gateskip import X` the package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circle():
    graph = {m: {n for n in deps if n != "gateskip"} for m, deps in _graph().items()}  # the package's
    # __init__ only re-exports the public API: it imports everything, and nothing inside imports it
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_nothing_inside_the_package_imports_its_top_level_namespace():
    offenders = sorted(m for m, deps in _graph().items() if "gateskip" in deps and m not in COMMAND_LAYER)
    assert not offenders, f"these import gateskip/__init__ (a circle through the public API): {offenders}"


def test_library_modules_never_import_a_command():
    graph = _graph()
    bad = sorted((m, n) for m, deps in graph.items() if not m.startswith(COMMAND_LAYER)
                 for n in deps if n.startswith("gateskip.commands"))
    assert not bad, f"library modules importing commands: {bad}"

