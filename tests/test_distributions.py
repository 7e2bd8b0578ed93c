"""The distributions are ready to publish, and install by name.

Every distribution's metadata is complete and in lockstep with the core's; the wheels and
sdists build (in copies: the clone gets no ``build/``) and pass ``twine check``; and
``sloth-core sloth-llama sloth-gguf`` install *by name* from the built folder into a fresh
environment, not editable, which then fine-tunes the demo and exports it. Install hints
name a command that works where the user is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from sloth_core import catalog
from sloth_core.catalog import install_command

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "scripts" / "build_dists.py"
sys.path.insert(0, str(BUILD.parent))
from build_dists import distributions  # noqa: E402

PYTHONS = ("3.10", "3.11", "3.12")


def _project(folder: Path) -> dict:
    with open(folder / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_every_distribution_has_complete_lockstep_metadata():
    core = _project(ROOT)["project"]
    dists = distributions()
    assert {"sloth-core", "sloth-kernels", "sloth-llama", "sloth-gguf"} <= set(dists)
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    for name, folder in dists.items():
        pyproject = _project(folder)
        project = pyproject["project"]
        where = f"{folder.relative_to(ROOT)}/pyproject.toml"
        assert project["version"] == core["version"], f"{where}: not in lockstep with the core"
        assert project["license"] == "Apache-2.0", where
        assert (folder / "LICENSE").read_text() == license_text, f"{where}: no LICENSE beside it"
        assert (folder / project["readme"]).is_file(), where
        assert project["description"] and project["requires-python"] == ">=3.10", where
        assert project["urls"] == core["urls"], f"{where}: other project URLs than the core's"
        assert set(project["urls"]) >= {"Homepage", "Documentation", "Source", "Issues"}
        versions = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if "Python :: 3." in c}
        assert versions == set(PYTHONS), where
        assert pyproject["build-system"]["requires"] == ["setuptools>=77"], where
        for requirement in project.get("dependencies", []):
            dist = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
            if dist.startswith("sloth-"):  # ours move together: exact pins
                assert requirement == f"{dist}=={core['version']}", f"{where}: {requirement}"
                assert dist in dists, f"{where}: {dist} is not one of ours"
        if name != "sloth-core":
            assert f"sloth-core=={core['version']}" in project["dependencies"], where
            assert [*project["entry-points"]["sloth"]] == [name], where


def test_install_hints_fit_where_sloth_runs(monkeypatch, tmp_path):
    root = catalog.repository_root()
    assert root == ROOT  # these tests run in an editable install of the clone
    monkeypatch.chdir(ROOT)
    assert install_command("sloth-gguf") == "pip install -e plugins/sloth-gguf"
    assert (
        install_command("sloth-gguf", "llama-cpp")
        == "pip install -e 'plugins/sloth-gguf[llama-cpp]'"
    )
    assert install_command("sloth-kernels") == "pip install -e kernels"
    assert install_command("sloth-core", "data") == "pip install -e '.[data]'"
    assert install_command("llama-cpp-python") == "pip install llama-cpp-python"
    monkeypatch.chdir(tmp_path)  # elsewhere: the clone's path, whole
    assert install_command("sloth-bnb") == f"pip install -e {ROOT / 'plugins' / 'sloth-bnb'}"
    # Every distribution the catalog names is one of ours, at the place the hint names.
    for dist in catalog.FIRST_PARTY:
        assert dist in distributions()
        assert (ROOT / "plugins" / dist / "pyproject.toml").is_file()
    monkeypatch.setattr(catalog, "repository_root", lambda: None)  # installed from wheels
    assert install_command("sloth-bnb") == "pip install sloth-bnb"
    assert install_command("sloth-gguf", "llama-cpp") == "pip install 'sloth-gguf[llama-cpp]'"


def _run(command: list[str], **options) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, **options)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
    return done


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")  # the build's copies
def test_built_distributions_install_by_name_then_fine_tune_and_export(tmp_path):
    pytest.importorskip("build", reason="pip install build twine (nox -s tests installs them)")
    dist = tmp_path / "dist"
    _run([sys.executable, str(BUILD), "--out", str(dist)])
    built = sorted(p.name for p in dist.iterdir())
    for name in distributions():
        stem = name.replace("-", "_")
        assert f"{stem}-0.1.0-py3-none-any.whl" in built and f"{stem}-0.1.0.tar.gz" in built
    _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())])

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    pip, bin_dir = [str(venv / "bin" / "python"), "-m", "pip", "-q"], venv / "bin"
    _run([*pip, "install", "torch==2.13.0"])  # first: the CPU build, as the README says
    # Ours by name from the built folder alone, then what they need from the index: the
    # sloth-* found there are the ones just built, whatever an index may hold.
    ours = ["sloth-core", "sloth-kernels", "sloth-llama", "sloth-gguf"]
    _run([*pip, "install", "--no-index", "--no-deps", "--find-links", str(dist), *ours])
    _run([*pip, "install", "--find-links", str(dist), "sloth-core", "sloth-llama", "sloth-gguf"])
    _run([*pip, "check"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "HF_HUB_OFFLINE": "1",
            "SLOTH_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}  # fmt: skip
    env.pop("TRITON_INTERPRET", None)  # the torch references: the interpreter is slow
    work = tmp_path / "work"
    work.mkdir()

    where = _run([str(bin_dir / "python"), "-c", "import sloth_core; print(sloth_core.__file__)"],
                 cwd=work, env=env)  # fmt: skip
    assert where.stdout.startswith(str(venv)), "sloth_core did not come from the built wheel"
    listed = json.loads(_run(["sloth", "plugins", "list", "--json"], cwd=work, env=env).stdout)
    status = {r["name"]: r["status"] for r in listed}
    assert all(status[name] == "active" for name in ours[1:]), status  # the plugins

    trained = _run(["sloth", "train", "--demo", "--max-steps", "3", "--quiet"], cwd=work, env=env)
    output = trained.stdout + trained.stderr
    assert "eval after training" in output and (work / "sloth-demo" / "final").is_dir()
    # --quiet: no progress bar, transformers' included; no deprecation noise.
    assert "it/s" not in output and "Warning" not in output, output

    # --verify without llama.cpp (not installed here): the pure-Python level alone.
    exported = _run(["sloth", "export", "sloth-demo", "--format", "gguf", "--quantization",
                     "q8_0", "--output", "demo.gguf", "--verify"], cwd=work, env=env)  # fmt: skip
    said = exported.stdout + exported.stderr
    assert (work / "demo.gguf").stat().st_size > 0, said
    assert "gguf-py reload: passed" in said and "llama.cpp: not installed" in said, said
    assert "verified: the export matches" in said, said
    # A format whose plugin is not installed: the hint installs it by name (no clone here).
    missing = subprocess.run(
        ["sloth", "export", "sloth-demo", "--format", "ollama", "--output", "o"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (
        missing.returncode != 0 and "`pip install sloth-ollama`" in missing.stderr + missing.stdout
    )
