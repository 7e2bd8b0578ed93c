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
    ArchitectureSpec,
    ModelSpec,
    PatchReport,
    load_with_sloth_attention,
    patch_modeling,
    sliding_window_kwargs,
)

PLUGIN = "sloth-mistral"
#: The Hugging Face model types this plugin makes fast, and what it patches in each: the
#: classes of transformers' modeling files.
ARCHITECTURES = (
    ArchitectureSpec("mistral", "Mistral", "Mistral: RMSNorm, SwiGLU, GQA, RoPE, sliding window"),
    # Mixtral: every layer sparse (no dense MLP); it always renormalises its top-k weights
    # (softmax over the chosen logits).
    ArchitectureSpec(
        "mixtral",
        "Mixtral",
        "Mixtral: Mistral's attention, routed SwiGLU experts (moe_experts)",
        kinds=("rms_norm", "attention", "moe", "causal_lm"),
        moe_options={"normalize": True},
    ),
)
MODEL_TYPES = tuple(entry.model_type for entry in ARCHITECTURES)


@hookimpl
def register_architectures(register):
    """Declare ``mistral`` (Mistral 7B and compatible checkpoints) and ``mixtral``."""
    for entry in ARCHITECTURES:
        register(entry.model_type, description=entry.description)


@hookimpl
def load_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """Load a Mistral or Mixtral checkpoint with ``sloth_attention`` unless the caller chose one."""
    return load_with_sloth_attention(spec, MODEL_TYPES)


@hookimpl
def patch_layers(model, ops) -> PatchReport | None:
    """Route Mistral's norms, MLPs, attention and causal-LM loss through ``ops``, and
    Mixtral's sparse blocks through ``moe_route``/``moe_experts``."""
    return patch_modeling(
        model,
        ops,
        plugin=PLUGIN,
        architectures=ARCHITECTURES,
        attention_kwargs=sliding_window_kwargs,
    )
