"""Triton cross entropy over rows of logits, and the row kernels the fused loss reuses.

One program per row walks the vocabulary in blocks with an online logsumexp in fp32
(so any vocabulary size fits), applying Gemma 2's softcap ``c * tanh(z / c)`` and a
temperature ``z / T`` (the preference losses' log-probs) on the fly.
Forward keeps only the per-row logsumexp ``[N]`` besides its inputs; backward recomputes
the softmax from the saved logits and writes ``(softmax - onehot) * dloss`` (through the
softcap's derivative) in the logits dtype. Ignored rows cost one label load and give a
zero loss and zero gradient.

The jitted row helpers, :func:`row_loss_kernel` and :func:`row_grad_kernel` are shared with
:mod:`sloth_kernels.fused_linear_cross_entropy`, which runs the forward kernel with
``WRITE_GRAD`` to turn a chunk's logits into their gradient in place, and with
:mod:`sloth_kernels.log_probs` (a log-prob is minus a row's loss).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sloth_core.ops.reference import cross_entropy as reference_cross_entropy
from sloth_kernels._utils import kernel_devices, next_power_of_2

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")

#: Vocabulary elements one program handles per loop step. Rows are streamed, so this
#: only trades registers against loop steps; 4096 with 8 warps is 16 fp32 values a
#: thread and lets ~8 programs share an SM (a 1024-row chunk is then about one wave).
MAX_BLOCK = 4096


@triton.jit
def _tanh(x):
    # Portable Triton has no tanh; this form saturates cleanly to +-1 for large |x|.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _transform(x, softcap, temperature, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr):
    """fp32 ``z = softcap * tanh(x / softcap) / temperature`` (each when asked), and
    ``dz/dx``'s softcap factor ``1 - tanh**2`` (1 without a softcap)."""
    t = x
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        x = softcap * t
    if HAS_TEMPERATURE:
        x = x / temperature
    return x, t


