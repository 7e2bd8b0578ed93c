"""Per-token log-probabilities of given labels from hidden states and the lm_head, chunked.

Only the rows of counted tokens (labels other than ``ignore_index``) are computed, gathered
first. Per chunk of them: the logits come from one cuBLAS matmul in the input dtype into a
reused ``[chunk, V]`` buffer (as the unfused ``F.linear(h, w).float()`` computes them);
the row-wise work is Triton, the cross-entropy row kernels of
:mod:`sloth_kernels.cross_entropy` (a log-prob is minus a row's loss): forward takes each
row's online fp32 log-sum-exp over the vocabulary with the softcap and temperature, and
gathers the target; backward recomputes the chunk's logits and overwrites them in place
with ``g * (onehot - softmax) * dz/dx``, which two more matmuls turn into the hidden and
weight gradients. So only one chunk of logits ever exists, and forward keeps only the
counted rows, their labels and fp32 log-sum-exp.

Precision: the weight gradient is summed across chunks in fp32 (``[V, H]`` fp32 extra
while backward runs, 2.1 GB for a 128k x 4k head; a frozen lm_head, the LoRA case, needs
none) and cast to the weight dtype at the end; the bias gradient likewise.
"""

from __future__ import annotations

import torch

from sloth_core.ops.reference import token_log_probs as reference_token_log_probs
from sloth_core.ops.reference.log_probs import check_log_prob_args
from sloth_kernels.cross_entropy import (
    logit_args,
    row_grad_kernel,
    row_launch_config,
    row_loss_kernel,
)
from sloth_kernels.fused_linear_cross_entropy import (
    _kernel_serves,
    counted_rows,
    default_chunk_size,
)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _chunk_logits(hidden, weight, bias, labels, ignore_index, chunk_size):
    """``(rows, logits)`` of every chunk (every row a counted token's: see
    :func:`token_log_probs`), the logits in the input dtype in one reused buffer (each
    chunk's overwrite the last's)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or default_chunk_size(n_rows, vocab, hidden.element_size())
    buffer = None
    for index in range(-(-n_rows // chunk)):
        start, stop = index * chunk, min((index + 1) * chunk, n_rows)
        if buffer is None:
            buffer = torch.empty(
                (min(chunk, n_rows), vocab), dtype=hidden.dtype, device=hidden.device
            )
        logits = buffer[: stop - start]
        if bias is None:
            torch.mm(hidden[start:stop], weight.t(), out=logits)
        else:
            torch.addmm(bias, hidden[start:stop], weight.t(), out=logits)
        yield slice(start, stop), logits


def _forward(hidden, weight, bias, labels, options):
    """fp32 log-probs ``[N]`` (0 at ignored tokens) and the ``[N]`` fp32 log-sum-exp."""
    softcap, temperature, ignore_index, chunk_size = options
    losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse = torch.zeros_like(losses)
    block, num_warps = row_launch_config(weight.shape[0])
    for rows, logits in _chunk_logits(hidden, weight, bias, labels, ignore_index, chunk_size):
        row_loss_kernel[(logits.shape[0],)](
            logits, logits.stride(0), labels[rows], losses[rows], lse[rows], lse, 0,
            weight.shape[0], ignore_index, **logit_args(softcap, temperature),
            STORE_LSE=True, WRITE_GRAD=False, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return losses.neg_(), lse


def _backward(hidden, weight, bias, labels, lse, grad_output, options, needs):
    softcap, temperature, ignore_index, chunk_size = options
    need_hidden, need_weight, need_bias = needs
    grad_hidden = (
        torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    )
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
    # d(log p)/d(logits) = -d(loss)/d(logits): the loss kernel's gradient scaled by -g.
    scale = grad_output.neg().float().contiguous()
    block, num_warps = row_launch_config(weight.shape[0])
    for rows, logits in _chunk_logits(hidden, weight, bias, labels, ignore_index, chunk_size):
        row_grad_kernel[(logits.shape[0],)](
            logits, logits.stride(0), logits, logits.stride(0), labels[rows], lse[rows],
            scale[rows], 1, weight.shape[0], ignore_index, **logit_args(softcap, temperature),
            BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
        dlogits = logits  # overwritten in place by the kernel
        if need_hidden:
            torch.mm(dlogits, weight, out=grad_hidden[rows])
        if need_weight and weight.dtype == torch.float32:
            grad_weight.addmm_(dlogits.t(), hidden[rows])
        elif need_weight:  # the chunk's product in the input dtype, summed in fp32
            grad_weight += torch.mm(dlogits.t(), hidden[rows])
        if need_bias:
            grad_bias += dlogits.sum(dim=0, dtype=torch.float32)
    if need_weight:
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, temperature, ignore_index, chunk):
        ctx.options = (softcap, temperature, ignore_index, chunk)
        out, lse = _forward(hidden, weight, bias, labels, ctx.options)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grads = _backward(
            hidden, weight, bias, labels, lse, grad_output, ctx.options, ctx.needs_input_grad[:3]
        )
        return *grads, None, None, None, None, None


def token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    counted: int | None = None,
) -> torch.Tensor:
    """Per-token ``log_softmax(logits / temperature)[label]`` without the full logits.

    Same contract as :func:`sloth_core.ops.reference.token_log_probs`: fp32 log-probs in
    ``labels``' shape, exactly 0 (and zero gradient) at ``ignore_index``; backward takes
    a per-token gradient. Computed chunk by chunk with cuBLAS and Triton row kernels.

    Args:
        hidden: ``[..., H]`` final hidden states (leading dims are flattened).
        weight: ``[V, H]`` lm_head weight, same dtype as ``hidden``.
        labels: ``[...]`` targets, one per hidden row, already aligned (no shifting).
        bias: ``[V]`` lm_head bias or ``None``.
        softcap: final-logit softcapping (Gemma 2), in fp32, before the temperature.
        temperature: the (softcapped) logits are divided by it.
        ignore_index: label of tokens without a log-probability.
        chunk_size: rows per chunk; default keeps a chunk's logits, in the input dtype,
            at most 256 MiB (:func:`sloth_kernels.fused_linear_cross_entropy.default_chunk_size`).
        counted: how many labels are not ``ignore_index``, when the caller knows it:
            the counted rows are then found without a host sync.

    Returns:
        fp32 ``[...]``. Mismatched dtypes or devices, and unsupported devices, go to the
        reference.
    """
    check_log_prob_args(hidden, weight, labels, softcap, temperature, chunk_size)
    if not _kernel_serves(hidden, weight, bias, labels, chunk_size):
        return reference_token_log_probs(
            hidden, weight, labels, bias=bias, softcap=softcap, temperature=temperature,
            ignore_index=ignore_index, chunk_size=chunk_size,
        )  # fmt: skip
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device).contiguous()
    # The counted tokens' rows only; the others' log-probs (and gradients) are 0.
    hidden, labels, index = counted_rows(hidden, labels, ignore_index, counted)
    out = _TokenLogProbs.apply(
        hidden, weight, bias, labels, softcap, float(temperature), ignore_index, chunk_size
    )
    if index is not None:
        out = out.new_zeros(shape.numel()).index_copy(0, index, out)
    return out.view(shape)


REGISTRATIONS = [{"op": "token_log_probs", "fn": token_log_probs, "dtypes": _FLOATS}]
