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


# -- the import rules of plugins (the design's section 1) ------------------------------------
ROOT = CORE.parent
#: What plugin and kernel code may import of sloth_core: the package's public names, the
#: SDK, the ops' references (the kernels' contract). Their tests may reach further (the
#: harness in sloth_core.testing, the manager, the CLI), never into another plugin.
ALLOWED = ("sloth_core", "sloth_core.sdk", "sloth_core.ops.reference")
ALLOWED_IN_TESTS = ("sloth_core", "sloth_core")


def _sources() -> list[tuple[str, Path, bool]]:
    """``(distribution, file, is_test)`` of every plugin's, the kernels' and the plugin
    template's Python code (the template's files as ``sloth plugins new`` writes them)."""
    found = []
    for dist in [
        ROOT / "kernels",
        *sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml")),
    ]:
        for path in sorted(dist.rglob("*.py")):
            if "egg-info" in str(path) or "build" in path.relative_to(dist).parts:
                continue
            found.append((dist.name, path, "tests" in path.relative_to(dist).parts))
    return found


def _imported_modules(tree: ast.AST) -> set[str]:
    """Like ``_imported_names``, but ``from a.b import c`` counts as ``a.b.c`` (``c`` may be
    a module: ``from sloth_core.ops import reference``) where ``a.b`` itself is not allowed."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "sloth_core" or not node.module.startswith("sloth_core"):
                names.add(node.module)
            else:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _allowed(module: str, allowed: tuple[str, ...]) -> bool:
    if module == "sloth_core":
        return True
    return any(module == prefix or module.startswith(prefix + ".") for prefix in allowed[1:])


def test_plugins_import_only_the_sdk_and_never_each_other():
    offenders = {}
    own_packages = {}
    for dist, path, _ in _sources():
        own_packages.setdefault(dist, set()).update(
            p.name for p in (path.parents[0],) if (p / "__init__.py").is_file()
        )
    for dist, path, is_test in _sources():
        tree = ast.parse(path.read_text(), str(path))
        allowed = ALLOWED_IN_TESTS if is_test else ALLOWED
        for name in _imported_modules(tree):
            top = name.split(".")[0]
            if top == "sloth_core" and not _allowed(name, allowed):
                offenders.setdefault(str(path.relative_to(ROOT)), []).append(name)
            elif top.startswith("sloth_") and top != "sloth_core":
                if top not in own_packages[dist]:  # another plugin, or sloth_kernels
                    offenders.setdefault(str(path.relative_to(ROOT)), []).append(name)
    assert offenders == {}, "plugins import sloth_core.sdk (see docs/plugin-authors.md)"


def test_the_template_renders_a_plugin_that_keeps_the_rules():
    from sloth_core.cli.plugins_new import render

    for relative, text in render("mymodel", "llama").items():
        if not relative.endswith(".py"):
            continue
        allowed = ALLOWED_IN_TESTS if relative.startswith("tests/") else ALLOWED
        names = _imported_modules(ast.parse(text, relative))
        bad = [n for n in names if n.split(".")[0] == "sloth_core" and not _allowed(n, allowed)]
        assert bad == [], relative


def test_every_sdk_name_resolves():
    import sloth_core.sdk as sdk

    missing = [name for name in sdk.__all__ if getattr(sdk, name, None) is None]
    assert missing == []
