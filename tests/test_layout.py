"""The monorepo's distributions: setuptools, versions in lockstep, entry points named right."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

import sloth_core

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = [
    ROOT,
    ROOT / "kernels",
    *sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml")),
]


@pytest.mark.parametrize("path", DISTRIBUTIONS, ids=lambda p: str(p.relative_to(ROOT)) or ".")
def test_distribution_is_setuptools_in_lockstep(path):
    project = tomllib.loads((path / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    meta = project["project"]
    assert meta["version"] == sloth_core.__version__, f"{meta['name']} is not in lockstep"
    assert (path / "README.md").is_file()
    if path != ROOT:
        assert meta["name"].startswith("sloth-")
        assert list(project["project"]["entry-points"]["sloth"]) == [meta["name"]]
        assert any(dep.startswith("sloth-core") for dep in meta["dependencies"])


def test_template_is_a_complete_plugin():
    template = ROOT / "plugins" / "_template"
    assert (template / "src" / "sloth_template" / "plugin.py").is_file()
    assert list((template / "tests").glob("test_*.py"))


def test_the_training_run_is_small_functions():
    """The run is in phases (prepare, build, step, callbacks, finish), none one long body."""
    import ast

    long = {}
    for path in sorted((ROOT / "sloth_core" / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long[f"{path.name}:{node.name}"] = lines
    assert long == {}


def test_py_typed_ships():
    assert (ROOT / "sloth_core" / "py.typed").is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["sloth_core"]
