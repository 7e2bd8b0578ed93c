"""The monorepo's distributions: setuptools, versions in lockstep, entry points named right."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import sloth_core

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = [ROOT, ROOT / "kernels", *sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))]


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
