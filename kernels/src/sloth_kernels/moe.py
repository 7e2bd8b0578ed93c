"""Routed mixture-of-experts with per-expert LoRA: grouped GEMMs in Triton, forward and backward.

The ``T * k`` (token, choice) pairs are sorted by expert (torch's sort), so that each
expert's rows are contiguous; a fixed-size schedule of row blocks (one expert per block,
an upper bound on their number, so no host sync) drives the grouped GEMMs:

- gate_up: ``X_e W_e^T + b_e + s (X_e A_e^T) B_e^T`` for the gate and the up rows of each
  expert at once, the input rows gathered from ``x`` by token, the activation (SwiGLU or
  gpt-oss's clamped GLU) applied in the same program. Saved: the gate and up
  pre-activations and ``X A^T`` (``[N, r]``). ``X A^T`` is a GEMM of its own, once per
  row: inside the main one every column tile would compute it again (a quarter more
  products at 64 columns), with the fp32 adapter forcing its operands to fp32.
- down: the same product on the activations, each row scaled by its routing weight,
  stored at its (token, choice) place, so that the ``k`` rows of a token are summed in
  fp32 by one reduction (the reference's ``sum_rows``, without its atomic adds).

Backward needs no saved output: with ``dH' = g W + s (g B) A`` (``g`` the upstream grad
gathered per row, unweighted), the routing-weight grad is ``<h, dH'> + <g, b>``,
``dH = w dH'``. Every input grad is one grouped GEMM (the forward's kernel on transposed
strides for ``dX`` and ``dH'``; a per-expert ``L^T R`` kernel for ``dW``, ``dA``, ``dB``).
Products accumulate in fp32. On the GPU two 16-bit operands of one dtype go to the tensor
cores as they are (bf16 x bf16 products are exact in fp32, as they were in tf32, at twice
tf32's rate and half its shared memory); a pair with an fp32 side (the adapters PEFT keeps
in fp32, the fp32 LoRA intermediates) is converted to fp32 and runs as tf32, and fp32
inputs in IEEE fp32. Triton's CPU interpreter gets fp32 operands always: its 16-bit
arithmetic is not to be trusted.

On Hopper and later the four base products (gate_up, down, dH', dX) run on torch's grouped
GEMM instead, the kernels above adding the adapter, bias, activation and routing weight
after it (``BASE``): measured faster there (:func:`_grouped_mm_faster`).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import replace
from typing import Any

import torch
import triton
import triton.language as tl

from sloth_core.ops import reference
from sloth_core.ops.reference import ExpertLinear
from sloth_core.ops.reference.moe import sum_rows
from sloth_kernels._utils import interpreting

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = {"swiglu": 0, "gpt_oss": 1}


def _tile_from_env() -> tuple[int, int, int, int, int] | None:
    """``SLOTH_MOE_TILE=rows,cols,depth,warps,stages``: another GPU tile, for measuring."""
    spec = os.environ.get("SLOTH_MOE_TILE")
    if not spec:
        return None
    values = tuple(int(v) for v in spec.split(","))
    if len(values) != 5:
        raise ValueError(f"SLOTH_MOE_TILE={spec!r}: five integers rows,cols,depth,warps,stages")
    return values


#: ``(rows, cols, depth, warps, stages)`` of a GEMM tile on the GPU; see :func:`_blocks`.
GPU_BLOCKS = _tile_from_env() or (64, 64, 64, 4, 3)


def _blocks() -> tuple[int, int, int, int, int]:
    """``(rows, cols, depth, warps, stages)`` of a GEMM tile. The interpreter's cost is per
    program and per operation, not per element: wide tiles there (the tests patch this for
    the several-tiles paths). ``scripts/moe_tiles_gpu.py`` times the GPU's choices."""
    return (32, 64, 64, 4, 1) if interpreting() else GPU_BLOCKS


def _lowp(*tensors: torch.Tensor) -> bool:
    """Whether a GEMM of these operands takes them to the tensor cores in their own 16-bit
    dtype (one dtype, bf16 or fp16, on the GPU) rather than converted to fp32."""
    dtypes = {t.dtype for t in tensors}
    return not interpreting() and len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16}


# -- kernels ---------------------------------------------------------------------------


@triton.jit
def _x_times(X, x_rows, row_mask, stride_x, W, w_rows, w_rows2, w_mask, stride_wn, stride_wk,
             K, TWO: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             PREC: tl.constexpr, LOWP: tl.constexpr):  # fmt: skip
    """``(X W[w_rows]^T, X W[w_rows2]^T (when TWO))`` for a tile of rows ``x_rows``, fp32; each
    tile of X is loaded once for both. ``LOWP``: X and W go to the dot in their 16-bit
    dtype, else as fp32. The adapter's ``X A^T`` is not here: one small GEMM computes it
    once per row (:func:`_lora_rows`) rather than every column tile of this one."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < K
        x = tl.load(X + x_rows[:, None] * stride_x + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
        w_mask2 = w_mask[None, :] & k_mask[:, None]
        w = tl.load(W + w_rows[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask2,
                    other=0.0)  # fmt: skip
        acc = _dot_acc(acc, x, w, LOWP, PREC)
        if TWO:
            w = tl.load(W + w_rows2[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask2,
                        other=0.0)  # fmt: skip
            acc2 = _dot_acc(acc2, x, w, LOWP, PREC)
    return acc, acc2


@triton.jit
def _dot_acc(acc, left, right, LOWP: tl.constexpr, PREC: tl.constexpr):
    """``acc + left @ right`` in fp32: the operands as they are (``LOWP``), else as fp32."""
    if LOWP:
        return tl.dot(left, right, acc)
    return tl.dot(left.to(tl.float32), right.to(tl.float32), acc, input_precision=PREC)


@triton.jit
def _load_xa(XA, rows, row_mask, R, RP: tl.constexpr):
    """The rows' ``X A^T`` (fp32 ``[BM, RP]``, zero past the rank)."""
    ranks = tl.arange(0, RP)
    mask = row_mask[:, None] & (ranks[None, :] < R)
    return tl.load(XA + rows[:, None] * R + ranks[None, :], mask=mask, other=0.0)


