"""sloth_core.testing.rounding: low-precision results judged by torch's own rounding error."""

from __future__ import annotations

import math

import pytest
import torch

from sloth_core.testing.rounding import assert_near_fp32, relative_error


def test_relative_error_of_zero_rows():
    expected = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert relative_error(expected, expected) == 0.0
    rows = relative_error(torch.tensor([[1.0, 0.0], [0.0, 1e-30]]), expected, rows=True)
    assert rows[0] == 0 and math.isinf(rows[1])  # anything where zero is expected fails


def test_bound_is_a_multiple_of_the_baseline_error_per_tensor_and_per_row():
    g = torch.Generator().manual_seed(0)
    # Rows of very different sizes, as a weight gradient's vocabulary rows are.
    expected = torch.randn(50, 8, generator=g) * torch.logspace(0, -6, 50)[:, None]
    baseline = expected.bfloat16().float()  # one rounding
    assert_near_fp32(baseline, expected, baseline, factor=1.0, floor=0.0)
    for bad in (expected * 0.9, -expected, torch.zeros_like(expected)):
        with pytest.raises(AssertionError, match="relative L2"):
            assert_near_fp32(bad, expected, baseline, factor=2.0, floor=1e-5)
    # Rows 30-49 (below 2e-4 of the largest) zeroed: unseen in the norm of the whole.
    small_rows_zeroed = torch.where(torch.arange(50)[:, None] >= 30, 0.0, expected)
    assert_near_fp32(small_rows_zeroed, expected, baseline, factor=2.0, floor=1e-5, rows=False)
    with pytest.raises(AssertionError, match="row"):
        assert_near_fp32(small_rows_zeroed, expected, baseline, factor=2.0, floor=1e-5)
