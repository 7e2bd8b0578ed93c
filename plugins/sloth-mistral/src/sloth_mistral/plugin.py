"""Hook implementations of sloth-mistral; the entry point names this module.

Mistral is Llama with a sliding window on every layer. The window reaches attention two
ways, as in transformers: through the mask (``create_sliding_window_causal_mask``, which
``sloth_attention`` gets too, since its mask function is ``sdpa_mask``) and through the
``sliding_window`` argument of the attention function (flash attention and ``sloth_attention``
read it). The patched attention forward passes that argument as Mistral's does.
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

PLUGIN = "sloth-mistral"
#: The Hugging Face ``model_type`` values this plugin makes fast.
MODEL_TYPES = ("mistral", "mixtral")
_DESCRIPTIONS = {
    "mistral": "Mistral: RMSNorm, SwiGLU, GQA, RoPE, sliding window",
    "mixtral": "Mixtral: Mistral's attention, routed SwiGLU experts (moe_experts)",
}


@hookimpl
def register_architectures(register):
    """Declare ``mistral`` (Mistral 7B and compatible checkpoints) and ``mixtral``."""
    for model_type in MODEL_TYPES:
        register(model_type, description=_DESCRIPTIONS[model_type])


@hookimpl
def load_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """Load a Mistral or Mixtral checkpoint with ``sloth_attention`` unless the caller chose one."""
    return load_with_sloth_attention(spec, MODEL_TYPES)


@hookimpl
def patch_layers(model, ops) -> PatchReport | None:
    """Route Mistral's norms, MLPs, attention and causal-LM loss through ``ops``, and
    Mixtral's sparse blocks through ``moe_route``/``moe_experts``."""
    model_type = model_type_of(model)
    if model_type not in MODEL_TYPES:
        return None  # before importing transformers' Mistral for a model that is not one
    if model_type == "mixtral":
        from transformers.models.mixtral import modeling_mixtral as mixtral

        # Mixtral always renormalises its top-k weights (softmax over the chosen logits).
        classes: dict[str, Any] = dict(
            rms_norm=mixtral.MixtralRMSNorm,
            attention=mixtral.MixtralAttention,
            moe=mixtral.MixtralSparseMoeBlock,
            moe_options={"normalize": True},
            causal_lm=mixtral.MixtralForCausalLM,
        )
    else:
        from transformers.models.mistral import modeling_mistral as mistral

        classes = dict(
            rms_norm=mistral.MistralRMSNorm,
            mlp=mistral.MistralMLP,
            attention=mistral.MistralAttention,
            causal_lm=mistral.MistralForCausalLM,
        )
    return patch_architecture(
        model,
        ops,
        plugin=PLUGIN,
        model_types=model_type,
        attention_kwargs=sliding_window_kwargs,
        **classes,
    )
