"""pytest plugin ``sloth``: fixtures for testing sloth and sloth plugins offline."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # No test may reach a model hub; set before transformers reads it at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op torch thread for a test module, the previous count restored after it.

    Tiny models' matrices are too small to split, and on a shared machine threads only
    contend (a 48x64 @ 64x128 linear measured 15 ms on 2 busy cores instead of 10 us).
    Opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def plugin_manager() -> Iterator[Any]:
    """A fresh plugin manager with the built-ins and no entry points, made process-wide.

    The public API (``FastLanguageModel``, ``sloth_core.export``) uses it for the test's
    duration, so installed plugins cannot change what a test sees.
    """
    import sloth_core.plugins as plugins

    manager = plugins.SlothPluginManager(entry_points=False)
    previous = plugins.reset_plugin_manager(manager)
    try:
        yield manager
    finally:
        plugins.reset_plugin_manager(previous)


@pytest.fixture
def register_plugin(plugin_manager: Any) -> Callable[..., Any]:
    """Register an object or module as a plugin on the test's plugin manager."""

    def register(plugin: object, name: str | None = None) -> Any:
        record = plugin_manager.register(plugin, name=name)
        if record.status != "active":
            raise AssertionError(f"plugin {record.name} did not register: {record.reason}")
        return record

    return register


@pytest.fixture
def make_tiny_model(tmp_path: Path) -> Callable[..., Path]:
    """``make_tiny_model("llama", **config_overrides)`` writes a tiny model under tmp_path."""
    from sloth_core.testing.models import tiny_model

    counter = iter(range(1_000_000))

    def make(arch: str, **overrides: Any) -> Path:
        return tiny_model(arch, tmp_path / f"{arch}-{next(counter)}", **overrides)

    return make
