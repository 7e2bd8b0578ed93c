"""No global at run time: no hook implementation and no patched forward looks up the
process-wide plugin manager. What they need from the host is bound at patch time
(``compute_loss``) or passed in (``host`` of ``patch_layers`` and ``export``)."""

from __future__ import annotations

import ast
from pathlib import Path

import sloth_core

ROOT = Path(sloth_core.__file__).parents[1]
SOURCES = [
    *Path(sloth_core.__file__).parent.rglob("*.py"),
    *ROOT.glob("kernels/src/**/*.py"),
    *ROOT.glob("plugins/*/src/**/*.py"),
]
GLOBAL = "get_plugin_manager"


def _is_hookimpl(node: ast.FunctionDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "hookimpl":
            return True
    return False


def run_time_lookups(source: str, filename: str = "<source>") -> list[str]:
    """``name:line`` of each hook implementation or forward (a function named ``forward``
    or ``*_forward``, at any depth) whose body calls ``get_plugin_manager``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if not (_is_hookimpl(node) or node.name == "forward" or node.name.endswith("_forward")):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Call):
                f = inner.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if called == GLOBAL:
                    found.append(f"{node.name}:{inner.lineno}")
    return found


def test_the_check_finds_a_lookup():
    source = """
from sloth_core import hookimpl
import sloth_core.plugins as plugins

@hookimpl
def export(model, tokenizer, format, path, options):
    return plugins.get_plugin_manager().export(model=model)

def patch(module):
    def forward(self, x):
        from sloth_core.plugins import get_plugin_manager
        return get_plugin_manager().compute_loss(model=self)
    return forward

def fine(model):
    return get_plugin_manager()
"""
    assert run_time_lookups(source) == ["export:7", "forward:12"]


def test_no_hook_or_forward_reads_the_global_manager():
    assert len(SOURCES) > 50, "the sources were not found"
    found = {str(p.relative_to(ROOT)): run_time_lookups(p.read_text(), str(p)) for p in SOURCES}
    assert {path: lookups for path, lookups in found.items() if lookups} == {}


def test_plugins_are_not_offered_the_global_manager():
    from sloth_core import sdk

    assert GLOBAL not in sdk.__all__
    plugin_sources = [p for p in SOURCES if "plugins" in p.relative_to(ROOT).parts[:1]]
    assert plugin_sources
    assert [str(p) for p in plugin_sources if GLOBAL in p.read_text()] == []
