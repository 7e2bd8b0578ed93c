"""Row normalisations: RMSNorm (Llama and Gemma flavours) and LayerNorm.

Each program of the forward normalises a tile of ``BLOCK_M`` rows (one row when rows are
long, many when they are short, as in Qwen3's per-head ``q_norm``), reading ``x`` once
and writing ``y`` plus one fp32 statistic per row. The backward reads ``x``, ``dy`` and
the statistics once: a persistent grid (about two programs per SM) walks the row tiles,
writes ``dx`` and keeps the weight (and bias) gradient of its rows in fp32 registers; the
per-program partial sums are reduced afterwards in fp32, so no atomics touch bf16.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sloth_core.ops import reference
from sloth_kernels._utils import MAX_FUSED_SIZE, interpreting, next_power_of_2, row_launch

#: Elements a forward program holds: one 4096-wide row, or 32 rows of a 128-wide head.
#: The forward grid has a program per tile, so several programs per SM hide latency.
_FORWARD_TILE = 4096
#: The backward grid is persistent (few programs, each looping over tiles and prefetching
#: the next), and few programs keep the fp32 partials small (2 x 132 x 4096 x 4 bytes at
#: Llama's width on an H200: ~4% of the pass's traffic). One 4096-wide row a tile beat
#: 8192 on the H200 (scripts/tune_rows.py; 85% of copy bandwidth for fwd + bwd).
_BACKWARD_TILE = 4096
_PROGRAMS_PER_SM = 2
#: Backward programs under the interpreter, where every program instance costs ~1 ms.
_INTERPRETER_PROGRAMS = 4


# -- RMSNorm ----------------------------------------------------------------------------


@triton.jit
def _rms_forward_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, x_stride, y_stride, eps,
    GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    xn = x * rstd[:, None]
    if GEMMA:
        y = xn * (1.0 + w[None, :])
    else:
        # Llama rounds the normalised value to the input dtype before scaling by weight.
        y = w[None, :] * xn.to(x_ptr.dtype.element_ty).to(tl.float32)
    y_ptrs = y_ptr + rows[:, None] * y_stride + cols[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _load_tile(
    dy_ptr, x_ptr, stat_ptr, stat2_ptr, block, n_rows, n_cols, dy_stride, x_stride,
    TWO_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Row tile ``block`` of ``dy`` and ``x`` (raw dtype) and its fp32 row statistics.

    The persistent backward loops call this for the *next* tile before working on the
    current one: the loads are in flight while the SM computes, which keeps HBM busy
    even with one resident program per SM. Past the last tile everything is masked off.
    """
    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0)
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
    stat = tl.load(stat_ptr + rows, mask=row_mask, other=0.0)
    if TWO_STATS:
        stat2 = tl.load(stat2_ptr + rows, mask=row_mask, other=0.0)
    else:
        stat2 = stat
    return dy, x, stat, stat2


