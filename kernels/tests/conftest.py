"""Shared setup of the kernel tests: device, interpreter, tolerances, poisoned outputs,
and a fresh recorded seed per test (a failure prints ``SLOTH_TEST_SEED=... pytest ...``
to replay its inputs; :mod:`sloth_core.testing.seeds`).

On a machine without CUDA the kernels run in Triton's CPU interpreter; that must be
switched on before triton is first imported, hence here, at collection time.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, HAS_CUDA

from sloth_core.testing.seeds import pytest_runtest_makereport, seed  # noqa: F401


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    """Every float buffer a kernel wrapper allocates starts as NaN (or a poison integer).

    Kernels allocate their outputs with ``torch.empty``/``torch.empty_like``; filled with
    NaN here, any element a kernel forgets to write shows up in the comparison.
    """
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
