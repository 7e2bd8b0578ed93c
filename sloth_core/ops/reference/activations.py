"""Reference gated activations of the MLP: SwiGLU (Llama) and GeGLU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GELU_APPROXIMATIONS = ("none", "tanh")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, in the input dtype, as ``LlamaMLP`` computes it.

    Args:
        gate: ``[..., I]``, the gate projection's output.
        up: ``[..., I]``, the up projection's output.

    Returns:
        ``[..., I]``.
    """
    return F.silu(gate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate) * up``, as ``GemmaMLP`` computes it.

    Args:
        gate: ``[..., I]``, the gate projection's output.
        up: ``[..., I]``, the up projection's output.
        approximate: ``"none"`` (exact erf GELU) or ``"tanh"`` (transformers'
            ``gelu_pytorch_tanh``, the one Gemma uses).

    Returns:
        ``[..., I]``.
    """
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_GELU_APPROXIMATIONS}, got {approximate!r}")
    return F.gelu(gate, approximate=approximate) * up
