"""Judging a bf16 or fp16 result by the rounding error it is allowed, not a fixed tolerance.

A fixed tolerance on a low-precision gradient passes a gradient that is all zeros once
the values are below it (max |dhidden| of 0.014 under an atol of 2e-2), and one scaled
by 0.9 once it is loose enough for bf16's noise. Here the truth is an fp32 run of the
same computation on the same (already rounded) inputs; torch's own run in the low
precision says how far rounding alone puts a result from it; the result under test may
be at most ``factor`` times as far off, plus a small ``floor`` (what fp32 itself may
differ by). This is how :mod:`sloth_core.testing.parity` judges bf16 models.

Errors are relative L2 norms: a zero, sign-flipped or 0.9-scaled result is 1, 2 or 0.1
off whatever the values' size. With ``rows=True`` each row is also judged relative to
its own norm, against the worst row of the baseline: a gradient's rows can differ in
size by orders of magnitude (the lm_head rows of tokens no label names), and in the
whole tensor's norm the small ones would not count.
"""

from __future__ import annotations

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor, *, rows: bool = False):
    """``||actual - expected|| / ||expected||`` in float64: a float, or per row (the first
    dimension; the rest flattened) a tensor. A zero ``expected`` gives 0 if ``actual`` is
    zero too, else inf."""
    diff = actual.detach().double() - expected.detach().double()
    ref = expected.detach().double()
    if rows:
        diff, ref = diff.reshape(diff.shape[0], -1), ref.reshape(ref.shape[0], -1)
        num, den = diff.norm(dim=1), ref.norm(dim=1)
    else:
        num, den = diff.norm(), ref.norm()
    error = num / den
    error = torch.where(num == 0, torch.zeros_like(error), error)  # 0/0: both zero
    return error if rows else error.item()


def assert_near_fp32(
    actual: torch.Tensor,
    expected: torch.Tensor,
    baseline: torch.Tensor,
    *,
    factor: float,
    floor: float,
    rows: bool = True,
    row_floor: torch.Tensor | None = None,
    what: str = "",
) -> None:
    """Assert ``actual`` is within ``factor`` times ``baseline``'s error of ``expected``.

    Args:
        actual: the low-precision result under test.
        expected: the same computation in fp32 on the same (rounded) inputs.
        baseline: torch's own low-precision result of it (the reference op in bf16).
        factor: how many times the baseline's error ``actual`` may be off.
        floor: added to the bound: the error fp32 itself may have (summation order).
        rows: also judge each row (first dimension) by its own norm, against the
            baseline's worst row; off for tensors whose rows are a handful of values.
        row_floor: ``floor`` per row for that judgment, where rows differ in how much
            fp32 itself may be off (a sum whose terms cancel: its error is relative to
            the terms, not to the sum).
        what: the start of the failure message (shape, dtype, seed).
    """
    assert actual.shape == expected.shape == baseline.shape, (
        f"{what}: shapes {tuple(actual.shape)}, {tuple(expected.shape)}, {tuple(baseline.shape)}"
    )
    assert not torch.isnan(actual).any(), f"{what}: NaN (an element left unwritten?)"
    error, base = relative_error(actual, expected), relative_error(baseline, expected)
    bound = factor * base + floor
    assert error <= bound, (
        f"{what}: relative L2 error {error:.3e} vs fp32 > {bound:.3e} "
        f"({factor:g} x torch's own {base:.3e} + {floor:g})"
    )
    if not rows or actual.dim() == 0 or actual.shape[0] < 2:
        return
    errors = relative_error(actual, expected, rows=True)
    base_rows = relative_error(baseline, expected, rows=True)
    finite = base_rows[base_rows.isfinite()]
    base_worst = finite.max().item() if finite.numel() else 0.0
    floors = torch.full_like(errors, floor) if row_floor is None else row_floor.to(errors)
    bounds = factor * base_worst + floors
    worst = int((errors - bounds).argmax())  # the row furthest past its own bound
    assert errors[worst] <= bounds[worst], (
        f"{what}: row {worst} relative L2 error {errors[worst]:.3e} vs fp32 > "
        f"{bounds[worst]:.3e} ({factor:g} x torch's worst row {base_worst:.3e} + "
        f"{floors[worst]:g})"
    )
