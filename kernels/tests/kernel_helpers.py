"""What the kernel tests share: device, tolerances, comparisons, poisoned outputs.

A module of its own, not ``conftest``: several test folders of the repository have a
``conftest.py``, and ``from conftest import ...`` would get whichever was imported first.
On a machine without CUDA the kernels run in Triton's CPU interpreter; that must be
switched on before triton is first imported, hence here (conftest imports this first).
"""

from __future__ import annotations

import os

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

#: How many times torch's own low-precision error (vs fp32) a kernel's may be, for
#: results judged with :func:`sloth_core.testing.rounding.assert_near_fp32`. On a GPU a
#: kernel rounds as torch does (~1x); Triton's CPU interpreter truncates fp32 -> bf16
#: instead of rounding, twice the error and biased: fused linear cross entropy's
#: gradients measured up to 1.9x per tensor and 2.3x on the worst row.
LOWP_FACTOR = 2.0 if HAS_CUDA else 4.0
#: Added to that bound: fp32 against fp32 in another summation order (measured 4.5e-6 on
#: the worst row of a weight gradient, 3e-7 on whole tensors).
FP32_FLOOR = 2e-5


def assert_close(actual, expected, dtype, *, scale=1.0, what=""):
    """Compare with the tolerance of ``dtype`` (widened by ``scale``); NaN never passes."""
    atol, rtol = TOLERANCES[dtype]
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (an element left unwritten?)"
    torch.testing.assert_close(
        actual.float(),
        expected.float(),
        atol=atol * scale,
        rtol=rtol * scale,
        msg=lambda m: f"{what}: {m}",
    )


def poisoned(shape, dtype, device=DEVICE):
    """An output buffer filled with NaN, so an element a kernel forgets to write fails."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def peak_bytes_above_inputs(fn):
    """CUDA bytes allocated at the peak of ``fn()`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
