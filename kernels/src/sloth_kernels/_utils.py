"""Small helpers shared by the kernels: launch sizing and where kernels may run."""

from __future__ import annotations

import functools
import os

import torch

#: Largest row a single program of the row-wise kernels holds in registers.
MAX_FUSED_SIZE = 65536


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_devices() -> tuple[str, ...]:
    """Device types the kernels serve: CUDA, and the CPU under the interpreter (for CI)."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports and can run here (a GPU, or the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return interpreting() or torch.cuda.is_available()


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_launch(n_cols: int) -> tuple[int, int]:
    """``(BLOCK_SIZE, num_warps)`` for a kernel that holds one row of ``n_cols``."""
    block = next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"rows of {n_cols} elements exceed the fused limit {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps
