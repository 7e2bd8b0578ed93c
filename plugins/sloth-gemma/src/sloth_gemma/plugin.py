"""Hook implementations of sloth-gemma; the entry point names this module.

Everything that is not Gemma-specific (the patchers, ``sloth_attention`` and its softcapped
attention) lives in :mod:`sloth_core.patches`; this plugin names Gemma's module classes,
says that its norms are the ``1 + weight`` kind, and hands the attention function what
Gemma's modeling files pass (Gemma 2: the per-layer window and the attention softcap).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from sloth_core import hookimpl
from sloth_core.sdk import (
    ModelSpec,
    PatchReport,
    load_with_sloth_attention,
    model_type_of,
    patch_architecture,
    sliding_window_kwargs,
)

PLUGIN = "sloth-gemma"
#: The Hugging Face ``model_type`` values this plugin makes fast.
MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
_DESCRIPTIONS = {
    "gemma": "Gemma: (1 + w) RMSNorm, GeGLU (tanh), sqrt(hidden)-scaled embeddings",
    "gemma2": "Gemma 2: attention and final-logit softcaps, pre/post-FFN norms, "
    "alternating sliding window",
    "gemma3_text": "Gemma 3 (text): per-head q/k norms, local/global rope bases, sliding window",
}


def gemma2_attention_kwargs(attention: torch.nn.Module) -> dict[str, Any]:
    """What Gemma 2's attention passes its attention function: window and softcap."""
    return {
        **sliding_window_kwargs(attention),
        "softcap": getattr(attention, "attn_logit_softcapping", None),
    }


@hookimpl
def register_architectures(register):
    """Declare ``gemma``, ``gemma2`` and ``gemma3_text``."""
    for model_type in MODEL_TYPES:
        register(model_type, description=_DESCRIPTIONS[model_type])


@hookimpl
def load_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """Load a Gemma checkpoint with ``sloth_attention`` unless the caller chose an attention.

    ``sloth_attention`` takes Gemma 2's softcap (flex attention on CUDA), where transformers'
    ``sdpa`` refuses it and Gemma 2 would fall back to ``eager``.
    """
    return load_with_sloth_attention(spec, MODEL_TYPES)


def _classes(model_type: str) -> tuple[dict[str, Any], Any]:
    gemma: ModuleType  # the modeling module of model_type
    if model_type == "gemma":
        from transformers.models.gemma import modeling_gemma as gemma

        names, extra = ("GemmaRMSNorm", "GemmaMLP", "GemmaAttention", "GemmaForCausalLM"), None
    elif model_type == "gemma2":
        from transformers.models.gemma2 import modeling_gemma2 as gemma

        names = ("Gemma2RMSNorm", "Gemma2MLP", "Gemma2Attention", "Gemma2ForCausalLM")
        extra = gemma2_attention_kwargs
    else:
        from transformers.models.gemma3 import modeling_gemma3 as gemma

        # Gemma3RMSNorm is also the class of every attention's q_norm/k_norm.
        names = ("Gemma3RMSNorm", "Gemma3MLP", "Gemma3Attention", "Gemma3ForCausalLM")
        extra = sliding_window_kwargs
    kinds = ("rms_norm", "mlp", "attention", "causal_lm")
    return {kind: getattr(gemma, name) for kind, name in zip(kinds, names, strict=True)}, extra


@hookimpl
def patch_layers(model, ops) -> PatchReport | None:
    """Route Gemma's norms (``1 + w``), GeGLU MLPs, attention and loss through ``ops``."""
    model_type = model_type_of(model)
    if model_type not in MODEL_TYPES:
        return None  # before importing transformers' Gemma for a model that is not one
    classes, attention_kwargs = _classes(model_type)
    return patch_architecture(
        model,
        ops,
        plugin=PLUGIN,
        model_types=model_type,
        gemma_norm=True,
        attention_kwargs=attention_kwargs,
        **classes,
    )
