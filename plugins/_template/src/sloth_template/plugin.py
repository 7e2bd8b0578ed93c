"""Hook implementations of sloth-template; the entry point names this module.

``patch_layers`` names the module classes of transformers' ``modeling_cwm`` and
hands them to :func:`sloth_core.patches.patch_architecture`, whose patchers route them
through the op registry. See docs/plugin-authors.md of sloth for each argument.
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

PLUGIN = "sloth-template"
#: The Hugging Face ``model_type`` values this plugin makes fast.
MODEL_TYPES = ("cwm",)


@hookimpl
def register_architectures(register):
    """Declare :data:`MODEL_TYPES`, for ``sloth plugins list`` and dispatch."""
    for model_type in MODEL_TYPES:
        register(model_type, description="Cwm: rms_norm, mlp, attention, causal_lm patched")


@hookimpl
def load_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """Load a checkpoint of :data:`MODEL_TYPES` with sloth's attention function."""
    return load_with_sloth_attention(spec, MODEL_TYPES)


@hookimpl
def patch_layers(model, ops) -> PatchReport | None:
    """Route the model's norms, MLPs, attention and loss through ``ops``."""
    if model_type_of(model) not in MODEL_TYPES:
        return None  # before importing a modeling file for a model that is not one
    from transformers.models.cwm import modeling_cwm as modeling

    return patch_architecture(
        model,
        ops,
        plugin=PLUGIN,
        model_types=MODEL_TYPES,
        rms_norm=modeling.CwmRMSNorm,
        mlp=modeling.CwmMLP,
        attention=modeling.CwmAttention,
        causal_lm=modeling.CwmForCausalLM,
        attention_kwargs=sliding_window_kwargs,
    )
