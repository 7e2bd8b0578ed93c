"""Dequantisation of bitsandbytes' NF4 weights in one Triton kernel.

Layout (as :func:`sloth_core.ops.reference.dequantize_nf4` documents it): the weight is
flattened row-major and cut into blocks of ``blocksize`` values; two 4-bit codes share a
byte, the earlier element in the high nibble; each block is scaled by its absmax. With
double quantisation the absmax are uint8 codes into ``state2.code``, scaled per
``state2.blocksize`` block by ``state2.absmax``, plus ``quant_state.offset``.

One program handles many whole quantisation blocks: a ``[blocks, blocksize // 2]`` tile of
packed bytes (16-byte vector loads), one scale per block computed once (the nested
absmax decoded in the same kernel), and a contiguous, interleaved ``[blocks, blocksize]``
tile of outputs (16-byte vector stores). The 16 code values are either gathered from a
64-byte table that stays in L1 (the default: one load per value, cheap next to the
memory traffic) or selected from constants in registers by a 4-level ``where`` tree
(15 selects per value; see :data:`CODE_IN_REGISTERS`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from sloth_core.ops import reference
from sloth_core.ops.reference.nf4 import NF4_CODE
from sloth_kernels._utils import interpreting, next_power_of_2

#: Packed bytes per program (4096 bytes = 8192 values): enough work per program to keep
#: several 16-byte loads in flight per thread and amortise the per-block scales.
BYTES_PER_PROGRAM = 4096
_NUM_WARPS = 4

#: ``False``: look codes up in a 16-entry fp32 table in global memory (L1-resident).
#: ``True``: pick them from constants in registers with a select tree. The table costs one
#: load per value, the tree ~19 ALU instructions per value, which on an H200 is about the
#: time the kernel's memory traffic takes; the gpu-marked test times both.
CODE_IN_REGISTERS = False

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_tables: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _nf4_from_registers(nibble):
    """The NF4 value of each 4-bit code, by a binary tree of selects on its bits."""
    b0 = (nibble & 1) != 0
    b1 = (nibble & 2) != 0
    b2 = (nibble & 4) != 0
    b3 = (nibble & 8) != 0
    v01 = tl.where(b0, -0.6961928009986877, -1.0)
    v23 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
    v45 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
    v67 = tl.where(b0, 0.0, -0.09105003625154495)
    v89 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
    vab = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
    vcd = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
    vef = tl.where(b0, 1.0, 0.7229568362236023)
    v03 = tl.where(b1, v23, v01)
    v47 = tl.where(b1, v67, v45)
    v8b = tl.where(b1, vab, v89)
    vcf = tl.where(b1, vef, vcd)
    v07 = tl.where(b2, v47, v03)
    v8f = tl.where(b2, vcf, v8b)
    return tl.where(b3, v8f, v07).to(tl.float32)


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    out_ptr,
    n_bytes,
    n_elements,
    n_blocks,
    blocksize2,
    HALF: tl.constexpr,
    BLOCKS: tl.constexpr,
    NESTED: tl.constexpr,
    CODE_IN_REGS: tl.constexpr,
):
    # 64-bit only in the per-program base; offsets inside the tile fit in 32 bits.
    first = tl.program_id(0).to(tl.int64) * BLOCKS
    blocks_left = tl.minimum(n_blocks - first, BLOCKS).to(tl.int32)
    bytes_left = tl.minimum(n_bytes - first * HALF, BLOCKS * HALF).to(tl.int32)
    values_left = tl.minimum(n_elements - first * (2 * HALF), BLOCKS * 2 * HALF).to(tl.int32)

    # One scale per quantisation block, decoded once for its blocksize values.
    rows = tl.arange(0, BLOCKS)
    row_mask = rows < blocks_left
    if NESTED:
        q = tl.load(absmax_ptr + first + rows, mask=row_mask, other=0).to(tl.int32)
        block2 = (first + rows) // blocksize2
        scale2 = tl.load(absmax2_ptr + block2, mask=row_mask, other=0.0).to(tl.float32)
        # Launched without FMA contraction: bitsandbytes rounds the product, then adds.
        scale = tl.load(code2_ptr + q).to(tl.float32) * scale2
        scale = scale + tl.load(offset_ptr).to(tl.float32)
    else:
        scale = tl.load(absmax_ptr + first + rows, mask=row_mask, other=0.0).to(tl.float32)

    byte_offsets = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    packed = tl.load(
        packed_ptr + first * HALF + byte_offsets,
        mask=byte_offsets < bytes_left,
        other=0,
        eviction_policy="evict_first",  # read once: keep L1/L2 for the code table
    ).to(tl.int32)
    high = packed >> 4
    low = packed & 15
    if CODE_IN_REGS:
        high_value = _nf4_from_registers(high)
        low_value = _nf4_from_registers(low)
    else:
        high_value = tl.load(code_ptr + high)
        low_value = tl.load(code_ptr + low)
    high_value = high_value * scale[:, None]
    low_value = low_value * scale[:, None]
    # Element 2i is byte i's high nibble: interleave into one contiguous row per block.
    values = tl.interleave(high_value, low_value)
    out_offsets = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    tl.store(
        out_ptr + first * (2 * HALF) + out_offsets,
        values.to(out_ptr.dtype.element_ty),
        mask=out_offsets < values_left,
    )


def _code_table(device: torch.device) -> torch.Tensor:
    table = _tables.get(device)
    if table is None:
        table = _tables[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return table


def _kernel_serves(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> bool:
    if packed.device.type != "cuda" and not (interpreting() and packed.device.type == "cpu"):
        return False
    if getattr(quant_state, "quant_type", None) != "nf4" or dtype not in _OUT_DTYPES:
        return False
    blocksize = int(quant_state.blocksize)
    # An even power of two keeps both nibbles of a byte in one block and the tile a power of 2.
    if blocksize < 2 or blocksize & (blocksize - 1):
        return False
    if getattr(quant_state, "nested", False):
        state2 = quant_state.state2
        if quant_state.absmax.dtype != torch.uint8 or int(state2.blocksize) < 1:
            return False
        if state2.code.device != packed.device or state2.absmax.device != packed.device:
            return False
    return quant_state.absmax.device == packed.device


def _as_bytes(data: torch.Tensor) -> torch.Tensor:
    packed = data.detach()
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    return packed.reshape(-1)


def dequantize_nf4(
    data: torch.Tensor, quant_state: Any, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Unpack a bitsandbytes NF4 weight into a dense ``quant_state.shape`` tensor.

    Same signature and result as :func:`sloth_core.ops.reference.dequantize_nf4` (and
    bitsandbytes' ``dequantize_4bit``): codes are scaled in fp32 and cast once to
    ``dtype`` (default ``quant_state.dtype``). Double quantisation is decoded in the same
    kernel. FP4, a blocksize that is not a power of two, an output dtype other than
    fp32/fp16/bf16, or tensors on a device Triton does not serve use the reference.

    Args:
        data: the packed weight, ``[(numel + 1) // 2, 1]`` of uint8 or another
            ``quant_storage`` dtype (reinterpreted as bytes).
        quant_state: duck-typed ``bitsandbytes.functional.QuantState``.
        dtype: output dtype.
    """
    out_dtype = dtype or quant_state.dtype
    if not _kernel_serves(data, quant_state, out_dtype):
        return reference.dequantize_nf4(data, quant_state, dtype=dtype)
    packed = _as_bytes(data)
    shape = tuple(quant_state.shape)
    n = math.prod(shape)
    out = torch.empty(shape, dtype=out_dtype, device=packed.device)
    if n == 0:
        return out
    blocksize = int(quant_state.blocksize)
    half = blocksize // 2
    n_blocks = triton.cdiv(n, blocksize)
    blocks_per_program = max(1, next_power_of_2(max(1, BYTES_PER_PROGRAM // half)))
    device = packed.device
    absmax = quant_state.absmax.reshape(-1)
    if absmax.numel() < n_blocks:
        raise ValueError(
            f"quant_state has {absmax.numel()} absmax for {n_blocks} blocks of {blocksize}"
        )
    nested = bool(getattr(quant_state, "nested", False))
    if nested:
        state2 = quant_state.state2
        code2, absmax2 = state2.code.reshape(-1), state2.absmax.reshape(-1)
        offset = quant_state.offset
        if not isinstance(offset, torch.Tensor) or offset.device != device:
            offset = torch.as_tensor(offset, dtype=torch.float32).to(device)
        blocksize2 = int(state2.blocksize)
    else:
        code2 = absmax2 = offset = absmax  # unused by the kernel when not NESTED
        blocksize2 = 1
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    _dequantize_nf4_kernel[grid](
        packed,
        absmax,
        _code_table(device),
        code2,
        absmax2,
        offset,
        out,
        packed.numel(),
        n,
        n_blocks,
        blocksize2,
        HALF=half,
        BLOCKS=blocks_per_program,
        NESTED=nested,
        CODE_IN_REGS=CODE_IN_REGISTERS,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out


REGISTRATIONS = [
    # The registry dispatches on the packed weight (uint8 or another quant_storage dtype).
    {"op": "dequantize_nf4", "fn": dequantize_nf4, "dtypes": None},
]
