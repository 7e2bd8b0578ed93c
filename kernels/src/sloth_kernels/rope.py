"""Rotary position embedding of queries and keys together, in one launch.

One program per token ``(b, s)``: it loads that token's ``cos``/``sin`` row once (gathered
through ``position_ids`` when tables are given, so packed sequences that restart their
positions cost nothing extra), then rotates every query head and every key head of the
token, a block of heads at a time. Inputs are addressed through their strides, so the
``view(...).transpose(1, 2)`` tensors transformers produces are read in place, in either
layout (``[B, H, S, D]`` or ``[B, S, H, D]``); outputs are new tensors with the inputs'
memory layout. The backward is the transposed rotation (``-sin``) and saves nothing but
``cos``, ``sin`` and ``position_ids``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sloth_core.ops import reference
from sloth_kernels._utils import next_power_of_2

#: Elements of one half-rotation tile (heads x rotary half): 16 heads of a 128-dim head.
_TILE = 1024
_NUM_WARPS = 4


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, x_base, o_base, n_heads, x_sh, x_sd, o_sh, o_sd, c1, c2, s1, s2,
    HALF: tl.constexpr, N_PASS: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Rotate (or pass through) every head of one token of one tensor."""
    r = tl.arange(0, BLOCK_R)
    r_mask = r < HALF
    p = tl.arange(0, BLOCK_P)
    p_mask = p < N_PASS
    for h0 in range(0, n_heads, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        h_mask = h < n_heads
        mask = h_mask[:, None] & r_mask[None, :]
        x1_ptrs = x_ptr + x_base + h[:, None] * x_sh + r[None, :] * x_sd
        o1_ptrs = o_ptr + o_base + h[:, None] * o_sh + r[None, :] * o_sd
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + HALF * x_sd, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            # The transpose of the forward rotation; with the usual cos = cat(f, f) tables
            # it is the forward with -sin.
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(o1_ptrs, y1.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o1_ptrs + HALF * o_sd, y2.to(o_ptr.dtype.element_ty), mask=mask)
        if N_PASS > 0:
            # Partial rotary: dims past the rotary ones are copied into the new output.
            pmask = h_mask[:, None] & p_mask[None, :]
            dims = 2 * HALF + p[None, :]
            xp = tl.load(x_ptr + x_base + h[:, None] * x_sh + dims * x_sd, mask=pmask)
            tl.store(o_ptr + o_base + h[:, None] * o_sh + dims * o_sd, xp, mask=pmask)


@triton.jit
def _load_half(row_ptr, start, stride, dtype, HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    """``[1, BLOCK_R]`` fp32 values ``start .. start + HALF`` of a cos/sin row."""
    r = tl.arange(0, BLOCK_R)
    values = tl.load(row_ptr + (start + r) * stride, mask=r < HALF, other=0.0)
    # transformers casts cos/sin to q's dtype before the products: round them likewise.
    return values.to(dtype).to(tl.float32)[None, :]


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr,
    seq_len, n_q_heads, n_k_heads,
    q_sb, q_ss, q_sh, q_sd, k_sb, k_ss, k_sh, k_sd,
    qo_sb, qo_ss, qo_sh, qo_sd, ko_sb, ko_ss, ko_sh, ko_sd,
    cos_s0, cos_s1, cos_sr, sin_s0, sin_s1, sin_sr, pos_sb, pos_ss,
    HALF: tl.constexpr, N_PASS: tl.constexpr, HAS_POS: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    if HAS_POS:
        # Tables [P, R]: row = this token's position.
        row = tl.load(pos_ptr + b * pos_sb + s * pos_ss).to(tl.int64)
        cos_base = row * cos_s0
        sin_base = row * sin_s0
    else:
        cos_base = b * cos_s0 + s * cos_s1
        sin_base = b * sin_s0 + s * sin_s1
    # Both halves of cos and sin: equal for the usual cat(freqs, freqs) tables, but the
    # reference does not assume it, so neither do we.
    dtype = qo_ptr.dtype.element_ty
    c1 = _load_half(cos_ptr + cos_base, 0, cos_sr, dtype, HALF, BLOCK_R)
    c2 = _load_half(cos_ptr + cos_base, HALF, cos_sr, dtype, HALF, BLOCK_R)
    s1 = _load_half(sin_ptr + sin_base, 0, sin_sr, dtype, HALF, BLOCK_R)
    s2 = _load_half(sin_ptr + sin_base, HALF, sin_sr, dtype, HALF, BLOCK_R)
    _rotate_heads(
        q_ptr, qo_ptr, b * q_sb + s * q_ss, b * qo_sb + s * qo_ss,
        n_q_heads, q_sh, q_sd, qo_sh, qo_sd,
        c1, c2, s1, s2, HALF, N_PASS, BACKWARD, BLOCK_H, BLOCK_R, BLOCK_P,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, ko_ptr, b * k_sb + s * k_ss, b * ko_sb + s * ko_ss,
        n_k_heads, k_sh, k_sd, ko_sh, ko_sd,
        c1, c2, s1, s2, HALF, N_PASS, BACKWARD, BLOCK_H, BLOCK_R, BLOCK_P,
    )  # fmt: skip


def _bshd_strides(t: torch.Tensor, heads_dim: int) -> tuple[int, int, int, int]:
    """Strides of ``t`` in (batch, seq, head, dim) order, whichever its layout."""
    seq_dim = 3 - heads_dim  # heads at 1 -> seq at 2, and the other way round
    return t.stride(0), t.stride(seq_dim), t.stride(heads_dim), t.stride(3)


def _launch(q, k, q_out, k_out, cos, sin, position_ids, heads_dim, backward):
    """Rotate ``q``/``k`` into ``q_out``/``k_out`` (new tensors, any strides) in one launch."""
    batch, seq = q.shape[0], q.shape[3 - heads_dim]
    n_q_heads, n_k_heads, head_dim = q.shape[heads_dim], k.shape[heads_dim], q.shape[3]
    rotary = cos.shape[-1]
    half = rotary // 2
    if position_ids is not None:
        pos = position_ids.expand(batch, seq)  # [1, S] ids serve every row of the batch
        cos_strides = (cos.stride(0), 0, cos.stride(1))
        sin_strides = (sin.stride(0), 0, sin.stride(1))
        pos_strides = (pos.stride(0), pos.stride(1))
    else:
        pos = cos  # unused pointer
        cos, sin = cos.expand(batch, seq, rotary), sin.expand(batch, seq, rotary)
        cos_strides, sin_strides, pos_strides = cos.stride(), sin.stride(), (0, 0)
    block_r = next_power_of_2(half)
    block_h = max(1, min(_TILE // block_r, next_power_of_2(max(n_q_heads, n_k_heads))))
    n_pass = head_dim - rotary
    _rope_kernel[(batch * seq,)](
        q, k, q_out, k_out, cos, sin, pos, seq, n_q_heads, n_k_heads,
        *_bshd_strides(q, heads_dim), *_bshd_strides(k, heads_dim),
        *_bshd_strides(q_out, heads_dim), *_bshd_strides(k_out, heads_dim),
        *cos_strides, *sin_strides, *pos_strides,
        HALF=half, N_PASS=n_pass, HAS_POS=position_ids is not None, BACKWARD=backward,
        BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=next_power_of_2(max(n_pass, 1)),
        num_warps=_NUM_WARPS,
    )  # fmt: skip


def _rotate(q, k, cos, sin, position_ids, heads_dim):
    """``(q_out, k_out)``: ``q`` and ``k`` rotated into new tensors."""
    # empty_like keeps q's (possibly transposed) memory layout for the output.
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _launch(q, k, q_out, k_out, cos, sin, position_ids, heads_dim, backward=False)
    return q_out, k_out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, heads_dim):
        q_out, k_out = _rotate(q, k, cos, sin, position_ids, heads_dim)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.heads_dim = heads_dim
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin, position_ids = ctx.saved_tensors
        dq, dk = torch.empty_like(dq_out), torch.empty_like(dk_out)
        _launch(dq_out, dk_out, dq, dk, cos, sin, position_ids, ctx.heads_dim, backward=True)
        return dq, dk, None, None, None, None


def _heads_dim(unsqueeze_dim: int) -> int | None:
    """The heads dimension of a 4-D ``q`` for ``unsqueeze_dim``, or ``None`` if unsupported."""
    return {1: 1, 2: 2, -3: 1, -2: 2}.get(unsqueeze_dim)


def _kernel_serves(q, k, cos, sin, position_ids, heads_dim) -> bool:
    if heads_dim is None or q.dim() != 4 or k.dim() != 4:
        return False
    if q.dtype != k.dtype or q.numel() == 0 or k.numel() == 0:
        return False
    tables = (cos, sin) if position_ids is None else (cos, sin, position_ids)
    if any(t.device != q.device for t in (k, *tables)) or not cos.is_floating_point():
        return False
    batch, seq, head_dim = q.shape[0], q.shape[3 - heads_dim], q.shape[3]
    if k.shape[0] != batch or k.shape[3 - heads_dim] != seq or k.shape[3] != head_dim:
        return False
    rotary = cos.shape[-1]
    if rotary % 2 or rotary > head_dim or rotary == 0 or sin.shape != cos.shape:
        return False  # the reference raises the right error, or broadcasts what we do not
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return False  # gradients for cos/sin: the reference's autograd provides them
    if position_ids is not None:
        return (
            cos.dim() == 2
            and position_ids.dim() == 2
            and position_ids.shape[0] in (1, batch)
            and position_ids.shape[1] == seq
            and not position_ids.is_floating_point()
        )
    return cos.dim() == 3 and cos.shape[0] in (1, batch) and cos.shape[1] == seq


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their positions, as transformers' ``apply_rotary_pos_emb``.

    Same signature and result as :func:`sloth_core.ops.reference.rope`: ``q``/``k`` are
    ``[B, H, S, D]`` (``unsqueeze_dim=1``) or ``[B, S, H, D]`` (``unsqueeze_dim=2``), any
    strides, with their own head counts (GQA); ``cos``/``sin`` are ``[B or 1, S, R]``, or
    ``[P, R]`` tables read at ``position_ids`` ``[B or 1, S]``; ``R <= D`` (partial rotary
    passes the rest through). Both are rotated in one launch, into new tensors. Other
    layouts, mixed q/k dtypes and ``cos``/``sin`` that require grad use the reference.
    """
    heads_dim = _heads_dim(unsqueeze_dim)
    if not _kernel_serves(q, k, cos, sin, position_ids, heads_dim):
        return reference.rope(q, k, cos, sin, position_ids, unsqueeze_dim=unsqueeze_dim)
    if not torch.is_grad_enabled():  # a checkpoint's first pass or inference: no Function
        return _rotate(q, k, cos, sin, position_ids, heads_dim)
    return _Rope.apply(q, k, cos, sin, position_ids, heads_dim)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

REGISTRATIONS = [{"op": "rope", "fn": rope, "dtypes": _DTYPES}]