@triton.jit
def _rms_backward_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, dy_stride, x_stride, dx_stride,
    GEMMA: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    # Accumulated in the tile's own layout and reduced over rows once, after the loop:
    # a per-iteration reduction would move the tile through shared memory every time.
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    step = tl.num_programs(0)
    dy_next, x_next, stat_next, _ = _load_tile(
        dy_ptr, x_ptr, rstd_ptr, rstd_ptr, pid, n_rows, n_cols, dy_stride, x_stride,
        False, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    for block in range(pid, tl.cdiv(n_rows, BLOCK_M), step):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        dy, x, rstd = dy_next.to(tl.float32), x_next.to(tl.float32), stat_next
        dy_next, x_next, stat_next, _ = _load_tile(
            dy_ptr, x_ptr, rstd_ptr, rstd_ptr, block + step, n_rows, n_cols, dy_stride, x_stride,
            False, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        xn = x * rstd[:, None]
        dxn = dy * w[None, :]
        dot = tl.sum(dxn * xn, axis=1) / n_cols
        dx = rstd[:, None] * (dxn - xn * dot[:, None])
        dx_ptrs = dx_ptr + rows[:, None] * dx_stride + cols[None, :]
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if GEMMA:
                dw += dy * xn
            else:
                # Llama's weight multiplies the normalised value already rounded to x's dtype.
                dw += dy * xn.to(x_ptr.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(dw_ptr + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_mask)


# -- LayerNorm --------------------------------------------------------------------------


@triton.jit
def _ln_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, n_cols, x_stride, y_stride, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * y_stride + cols[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _ln_backward_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
    n_rows, n_cols, dy_stride, x_stride, dx_stride,
    HAS_W: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # Accumulated in the tile's layout, reduced over rows once after the loop (see RMSNorm).
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    step = tl.num_programs(0)
    dy_next, x_next, mean_next, rstd_next = _load_tile(
        dy_ptr, x_ptr, mean_ptr, rstd_ptr, pid, n_rows, n_cols, dy_stride, x_stride,
        True, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    for block in range(pid, tl.cdiv(n_rows, BLOCK_M), step):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        dy, x, mean, rstd = dy_next.to(tl.float32), x_next.to(tl.float32), mean_next, rstd_next
        dy_next, x_next, mean_next, rstd_next = _load_tile(
            dy_ptr, x_ptr, mean_ptr, rstd_ptr, block + step, n_rows, n_cols, dy_stride, x_stride,
            True, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        # Padding columns would otherwise carry -mean * rstd into the row sums.
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            dxhat = dy * w[None, :]
        else:
            dxhat = dy
        c1 = tl.sum(dxhat * xhat, axis=1) / n_cols
        c2 = tl.sum(dxhat, axis=1) / n_cols
        dx = rstd[:, None] * (dxhat - xhat * c1[:, None] - c2[:, None])
        dx_ptrs = dx_ptr + rows[:, None] * dx_stride + cols[None, :]
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += dy * xhat
        if COMPUTE_DB:
            db += dy
    if COMPUTE_DW:
        tl.store(dw_ptr + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(db_ptr + pid * n_cols + cols, tl.sum(db, axis=0), mask=col_mask)


# -- launch helpers ---------------------------------------------------------------------


def _tile(n_rows: int, n_cols: int, tile: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)``: whole rows, about ``tile`` elements a program."""
    block_n = next_power_of_2(n_cols)
    block_m = max(1, min(tile // block_n, next_power_of_2(n_rows)))
    return block_m, block_n, row_launch(block_m * block_n)[1]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _backward_programs(device: torch.device, n_row_blocks: int) -> int:
    if interpreting() or device.type != "cuda":
        target = _INTERPRETER_PROGRAMS
    else:
        target = _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else 0)
    return max(1, min(target, n_row_blocks))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[N, D]`` rows with unit column stride (a view when the layout allows)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _partials(needed: bool, programs: int, like: torch.Tensor) -> torch.Tensor | None:
    """A ``[programs, D]`` fp32 buffer of per-program weight-gradient sums, if ``needed``."""
    if not needed:
        return None
    return torch.empty((programs, like.shape[-1]), dtype=torch.float32, device=like.device)


def _reduce_partials(partials: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if partials is None else partials.sum(0).to(dtype)


def _serves(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    n_cols = x.shape[-1] if x.dim() else 0
    if x.numel() == 0 or n_cols > MAX_FUSED_SIZE or not x.is_floating_point():
        return False
    return all(p is None or (p.shape == (n_cols,) and p.device == x.device) for p in params)


# -- autograd ---------------------------------------------------------------------------


def _rms_forward(x, weight, eps, gemma):
    """``(y [rows, D], x as rows, the contiguous weight, rstd [rows])``."""
    x2, weight = _rows(x), weight.contiguous()
    n_rows, n_cols = x2.shape
    out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_m, block_n, warps = _tile(n_rows, n_cols, _FORWARD_TILE)
    _rms_forward_kernel[(triton.cdiv(n_rows, block_m),)](
        x2, weight, y, rstd, n_rows, n_cols, x2.stride(0), y.stride(0), eps,
        GEMMA=gemma, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return y, x2, weight, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, gemma):
        y, x2, weight, rstd = _rms_forward(x, weight, eps, gemma)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma, ctx.x_shape = gemma, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        n_rows, n_cols = x2.shape
        compute_dw = ctx.needs_input_grad[1]
        block_m, block_n, warps = _tile(n_rows, n_cols, _BACKWARD_TILE)
        programs = _backward_programs(x2.device, triton.cdiv(n_rows, block_m))
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        dw = _partials(compute_dw, programs, x2)
        _rms_backward_kernel[(programs,)](
            dy2, x2, weight, rstd, dx, dx if dw is None else dw, n_rows, n_cols,
            dy2.stride(0), x2.stride(0), dx.stride(0),
            GEMMA=ctx.gemma, COMPUTE_DW=compute_dw,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
        return dx.view(ctx.x_shape), _reduce_partials(dw, weight.dtype), None, None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = _rows(x)
        weight = None if weight is None else weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_m, block_n, warps = _tile(n_rows, n_cols, _FORWARD_TILE)
        _ln_forward_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, x2 if weight is None else weight, x2 if bias is None else bias, y, mean, rstd,
            n_rows, n_cols, x2.stride(0), y.stride(0), eps,
            HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.bias_dtype, ctx.x_shape = None if bias is None else bias.dtype, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        n_rows, n_cols = x2.shape
        compute_dw = weight is not None and ctx.needs_input_grad[1]
        compute_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        block_m, block_n, warps = _tile(n_rows, n_cols, _BACKWARD_TILE)
        programs = _backward_programs(x2.device, triton.cdiv(n_rows, block_m))
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        dw, db = _partials(compute_dw, programs, x2), _partials(compute_db, programs, x2)
        _ln_backward_kernel[(programs,)](
            dy2, x2, x2 if weight is None else weight, mean, rstd, dx,
            dx if dw is None else dw, dx if db is None else db,
            n_rows, n_cols, dy2.stride(0), x2.stride(0), dx.stride(0),
            HAS_W=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
        dw = _reduce_partials(dw, weight.dtype) if compute_dw else None
        db = _reduce_partials(db, ctx.bias_dtype) if compute_db else None
        return dx.view(ctx.x_shape), dw, db, None


# -- registered ops ---------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    gemma: bool = False,
    cast_after_weight: bool = False,
) -> torch.Tensor:
    """RMSNorm over the last dimension, as ``LlamaRMSNorm`` (or ``GemmaRMSNorm`` with ``gemma``).

    Same signature and result as :func:`sloth_core.ops.reference.rms_norm`: math in fp32;
    Llama casts the normalised value to ``x.dtype`` before ``weight *`` (result in the
    promoted dtype of the two), Gemma multiplies by ``1 + weight`` in fp32 and casts to
    ``x.dtype``. ``x`` is ``[..., D]`` with any leading shape; the backward gives ``dx``
    and, when ``weight`` requires grad, ``dweight``. Rows wider than the fused limit or a
    weight not shaped ``[D]`` use the reference, and so does ``cast_after_weight``
    (gpt-oss's order) without ``gemma``: the LoRA kernels' recompute of a norm output
    (:class:`NormSource`) knows the Llama and Gemma orders only.
    """
    if (cast_after_weight and not gemma) or not _serves(x, weight):
        return reference.rms_norm(x, weight, eps, gemma=gemma, cast_after_weight=cast_after_weight)
    if not torch.is_grad_enabled():  # a checkpoint's first pass or inference: no Function
        return _rms_forward(x, weight, float(eps), bool(gemma))[0].view(x.shape)
    out = _RMSNorm.apply(x, weight, float(eps), bool(gemma))
    if out.grad_fn is not None:
        # How to recompute this output (see norm_source): the LoRA ops that consume it
        # save these instead of the output, which the norm's own backward keeps anyway.
        out._sloth_norm = NormSource(x, weight, float(eps), bool(gemma), out.grad_fn, out._version)
    return out


class NormSource:
    """The input, weight and options of an ``rms_norm`` output, to recompute it bitwise."""

    __slots__ = ("x", "weight", "eps", "gemma", "node", "version")

    def __init__(self, x, weight, eps, gemma, node, version) -> None:
        self.x, self.weight, self.eps, self.gemma = x, weight, eps, gemma
        self.node, self.version = node, version


def norm_source(t: torch.Tensor) -> NormSource | None:
    """The :class:`NormSource` of ``t`` if ``t`` is an untouched ``rms_norm`` output.

    Untouched: its autograd node is still the norm's (an in-place change would replace it)
    and its version counter has not moved (no in-place change under ``no_grad`` either).
    """
    source = getattr(t, "_sloth_norm", None)
    if source is None or t._version != source.version:
        return None
    try:
        untouched = t.grad_fn is source.node
    except RuntimeError:  # a view output changed in place: autograd refuses it anyway
        return None
    return source if untouched else None


def recompute_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool
) -> torch.Tensor:
    """The forward of ``rms_norm`` again, without autograd: the same kernel, the same bits."""
    with torch.no_grad():
        return _rms_forward(x, weight, eps, gemma)[0].view(x.shape)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dimension, as ``nn.LayerNorm(D)`` (``weight``/``bias`` optional).

    Same signature and result as :func:`sloth_core.ops.reference.layer_norm`, output in
    ``x.dtype``; the forward saves the per-row mean and rstd (fp32) and the backward gives
    ``dx``, ``dweight`` and ``dbias``. Rows wider than the fused limit use the reference.
    """
    if not _serves(x, weight, bias):
        return reference.layer_norm(x, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, float(eps))


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

REGISTRATIONS = [
    {"op": "rms_norm", "fn": rms_norm, "dtypes": _DTYPES},
    {"op": "layer_norm", "fn": layer_norm, "dtypes": _DTYPES},
]
