"""Reference dequantisation of bitsandbytes' 4-bit (NF4 and FP4) weights, in pure torch.

Layout (bitsandbytes 0.4x-0.5x, ``bitsandbytes.functional.quantize_4bit``): the weight is
flattened row-major, cut into blocks of ``quant_state.blocksize`` values (the last block
may be short), each block scaled by its absmax into [-1, 1] and rounded to the nearest of
16 code values. Two 4-bit codes share a byte, the earlier element in the high nibble;
the packed tensor is ``[(numel + 1) // 2, 1]`` of ``quant_storage`` (usually uint8).
With double quantisation (``quant_state.nested``) the fp32 absmax are themselves stored as
uint8 codes into ``state2.code`` (a 256-entry dynamic map), scaled per ``state2.blocksize``
block by ``state2.absmax``, after subtracting ``quant_state.offset``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# bitsandbytes.functional.get_4bit_type: quantiles of N(0, 1), index order == value order.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, normalised by its max (12).
_FP4 = tuple(
    v / 12.0
    for v in (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
    + (-0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
)
_CODES = {"nf4": NF4_CODE, "fp4": _FP4}


def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    try:
        values = _CODES[quant_type]
    except KeyError:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}") from None
    return torch.tensor(values, dtype=torch.float32, device=device)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    # Pad to whole blocks so a short last block shares the broadcast with the others.
    n = values.numel()
    blocks = math.ceil(n / blocksize)
    padded = torch.nn.functional.pad(values, (0, blocks * blocksize - n))
    scaled = padded.view(blocks, blocksize) * absmax[:blocks].float().view(-1, 1)
    return scaled.reshape(-1)[:n]


def _absmax(quant_state: Any) -> torch.Tensor:
    if not getattr(quant_state, "nested", False):
        return quant_state.absmax.float()
    state2 = quant_state.state2
    codes = quant_state.absmax.reshape(-1)
    values = state2.code.to(device=codes.device, dtype=torch.float32)[codes.long()]
    absmax = _scale_blocks(values, state2.absmax, state2.blocksize)
    offset = quant_state.offset
    if isinstance(offset, torch.Tensor):
        offset = offset.to(absmax.device)
    return (absmax + offset).float()


def dequantize_nf4(
    data: torch.Tensor, quant_state: Any, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Unpack a bitsandbytes 4-bit weight into a dense tensor, as ``dequantize_4bit`` does.

    Args:
        data: the packed weight (``Params4bit`` or its data), ``[(numel + 1) // 2, 1]`` of
            uint8 or of another ``quant_storage`` dtype (reinterpreted as bytes).
        quant_state: duck-typed ``bitsandbytes.functional.QuantState``: ``absmax``,
            ``shape``, ``dtype``, ``blocksize``, ``quant_type`` (``"nf4"`` or ``"fp4"``),
            ``nested``, and when nested ``offset`` and ``state2`` (``absmax``, ``code``,
            ``blocksize``).
        dtype: output dtype; defaults to ``quant_state.dtype``.

    Returns:
        ``quant_state.shape`` in ``dtype``; codes are scaled in fp32 and cast once.

    Raises:
        ValueError: unknown ``quant_type``, or a weight bitsandbytes repacked for its CPU
            inference kernel (``quant_state.packing_format_for_cpu``).
    """
    if getattr(quant_state, "packing_format_for_cpu", False):
        # bnb repacks CPU weights for its AVX512 inference kernel in another layout.
        raise ValueError("quant_state uses bitsandbytes' CPU inference packing; not supported")
    packed = data.detach()
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1)
    shape = tuple(quant_state.shape)
    n = math.prod(shape)
    # High nibble first: element 2i is byte i >> 4, element 2i + 1 is byte i & 0xF.
    indices = torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)[:n]
    values = _code(quant_state.quant_type, packed.device)[indices.long()]
    out = _scale_blocks(values, _absmax(quant_state), quant_state.blocksize)
    return out.reshape(shape).to(dtype or quant_state.dtype)
