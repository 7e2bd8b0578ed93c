"""No package cycles in the core: its modules and subpackages (``api``, ``inference``,
``train``, ``plugins``, ...) import one another in one direction only, counting the
imports inside functions too (they hide cycles, not remove them). Imports under
``TYPE_CHECKING`` are for annotations and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import sloth_core

CORE = Path(sloth_core.__file__).parent
#: Names the package root defines itself: importing them is not importing a module.
ROOT_NAMES = {"__version__", "PROJECT_NAME", "hookimpl"}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "sloth_core":
        return None
    return parts[1] if len(parts) > 1 and parts[1] not in ROOT_NAMES else "__root__"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def import_graph(core: Path = CORE) -> dict[str, dict[str, str]]:
    """unit -> {imported unit: where (file:line)}, for every import in the core."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(core.rglob("*.py")):
        parts = path.relative_to(core.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        source = _unit(module) or "__root__"
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if base == "sloth_core" else base for a in node.names]
            else:
                continue
            for target in targets:
                unit = _unit(target)
                if unit is not None and unit != source:
                    where = f"{path.relative_to(core)}:{node.lineno}"
                    graph.setdefault(source, {}).setdefault(unit, where)
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_check_finds_a_cycle(tmp_path):
    core = tmp_path / "sloth_core"
    (core / "inference").mkdir(parents=True)
    (core / "__init__.py").write_text("")
    (core / "api.py").write_text("def f():\n    from sloth_core.inference import modes\n")
    (core / "inference" / "__init__.py").write_text("")
    (core / "inference" / "engines.py").write_text("from ..api import f\n")
    (core / "types.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from sloth_core.api import f\n")  # fmt: skip
    graph = import_graph(core)
    assert cycles(graph) == [["api", "inference"]]
    assert "types" not in graph


def test_the_core_has_no_package_cycles():
    graph = import_graph()
    assert len(graph) > 15, "the core's modules were not read"
    found = cycles(graph)
    where = {
        " <-> ".join(c): [
            f"{a} -> {b} at {graph[a][b]}" for a in c for b in graph.get(a, {}) if b in c
        ]
        for c in found
    }
    assert where == {}
