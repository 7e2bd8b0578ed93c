"""Fixtures of sloth-fp8's tests: one thread, and the plugins models load with."""

from __future__ import annotations

import pytest

from sloth_core.testing import installed_manager


@pytest.fixture(scope="module", autouse=True)
def _single_thread(single_thread):
    """Every module of sloth-fp8's tests on one thread (the core's ``single_thread``)."""


@pytest.fixture(scope="module")
def installed():
    """sloth-fp8 with the architecture plugin and kernels users install beside it."""
    return installed_manager("sloth-fp8", "sloth-llama")