@triton.jit
def _row_logsumexp(
    row_ptr, n_cols, softcap, temperature,
    HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """fp32 logsumexp of one (softcapped, tempered) row, streamed block by block."""
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        z, _ = _transform(z, softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        # Re-mask after the softcap: capped padding would be -c, not -inf.
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    return m + tl.log(d)


@triton.jit
def _target_logit(
    row_ptr, label, n_cols, softcap, temperature,
    HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
):  # fmt: skip
    # Masked so that an out-of-range label reads nothing out of bounds (it is not checked).
    in_range = (label >= 0) & (label < n_cols)
    z = tl.load(row_ptr + label, mask=in_range, other=0.0).to(tl.float32)
    z, _ = _transform(z, softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
    return z


@triton.jit
def _store_row_grad(
    in_ptr, out_ptr, label, lse, scale, n_cols, softcap, temperature,
    HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``out = scale * (softmax(z) - onehot(label)) * dz/dx`` for one row; in == out is fine."""
    if HAS_TEMPERATURE:
        scale = scale / temperature  # dz/dx's 1 / T
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(in_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        z, t = _transform(x, softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE)
        g = tl.exp(z - lse)
        g = tl.where(cols == label, g - 1.0, g) * scale
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)  # d(c * tanh(x / c))/dx
        tl.store(out_ptr + cols, g.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_zero_row(out_ptr, n_cols, BLOCK: tl.constexpr):
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        zeros = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + cols, zeros, mask=cols < n_cols)


@triton.jit
def row_loss_kernel(
    logits_ptr,
    logits_stride,
    labels_ptr,
    loss_ptr,
    lse_ptr,
    scale_ptr,
    scale_stride,
    n_cols,
    ignore_index,
    softcap,
    temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    STORE_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-row fp32 loss (0 when ignored), optionally its lse, optionally d(loss)/d(logits).

    With ``WRITE_GRAD`` the row of logits is overwritten in place with its gradient,
    scaled by ``scale_ptr[row * scale_stride]`` (stride 0: one scale for every row).
    """
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 at 16k x 128k
    row_ptr = logits_ptr + row * logits_stride
    label = tl.load(labels_ptr + row)
    if label != ignore_index:
        lse = _row_logsumexp(
            row_ptr, n_cols, softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK
        )
        target = _target_logit(
            row_ptr, label, n_cols, softcap, temperature, HAS_SOFTCAP, HAS_TEMPERATURE
        )
        tl.store(loss_ptr + row, lse - target)
        if STORE_LSE:
            tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:
            scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
            _store_row_grad(
                row_ptr, row_ptr, label, lse, scale, n_cols, softcap, temperature,
                HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK,
            )  # fmt: skip
    else:
        tl.store(loss_ptr + row, 0.0)
        if STORE_LSE:
            tl.store(lse_ptr + row, 0.0)
        if WRITE_GRAD:
            _store_zero_row(row_ptr, n_cols, BLOCK)


@triton.jit
def row_grad_kernel(
    logits_ptr,
    logits_stride,
    grad_ptr,
    grad_stride,
    labels_ptr,
    lse_ptr,
    dloss_ptr,
    dloss_stride,
    n_cols,
    ignore_index,
    softcap,
    temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row ``i`` of ``grad`` is ``dloss[i] * d(loss_i)/d(logits_i)`` (0 when ignored), from
    the row's saved ``lse``; ``grad`` may be the logits themselves (in place)."""
    row = tl.program_id(0).to(tl.int64)
    grad_row = grad_ptr + row * grad_stride
    label = tl.load(labels_ptr + row)
    if label != ignore_index:
        lse = tl.load(lse_ptr + row)
        scale = tl.load(dloss_ptr + row * dloss_stride).to(tl.float32)
        logits_row = logits_ptr + row * logits_stride
        _store_row_grad(
            logits_row, grad_row, label, lse, scale, n_cols, softcap, temperature,
            HAS_SOFTCAP, HAS_TEMPERATURE, BLOCK,
        )  # fmt: skip
    else:
        _store_zero_row(grad_row, n_cols, BLOCK)


def row_launch_config(n_cols: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of the streaming row kernels for rows of ``n_cols``."""
    block = min(next_power_of_2(n_cols), MAX_BLOCK)
    return block, (8 if block >= 2048 else 4)


def logit_args(softcap: float | None, temperature: float = 1.0) -> dict:
    """The row kernels' ``softcap``, ``temperature``, ``HAS_SOFTCAP`` and ``HAS_TEMPERATURE``
    arguments; floats, so that an int cap is not integer math."""
    return {
        "softcap": 0.0 if softcap is None else float(softcap),
        "temperature": float(temperature),
        "HAS_SOFTCAP": softcap is not None,
        "HAS_TEMPERATURE": temperature != 1.0,
    }


def _row_losses(logits, labels, ignore_index, softcap):
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block, num_warps = row_launch_config(n_cols)
    row_loss_kernel[(n_rows,)](
        logits, logits.stride(0), labels, losses, lse, lse, 0, n_cols, ignore_index,
        **logit_args(softcap), STORE_LSE=True, WRITE_GRAD=False, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return losses, lse


def _row_grads(logits, labels, lse, dlosses, ignore_index, softcap):
    n_rows, n_cols = logits.shape
    grad = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    block, num_warps = row_launch_config(n_cols)
    row_grad_kernel[(n_rows,)](
        logits, logits.stride(0), grad, grad.stride(0), labels, lse, dlosses, dlosses.stride(0),
        n_cols, ignore_index, **logit_args(softcap), BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return grad


class _CrossEntropyRows(torch.autograd.Function):
    # Per-row losses only; the reductions stay in torch so autograd hands backward the
    # exact per-row scale (an expanded scalar for mean/sum: stride 0, no copy).

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, softcap):
        losses, lse = _row_losses(logits, labels, ignore_index, softcap)
        ctx.save_for_backward(logits, labels, lse)
        ctx.options = (ignore_index, softcap)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlosses):
        logits, labels, lse = ctx.saved_tensors
        ignore_index, softcap = ctx.options
        return _row_grads(logits, labels, lse, dlosses, ignore_index, softcap), None, None, None


def _kernel_serves(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    return (
        logits.dim() == 2
        and labels.dim() == 1
        and labels.shape[0] == logits.shape[0]
        and logits.numel() > 0
        and logits.dtype in _FLOATS
        and not labels.is_floating_point()
        and labels.device == logits.device
        and logits.device.type in kernel_devices()
    )


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token cross entropy in fp32 with a Triton kernel; same contract as the reference.

    Args:
        logits: ``[N, V]`` fp32/fp16/bf16 logits (any other layout or dtype, and invalid
            options, go to :func:`sloth_core.ops.reference.cross_entropy`).
        labels: ``[N]`` integer targets, already aligned (no shifting).
        ignore_index: label of tokens that do not count.
        softcap: when set, ``softcap * tanh(logits / softcap)`` first (Gemma 2).
        num_items_in_batch: when set, the summed loss divided by it.
        reduction: ``"mean"`` over non-ignored tokens (0 when there are none), ``"sum"``
            or ``"none"`` (per-token fp32 ``[N]``, 0 at ignored tokens).

    Returns:
        A scalar fp32 loss, or ``[N]`` with ``reduction="none"``.
    """
    if (
        reduction not in _REDUCTIONS
        or (num_items_in_batch is not None and reduction == "none")
        or not _kernel_serves(logits, labels)
    ):
        return reference_cross_entropy(
            logits, labels, ignore_index=ignore_index, softcap=softcap,
            num_items_in_batch=num_items_in_batch, reduction=reduction,
        )  # fmt: skip
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    labels = labels.contiguous()
    losses = _CrossEntropyRows.apply(logits, labels, ignore_index, softcap)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(losses.device)
        return losses.sum() / num_items_in_batch
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    count = (labels != ignore_index).sum()
    return losses.sum() / count.clamp(min=1)


REGISTRATIONS = [{"op": "cross_entropy", "fn": cross_entropy, "dtypes": _FLOATS}]
