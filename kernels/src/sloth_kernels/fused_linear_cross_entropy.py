"""Fused lm_head + cross entropy: chunked over tokens, gradients computed in the forward.

Only the counted tokens' rows (labels other than ``ignore_index``) are computed, gathered
first (one host sync), so a prompt's or padding's rows cost no matmul. Per chunk of them:
the logits come from one cuBLAS matmul in the input dtype (as the
unfused ``F.linear(h, w).float()`` path computes them), then one Triton kernel
(:func:`sloth_kernels.cross_entropy.row_loss_kernel`) takes each row's fp32 logsumexp and
loss and overwrites the logits buffer in place with ``d(loss)/d(logits)``; two more
matmuls turn that into the hidden and weight gradients. So only one chunk of logits ever
exists (default at most :data:`CHUNK_BYTES` in the compute dtype), nothing of size
``[N, V]`` is kept for backward, and backward only scales the stored gradients.

Precision: each chunk's gradient matmuls run in cuBLAS with fp32 accumulation, but the
weight gradient is summed across chunks in the weight dtype (``addmm_`` with beta=1, so
a bf16 weight adds one bf16 rounding per chunk, ~2**-9 relative each, against the
reference's fp32 accumulator). That keeps the extra memory at ``[V, H]`` in the weight
dtype instead of fp32 (2.1 GB for a 128k x 4k head); an fp32 weight sums in fp32. The
bias gradient, only ``[V]``, is summed in fp32.
"""

from __future__ import annotations

import math

import torch

from sloth_core.ops.reference import fused_linear_cross_entropy as reference_flce
from sloth_kernels._utils import kernel_devices
from sloth_kernels.cross_entropy import logit_args, row_launch_config, row_loss_kernel

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

#: Largest size of one chunk's logits, in the compute (input) dtype.
CHUNK_BYTES = 256 * 1024 * 1024
#: Default chunks are a multiple of this many rows, a friendly M for the matmuls.
ROW_MULTIPLE = 64


