"""Named ops: the registry, and the plain-PyTorch references every kernel is tested against.

Importing this package imports torch only; PEFT and bitsandbytes objects are read
duck-typed (see :class:`LoRALinear`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import reference
from .reference import ExpertLinear, LoRALinear
from .registry import OpImpl, OpRegistry

#: Every op the core defines, in the order of DESIGN.md section 3, with its reference.
REFERENCE_OPS: dict[str, Callable[..., Any]] = {
    "rms_norm": reference.rms_norm,
    "layer_norm": reference.layer_norm,
    "rope": reference.rope,
    "swiglu": reference.swiglu,
    "geglu": reference.geglu,
    "lora_linear": reference.lora_linear,
    "lora_mlp": reference.lora_mlp,
    "lora_qkv": reference.lora_qkv,
    "lora_o": reference.lora_o,
    "cross_entropy": reference.cross_entropy,
    "fused_linear_cross_entropy": reference.fused_linear_cross_entropy,
    "token_log_probs": reference.token_log_probs,
    "dequantize_nf4": reference.dequantize_nf4,
    "moe_route": reference.moe_route,
    "moe_experts": reference.moe_experts,
}


def define_reference_ops(registry: OpRegistry) -> None:
    """Define every core op in ``registry`` with its torch reference.

    Args:
        registry: a registry in which none of these ops is defined yet.
    """
    for name, fn in REFERENCE_OPS.items():
        registry.define(name, fn)


def default_registry() -> OpRegistry:
    """A fresh registry with every core op defined and no kernels registered."""
    registry = OpRegistry()
    define_reference_ops(registry)
    return registry


__all__ = [
    "REFERENCE_OPS",
    "ExpertLinear",
    "LoRALinear",
    "OpImpl",
    "OpRegistry",
    "default_registry",
    "define_reference_ops",
]
