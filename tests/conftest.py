"""The suite writes nothing inside the repository.

At the start of the session (in the controlling process, under pytest-xdist too) the
files git does not track are listed; at the end, any new one fails the run, named. Tests
write under ``tmp_path``; a distribution is installed from a copy (``_dists.py``), since
setuptools builds in the source folder. This folder being a conftest's also puts it on
``sys.path``, so the test files import ``_dists`` by name.

Each test also starts with the attention's varlen probes forgotten (see
:func:`_fresh_varlen_probes`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Caches Python, pytest and the linters write beside the code: not the tests' doing.
_CACHES = ("__pycache__/", ".pytest_cache/", ".pyc", ".ruff_cache/", ".mypy_cache/", ".nox/")


def _untracked() -> set[str] | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None  # an sdist or an export of the tree: nothing to compare with
    listing = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", "."],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if listing.returncode:
        return None
    paths = {line[3:] for line in listing.stdout.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if not any(c in p for c in _CACHES)}


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")  # a pytest-xdist worker: the controller checks


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _is_worker(session.config):
        session.config.stash[_BEFORE] = _untracked()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _is_worker(session.config):
        return
    before = session.config.stash.get(_BEFORE, None)
    after = _untracked()
    if before is None or after is None:
        return
    written = sorted(after - before)
    if written:
        listing = "\n  ".join(written[:20])
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"the tests wrote inside the repository:\n  {listing}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[set[str] | None]()


@pytest.fixture(autouse=True)
def _fresh_varlen_probes():
    """The varlen kernels' probes (their causal alignment, their own GQA) are answered
    once per device and dtype, of whatever ``_varlen_attn`` was in place: tests swap in
    kernels of their own, so each test probes its own afresh, and none leaves an answer
    to the next."""
    from sloth_core.patches import attention

    probes = (attention._aligned_to_last_key, attention._native_gqa)
    for probe in probes:
        probe.cache_clear()
    yield
    for probe in probes:
        probe.cache_clear()
