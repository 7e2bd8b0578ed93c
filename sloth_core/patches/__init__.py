"""Reusable patchers for architecture plugins: what every Llama-like model shares.

An architecture plugin names its module classes and calls :func:`patch_architecture`
from its ``patch_layers`` hook; the patchers below route those modules through the op
registry. Every patch goes through :func:`sloth_core.patching.bind_forward`, so it is
reversible (the report's ``undo``), idempotent (running ``patch_layers`` again after PEFT
wraps the model patches nothing twice), and falls back to the module's original forward
wherever the ops would not compute exactly what transformers and PEFT compute.

Nothing here imports transformers at import time; plugins import this module cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from sloth_core.patching import model_type_of, restorer, unwrap_model
from sloth_core.types import PatchReport

from .attention import (
    SLOTH_ATTENTION,
    PackedRows,
    packed_rows,
    patch_attention,
    register_sloth_attention,
    sloth_attention,
)
from .causal_lm import RETURN_LOGITS_ENV, causal_lm_logits, patch_causal_lm, prompt_learning
from .fused import patch_fused_attention, patch_fused_mlp
from .mlp import MLP_ACTIVATIONS, lift_linear, mlp_activation, patch_gated_mlp
from .modeling import DENSE_KINDS, ArchitectureSpec, patch_modeling
from .moe import expert_parameter_names, moe_block_mismatch, patch_moe_block, router_aux_loss
from .norms import patch_rms_norm, rms_norm_eps

if TYPE_CHECKING:
    import torch

    from sloth_core.ops import OpRegistry
    from sloth_core.types import ModelSpec

ModuleClasses = type | tuple[type, ...]


def load_with_sloth_attention(
    spec: ModelSpec, model_types: Iterable[str]
) -> tuple[Any, Any] | None:
    """The body of an architecture plugin's ``load_model``.

    ``None`` for a spec of another model type; else the generic Hugging Face load with
    the ``sloth_attention`` attention function, unless the caller chose another.
    """
    if spec.model_type not in set(model_types):
        return None
    from sloth_core.sdk.loading import load_hf_model

    register_sloth_attention()
    spec.extra.setdefault("attn_implementation", SLOTH_ATTENTION)
    return load_hf_model(spec)


def sliding_window_kwargs(attention: torch.nn.Module) -> dict[str, Any]:
    """``{"sliding_window": ...}`` as transformers' attention modules pass it on.

    The module's own ``sliding_window`` where it keeps one (``None`` on full-attention
    layers); else the config's window, restricted to the layers ``config.layer_types``
    marks ``"sliding_attention"`` when the config has per-layer types (Qwen2/3 keep the
    window only with ``use_sliding_window``, from ``max_window_layers`` on), and on every
    layer when it has none (Mistral).
    """
    if hasattr(attention, "sliding_window"):
        return {"sliding_window": attention.sliding_window}
    config = attention.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        index = cast(int, attention.layer_idx)  # torch types attributes as Tensor | Module
        if not (index < len(layer_types) and layer_types[index] == "sliding_attention"):
            window = None
    return {"sliding_window": window}


def patch_architecture(
    model: torch.nn.Module,
    ops: OpRegistry,
    *,
    plugin: str,
    model_types: str | Iterable[str],
    rms_norm: ModuleClasses = (),
    mlp: ModuleClasses = (),
    attention: ModuleClasses = (),
    causal_lm: ModuleClasses = (),
    fused_mlp: ModuleClasses = (),
    fused_attention: ModuleClasses = (),
    moe: ModuleClasses = (),
    moe_options: dict[str, Any] | None = None,
    gemma_norm: bool = False,
    activation: str | None = None,
    attention_kwargs: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
) -> PatchReport | None:
    """Patch every module of the given classes in ``model``: the body of ``patch_layers``.

    Args:
        model: the model ``patch_layers`` received, possibly wrapped by PEFT.
        ops: the op registry ``patch_layers`` received.
        plugin: the plugin's name, for the report.
        model_types: the ``config.model_type`` values the plugin handles; other models
            are left alone and ``None`` is returned.
        rms_norm: RMSNorm classes, for :func:`patch_rms_norm`.
        mlp: gated MLP classes, for :func:`patch_gated_mlp`.
        attention: self-attention classes, for :func:`patch_attention`.
        causal_lm: ``*ForCausalLM`` classes, for :func:`patch_causal_lm`.
        fused_mlp: MLP classes with a fused ``gate_up_proj`` (Phi-3), for
            :func:`patch_fused_mlp`; counted as ``"mlp"``.
        fused_attention: attention classes with a fused ``qkv_proj`` (Phi-3), for
            :func:`patch_fused_attention`; counted as ``"attention"``.
        moe: sparse mixture-of-experts block classes, for :func:`patch_moe_block`; a
            block that does not fit the ops is left alone and its reason recorded in the
            report's ``skipped``.
        moe_options: keyword arguments of :func:`patch_moe_block` (Mixtral:
            ``{"normalize": True}``; by default the router's ``norm_topk_prob`` decides).
        gemma_norm: the norms are Gemma's ``1 + weight`` variant.
        activation: the MLP activation (``"swiglu"``...), of both MLP kinds; by default
            from the config.
        attention_kwargs: extra attention-function arguments, of both attention kinds; see
            :func:`patch_attention`.

    Returns:
        A :class:`PatchReport` counting the modules newly patched per kind (0 for those
        patched by an earlier call; the fused classes count under ``"mlp"`` and
        ``"attention"``, what the module is rather than how it is patched), whose ``undo``
        restores them, and whose ``skipped`` names each MoE block left alone with the
        reason; ``None`` for a model of another type.
    """
    model_type = model_type_of(model)
    wanted = {model_types} if isinstance(model_types, str) else set(model_types)
    if model_type not in wanted:
        return None
    # A model may be switched to sloth_attention after loading (the parity harness, a
    # caller's set_attn_implementation) whether or not its attention modules are patched.
    register_sloth_attention()
    keep_logits = prompt_learning(model)
    attn: dict[str, Any] = {"attention_kwargs": attention_kwargs}
    moe_kw = moe_options or {}
    # Any, not ModuleClasses: isinstance against a `type` would narrow modules to object.
    patchers: list[tuple[str, Any, Callable[[Any], bool]]] = [
        ("rms_norm", rms_norm, lambda m: patch_rms_norm(m, ops, gemma=gemma_norm)),
        ("mlp", mlp, lambda m: patch_gated_mlp(m, ops, activation=activation)),
        ("mlp", fused_mlp, lambda m: patch_fused_mlp(m, ops, activation=activation)),
        ("attention", attention, lambda m: patch_attention(m, ops, **attn)),
        ("attention", fused_attention, lambda m: patch_fused_attention(m, ops, **attn)),
        ("moe", moe, lambda m: patch_moe_block(m, ops, **moe_kw)),
        ("causal_lm", causal_lm, lambda m: patch_causal_lm(m, keep_logits=keep_logits)),
    ]
    counts = {kind: 0 for kind, classes, _ in patchers if classes != ()}
    patched: list[torch.nn.Module] = []
    skipped: dict[str, str] = {}
    root: torch.nn.Module = unwrap_model(model)
    for name, module in root.named_modules():
        for kind, classes, patch in patchers:
            if classes != () and isinstance(module, classes):
                if patch(module):
                    counts[kind] += 1
                    patched.append(module)
                elif kind == "moe" and (reason := moe_block_mismatch(module, **moe_kw)):
                    skipped[name] = reason
                break
    return PatchReport(plugin, model_type, counts, restorer(patched), skipped=skipped)


__all__ = [
    "DENSE_KINDS",
    "MLP_ACTIVATIONS",
    "ArchitectureSpec",
    "RETURN_LOGITS_ENV",
    "SLOTH_ATTENTION",
    "PackedRows",
    "causal_lm_logits",
    "expert_parameter_names",
    "lift_linear",
    "load_with_sloth_attention",
    "mlp_activation",
    "moe_block_mismatch",
    "packed_rows",
    "patch_architecture",
    "patch_attention",
    "patch_causal_lm",
    "patch_fused_attention",
    "patch_fused_mlp",
    "patch_gated_mlp",
    "patch_modeling",
    "patch_moe_block",
    "patch_rms_norm",
    "prompt_learning",
    "register_sloth_attention",
    "rms_norm_eps",
    "router_aux_loss",
    "sliding_window_kwargs",
    "sloth_attention",
]
