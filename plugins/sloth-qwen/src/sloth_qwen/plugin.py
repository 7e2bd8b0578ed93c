"""Hook implementations of sloth-qwen; the entry point names this module.

Everything that is not Qwen-specific (the patchers, ``sloth_attention``) lives in
:mod:`sloth_core.patches`; this plugin only names Qwen's module classes and hands the
attention function the per-layer ``sliding_window`` that Qwen's modeling files pass.
"""

from __future__ import annotations

from typing import Any

from sloth_core import hookimpl
from sloth_core.sdk import (
    DENSE_KINDS,
    ArchitectureSpec,
    ModelSpec,
    PatchReport,
    load_with_sloth_attention,
    patch_modeling,
    sliding_window_kwargs,
)

PLUGIN = "sloth-qwen"
#: The Hugging Face model types this plugin makes fast, and what it patches in each: the
#: classes of transformers' modeling files.
ARCHITECTURES = (
    ArchitectureSpec("qwen2", "Qwen2", "Qwen2/2.5: RMSNorm, SwiGLU, GQA, RoPE, q/k/v biases"),
    # Qwen3RMSNorm is also the class of every attention's q_norm/k_norm: they become
    # rms_norm calls too, on [batch, seq, heads, head_dim].
    ArchitectureSpec(
        "qwen3", "Qwen3", "Qwen3 (dense): RMSNorm, SwiGLU, GQA, RoPE, per-head q_norm/k_norm"
    ),
    # Dense layers (mlp_only_layers, decoder_sparse_step) keep a plain Qwen3MoeMLP; the
    # sparse ones renormalise their top-k as the router's norm_topk_prob says.
    ArchitectureSpec(
        "qwen3_moe",
        "Qwen3Moe",
        "Qwen3-MoE: Qwen3's attention, routed SwiGLU experts (moe_experts)",
        kinds=(*DENSE_KINDS, "moe"),
    ),
)
MODEL_TYPES = tuple(entry.model_type for entry in ARCHITECTURES)


@hookimpl
def register_architectures(register):
    """Declare ``qwen2``, ``qwen3`` and ``qwen3_moe``."""
    for entry in ARCHITECTURES:
        register(entry.model_type, description=entry.description)


@hookimpl
def load_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """Load a Qwen2, Qwen3 or Qwen3-MoE checkpoint with ``sloth_attention`` unless asked not to."""
    return load_with_sloth_attention(spec, MODEL_TYPES)


@hookimpl
def patch_layers(model, ops) -> PatchReport | None:
    """Route Qwen's norms (q_norm/k_norm included), MLPs, attention and loss through ``ops``,
    and Qwen3-MoE's sparse blocks through ``moe_route``/``moe_experts``."""
    return patch_modeling(
        model,
        ops,
        plugin=PLUGIN,
        architectures=ARCHITECTURES,
        attention_kwargs=sliding_window_kwargs,
    )
