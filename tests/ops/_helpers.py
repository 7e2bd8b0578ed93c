"""Helpers shared by the reference-op tests: fresh random sizes and a strict comparison."""

from __future__ import annotations

# The test's recorded seed (see conftest.py) and random sizes drawn from it.
from sloth_core.testing.seeds import draw  # noqa: F401

#: fp32 error allowed against the Hugging Face module or function replaced, per unit of
#: the expected value's magnitude (absolute where that is below 1).
TOL = 1e-5


def assert_close(actual, expected, what, tol=TOL):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    err = (actual.double() - expected.double()).abs().max().item()
    # fp32 keeps ~7 digits: a loss of 200 (a sum over few items) is only good to ~2e-5
    # absolute, however right the computation. Scale by the magnitude, never below 1.
    scale = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} x {scale:.3g}"