def default_chunk_size(n_rows: int, vocab_size: int, element_size: int) -> int:
    """Rows per chunk: logits of at most :data:`CHUNK_BYTES`, chunks of even size.

    The cap is rounded down to a multiple of :data:`ROW_MULTIPLE`; then the rows are
    split into as few chunks as that allows, of equal size rounded up to the multiple,
    so the last chunk is not a sliver (8192 rows at 128256 x bf16: 8 chunks of 1024).
    """
    cap = max(1, CHUNK_BYTES // (element_size * max(1, vocab_size)))
    if cap >= ROW_MULTIPLE:
        cap -= cap % ROW_MULTIPLE
    n_chunks = math.ceil(n_rows / cap)
    rows = math.ceil(n_rows / max(1, n_chunks))
    if cap >= ROW_MULTIPLE:
        rows = min(cap, math.ceil(rows / ROW_MULTIPLE) * ROW_MULTIPLE)
    return max(1, min(rows, n_rows))


def _fused_forward(
    hidden, weight, bias, labels, ignore_index, softcap, num_items_in_batch, chunk_size, needs
):
    """Loss, and the gradients of the inputs flagged in ``needs`` (unscaled by dloss)."""
    need_hidden, need_weight, need_bias = needs
    need_grad = need_hidden or need_weight or need_bias
    device, dtype = hidden.device, hidden.dtype
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or default_chunk_size(n_rows, vocab, hidden.element_size())

    # The gradient's 1/denominator covers the whole batch, so count before any chunk.
    valid = labels != ignore_index
    if num_items_in_batch is None:
        denominator = valid.sum().clamp(min=1).float()
    else:
        denominator = num_items_in_batch
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(device)
    if isinstance(denominator, torch.Tensor):
        inv_denominator = (1.0 / denominator.float()).reshape(1)
    else:  # a plain number: a fill, not a host-to-device copy
        inv = math.inf if denominator == 0 else 1.0 / denominator
        inv_denominator = torch.full((1,), inv, dtype=torch.float32, device=device)

    losses = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad_hidden = None
    if need_hidden:
        grad_hidden = torch.empty((n_rows, hidden.shape[1]), dtype=dtype, device=device)
    grad_weight = None  # allocated by the first chunk's matmul
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias else None
    block, num_warps = row_launch_config(vocab)
    buffer = None

    # Every row is a counted token's (fused_linear_cross_entropy gathers them first).
    for index in range(-(-n_rows // chunk)):
        start = index * chunk
        stop = min(start + chunk, n_rows)
        if buffer is None:
            buffer = torch.empty((min(chunk, n_rows), vocab), dtype=dtype, device=device)
        h = hidden[start:stop]
        logits = buffer[: stop - start]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        row_loss_kernel[(stop - start,)](
            logits, logits.stride(0), labels[start:stop], losses[start:stop], losses,
            inv_denominator, 0, vocab, ignore_index, **logit_args(softcap),
            STORE_LSE=False, WRITE_GRAD=need_grad, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
        if not need_grad:
            continue
        dlogits = logits  # overwritten in place by the kernel
        if need_hidden:
            torch.mm(dlogits, weight, out=grad_hidden[start:stop])
        if need_weight:
            if grad_weight is None:
                grad_weight = torch.mm(dlogits.t(), h)
            else:
                grad_weight.addmm_(dlogits.t(), h)
        if need_bias:
            grad_bias += dlogits.sum(dim=0, dtype=torch.float32)

    if need_weight and grad_weight is None:  # every label ignored
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    loss = losses.sum() / denominator
    return loss, grad_hidden, grad_weight, grad_bias


def _is_one(grad_output: torch.Tensor) -> bool:
    # One sync in backward buys skipping a full pass over [V, H] and [N, H] in the usual
    # case (the loss is the root of backward, so grad_output is exactly 1).
    return grad_output.numel() == 1 and bool(grad_output == 1)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, ignore_index, softcap, num_items_in_batch, chunk_size
    ):
        loss, grad_hidden, grad_weight, grad_bias = _fused_forward(
            hidden, weight, bias, labels, ignore_index, softcap, num_items_in_batch, chunk_size,
            ctx.needs_input_grad[:3],
        )  # fmt: skip
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # Out of place, so that a retained graph can run backward again. Without a weight
        # gradient (LoRA) the product is an [N, H] pass, cheaper than a host sync that
        # would drain the GPU's queue at the backward's start; a [V, H] weight gradient
        # (a trained head) is worth the sync that tells whether grad_output is 1.
        if grad_weight is None or not _is_one(grad_output):
            if grad_hidden is not None:
                grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight = grad_weight * grad_output.to(grad_weight.dtype)
            if grad_bias is not None:
                grad_bias = grad_bias * grad_output
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _kernel_serves(hidden, weight, bias, labels, chunk_size) -> bool:
    return (
        hidden.dtype in _FLOATS
        and weight.dtype == hidden.dtype
        and weight.dim() == 2
        and weight.shape[0] > 0
        and hidden.shape[-1] == weight.shape[1]
        and hidden.numel() > 0
        and (bias is None or (bias.dtype == weight.dtype and bias.shape == weight.shape[:1]))
        and not labels.is_floating_point()
        and labels.numel() * hidden.shape[-1] == hidden.numel()
        and hidden.device == weight.device
        and (bias is None or bias.device == hidden.device)
        and hidden.device.type in kernel_devices()
        and (chunk_size is None or chunk_size >= 1)
    )


def counted_rows(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                 counted: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``[N, H]`` hidden rows and ``[N]`` labels cut to the counted tokens' (labels other
    than ``ignore_index``), and their indices; ``None`` where every token counts (nothing
    copied). The head then runs no matmul for a prompt's or padding's rows wherever they
    fall in a chunk (train_on_responses_only, DPO's prompts, left padding).

    Without ``counted`` (how many count) finding the rows is one host sync, at the loss:
    it drains the forward's queue, which a host-bound step (llama-1b's) needs ahead of
    the GPU for its backward. With it, none."""
    if counted is None:
        index = (labels != ignore_index).nonzero().squeeze(1)
        if index.numel() == labels.numel():
            return hidden, labels, None
    elif counted == labels.numel():
        return hidden, labels, None
    else:
        # A stable sort puts the counted rows first, in order: their indices without
        # reading the labels back.
        index = torch.argsort((labels == ignore_index).to(torch.uint8), stable=True)[:counted]
    return hidden.index_select(0, index), labels.index_select(0, index), index


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    counted: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` without materialising the logits.

    Same loss and gradients as :func:`sloth_core.ops.reference.fused_linear_cross_entropy`
    (mean over non-ignored tokens, 0 when there are none; or the sum divided by
    ``num_items_in_batch``), computed chunk by chunk with cuBLAS and one Triton kernel.

    Args:
        hidden: ``[..., H]`` final hidden states (leading dims are flattened).
        weight: ``[V, H]`` lm_head weight, same dtype as ``hidden``.
        labels: targets, one per hidden row, already aligned (no shifting).
        bias: ``[V]`` lm_head bias or ``None``.
        ignore_index: label of tokens that do not count.
        softcap: final-logit softcapping (Gemma 2), applied in fp32.
        num_items_in_batch: when set, summed loss divided by it.
        chunk_size: rows per chunk; default keeps a chunk's logits, in the input dtype,
            at most :data:`CHUNK_BYTES` (see :func:`default_chunk_size`).
        counted: how many labels are not ``ignore_index``, when the caller knows it:
            the counted rows are then found without a host sync (:func:`counted_rows`).

    Returns:
        A scalar fp32 loss. Mismatched dtypes or devices, and unsupported devices, go to
        the reference (which raises where the arguments are invalid).
    """
    if not _kernel_serves(hidden, weight, bias, labels, chunk_size):
        return reference_flce(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap,
            num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
        )  # fmt: skip
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device).contiguous()
    # The loss's denominator counts the same tokens either way.
    hidden, labels, _ = counted_rows(hidden, labels, ignore_index, counted)
    args = (hidden, weight, bias, labels, ignore_index, softcap, num_items_in_batch, chunk_size)
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FusedLinearCrossEntropy.apply(*args)
    # Nothing to differentiate: the kernel computes the loss only, no gradient matmuls.
    return _fused_forward(*args, (False, False, False))[0]


REGISTRATIONS = [
    {"op": "fused_linear_cross_entropy", "fn": fused_linear_cross_entropy, "dtypes": _FLOATS}
]
