"""The gated activation with the gate and up adapters' thin products added in the kernel.

A LoRA projection's output is ``e = x W^T + s (x A^T) B^T``. With a dense base the thin
product is written first and the base GEMM accumulates onto it in its epilogue, at no
extra pass. A base whose product cannot accumulate (FP8's ``_scaled_mm`` has no beta)
had the thin product added after, ``addmm_`` over the whole ``[N, I]`` output: a read
and a write of gate's and of up's, 30 ms of a 547 ms FP8 llama-8b step on an H100
(docs/benchmarks.md, session 22). Here the MLP keeps the base products ``e0`` and
``u0`` and the kernels add the adapters where they read them, a tile at a time:
``e = e0 + s (x A^T)[rows] B^T[:, cols]``, a ``tl.dot`` of the ``[BM, r]`` rows of
``x A^T`` (the group's stacked ``[N, sum r]``) with ``[r, BN]`` of ``B^T`` in float32,
rounded to the dtype as ``addmm_`` rounds its output. Forward and backward compute the
same ``e`` and ``u`` from the same tiles, so the backward recomputes exactly what the
forward multiplied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sloth_kernels.activations import _GELU_ERF, _GELU_TANH, _SILU, _act_and_grad

#: The launch: ``BM`` rows and ``BN`` columns of ``[N, I]`` a program (``tl.dot`` needs
#: at least 16 of each), warps, and whether the thin product runs through ``tl.dot``
#: (``1``) or as outer products a rank at a time (``0``). ``SLOTH_GATED_LORA_TILE`` =
#: ``"BM,BN,WARPS,DOT"`` overrides it (``scripts/gated_lora_tiles_gpu.py`` times them).
TILE_ENV = "SLOTH_GATED_LORA_TILE"
_TILE = (32, 128, 4, 1)


def _tile() -> tuple[int, int, int, int]:
    text = os.environ.get(TILE_ENV)
    if not text:
        return _TILE
    try:
        bm, bn, warps, dot = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{TILE_ENV} must be BM,BN,WARPS,DOT (integers), got {text!r}") from None
    if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1) or warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{TILE_ENV}: BM and BN powers of two >= 16, WARPS 1 to 16, got {text!r}")
    return bm, bn, warps, dot


#: The largest rank served (the padded rank is a power of two, at least 16): a tile of
#: ``x A^T`` and one of ``B^T`` stay in registers.
MAX_RANK = 128
_ACTS = {"swiglu": _SILU, "geglu": _GELU_ERF, "geglu_tanh": _GELU_TANH}


@dataclass(frozen=True)
class Addend:
    """One projection's adapter, added in the kernel: the columns ``[start, start + rank)``
    of the stacked ``x A^T``, ``B`` ``[I, rank]`` and the scaling ``s``."""

    start: int
    rank: int
    b: torch.Tensor
    scaling: float


@dataclass(frozen=True)
class Addends:
    """What the kernels add to gate's and up's base products: ``xa`` (``[N, sum r]``, the
    group's stacked ``x A^T``) and each projection's :class:`Addend` (``None``: none)."""

    xa: torch.Tensor
    gate: Addend | None
    up: Addend | None

    def rows(self, start: int, stop: int) -> Addends:
        """The same adapters for rows ``start:stop`` of the products."""
        return Addends(self.xa[start:stop], self.gate, self.up)


def serves(rank: int) -> bool:
    """Whether the kernels take an adapter of this rank."""
    return 0 < rank <= MAX_RANK


@triton.jit
def _with_adapter(
    base_ptr, offsets, mask, xa_ptr, b_ptr, scaling, rows, cols, row_mask, col_mask,
    stride_xa, R: tl.constexpr, RP: tl.constexpr, IEEE: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """``base + s (x A^T) B^T`` on a ``[BM, BN]`` tile, in float32, rounded to the dtype."""
    value = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if R > 0:
        if DOT:
            k = tl.arange(0, RP)
            k_mask = k < R
            xa = tl.load(
                xa_ptr + rows[:, None] * stride_xa + k[None, :],
                mask=row_mask[:, None] & k_mask[None, :], other=0.0,
            ).to(tl.float32)  # fmt: skip
            # B is [I, R], row-major: the tile of B^T is one contiguous block of B.
            b_t = tl.load(
                b_ptr + cols[None, :] * R + k[:, None],
                mask=k_mask[:, None] & col_mask[None, :], other=0.0,
            ).to(tl.float32)  # fmt: skip
            # 16-bit values are exact in tf32 (bf16's 8 and fp16's 11 significant bits fit
            # its 11); float32 ones are not, and take the full-precision product.
            if IEEE:
                thin = tl.dot(xa, b_t, input_precision="ieee")
            else:
                thin = tl.dot(xa, b_t)
        else:
            # An outer product a rank at a time, in the tile's own layout: no tensor cores,
            # and no move of the product from their layout into the tile's.
            thin = tl.zeros(value.shape, dtype=tl.float32)
            for k in range(R):
                xa_k = tl.load(xa_ptr + rows * stride_xa + k, mask=row_mask, other=0.0)
                b_k = tl.load(b_ptr + cols * R + k, mask=col_mask, other=0.0)
                thin += xa_k.to(tl.float32)[:, None] * b_k.to(tl.float32)[None, :]
        value = value + scaling * thin
    return value.to(base_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _gate_and_up(
    gate_ptr, up_ptr, xa_ptr, bg_ptr, bu_ptr, sg, su, n_rows, n_cols, stride_xa, start_g,
    start_u, RG: tl.constexpr, RU: tl.constexpr, RP: tl.constexpr, IEEE: tl.constexpr,
    DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """This program's tile of gate's and up's sums with their adapters, and where it lies:
    ``(g, u, offsets, mask)``."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_mask, col_mask = rows < n_rows, cols < n_cols
    offsets = rows[:, None] * n_cols + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    g = _with_adapter(gate_ptr, offsets, mask, xa_ptr + start_g, bg_ptr, sg, rows, cols,
                      row_mask, col_mask, stride_xa, RG, RP, IEEE, DOT)  # fmt: skip
    u = _with_adapter(up_ptr, offsets, mask, xa_ptr + start_u, bu_ptr, su, rows, cols,
                      row_mask, col_mask, stride_xa, RU, RP, IEEE, DOT)  # fmt: skip
    return g, u, offsets, mask


@triton.jit
def _gated_lora_forward_kernel(
    gate_ptr, up_ptr, out_ptr, xa_ptr, bg_ptr, bu_ptr, sg, su, n_rows, n_cols, stride_xa,
    start_g, start_u, RG: tl.constexpr, RU: tl.constexpr, RP: tl.constexpr,
    IEEE: tl.constexpr, DOT: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr,
):  # fmt: skip
    g, u, offsets, mask = _gate_and_up(gate_ptr, up_ptr, xa_ptr, bg_ptr, bu_ptr, sg, su,
                                       n_rows, n_cols, stride_xa, start_g, start_u, RG, RU,
                                       RP, IEEE, DOT, BM, BN)  # fmt: skip
    a, _ = _act_and_grad(g, ACT, False)
    # torch rounds the activation to the input dtype before multiplying by ``up``: so do we.
    a = a.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offsets, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_lora_backward_kernel(
    grad_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, xa_ptr, bg_ptr, bu_ptr, sg, su,
    n_rows, n_cols, stride_xa, start_g, start_u, RG: tl.constexpr, RU: tl.constexpr,
    RP: tl.constexpr, IEEE: tl.constexpr, DOT: tl.constexpr, ACT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    # dgate/dup may alias gate/up: every element is loaded before it is stored, and no two
    # programs touch the same element (the adapters' terms read x A^T and B only).
    g, u, offsets, mask = _gate_and_up(gate_ptr, up_ptr, xa_ptr, bg_ptr, bu_ptr, sg, su,
                                       n_rows, n_cols, stride_xa, start_g, start_u, RG, RU,
                                       RP, IEEE, DOT, BM, BN)  # fmt: skip
    dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT, True)
    tl.store(dgate_ptr + offsets, (dy * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, (dy * a).to(dup_ptr.dtype.element_ty), mask=mask)


def _arguments(gate: torch.Tensor, up: torch.Tensor, addends: Addends, activation: str):
    """The kernels' shared arguments after their tensors' checks: what follows the
    output pointers, as positional and keyword arguments."""
    if activation not in _ACTS:
        raise ValueError(f"activation must be one of {tuple(_ACTS)}, got {activation!r}")
    if gate.dim() != 2 or gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must be alike [N, I], got {gate.shape} and {up.shape}")
    if not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("gate and up must be contiguous")
    xa = addends.xa
    if xa.dim() != 2 or xa.shape[0] != gate.shape[0] or xa.stride(1) != 1:
        raise ValueError(f"x A^T must be [N, sum r] with unit column stride, got {xa.shape}")
    ranks, pointers, starts, scalings = [], [], [], []
    for addend in (addends.gate, addends.up):
        if addend is None:  # no adapter: rank 0 (the kernel reads no B); any pointer
            ranks.append(0)
            pointers.append(xa)
            starts.append(0)
            scalings.append(0.0)
            continue
        if not serves(addend.rank) or addend.b.shape != (gate.shape[1], addend.rank):
            raise ValueError(f"B must be [{gate.shape[1]}, r <= {MAX_RANK}], got {addend.b.shape}")
        if addend.start + addend.rank > xa.shape[1]:
            raise ValueError(f"columns {addend.start}+{addend.rank} past x A^T's {xa.shape[1]}")
        ranks.append(addend.rank)
        pointers.append(addend.b.contiguous())
        starts.append(addend.start)
        scalings.append(float(addend.scaling))
    padded = max(16, triton.next_power_of_2(max(ranks)))
    positional = (xa, *pointers, *scalings, gate.shape[0], gate.shape[1], xa.stride(0), *starts)
    bm, bn, warps, dot = _tile()
    keywords = {
        "RG": ranks[0], "RU": ranks[1], "RP": padded, "IEEE": gate.dtype == torch.float32,
        "DOT": bool(dot), "ACT": _ACTS[activation], "BM": bm, "BN": bn, "num_warps": warps,
    }  # fmt: skip
    grid = (triton.cdiv(gate.shape[0], bm), triton.cdiv(gate.shape[1], bn))
    return grid, positional, keywords


def gated_lora_forward(
    gate: torch.Tensor, up: torch.Tensor, addends: Addends, activation: str = "swiglu"
) -> torch.Tensor:
    """``act(gate + s_g xa_g B_g^T) * (up + s_u xa_u B_u^T)`` (no autograd): a new ``[N, I]``
    tensor. ``gate`` and ``up`` are the base products (contiguous ``[N, I]``), each sum is
    rounded to their dtype as ``addmm_`` rounds, and the activation before the product, as
    torch does; ``activation``: ``"swiglu"``, ``"geglu"`` or ``"geglu_tanh"``."""
    grid, positional, keywords = _arguments(gate, up, addends, activation)
    out = torch.empty_like(gate)
    if gate.numel():
        _gated_lora_forward_kernel[grid](gate, up, out, *positional, **keywords)
    return out


def gated_lora_backward_inplace(
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    addends: Addends,
    activation: str = "swiglu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients ``(d_gate, d_up)`` of :func:`gated_lora_forward`'s output given its
    gradient ``grad``: of the sums, so the adapters' too. Written over ``gate`` and ``up``
    (those tensors are returned); the sums and the activation are recomputed."""
    grid, positional, keywords = _arguments(gate, up, addends, activation)
    if grad.shape != gate.shape:
        raise ValueError(f"grad {tuple(grad.shape)} does not match gate {tuple(gate.shape)}")
    if gate.numel():
        _gated_lora_backward_kernel[grid](
            grad.contiguous(), gate, up, gate, up, *positional, **keywords
        )
    return gate, up
