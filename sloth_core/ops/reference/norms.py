"""Reference normalisations: RMSNorm (Llama, Gemma and gpt-oss flavours) and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    gemma: bool = False,
    cast_after_weight: bool = False,
) -> torch.Tensor:
    """Root-mean-square normalisation over the last dimension, as transformers computes it.

    Args:
        x: ``[..., D]``, any float dtype; also per-head ``[B, S, H, head_dim]`` inputs such
            as Qwen3's ``q_norm``/``k_norm``.
        weight: ``[D]``.
        eps: added to the mean square before the reciprocal square root.
        gemma: ``False`` matches ``LlamaRMSNorm`` (normalise in fp32, cast to ``x.dtype``,
            then ``weight * normed``, so the result takes the promoted dtype of the two).
            ``True`` matches ``GemmaRMSNorm`` (normalise in fp32, multiply by
            ``1 + weight`` in fp32, then cast to ``x.dtype``).
        cast_after_weight: ``True`` matches ``GptOssRMSNorm`` (T5's order: normalise in
            fp32, ``weight * normed`` in fp32, then cast to ``x.dtype``; from_pretrained
            keeps gpt-oss's norm weights in fp32, and the result stays in ``x.dtype``).
            Implied by ``gemma``.

    Returns:
        ``[..., D]``.
    """
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    if gemma:
        # Gemma scales before the downcast, Llama after: the two round differently in bf16.
        return (hidden * (1.0 + weight.float())).to(input_dtype)
    if cast_after_weight:
        return (weight * hidden).to(input_dtype)
    return weight * hidden.to(input_dtype)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalisation over the last dimension, as ``nn.LayerNorm(D)`` computes it.

    Args:
        x: ``[..., D]``.
        weight: ``[D]`` or ``None`` (no elementwise affine scale).
        bias: ``[D]`` or ``None``.
        eps: added to the variance.

    Returns:
        ``[..., D]`` in ``x.dtype``.
    """
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
