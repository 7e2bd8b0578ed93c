"""Helpers shared by the reference-op tests: fresh random sizes and a strict comparison."""

from __future__ import annotations

# The test's recorded seed (see conftest.py) and random sizes drawn from it.
from sloth_core.testing.seeds import draw  # noqa: F401

#: fp32 max abs error allowed against the Hugging Face module or function replaced.
TOL = 1e-5


def assert_close(actual, expected, what, tol=TOL):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"
