"""Writing outputs so that a crash or an error never leaves half of one behind."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sloth_core.errors import OutputExistsError


def refuse_existing(path: Path, force: bool) -> None:
    """Raise unless ``path`` is free, or ``force`` allows replacing it."""
    if path.exists() and not force and not (path.is_dir() and not any(path.iterdir())):
        raise OutputExistsError(f"{path} exists; pass force=True (--force) to replace it")


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; it becomes ``path`` only on success.

    The old ``path`` (replaced only with ``force``) survives until the new one is in place,
    and on any error the temporary directory is removed and ``path`` is left untouched.
    """
    path = Path(path).expanduser().resolve()
    refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        if path.exists():
            retired = staging.with_suffix(".old")
            path.rename(retired)
            staging.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
