"""The project's own distributions: which one to install for what is missing, and how.

Installed plugins describe themselves (:mod:`sloth_core.formats`); what is *not* installed
cannot, so this index names which of our distributions to ``pip install`` for a format or
a quantization method. It holds names only: nothing here is read when the plugin is
installed, and a third party's format needs no entry.

:func:`install_command` writes the command for where the user is: in an editable install
from a clone of the repository, ``pip install -e plugins/sloth-gguf`` (the distributions
are on no index there); otherwise ``pip install sloth-gguf``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Distribution -> the export formats and quantization methods it provides.
FIRST_PARTY: dict[str, dict[str, tuple[str, ...]]] = {
    "sloth-bnb": {"formats": ("merged_4bit",), "quantizers": ("nf4", "fp4", "int8")},
    "sloth-gguf": {"formats": ("gguf", "llama.cpp")},
    "sloth-ollama": {"formats": ("ollama",)},
}

#: Where each of our distributions lives in the repository, relative to its root (the
#: plugins are ``plugins/<name>``).
_IN_REPOSITORY = {"sloth-core": ".", "sloth-kernels": "kernels"}


def distribution_for(kind: str, name: str) -> str | None:
    """Which of our distributions provides ``name`` (``kind``: "formats" or "quantizers")."""
    return next((d for d, p in FIRST_PARTY.items() if name in p.get(kind, ())), None)


def not_installed(kind: str, installed: dict[str, str]) -> dict[str, str]:
    """Name -> distribution for each of ``kind`` that no installed plugin serves."""
    return {
        name: dist
        for dist, provides in FIRST_PARTY.items()
        for name in provides.get(kind, ())
        if name not in installed
    }


def repository_root() -> Path | None:
    """The clone this sloth-core runs from (an editable install), or None (a wheel)."""
    root = Path(__file__).resolve().parents[1]
    marker = root / "plugins" / "sloth-llama" / "pyproject.toml"
    return root if (root / "pyproject.toml").is_file() and marker.is_file() else None


def _shown(path: Path, base: Path | None) -> str:
    """``path`` relative to ``base`` (the working directory) when below it, else whole."""
    try:
        relative = path.relative_to((base or Path.cwd()).resolve())
    except ValueError:
        return str(path)
    return "." if str(relative) == "." else str(relative)


def install_command(
    distribution: str, extra: str | None = None, *, run_from: Path | None = None
) -> str:
    """The ``pip install`` command that installs ``distribution`` (with ``extra``) here.

    Our distributions are installed editable from the clone that this sloth-core comes
    from when there is one: they are on no package index a clone's user can count on.
    Any other name (``llama-cpp-python``) is installed by name. ``run_from``: the folder
    the command will be typed in (default: the working directory), for a relative path.
    """
    suffix = f"[{extra}]" if extra else ""
    root = repository_root()
    if root is not None and distribution.startswith("sloth-"):
        where = root / _IN_REPOSITORY.get(distribution, os.path.join("plugins", distribution))
        if (where / "pyproject.toml").is_file():
            target = _shown(where, run_from) + suffix
            return f"pip install -e '{target}'" if extra else f"pip install -e {target}"
    target = distribution + suffix
    return f"pip install '{target}'" if extra else f"pip install {target}"
