"""The core never imports a plugin or sloth_kernels: the only way in is a hook call."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import sloth_core

CORE = Path(sloth_core.__file__).parent


def _imported_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_core_module_imports_a_plugin_statically():
    offenders = {}
    for path in CORE.rglob("*.py"):
        bad = {
            name
            for name in _imported_names(ast.parse(path.read_text(), str(path)))
            if name.split(".")[0].startswith("sloth_") and name.split(".")[0] != "sloth_core"
        }
        if bad:
            offenders[str(path.relative_to(CORE))] = sorted(bad)
    assert offenders == {}


SCRIPT = """
import importlib, json, pkgutil, sys
import sloth_core
skip = {"sloth_core.__main__"}
for info in pkgutil.walk_packages(sloth_core.__path__, "sloth_core."):
    if info.name not in skip:
        importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0].startswith("sloth"))))
"""


def test_importing_every_core_module_loads_no_plugin():
    # A fresh interpreter: the test session itself may have loaded plugins.
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          check=True)  # fmt: skip
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert modules, "nothing was imported"
    foreign = [m for m in modules if m.split(".")[0] != "sloth_core"]
    assert foreign == []
    assert len(modules) >= len(list(pkgutil.walk_packages(sloth_core.__path__))) // 2
