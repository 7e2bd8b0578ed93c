"""Hook implementations of sloth-phi; the entry point names this module.

Everything that is not Phi-specific (the fused-projection patchers, ``sloth_attention``) lives
in :mod:`sloth_core.patches`; this plugin only names Phi-3's module classes and hands the
attention function the ``sliding_window`` that Phi-3's modeling file passes.
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

PLUGIN = "sloth-phi"
#: The Hugging Face ``model_type`` values this plugin makes fast.
MODEL_TYPES = ("phi3",)
_DESCRIPTION = "Phi-3: RMSNorm, fused qkv_proj and gate_up_proj, SwiGLU, partial RoPE"


@hookimpl
def register_architectures(register):
    """Declare ``phi3``."""
    register("phi3", description=_DESCRIPTION)


@hookimpl
def load_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """Load a Phi-3 checkpoint with ``sloth_attention`` unless the caller chose one."""
    return load_with_sloth_attention(spec, MODEL_TYPES)


@hookimpl
def patch_layers(model, ops) -> PatchReport | None:
    """Route Phi-3's norms, fused MLPs, fused attention and loss through ``ops``."""
    if model_type_of(model) not in MODEL_TYPES:
        return None  # before importing transformers' Phi-3 for a model that is not one
    from transformers.models.phi3 import modeling_phi3 as phi3

    # Phi-3 passes the config's sliding_window to every layer's attention function (it
    # keeps no layer_types), which is what sliding_window_kwargs returns for it.
    return patch_architecture(
        model,
        ops,
        plugin=PLUGIN,
        model_types=MODEL_TYPES,
        rms_norm=phi3.Phi3RMSNorm,
        fused_mlp=phi3.Phi3MLP,
        fused_attention=phi3.Phi3Attention,
        causal_lm=phi3.Phi3ForCausalLM,
        attention_kwargs=sliding_window_kwargs,
    )
