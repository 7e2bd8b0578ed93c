"""Fixtures of sloth-bnb's tests: one thread, and the two plugin sets models load with."""

from __future__ import annotations

import pytest
from sloth_bnb import plugin

from sloth_core.testing import installed_manager


@pytest.fixture(scope="module", autouse=True)
def _single_thread(single_thread):
    """Every module of sloth-bnb's tests on one thread (the core's ``single_thread``)."""


@pytest.fixture
def bnb_only(plugin_manager, register_plugin):
    """The core's built-ins and sloth-bnb, made process-wide: models load quantized and
    unpatched (transformers' own forwards, bitsandbytes' own ``Linear4bit.forward``)."""
    register_plugin(plugin, name=plugin.PLUGIN)
    return plugin_manager


@pytest.fixture(scope="module")
def installed():
    """Every installed plugin, as users get them: sloth-bnb, sloth-llama, sloth-kernels."""
    return installed_manager("sloth-bnb", "sloth-llama")


@pytest.fixture
def llama_dir(make_tiny_model):
    """A tiny llama checkpoint (hidden 64, intermediate 128, 2 layers) written to tmp_path."""
    return make_tiny_model("llama")
