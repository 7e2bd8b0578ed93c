"""Hook implementations of sloth-llama; the entry point names this module.

Everything that is not Llama-specific (the patchers, ``sloth_attention``) lives in
:mod:`sloth_core.patches`; this plugin only names Llama's module classes.
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
)

PLUGIN = "sloth-llama"
#: The Hugging Face ``model_type`` values this plugin makes fast.
MODEL_TYPES = ("llama",)


@hookimpl
def register_architectures(register):
    """Declare ``llama`` (Llama 2, 3, 3.1, 3.2 and compatible checkpoints)."""
    for model_type in MODEL_TYPES:
        register(model_type, description="Llama 2/3/3.1/3.2: RMSNorm, SwiGLU, GQA, RoPE")


@hookimpl
def load_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """Load a Llama checkpoint with ``sloth_attention`` attention unless the caller chose one."""
    return load_with_sloth_attention(spec, MODEL_TYPES)


@hookimpl
def patch_layers(model, ops) -> PatchReport | None:
    """Route Llama's norms, MLPs, attention and causal-LM loss through ``ops``."""
    if model_type_of(model) not in MODEL_TYPES:
        return None  # before importing transformers' Llama for a model that is not one
    from transformers.models.llama import modeling_llama as llama

    return patch_architecture(
        model,
        ops,
        plugin=PLUGIN,
        model_types=MODEL_TYPES,
        rms_norm=llama.LlamaRMSNorm,
        mlp=llama.LlamaMLP,
        attention=llama.LlamaAttention,
        causal_lm=llama.LlamaForCausalLM,
    )
