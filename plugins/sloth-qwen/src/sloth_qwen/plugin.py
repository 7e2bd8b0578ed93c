"""Hook implementations of sloth-qwen; the entry point names this module.

Everything that is not Qwen-specific (the patchers, ``sloth_attention``) lives in
:mod:`sloth_core.patches`; this plugin only names Qwen's module classes and hands the
attention function the per-layer ``sliding_window`` that Qwen's modeling files pass.
"""

from __future__ import annotations

from typing import Any

from sloth_core import hookimpl
from sloth_core.sdk import (
    ModelSpec,
    PatchReport,
    load_with_sloth_attention,
    model_type_of,
    patch_architecture,
    sliding_window_kwargs,
)

PLUGIN = "sloth-qwen"
#: The Hugging Face ``model_type`` values this plugin makes fast.
MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe")
_DESCRIPTIONS = {
    "qwen2": "Qwen2/2.5: RMSNorm, SwiGLU, GQA, RoPE, q/k/v biases",
    "qwen3": "Qwen3 (dense): RMSNorm, SwiGLU, GQA, RoPE, per-head q_norm/k_norm",
    "qwen3_moe": "Qwen3-MoE: Qwen3's attention, routed SwiGLU experts (moe_experts)",
}


@hookimpl
def register_architectures(register):
    """Declare ``qwen2``, ``qwen3`` and ``qwen3_moe``."""
    for model_type in MODEL_TYPES:
        register(model_type, description=_DESCRIPTIONS[model_type])


@hookimpl
def load_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """Load a Qwen2, Qwen3 or Qwen3-MoE checkpoint with ``sloth_attention`` unless asked not to."""
    return load_with_sloth_attention(spec, MODEL_TYPES)


@hookimpl
def patch_layers(model, ops) -> PatchReport | None:
    """Route Qwen's norms (q_norm/k_norm included), MLPs, attention and loss through ``ops``,
    and Qwen3-MoE's sparse blocks through ``moe_route``/``moe_experts``."""
    model_type = model_type_of(model)
    if model_type not in MODEL_TYPES:
        return None  # before importing transformers' Qwen for a model that is not one
    if model_type == "qwen2":
        from transformers.models.qwen2 import modeling_qwen2 as qwen2

        classes = dict(
            rms_norm=qwen2.Qwen2RMSNorm,
            mlp=qwen2.Qwen2MLP,
            attention=qwen2.Qwen2Attention,
            causal_lm=qwen2.Qwen2ForCausalLM,
        )
    elif model_type == "qwen3_moe":
        from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

        # Dense layers (mlp_only_layers, decoder_sparse_step) keep a plain Qwen3MoeMLP;
        # the sparse ones renormalise their top-k as the router's norm_topk_prob says.
        classes = dict(
            rms_norm=qwen3_moe.Qwen3MoeRMSNorm,
            mlp=qwen3_moe.Qwen3MoeMLP,
            attention=qwen3_moe.Qwen3MoeAttention,
            moe=qwen3_moe.Qwen3MoeSparseMoeBlock,
            causal_lm=qwen3_moe.Qwen3MoeForCausalLM,
        )
    else:
        from transformers.models.qwen3 import modeling_qwen3 as qwen3

        # Qwen3RMSNorm is also the class of every attention's q_norm/k_norm: they become
        # rms_norm calls too, on [batch, seq, heads, head_dim].
        classes = dict(
            rms_norm=qwen3.Qwen3RMSNorm,
            mlp=qwen3.Qwen3MLP,
            attention=qwen3.Qwen3Attention,
            causal_lm=qwen3.Qwen3ForCausalLM,
        )
    return patch_architecture(
        model,
        ops,
        plugin=PLUGIN,
        model_types=model_type,
        attention_kwargs=sliding_window_kwargs,
        **classes,
    )
