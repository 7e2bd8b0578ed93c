"""Reference causal-LM losses: cross entropy, and a chunked fused lm_head + cross entropy.

Both follow transformers' ``ForCausalLMLoss``: logits upcast to fp32, optional Gemma 2
softcapping, and with ``num_items_in_batch`` the summed token losses divided by it
(``fixed_cross_entropy``, for gradient accumulation). Labels arrive already shifted.

One deliberate difference from torch: a mean over zero non-ignored tokens is defined as 0
(with zero gradients) where ``F.cross_entropy`` returns NaN, because a batch whose
labels are all masked (a prompt-only packed row, a short last batch) must not poison the
weights. ``num_items_in_batch`` is divided by as given, exactly as transformers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")
#: Target size of one chunk's fp32 logits in :func:`fused_linear_cross_entropy`.
CHUNK_BYTES = 256 * 1024 * 1024


def _softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return logits
    return softcap * torch.tanh(logits / softcap)


def _divide(total: torch.Tensor, num_items_in_batch: torch.Tensor | int | float) -> torch.Tensor:
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token cross entropy in fp32, as transformers' ``ForCausalLMLoss`` computes it.

    Args:
        logits: ``[N, V]``, any float dtype (upcast to fp32 first).
        labels: ``[N]`` integer targets, already aligned with ``logits`` (no shifting).
        ignore_index: label of tokens that do not count.
        softcap: when set, ``logits = softcap * tanh(logits / softcap)`` first (Gemma 2).
        num_items_in_batch: when set, the summed token losses divided by it
            (``fixed_cross_entropy``); ``reduction`` must then be ``"mean"`` or ``"sum"``
            and is overridden.
        reduction: ``"mean"`` over non-ignored tokens (0 when there are none), ``"sum"``,
            or ``"none"`` (per-token ``[N]``, 0 at ignored tokens).

    Returns:
        A scalar fp32 loss, or ``[N]`` with ``reduction="none"``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    logits = _softcap(logits.float(), softcap)
    if num_items_in_batch is not None:
        if reduction == "none":
            raise ValueError("num_items_in_batch needs a reduced loss, not reduction='none'")
        total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        return _divide(total, num_items_in_batch)
    if reduction != "mean":
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum()
    return total / count.clamp(min=1)


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about :data:`CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // (4 * max(1, vocab_size)))


def add_linear_grads(grad, h, weight, rows, grad_hidden, grad_weight, grad_bias) -> None:
    """Backpropagate one chunk's fp32 ``d(logits)`` through ``h @ weight.T + bias``.

    ``grad`` is cast to ``h``'s dtype first, as the unfused path's ``.float()`` does before
    its matmuls; ``grad_hidden[rows]`` is written, the fp32 ``grad_weight`` and
    ``grad_bias`` accumulate. A ``None`` gradient is not computed.
    """
    grad = grad.to(h.dtype)
    if grad_hidden is not None:
        grad_hidden[rows] = grad @ weight
    if grad_weight is not None:
        grad_weight += (grad.t() @ h).float()
    if grad_bias is not None:
        grad_bias += grad.float().sum(0)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    # Gradients are computed during forward, chunk by chunk, while each chunk's logits
    # exist; backward only rescales them. So nothing of size [N, V] outlives a chunk.

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, ignore_index, softcap, num_items_in_batch, chunk_size
    ):
        n_rows = hidden.shape[0]
        chunk_size = chunk_size or default_chunk_size(weight.shape[0])
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        valid = labels != ignore_index
        if num_items_in_batch is None:
            denominator = valid.sum().clamp(min=1).float()
        else:
            denominator = num_items_in_batch
            if isinstance(denominator, torch.Tensor):
                denominator = denominator.to(hidden.device)

        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # fp32 accumulators: the weight gradient sums over every chunk.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None

        for start in range(0, n_rows, chunk_size):
            rows = slice(start, min(start + chunk_size, n_rows))
            # A chunk with no counted row adds zeros: skipping it would read the labels back.
            chunk_valid = valid[rows]
            h = hidden[rows]
            logits = F.linear(h, weight, bias).float()  # in the input dtype, like the unfused path
            if softcap is not None:
                tanh = torch.tanh(logits / softcap)
                logits = softcap * tanh
            targets = torch.where(chunk_valid, labels[rows], 0)
            lse = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
            mask = chunk_valid.float()
            total = total + ((lse - target_logits) * mask).sum()

            # d(loss)/d(logits) = (softmax - onehot) / denominator on valid rows.
            grad = torch.exp(logits - lse.unsqueeze(1))
            grad.scatter_add_(1, targets.unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
            grad = grad * (mask / denominator).unsqueeze(1)
            if softcap is not None:
                grad = grad * (1.0 - tanh * tanh)
            add_linear_grads(grad, h, weight, rows, grad_hidden, grad_weight, grad_bias)

        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return _divide(total, denominator)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_output).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


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

    Walks the tokens ``chunk_size`` rows at a time; each chunk's logits, fp32 loss and
    gradients are computed together, so neither the full ``[N, V]`` fp32 logits nor
    anything of size ``[N, V]`` is kept for backward: only ``[N, H]``, ``[V, H]`` and
    ``[V]`` gradients, which backward scales by the incoming gradient. Same loss and
    gradients as :func:`cross_entropy` (``reduction="mean"``) on the unfused logits.

    Args:
        hidden: ``[N, H]`` final hidden states (leading dims are flattened).
        weight: ``[V, H]`` lm_head weight.
        labels: ``[N]`` targets, already aligned (no shifting).
        bias: ``[V]`` lm_head bias or ``None``.
        ignore_index: label of tokens that do not count.
        softcap: final-logit softcapping (Gemma 2), applied in fp32.
        num_items_in_batch: when set, summed loss divided by it; else mean over
            non-ignored tokens (0 when there are none).
        chunk_size: rows per chunk; default keeps a chunk's fp32 logits near 256 MiB.
        counted: how many labels are not ``ignore_index``, where the caller knows it
            without asking the device (:func:`sloth_core.patches.lm_head.counted_labels`):
            a kernel set may then cut the rows to the counted ones without a host sync.
            The reference walks every row and needs no count.

    Returns:
        A scalar fp32 loss.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {labels.shape[0]} labels")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, bias, labels, ignore_index, softcap, num_items_in_batch, chunk_size
    )
