"""Build the wheel and sdist of every distribution of the repository into one folder.

    python scripts/build_dists.py --out dist [sloth-core sloth-llama ...]

Each distribution is copied to a temporary folder first and built there (its sdist, then
the wheel from that sdist, by ``python -m build --no-isolation``), so that the clone gets
no ``build/`` or ``*.egg-info`` and every wheel is proven to build from its sdist alone.
``nox -s build`` runs it and ``twine check``; tests/test_distributions.py installs what it
builds by name into a fresh environment.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
#: What the core's sdist is built from: the repository root also holds the plugins,
#: the tests and the docs, which are not part of it.
CORE_FILES = ("pyproject.toml", "README.md", "LICENSE", "sloth_core")
_LEFTOVERS = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.pyc")


def distributions() -> dict[str, Path]:
    """Name -> folder of every distribution we publish (the template is an example)."""
    folders = [ROOT, ROOT / "kernels", *sorted((ROOT / "plugins").glob("sloth-*"))]
    found = {}
    for folder in folders:
        with open(folder / "pyproject.toml", "rb") as f:
            found[tomllib.load(f)["project"]["name"]] = folder
    return found


def _copy(folder: Path, into: Path) -> Path:
    if folder == ROOT:
        into.mkdir()
        for name in CORE_FILES:
            source = folder / name
            if source.is_dir():
                shutil.copytree(source, into / name, ignore=_LEFTOVERS)
            else:
                shutil.copy2(source, into / name)
        return into
    return Path(shutil.copytree(folder, into, ignore=_LEFTOVERS))


def build(names: list[str], out: Path) -> list[Path]:
    """Build ``names`` (all when empty) into ``out``; returns the files written."""
    known = distributions()
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown distributions {unknown}; known: {', '.join(known)}")
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    with tempfile.TemporaryDirectory(prefix="sloth-build-") as scratch:
        for name in names or list(known):
            source = _copy(known[name], Path(scratch) / name)
            command = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out)]
            done = subprocess.run([*command, str(source)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} did not build:\n{done.stdout}{done.stderr}")
    return sorted(set(out.iterdir()) - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="distributions (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="default: dist/")
    args = parser.parse_args()
    for path in build(args.names, args.out.resolve()):
        print(path)


if __name__ == "__main__":
    main()