@triton.jit
def _add_lora_bias(acc, xa, w_rows, w_mask, LB, stride_bn, stride_br, R, scale, BIAS,
                   HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, RP: tl.constexpr,
                   PREC: tl.constexpr):  # fmt: skip
    """``acc + s * xa B^T + b`` for the output columns ``w_rows``."""
    if HAS_LORA:
        ranks = tl.arange(0, RP)
        b_mask = w_mask[None, :] & (ranks[:, None] < R)
        b = tl.load(LB + w_rows[None, :] * stride_bn + ranks[:, None] * stride_br, mask=b_mask,
                    other=0.0).to(tl.float32)  # fmt: skip
        acc += scale * tl.dot(xa, b, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + w_rows, mask=w_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _block_rows(block_expert, block_start, expert_end, BM: tl.constexpr):
    """The expert of this program's row block (-1: padding), its rows and their mask."""
    blk = tl.program_id(0)
    expert = tl.load(block_expert + blk)
    start = tl.load(block_start + blk)
    end = tl.load(expert_end + tl.maximum(expert, 0))
    rows = start + tl.arange(0, BM)
    return expert.to(tl.int64), rows, rows < end


@triton.jit
def _grouped_linear_kernel(
    X, x_index, Y, y_index, W, BIAS, LB, XA, row_scale, B0, block_expert, block_start,
    expert_end, N, K, R, scale, stride_x, stride_y, stride_b0, stride_we, stride_wn, stride_wk,
    stride_be, stride_lbe, stride_lbn, stride_lbr,
    GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    ROW_SCALE: tl.constexpr, SCATTER: tl.constexpr, BASE: tl.constexpr, RP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    LOWP: tl.constexpr,
):  # fmt: skip
    """``Y[rows] = (X[rows] W_e^T + b_e + s XA[rows] B_e^T) * row_scale`` per block, ``XA``
    the rows' ``X A_e^T``; ``SCATTER``: into the rows ``y_index[rows]`` of Y instead.
    ``BASE``: ``X[rows] W_e^T`` is read from ``B0`` (torch's grouped GEMM made it)."""
    expert, rows, row_mask = _block_rows(block_expert, block_start, expert_end, BM)
    if expert < 0:
        return
    x_rows = rows
    if GATHER:
        x_rows = tl.load(x_index + rows, mask=row_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_mask = cols < N
    if BASE:
        acc = tl.load(
            B0 + rows[:, None] * stride_b0 + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
    else:
        acc, _ = _x_times(X, x_rows, row_mask, stride_x, W + expert * stride_we, cols, cols,
                          col_mask, stride_wn, stride_wk, K, False, BM, BN, BK, PREC,
                          LOWP)  # fmt: skip
    xa = _load_xa(XA, rows, row_mask, R, RP) if HAS_LORA else None
    acc = _add_lora_bias(acc, xa, cols, col_mask, LB + expert * stride_lbe, stride_lbn,
                         stride_lbr, R, scale, BIAS + expert * stride_be, HAS_LORA, HAS_BIAS,
                         RP, PREC)  # fmt: skip
    if ROW_SCALE:
        acc *= tl.load(row_scale + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    y_rows = rows
    if SCATTER:
        y_rows = tl.load(y_index + rows, mask=row_mask, other=0).to(tl.int64)
    tl.store(Y + y_rows[:, None] * stride_y + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])  # fmt: skip


@triton.jit
def _act(gate, up, ACT: tl.constexpr, alpha, limit):
    """The gated activation in fp32 and ``(d/dgate, d/dup)`` factors for backward."""
    if ACT == 0:  # swiglu: silu(gate) * up
        sig = tl.sigmoid(gate)
        glu = gate * sig
        d_glu = sig * (1.0 + gate * (1.0 - sig))
        h = glu * up
        d_gate = d_glu * up
        d_up = glu
    else:  # gpt-oss: clamp, gate * sigmoid(alpha gate), times (up + 1)
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        sig = tl.sigmoid(alpha * g)
        glu = g * sig
        h = glu * (u + 1.0)
        d_gate = tl.where(gate <= limit, (u + 1.0) * sig * (1.0 + alpha * g * (1.0 - sig)), 0.0)
        d_up = tl.where((up >= -limit) & (up <= limit), glu, 0.0)
    return h, d_gate, d_up


@triton.jit
def _gate_up_kernel(
    X, x_index, GATE, UP, H, W, BIAS, LB, XA, B0, block_expert, block_start, expert_end,
    inter, K, R, scale, alpha, limit, stride_x, stride_b0, stride_we, stride_wn, stride_wk,
    stride_be, stride_lbe, stride_lbn, stride_lbr, up_offset, pair_stride,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BASE: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    LOWP: tl.constexpr,
):  # fmt: skip
    """Gate and up columns ``j`` of each row (rows ``j * pair_stride`` and
    ``up_offset + j * pair_stride`` of W), then ``h = act(gate, up)``; all three stored.
    ``BASE``: ``X[rows] W_e^T`` is read from ``B0`` (torch's grouped GEMM made it)."""
    expert, rows, row_mask = _block_rows(block_expert, block_start, expert_end, BM)
    if expert < 0:
        return
    x_rows = tl.load(x_index + rows, mask=row_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_mask = cols < inter
    gate_rows = cols * pair_stride
    up_rows = up_offset + gate_rows
    if BASE:
        b0_mask = row_mask[:, None] & col_mask[None, :]
        b0 = B0 + rows[:, None] * stride_b0
        acc_gate = tl.load(b0 + gate_rows[None, :], mask=b0_mask, other=0.0).to(tl.float32)
        acc_up = tl.load(b0 + up_rows[None, :], mask=b0_mask, other=0.0).to(tl.float32)
    else:
        acc_gate, acc_up = _x_times(X, x_rows, row_mask, stride_x, W + expert * stride_we,
                                    gate_rows, up_rows, col_mask, stride_wn, stride_wk, K, True,
                                    BM, BN, BK, PREC, LOWP)  # fmt: skip
    xa = _load_xa(XA, rows, row_mask, R, RP) if HAS_LORA else None
    b_e, bias_e = LB + expert * stride_lbe, BIAS + expert * stride_be
    acc_gate = _add_lora_bias(acc_gate, xa, gate_rows, col_mask, b_e, stride_lbn, stride_lbr, R,
                              scale, bias_e, HAS_LORA, HAS_BIAS, RP, PREC)  # fmt: skip
    acc_up = _add_lora_bias(acc_up, xa, up_rows, col_mask, b_e, stride_lbn, stride_lbr, R,
                            scale, bias_e, HAS_LORA, HAS_BIAS, RP, PREC)  # fmt: skip
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows[:, None] * inter + cols[None, :]
    gate = acc_gate.to(GATE.dtype.element_ty)
    up = acc_up.to(UP.dtype.element_ty)
    tl.store(GATE + offs, gate, mask=mask)
    tl.store(UP + offs, up, mask=mask)
    # The activation of the rounded values, as the reference computes it on its output.
    h, _, _ = _act(gate.to(tl.float32), up.to(tl.float32), ACT, alpha, limit)
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _act_backward_kernel(GATE, UP, DH, row_scale, DGU, HW, DW, N, inter, alpha, limit, up_offset,
                         pair_stride, ACT: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK: tl.constexpr):  # fmt: skip
    """``ROWS`` rows: ``dH = w dH'`` through the activation into ``dGU`` (gate_up's layout),
    ``w h`` (for down's weight grads) and ``<h, dH'>`` (the routing weight's grad)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < N
    w = tl.load(row_scale + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    dot = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for c0 in range(0, inter, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < inter)[None, :]
        offs = rows[:, None] * inter + cols[None, :]
        gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        h, d_gate, d_up = _act(gate, up, ACT, alpha, limit)
        dot += tl.where(mask, h * dh, 0.0)
        tl.store(HW + offs, (w * h).to(HW.dtype.element_ty), mask=mask)
        dgu = DGU + rows[:, None] * 2 * inter + cols[None, :] * pair_stride
        tl.store(dgu, (w * dh * d_gate).to(DGU.dtype.element_ty), mask=mask)
        tl.store(dgu + up_offset, (w * dh * d_up).to(DGU.dtype.element_ty), mask=mask)
    tl.store(DW + rows, tl.sum(dot, axis=1), mask=row_mask)


@triton.jit
def _grouped_tn_kernel(
    L, l_index, Rm, r_index, OUT, expert_start, expert_end, M, N, scale, stride_l, stride_r,
    stride_oe, stride_om, stride_on,
    GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    """``OUT[e] = s * L_e^T R_e`` over the rows of expert ``e`` (zero for an expert with none)."""
    expert = tl.program_id(0).to(tl.int64)
    ms = tl.program_id(1) * BM + tl.arange(0, BM)
    ns = tl.program_id(2) * BN + tl.arange(0, BN)
    m_mask, n_mask = ms < M, ns < N
    start = tl.load(expert_start + expert)
    end = tl.load(expert_end + expert)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t0 in range(start, end, BT):
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < end
        l_rows = rows
        if GATHER_L:
            l_rows = tl.load(l_index + rows, mask=row_mask, other=0).to(tl.int64)
        r_rows = rows
        if GATHER_R:
            r_rows = tl.load(r_index + rows, mask=row_mask, other=0).to(tl.int64)
        lt_mask = row_mask[:, None] & m_mask[None, :]
        lt = tl.load(L + l_rows[:, None] * stride_l + ms[None, :], mask=lt_mask, other=0.0)
        r_mask = row_mask[:, None] & n_mask[None, :]
        r = tl.load(Rm + r_rows[:, None] * stride_r + ns[None, :], mask=r_mask, other=0.0)
        acc = _dot_acc(acc, tl.trans(lt), r, LOWP, PREC)
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(OUT + expert * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on,
             (acc * scale).to(OUT.dtype.element_ty), mask=out_mask)  # fmt: skip


@triton.jit
def _dequantize_kernel(V, S, Y, expert_start, expert_end, PER, IN, OUT, TRANSPOSED: tl.constexpr,
                       BF16: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """``Y = V * S`` per output row for expert ``program_id(1)``: ``V`` quantized (e4m3)
    ``[E, OUT, IN]`` stored contiguous, or ``[E, IN, OUT]`` (``TRANSPOSED``), ``S`` float32
    ``[E, OUT]``; computed in fp32 and rounded to nearest even (by hand for bf16: the
    interpreter truncates). An expert no row is routed to is skipped, its part of ``Y``
    left unwritten: no product reads it."""
    e = tl.program_id(1).to(tl.int64)
    if tl.load(expert_end + e) == tl.load(expert_start + e):
        return
    local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < PER
    if TRANSPOSED:  # local = i * OUT + o
        row = e * OUT + local % OUT
    else:  # local = o * IN + i
        row = e * OUT + local // IN
    value = tl.load(V + e * PER + local, mask=mask, other=0.0).to(tl.float32)
    y = value * tl.load(S + row, mask=mask, other=0.0)
    if BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(Y + e * PER + local, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(Y + e * PER + local, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bound_search(values_ptr, n, target, steps, RIGHT: tl.constexpr):
    """For each of ``target``: the first index of the sorted ``values[:n]`` holding a value
    above it (``RIGHT``) or not below it; ``steps`` halvings cover ``n``."""
    lo = tl.zeros(target.shape, dtype=tl.int64)
    hi = lo + n
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(values_ptr + mid, mask=active, other=0)
        right = (v <= target) if RIGHT else (v < target)
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _schedule_kernel(
    expert_ptr, order_ptr, weights_ptr, token_ptr, w_rows_ptr, start_ptr, end_ptr, offs_ptr,
    block_end_ptr, block_expert_ptr, block_start_ptr, n_rows, n_experts, n_bound, top_k,
    block_rows, row_steps, expert_steps,
    HAS_WEIGHTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The schedule of :class:`_Schedule` from the expert-sorted rows, in one launch.

    Every program writes a chunk of the rows' tokens (and routing weights); program 0 also
    finds each expert's rows in the sorted experts (two binary searches), counts its row
    blocks, and writes which expert and first row each block of the fixed bound has.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    order = tl.load(order_ptr + rows, mask=row_mask, other=0)
    tl.store(token_ptr + rows, order // top_k, mask=row_mask)
    if HAS_WEIGHTS:
        tl.store(w_rows_ptr + rows, tl.load(weights_ptr + order, mask=row_mask), mask=row_mask)
    if pid == 0:
        e = tl.arange(0, BLOCK_E)
        e_mask = e < n_experts
        start = _bound_search(expert_ptr, n_rows, e, row_steps, RIGHT=False)
        end = _bound_search(expert_ptr, n_rows, e, row_steps, RIGHT=True)
        blocks = tl.where(e_mask, (end - start + block_rows - 1) // block_rows, 0)
        block_end = tl.cumsum(blocks, 0)
        tl.store(start_ptr + e, start, mask=e_mask)
        tl.store(end_ptr + e, end, mask=e_mask)
        tl.store(offs_ptr + e, end.to(tl.int32), mask=e_mask)
        tl.store(block_end_ptr + e, block_end, mask=e_mask)
        tl.debug_barrier()  # the stores above are read back, gathered, below
        for first in range(0, n_bound, BLOCK):
            b = first + tl.arange(0, BLOCK).to(tl.int64)
            b_mask = b < n_bound
            owner = _bound_search(block_end_ptr, n_experts, b, expert_steps, RIGHT=True)
            valid = owner < n_experts
            owner = tl.minimum(owner, n_experts - 1)
            own_start = tl.load(start_ptr + owner, mask=b_mask, other=0)
            own_end = tl.load(end_ptr + owner, mask=b_mask, other=0)
            own_block_end = tl.load(block_end_ptr + owner, mask=b_mask, other=0)
            own_blocks = (own_end - own_start + block_rows - 1) // block_rows
            row = own_start + (b - (own_block_end - own_blocks)) * block_rows
            tl.store(block_expert_ptr + b, tl.where(valid, owner, -1), mask=b_mask)
            tl.store(block_start_ptr + b, tl.where(valid, row, 0), mask=b_mask)


#: Rows a program of ``_schedule_kernel`` handles on the GPU (16 under the interpreter, so
#: that the tests' few rows still take several programs).
_SCHEDULE_BLOCK = 1024


class _Schedule:
    """The (token, choice) pairs sorted by expert, and the row blocks of the grouped GEMMs.

    Attributes:
        order: ``[N]`` flat (token * k + choice) index of each sorted row.
        token: ``[N]`` token of each sorted row.
        expert: ``[N]`` expert of each sorted row.
        w_rows: ``[N]`` routing weight of each sorted row, given ``top_k_weights``.
        tokens: ``T``, the routed tokens (each has ``k`` rows).
        start, end: ``[E]`` each expert's rows (``offs``: ``end`` in int32, as
            ``torch._grouped_mm`` takes group ends).
        block_expert, block_start: ``[cdiv(N, BM) + E]`` each row block's expert (-1 for
            the unused tail of the bound) and first row.

    Everything after torch's sort is one kernel (:func:`_schedule_kernel`), where some
    twenty small torch operations were launched a call, twice a layer a step (the forward
    and the recompute). Nothing reads back to the host: the bound on the blocks is fixed
    by the sizes alone.
    """

    def __init__(self, top_k_index: torch.Tensor, experts: int, block_rows: int,
                 top_k_weights: torch.Tensor | None = None) -> None:  # fmt: skip
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)
        self.expert, self.order = torch.sort(flat, stable=True)
        n, device = flat.numel(), flat.device
        self.rows, self.tokens = n, top_k_index.shape[0]
        bound = triton.cdiv(n, block_rows) + experts
        self.token = torch.empty(n, dtype=torch.int64, device=device)
        self.start, self.end, block_end = (
            torch.empty(experts, dtype=torch.int64, device=device) for _ in range(3)
        )
        self.offs = torch.empty(experts, dtype=torch.int32, device=device)
        self.block_expert, self.block_start = (
            torch.empty(bound, dtype=torch.int64, device=device) for _ in range(2)
        )
        weights = None if top_k_weights is None else top_k_weights.reshape(-1)
        self.w_rows = None if weights is None else torch.empty_like(weights)
        block = 16 if interpreting() else _SCHEDULE_BLOCK
        _schedule_kernel[(max(1, triton.cdiv(n, block)),)](
            self.expert, self.order, weights if weights is not None else self.token, self.token,
            self.w_rows if self.w_rows is not None else self.token, self.start, self.end,
            self.offs, block_end, self.block_expert, self.block_start, n, experts, bound, k,
            block_rows, n.bit_length(), experts.bit_length(),
            HAS_WEIGHTS=weights is not None, BLOCK_E=max(16, triton.next_power_of_2(experts)),
            BLOCK=block,
        )  # fmt: skip


def _dense(layer: ExpertLinear, dtype: torch.dtype, sched: _Schedule) -> ExpertLinear:
    """``layer`` with its quantized weight (``weight_scale``) dequantized to ``dtype`` in one
    pass (:func:`_dequantize_kernel`: 1 byte read and 2 written an element, where torch's
    ``values.float() * scales`` makes and reads an fp32 stack twice the size of bf16's), in
    the layout it is stored in; the layer itself when not quantized. The values are
    :meth:`ExpertLinear.dense_weight`'s for every expert ``sched`` routes a row to; the
    others are skipped (a decode step's few tokens hit a few of the experts), their
    weights left unset."""
    if layer.weight_scale is None:
        return layer
    weight = layer.weight
    transposed = not weight.is_contiguous()
    stored = weight.transpose(1, 2) if transposed else weight
    if not stored.is_contiguous() or not layer.weight_scale.is_contiguous():
        return layer.dense(dtype)
    out = torch.empty(stored.shape, dtype=dtype, device=stored.device)
    experts, rows, cols = weight.shape
    per, block = rows * cols, 4096
    _dequantize_kernel[(triton.cdiv(per, block), experts)](
        stored, layer.weight_scale, out, sched.start, sched.end, per, cols, rows,
        TRANSPOSED=transposed, BF16=dtype == torch.bfloat16, BLOCK=block,
    )  # fmt: skip
    return replace(layer, weight=out.transpose(1, 2) if transposed else out, weight_scale=None)


def _adapter(layer: ExpertLinear, transpose: bool) -> tuple | None:
    """``(A [E, r, in], B [E, out, r], r, scaling)`` of the map's adapter (views), or None.

    ``transpose`` gives the adapter of the transposed map ``x W`` (``A -> B^T``, ``B -> A^T``).
    """
    a, b = layer.lora_A, layer.lora_B
    if a is None or b is None:
        return None
    if transpose:
        return b.transpose(1, 2), a.transpose(1, 2), a.shape[1], layer.scaling
    return a, b, a.shape[1], layer.scaling


#: ``SLOTH_MOE_GEMM``: where the base products run (see :func:`_grouped_mm_wanted`).
GEMM_CHOICES = ("auto", "triton", "grouped_mm")


def _grouped_mm_wanted(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the base products go through ``torch._grouped_mm`` (CUTLASS's grouped GEMM on
    Hopper) rather than the Triton GEMMs. ``SLOTH_MOE_GEMM``: ``grouped_mm`` or ``triton``
    ask for one; ``auto`` (the default) takes torch's where it was measured faster
    (:func:`_grouped_mm_faster`). Either way it needs one dtype (bf16 on CUDA) and rows and
    columns of a multiple of 16 bytes."""
    choice = os.environ.get("SLOTH_MOE_GEMM", "auto")
    if choice not in GEMM_CHOICES:
        raise ValueError(f"SLOTH_MOE_GEMM={choice!r}: one of {', '.join(GEMM_CHOICES)}")
    if choice == "triton":
        return False
    if not hasattr(torch, "_grouped_mm") or any(w.dtype != x.dtype for w in weights):
        return False
    if x.is_cuda and x.dtype != torch.bfloat16:  # elsewhere torch loops over the groups
        return False
    sizes = [x.shape[1]] + [n for w in weights for n in w.shape[1:]]
    if not all(n * x.element_size() % 16 == 0 for n in sizes):
        return False
    return choice == "grouped_mm" or _grouped_mm_faster(x.device)


def _grouped_mm_faster(device: torch.device) -> bool:
    """``auto``'s choice: torch's grouped GEMM on CUDA cards of compute capability 9 (Hopper)
    and later. On an H100, one qwen3-30b-a3b layer (4096 tokens, LoRA on every expert,
    forward and backward) took 4.05 ms with it against 4.91 ms for the best Triton tile
    (``scripts/moe_tiles_gpu.py``, docs/benchmarks.md); earlier cards were not measured,
    and the Triton GEMMs, tested everywhere, stay theirs."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _grouped_mm_base(x, sched, w, *, gather):
    """``x[rows] w_e^T`` ``[N, out]`` in ``x.dtype`` through ``torch._grouped_mm``, ``w``
    ``[E, out, in]`` (any strides): the products rounded as the reference rounds them."""
    rows = x.index_select(0, sched.token) if gather else x
    return torch._grouped_mm(rows, w.transpose(1, 2), offs=sched.offs)


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _prec(dtype: torch.dtype) -> str:
    # tf32 holds a 16-bit float's mantissa exactly; fp32 needs IEEE products to stay tight.
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_linear(x, sched, w, y, *, gather, bias=None, lora=None, xa=None, row_scale=None,
                   scatter=False, cols=None, base=None):  # fmt: skip
    """``_grouped_linear_kernel`` of ``w`` ``[E, out, in]`` (any strides) into ``y``; ``base``:
    the rows' ``x W^T``, already made."""
    bm, bn, bk, warps, stages = _blocks()
    bn = cols or bn
    n_out, k_in = w.shape[1], w.shape[2]
    _, b, r, scale = lora or (None, w, 1, 0.0)
    grid = (sched.block_expert.numel(), triton.cdiv(n_out, bn))
    _grouped_linear_kernel[grid](
        x, sched.token, y, sched.order, w, w if bias is None else bias, b,
        y if xa is None else xa, y if row_scale is None else row_scale,
        y if base is None else base, sched.block_expert, sched.block_start, sched.end, n_out,
        k_in, r, scale, x.stride(0), y.stride(0), 0 if base is None else base.stride(0),
        *w.stride(), 0 if bias is None else bias.stride(0), *b.stride(),
        GATHER=gather, HAS_BIAS=bias is not None, HAS_LORA=lora is not None,
        ROW_SCALE=row_scale is not None, SCATTER=scatter, BASE=base is not None,
        RP=_rank_block(r), BM=bm, BN=bn,
        BK=bk, PREC=_prec(x.dtype), LOWP=_lowp(x, w), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def _lora_rows(x, sched, adapter, *, gather):
    """``x A_e^T`` ``[N, r]`` fp32 of the sorted rows (``x[token]`` with ``gather``), or None
    without an adapter: once per row, beside the main GEMM that adds ``s (x A^T) B^T``."""
    if adapter is None:
        return None
    a, r = adapter[0], adapter[2]
    y = torch.empty(sched.rows, r, device=x.device, dtype=torch.float32)
    # Columns as many as the rank (16 at the least), at most 64 a tile: a rank-256 adapter's
    # fp32 tiles would outgrow the shared memory in one.
    return _launch_linear(x, sched, a, y, gather=gather, cols=min(_rank_block(r), 64))


def _linear(x, sched, layer, *, gather, transpose=False, row_scale=None, xa=None, out_dtype,
            per_token=False, grouped_mm=False):  # fmt: skip
    """``[N, out]`` grouped linear over the sorted rows: ``layer`` applied to ``x[token]``
    (``gather``) or to ``x``'s own rows; ``transpose`` applies ``x W_e`` (and the
    transposed adapter) instead, for backward. ``xa``: the rows' ``x A^T`` (of the
    transposed adapter with ``transpose``), from :func:`_lora_rows`, when there is one.
    ``per_token``: the rows summed per token instead, ``[T, out]`` fp32 (each sorted row
    stored at its (token, choice) place, then the ``k`` of a token added in one pass).
    ``grouped_mm``: the base product through torch's grouped GEMM, the rest after it."""
    w = layer.weight.transpose(1, 2) if transpose else layer.weight
    lora = _adapter(layer, transpose)
    base = _grouped_mm_base(x, sched, w, gather=gather) if grouped_mm else None
    y = torch.empty(sched.rows, w.shape[1], device=x.device, dtype=out_dtype)
    _launch_linear(x, sched, w, y, gather=gather, bias=None if transpose else layer.bias,
                   lora=lora, xa=xa, row_scale=row_scale, scatter=per_token,
                   base=base)  # fmt: skip
    if per_token:
        return y.view(sched.tokens, -1, w.shape[1]).sum(1, dtype=torch.float32)
    return y


def _grouped_tn(left, right, sched, out, *, gather_left=False, gather_right=False, scale=1.0):
    """``out[e] = scale * left_e^T right_e`` over each expert's sorted rows, in place."""
    _, cols, depth, warps, stages = _blocks()
    m, n = out.shape[1], out.shape[2]
    # A LoRA rank is one side of dA and dB: a tile no wider than it (16 at the least).
    bm = min(cols, max(16, triton.next_power_of_2(m)))
    bn = min(cols, max(16, triton.next_power_of_2(n)))
    grid = (out.shape[0], triton.cdiv(m, bm), triton.cdiv(n, bn))
    _grouped_tn_kernel[grid](
        left, sched.token, right, sched.token, out, sched.start, sched.end, m, n, scale,
        left.stride(0), right.stride(0), *out.stride(), GATHER_L=gather_left,
        GATHER_R=gather_right, BT=depth, BM=bm, BN=bn, PREC=_prec(left.dtype),
        LOWP=_lowp(left, right), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def _grads_of(layer, left, right, lora_left, lora_right, sched, needs, **gather):
    """``(dW, db, dA, dB)`` of ``layer`` for ``needs`` (four flags): ``dW = L^T R``,
    ``dA = s (L B)^T R`` from ``lora_left = L B``, ``dB = s L^T (R A^T)`` from ``lora_right``."""
    w = layer.weight
    grads: list[torch.Tensor | None] = [None, None, None, None]
    if needs[0]:
        grads[0] = _grouped_tn(left, right, sched, torch.empty_like(w), **gather)
    if needs[2]:
        a = layer.lora_A
        assert a is not None
        grads[2] = _grouped_tn(lora_left, right, sched, torch.empty_like(a), scale=layer.scaling,
                               gather_right=gather.get("gather_right", False))  # fmt: skip
    if needs[3]:
        b = layer.lora_B
        assert b is not None
        grads[3] = _grouped_tn(left, lora_right, sched, torch.empty_like(b), scale=layer.scaling,
                               gather_left=gather.get("gather_left", False))  # fmt: skip
    return grads


def _gate_up(x, sched, layer, act, layout, alpha, limit, xa, grouped_mm=False):
    """``(gate, up, h)`` of the sorted rows: gate_up's GEMM with the activation fused; ``xa``
    the rows' ``x A^T`` when there is an adapter; ``grouped_mm``: the base product through
    torch's grouped GEMM, the adapter, bias and activation after it."""
    bm, bn, bk, warps, stages = _blocks()
    inter = layer.weight.shape[1] // 2
    up_offset, pair_stride = (inter, 1) if layout == "halves" else (1, 2)
    gate, up, h = (torch.empty(sched.rows, inter, device=x.device, dtype=x.dtype) for _ in range(3))
    _, b, r, scale = _adapter(layer, False) or (None, layer.weight, 1, 0.0)
    bias = layer.bias
    base = _grouped_mm_base(x, sched, layer.weight, gather=True) if grouped_mm else None
    grid = (sched.block_expert.numel(), triton.cdiv(inter, bn))
    _gate_up_kernel[grid](
        x, sched.token, gate, up, h, layer.weight, h if bias is None else bias, b,
        h if xa is None else xa, h if base is None else base, sched.block_expert,
        sched.block_start, sched.end, inter, x.shape[1], r, scale, alpha, limit, x.stride(0),
        0 if base is None else base.stride(0), *layer.weight.stride(),
        0 if bias is None else bias.stride(0), *b.stride(), up_offset, pair_stride,
        ACT=_ACTIVATIONS[act], HAS_BIAS=bias is not None, HAS_LORA=layer.has_lora,
        BASE=base is not None,
        RP=_rank_block(r), BM=bm, BN=bn, BK=bk, PREC=_prec(x.dtype),
        LOWP=_lowp(x, layer.weight), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return gate, up, h


def _act_backward(gate, up, dh, w_rows, act, layout, alpha, limit):
    """``(dGU [N, 2I] in gate_up's layout, w h [N, I], <h, dH'> [N] fp32)``."""
    rows, inter = gate.shape
    up_offset, pair_stride = (inter, 1) if layout == "halves" else (1, 2)
    d_gu = torch.empty(rows, 2 * inter, device=gate.device, dtype=gate.dtype)
    hw = torch.empty_like(gate)
    dw = torch.empty(rows, device=gate.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(inter), 128)
    row_block = 16
    _act_backward_kernel[(triton.cdiv(rows, row_block),)](
        gate, up, dh, w_rows, d_gu, hw, dw, rows, inter, alpha, limit, up_offset, pair_stride,
        ACT=_ACTIVATIONS[act], ROWS=row_block, BLOCK=block,
    )  # fmt: skip
    return d_gu, hw, dw


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, w1, b1, a1, lb1, w2, b2, a2, lb2, cfg):
        gate_up, down, act, layout, alpha, limit, output = cfg
        # Quantized (FP8) weights: their dense stacks live for this call only, made again
        # in the backward; ctx keeps the quantized maps (cfg), or a checkpointed step would
        # hold every layer's dense weights, all the memory FP8 saves.
        # (A recompute that reads no output multiplies nothing by down's base weight.)
        sched = _Schedule(top_k_index, w1.shape[0], _blocks()[0], top_k_weights)
        gate_up = _dense(gate_up, x.dtype, sched)
        down = _dense(down, x.dtype, sched) if output else down
        w_rows = sched.w_rows
        # down is still quantized only where no output is made (dense, it is in x's dtype).
        dense = [gate_up.weight] + ([down.weight] if down.weight_scale is None else [])
        mm = _grouped_mm_wanted(x, *dense)
        xa1 = _lora_rows(x, sched, _adapter(gate_up, False), gather=True)
        gate, up, h = _gate_up(x, sched, gate_up, act, layout, alpha, limit, xa1, mm)
        xa2 = _lora_rows(h, sched, _adapter(down, False), gather=False)
        if output:
            out = _linear(h, sched, down, gather=False, row_scale=w_rows, xa=xa2,
                          out_dtype=torch.float32, per_token=True, grouped_mm=mm)  # fmt: skip
            out = out.to(x.dtype)
        else:  # the caller reads no value of out (a recompute): down's products are skipped
            out = x.new_empty(sched.tokens, down.weight.shape[1])
        del h
        ctx.sched, ctx.cfg, ctx.grouped_mm = sched, cfg, mm
        ctx.weights_shape, ctx.weights_dtype = top_k_weights.shape, top_k_weights.dtype
        ctx.save_for_backward(x, w_rows, gate, up, xa1, xa2)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w_rows, gate, up, xa1, xa2 = ctx.saved_tensors
        sched, (gate_up, down, act, layout, alpha, limit, _) = ctx.sched, ctx.cfg
        gate_up, down = _dense(gate_up, x.dtype, sched), _dense(down, x.dtype, sched)
        needs = ctx.needs_input_grad
        g = grad.contiguous()
        # dH' = g W2 + s (g B2) A2 per row (unweighted); g B2 kept for dA2.
        gb2 = _lora_rows(g, sched, _adapter(down, True), gather=True)
        mm = ctx.grouped_mm
        dh = _linear(g, sched, down, gather=True, transpose=True, xa=gb2, out_dtype=torch.float32,
                     grouped_mm=mm)  # fmt: skip
        d_gu, hw, dw_rows = _act_backward(gate, up, dh, w_rows, act, layout, alpha, limit)
        del dh
        d_weights = None
        if needs[2]:
            if down.bias is not None:  # <g, b2> of each row
                dw_rows += (g[sched.token].float() * down.bias[sched.expert].float()).sum(-1)
            d_weights = torch.empty(sched.rows, device=x.device, dtype=torch.float32)
            d_weights[sched.order] = dw_rows
            d_weights = d_weights.view(ctx.weights_shape).to(ctx.weights_dtype)
        # d_gu B1: the transposed adapter's rows, for dX and for dA1.
        dgb1 = None
        if needs[0] or needs[5]:
            dgb1 = _lora_rows(d_gu, sched, _adapter(gate_up, True), gather=False)
        dx = None
        if needs[0]:
            dx = _linear(d_gu, sched, gate_up, gather=False, transpose=True, xa=dgb1,
                         out_dtype=torch.float32, per_token=True, grouped_mm=mm)  # fmt: skip
            dx = dx.to(x.dtype)
        g1 = _grads_of(gate_up, d_gu, x, dgb1, xa1, sched, needs[3:7], gather_right=True)
        if needs[4]:
            g1[1] = _segment_sum(d_gu.float(), sched, gate_up.bias)
        hw_a2 = None if xa2 is None else xa2 * w_rows[:, None].float()
        g2 = _grads_of(down, g, hw, gb2, hw_a2, sched, needs[7:11], gather_left=True)
        if needs[8]:
            g2[1] = _segment_sum(g[sched.token].float() * w_rows[:, None].float(), sched, down.bias)
        return dx, None, d_weights, *g1, *g2, None


def _segment_sum(rows: torch.Tensor, sched: _Schedule, like: torch.Tensor) -> torch.Tensor:
    """Per-expert sums ``[E, C]`` of the sorted ``rows`` ``[N, C]`` (a bias's grad)."""
    return sum_rows(rows, sched.expert, like.shape[0]).to(like.dtype)


def _tensors(layer: ExpertLinear) -> tuple[torch.Tensor | None, ...]:
    return (layer.weight, layer.bias, layer.lora_A, layer.lora_B)


def _served(
    x: torch.Tensor, layers: tuple[ExpertLinear, ...], activation: str, layout: str
) -> bool:
    """Whether the kernels compute what the reference does for these arguments."""
    if activation not in _ACTIVATIONS or layout not in ("halves", "interleaved"):
        return False
    if x.dim() != 2 or x.shape[0] == 0 or x.dtype not in DTYPES or torch.is_autocast_enabled():
        return False
    tensors = [t for layer in layers for t in (*_tensors(layer), layer.weight_scale)]
    if any(t is not None and (t.device != x.device or t.stride(-1) == 0) for t in tensors):
        return False
    return all(
        layer.has_lora or (layer.lora_A is None and layer.lora_B is None) for layer in layers
    )


#: ``moe_experts``'s keyword options with their defaults, as the reference declares them.
_OPTIONS = {
    name: param.default
    for name, param in inspect.signature(reference.moe_experts).parameters.items()
    if param.kind is param.KEYWORD_ONLY
}


def moe_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: ExpertLinear,
    down: ExpertLinear,
    **options: Any,
) -> torch.Tensor:
    """:func:`sloth_core.ops.reference.moe_experts` on grouped Triton GEMMs (same arguments
    and defaults: ``activation``, ``gate_up_layout``, ``alpha``, ``limit``, ``output``;
    ``output=False`` skips the down products and leaves the result's values unset)."""
    opts = {**_OPTIONS, **options}
    if opts.keys() != _OPTIONS.keys() or not _served(
        x, (gate_up, down), opts["activation"], opts["gate_up_layout"]
    ):
        return reference.moe_experts(x, top_k_index, top_k_weights, gate_up, down, **options)
    cfg = (gate_up, down, opts["activation"], opts["gate_up_layout"],
           float(opts["alpha"]), float(opts["limit"]), bool(opts["output"]))  # fmt: skip
    tensors = [t for layer in (gate_up, down) for t in _tensors(layer)]
    return _MoEExperts.apply(x.contiguous(), top_k_index, top_k_weights, *tensors, cfg)


REGISTRATIONS = [
    {"op": "moe_experts", "fn": moe_experts, "dtypes": DTYPES},
]
