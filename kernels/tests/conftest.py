"""Shared setup of the kernel tests: device, interpreter, tolerances, poisoned outputs.

On a machine without CUDA the kernels run in Triton's CPU interpreter; that must be
switched on before triton is first imported, hence here, at collection time.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"

#: (atol, rtol) per dtype for outputs compared against the fp32-computed reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = list(TOLERANCES)


def assert_close(actual, expected, dtype, *, scale=1.0, what=""):
    """Compare with the tolerance of ``dtype`` (widened by ``scale``); NaN never passes."""
    atol, rtol = TOLERANCES[dtype]
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (an element left unwritten?)"
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale, msg=lambda m: f"{what}: {m}"
    )


def poisoned(shape, dtype, device=DEVICE):
    """An output buffer filled with NaN, so an element a kernel forgets to write fails."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


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
