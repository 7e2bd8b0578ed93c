"""Errors sloth raises on purpose: each says what went wrong and what to do about it."""

from __future__ import annotations

import errno


class SlothError(Exception):
    """Base class of sloth's own errors; the command line exits with ``exit_code``."""

    exit_code = 1


class PluginMissingError(SlothError):
    """A requested feature needs a plugin that is not installed (the message names it)."""


class UnsafeWeightsError(SlothError):
    """A model directory holds only pickled weights and the caller did not allow them."""


class ModelNotFoundError(SlothError):
    """The model name is neither a local directory with a model nor a reachable hub id."""


class OutputExistsError(SlothError):
    """An output path exists and ``force`` was not given: nothing was overwritten."""


class DiskFullError(SlothError, OSError):
    """The disk (or quota) filled up while writing; what was being written was not kept.

    An ``OSError`` with ``errno.ENOSPC``, as the write that failed would have raised."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


class UntrustedCodeError(SlothError):
    """A model asks to run code of its own and the caller did not pass ``trust_remote_code``."""


class Interrupted(SlothError):
    """Ctrl-C: the message says where the work stopped and what was kept."""

    exit_code = 130
