"""Writing outputs so that a crash or an error never leaves half of one behind."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sloth_core.errors import DiskFullError, OutputExistsError

#: How libraries that do not raise ``OSError`` (safetensors, torch's writers) word ENOSPC.
_DISK_FULL_WORDS = ("no space left", "storagefull", "os error 28", "disk quota exceeded")


def format_bytes(count: float) -> str:
    """``count`` bytes for people: MB below a gigabyte (a "0.00 GiB" tells nothing), else GiB."""
    if abs(count) < 2**30:
        return f"{count / 2**20:.1f} MB"
    return f"{count / 2**30:.2f} GiB"


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    probe = Path(path).expanduser().resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(path: str | Path, needed: int, what: str, *, margin: float = 1.1) -> None:
    """Raise :class:`DiskFullError` unless the file system of ``path`` has room for
    ``needed`` bytes of ``what`` and a margin, before anything is written."""
    free = free_bytes(path)
    if free < needed * margin:
        raise DiskFullError(
            f"not enough free disk space for {what} at {path}: {format_bytes(free)} free, "
            f"about {format_bytes(needed * margin)} needed; free some space or pick another "
            "output path"
        )


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it was raised from) says the disk or quota is full."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(word in str(exc).lower() for word in _DISK_FULL_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(what: str, where: str | Path, after: str = "") -> DiskFullError:
    """The message for a write that ran out of disk: the folder and its free space."""
    return DiskFullError(
        f"disk full while writing {what} in {where} ({format_bytes(free_bytes(where))} free)"
        f"{after}; free some space or pick another folder"
    )


def refuse_existing(path: Path, force: bool) -> None:
    """Raise unless ``path`` is free, or ``force`` allows replacing it."""
    if path.exists() and not force and not (path.is_dir() and not any(path.iterdir())):
        raise OutputExistsError(f"{path} exists; pass force=True (--force) to replace it")


def _umask() -> int:
    # os.umask can only be read by setting it: set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_published(path: str | Path) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the permissions a file the
    user writes gets (``0o666``/``0o777`` less the umask): ``tempfile`` makes its files and
    directories private (0600/0700), and an export renamed from one would stay unreadable
    to the service account of vLLM, Ollama or llama.cpp."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        for directory, _, files in os.walk(path):
            os.chmod(directory, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(directory, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; it becomes ``path`` only on success,
    with the permissions the user's umask gives (:func:`as_published`), not tempfile's 0700.

    The old ``path`` (replaced only with ``force``) survives until the new one is in place,
    and on any error the temporary directory is removed and ``path`` is left untouched.
    """
    path = Path(path).expanduser().resolve()
    refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        as_published(staging)
        if path.exists():
            retired = staging.with_suffix(".old")
            path.rename(retired)
            staging.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise disk_full_error(path.name, path.parent, ": nothing of it was kept") from exc
        raise


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` beside it first, then rename: a crash or a full disk
    mid-write leaves the old file (or none), never half of a new one."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(text, encoding="utf-8")
        as_published(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path
