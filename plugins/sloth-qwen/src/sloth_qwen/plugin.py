"""Hook implementations of sloth-qwen; the entry point names this module.

Everything that is not Qwen-specific (the patchers, ``sloth_sdpa``) lives in
:mod:`sloth_core.patches`; this plugin only names Qwen's module classes and hands the
attention function the per-layer ``sliding_window`` that Qwen's modeling files pass.
"""

from __future__ import annotations

from typing import Any

from sloth_core import hookimpl
from sloth_core.patches import SLOTH_SDPA, patch_architecture, register_sloth_sdpa
from sloth_core.patching import model_type_of
from sloth_core.types import ModelSpec, PatchReport

PLUGIN = "sloth-qwen"
#: The Hugging Face ``model_type`` values this plugin makes fast.
MODEL_TYPES = ("qwen2", "qwen3")
_DESCRIPTIONS = {
    "qwen2": "Qwen2/2.5: RMSNorm, SwiGLU, GQA, RoPE, q/k/v biases",
    "qwen3": "Qwen3 (dense): RMSNorm, SwiGLU, GQA, RoPE, per-head q_norm/k_norm",
}


@hookimpl
def register_architectures(register):
    """Declare ``qwen2`` and ``qwen3``."""
    for model_type in MODEL_TYPES:
        register(model_type, description=_DESCRIPTIONS[model_type])


@hookimpl
def load_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """Load a Qwen2/Qwen3 checkpoint with ``sloth_sdpa`` unless the caller chose one."""
    if spec.model_type not in MODEL_TYPES:
        return None
    from sloth_core.default_plugins.hf_loader import load_hf_model

    register_sloth_sdpa()
    spec.extra.setdefault("attn_implementation", SLOTH_SDPA)
    return load_hf_model(spec)


def sliding_window(module) -> dict[str, Any]:
    """The ``sliding_window`` Qwen's attention passes to the attention function.

    The configs keep ``sliding_window`` only with ``use_sliding_window`` and mark the
    windowed layers in ``layer_types`` (``"sliding_attention"`` from
    ``max_window_layers`` on); each attention module stores its own window (``None`` on
    full-attention layers). The masks already carry the window for (sloth_)sdpa and
    eager; the argument matters to flash attention and keeps ``sloth_sdpa``'s packed
    varlen path (which has no window) off windowed layers.
    """
    if hasattr(module, "sliding_window"):
        return {"sliding_window": module.sliding_window}
    config = module.config
    layer_types = getattr(config, "layer_types", None) or ()
    windowed = (
        module.layer_idx < len(layer_types) and layer_types[module.layer_idx] == "sliding_attention"
    )
    return {"sliding_window": getattr(config, "sliding_window", None) if windowed else None}


@hookimpl
def patch_layers(model, ops) -> PatchReport | None:
    """Route Qwen's norms (q_norm/k_norm included), MLPs, attention and loss through ``ops``."""
    model_type = model_type_of(model)
    if model_type not in MODEL_TYPES:
        return None  # before importing transformers' Qwen for a model that is not one
    register_sloth_sdpa()  # a model may be switched to it after loading
    if model_type == "qwen2":
        from transformers.models.qwen2 import modeling_qwen2 as qwen

        classes = dict(
            rms_norm=qwen.Qwen2RMSNorm,
            mlp=qwen.Qwen2MLP,
            attention=qwen.Qwen2Attention,
            causal_lm=qwen.Qwen2ForCausalLM,
        )
    else:
        from transformers.models.qwen3 import modeling_qwen3 as qwen

        # Qwen3RMSNorm is also the class of every attention's q_norm/k_norm: they become
        # rms_norm calls too, on [batch, seq, heads, head_dim].
        classes = dict(
            rms_norm=qwen.Qwen3RMSNorm,
            mlp=qwen.Qwen3MLP,
            attention=qwen.Qwen3Attention,
            causal_lm=qwen.Qwen3ForCausalLM,
        )
    return patch_architecture(
        model,
        ops,
        plugin=PLUGIN,
        model_types=model_type,
        attention_kwargs=sliding_window,
        **classes,
    )
