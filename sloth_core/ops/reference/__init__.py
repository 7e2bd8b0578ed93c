"""Plain-PyTorch reference implementations of every op.

They re-implement what Hugging Face transformers and PEFT compute, run on any device, and
define the signature that faster kernels must implement and are tested against.
"""

from .activations import geglu, swiglu
from .log_probs import token_log_probs
from .lora import LoRALinear, lora_linear, lora_mlp, lora_o, lora_qkv
from .loss import cross_entropy, fused_linear_cross_entropy
from .moe import (
    ROW_SCALES,
    ExpertLinear,
    expert_linears,
    moe_activation,
    moe_experts,
    moe_route,
)
from .nf4 import dequantize_nf4
from .norms import layer_norm, rms_norm
from .rope import rope

__all__ = [
    "ROW_SCALES",
    "ExpertLinear",
    "LoRALinear",
    "cross_entropy",
    "dequantize_nf4",
    "expert_linears",
    "fused_linear_cross_entropy",
    "geglu",
    "layer_norm",
    "lora_linear",
    "lora_mlp",
    "lora_o",
    "lora_qkv",
    "moe_activation",
    "moe_experts",
    "moe_route",
    "rms_norm",
    "rope",
    "swiglu",
    "token_log_probs",
]
