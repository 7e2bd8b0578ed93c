"""Installing the repository's fixture distributions for a test, without writing in it.

setuptools builds in the source folder (``build/``, ``*.egg-info``), so each distribution
is copied to a temporary folder first and installed from there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

_LEFTOVERS = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")


def install_into(target: Path, *dists: Path) -> Path:
    """pip-install copies of ``dists`` into the ``--target`` folder ``target``."""
    copies = target.parent / f"{target.name}-sources"
    sources = [shutil.copytree(d, copies / d.name, ignore=_LEFTOVERS) for d in dists]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target), *map(str, sources)],
        check=True,
    )  # fmt: skip
    shutil.rmtree(copies)
    return target
