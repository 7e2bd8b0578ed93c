"""Errors sloth raises on purpose: each says what went wrong and what to do about it."""

from __future__ import annotations


class SlothError(Exception):
    """Base class of sloth's own errors."""


class PluginMissingError(SlothError):
    """A requested feature needs a plugin that is not installed (the message names it)."""


class UnsafeWeightsError(SlothError):
    """A model directory holds only pickled weights and the caller did not allow them."""


class ModelNotFoundError(SlothError):
    """The model name is neither a local directory with a model nor a reachable hub id."""


class OutputExistsError(SlothError):
    """An output path exists and ``force`` was not given: nothing was overwritten."""
