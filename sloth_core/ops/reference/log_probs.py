"""Reference per-token log-probabilities of given labels, chunked: never the ``[N, V]`` logits.

Preference and RL losses (DPO, ORPO, SimPO, KTO, GRPO) need ``log p(label | context)`` of
every completion token, under the policy and the reference model, and weight each token
differently. Computing them from the full logits costs ``N * V * 4`` bytes (4.2 GB for
8k tokens of a 128k vocabulary); here the tokens are walked ``chunk_size`` rows at a time.

Forward keeps only its inputs and the ``[N]`` log-sum-exp; backward takes the
per-token gradient ``[N]`` and recomputes each chunk's logits to turn it into the hidden,
weight and bias gradients. Every step rounds where the unfused path does:

    z = F.linear(hidden, weight, bias).float()      # the matmul in the input dtype
    z = softcap * tanh(z / softcap)                 # when softcap (Gemma 2)
    log_softmax(z / temperature, -1).gather(label)  # fp32

and in backward ``d(logits)`` is cast back to the input dtype before the matmuls, as
autograd's ``.float()`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss import add_linear_grads, default_chunk_size


def _chunk_logits(h, weight, bias, softcap, temperature):
    """fp32 ``z / temperature`` of one chunk, and ``tanh(logits / softcap)`` (or None)."""
    z = F.linear(h, weight, bias).float()  # in the input dtype, like the unfused path
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(z / softcap)
        z = softcap * tanh
    if temperature != 1.0:
        z = z / temperature
    return z, tanh


def _chunks(valid: torch.Tensor, chunk_size: int):
    """``(rows, valid[rows])`` of every chunk with at least one counted token."""
    for start in range(0, valid.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, valid.shape[0]))
        if bool(valid[rows].any()):  # a chunk with no label has no log-prob, no gradient
            yield rows, valid[rows]


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, temperature, ignore_index, chunk):
        valid = labels != ignore_index
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # The log-sum-exp in two parts, the row max and the log of the shifted sum, so
        # that ``(z - max) - log_sum`` rounds as log_softmax does: one fp32 lse would
        # carry an error of half its ulp (5e-7 at 8) into every probability of the row.
        row_max, log_sum = torch.zeros_like(out), torch.zeros_like(out)
        for rows, chunk_valid in _chunks(valid, chunk):
            z, _ = _chunk_logits(hidden[rows], weight, bias, softcap, temperature)
            targets = torch.where(chunk_valid, labels[rows], 0).unsqueeze(1)
            m = z.amax(dim=-1, keepdim=True)
            z = z.sub_(m)
            s = torch.exp(z).sum(-1).log_()
            log_probs = z.gather(1, targets).squeeze(1) - s
            out[rows] = torch.where(chunk_valid, log_probs, 0.0)
            row_max[rows], log_sum[rows] = m.squeeze(1), s
        ctx.save_for_backward(hidden, weight, bias, labels, row_max, log_sum)
        ctx.options = (softcap, temperature, ignore_index, chunk)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        hidden, weight, bias, labels, row_max, log_sum = ctx.saved_tensors
        softcap, temperature, ignore_index, chunk = ctx.options
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_output = grad_output.float()
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # fp32 accumulators: the weight and bias gradients sum over every chunk.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None

        for rows, chunk_valid in _chunks(labels != ignore_index, chunk):
            h = hidden[rows]
            z, tanh = _chunk_logits(h, weight, bias, softcap, temperature)
            targets = torch.where(chunk_valid, labels[rows], 0).unsqueeze(1)
            scale = torch.where(chunk_valid, grad_output[rows], 0.0).unsqueeze(1)
            # d(log_softmax(z)[t])/dz = onehot(t) - softmax(z), times the token's gradient.
            z = z.sub_(row_max[rows].unsqueeze(1)).sub_(log_sum[rows].unsqueeze(1))
            grad = z.exp_().neg_()
            grad.scatter_add_(1, targets, torch.ones_like(scale))
            grad.mul_(scale)
            if temperature != 1.0:
                grad.div_(temperature)
            if tanh is not None:
                grad.mul_(1.0 - tanh * tanh)  # d(c * tanh(x / c))/dx
            add_linear_grads(grad, h, weight, rows, grad_hidden, grad_weight, grad_bias)

        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def check_log_prob_args(hidden, weight, labels, softcap, temperature, chunk_size) -> None:
    """Raise ``ValueError`` on arguments :func:`token_log_probs` cannot take."""
    if labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(
            f"hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not [V, {hidden.shape[-1]}]")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


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

    ``logits = hidden @ weight.T + bias`` in the input dtype, upcast to fp32, softcapped
    when asked; equal to ``torch.log_softmax(F.linear(h, w, b).float() / temperature,
    -1).gather(-1, labels)`` forward and backward. Walks ``chunk_size`` rows at a time:
    forward keeps its inputs and the ``[N]`` log-sum-exp, backward recomputes each
    chunk's logits, so nothing of size ``[N, V]`` ever exists.

    Args:
        hidden: ``[..., H]`` final hidden states (leading dims are flattened).
        weight: ``[V, H]`` lm_head weight.
        labels: ``[...]`` integer targets, one per hidden row, already aligned (no
            shifting).
        bias: ``[V]`` lm_head bias or ``None``.
        softcap: final-logit softcapping ``softcap * tanh(logits / softcap)`` (Gemma 2),
            in fp32, before the temperature.
        temperature: the (softcapped) logits are divided by it (TRL's sampling
            temperature).
        ignore_index: label of tokens without a log-probability: exactly 0 there, with
            zero gradient.
        chunk_size: rows per chunk; default keeps a chunk's fp32 logits near 256 MiB.
        counted: how many labels are not ``ignore_index``, where the caller knows it
            (see :func:`fused_linear_cross_entropy`); the reference needs no count.

    Returns:
        fp32 log-probabilities in ``labels``' shape. Backward takes a per-token gradient;
        the weight and bias gradients are summed in fp32 and cast to their dtype.
    """
    check_log_prob_args(hidden, weight, labels, softcap, temperature, chunk_size)
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    out = _TokenLogProbs.apply(
        hidden, weight, bias, labels, softcap, float(temperature), ignore_index, chunk
    )
    return out.view(shape)
