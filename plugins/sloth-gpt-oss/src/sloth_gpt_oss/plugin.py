"""Hook implementations of sloth-gpt-oss; the entry point names this module.

gpt-oss differs from Mixtral in five places, each handled by the core's patches:

- its RMSNorm scales by the weight in fp32 before the cast to the input dtype (T5's
  order; from_pretrained keeps the norm weights in fp32): ``rms_norm``'s
  ``cast_after_weight``;

- attention sinks: a learned logit per head joins every softmax denominator. The patched
  attention passes ``s_aux=self.sinks`` to the attention function as gpt-oss's forward
  does; ``sloth_attention`` computes it exactly (``sink_attention``: SDPA with one extra
  key, since neither SDPA nor the varlen kernels take a sink), eager uses the module's own.
- alternating sliding and full layers (``config.layer_types``): each attention module
  keeps its ``sliding_window`` (``None`` on full layers), passed on like Mistral's.
- a rotary embedding that returns ``head_dim / 2`` frequencies and rotates the two halves:
  ``patch_attention(half_rotary=True)``;
- the MoE block ``GptOssMLP``: a router with a bias, softmax over the top-k logits
  (renormalised top-k), experts stored ``[E, in, out]`` with biases, gate and up
  interleaved, and the clamped SwiGLU with the experts' ``alpha``/``limit``
  (``config.swiglu_alpha``/``swiglu_limit`` in recent transformers; 5.17 fixes 1.702
  and 7); the block returns its routing weights.

MXFP4 checkpoints (``quantization_config.quant_method == "mxfp4"``, as OpenAI ships
gpt-oss) are loaded dequantized to bf16 (``Mxfp4Config(dequantize=True)``): LoRA trains on
bf16 experts, and transformers' MXFP4 path would otherwise fetch Hub kernels.
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
    patch_attention,
    patch_rms_norm,
    restorer,
    sliding_window_kwargs,
    unwrap_model,
)

PLUGIN = "sloth-gpt-oss"
#: The Hugging Face ``model_type`` values this plugin makes fast.
MODEL_TYPES = ("gpt_oss",)
#: patch_moe_block's options for ``GptOssMLP``.
MOE_OPTIONS = {
    "router": "router",
    "activation": "gpt_oss",
    "gate_up_layout": "interleaved",
    "normalize": True,
    "returns_scores": True,
}


@hookimpl
def register_architectures(register):
    """Declare ``gpt_oss`` (gpt-oss-20b, gpt-oss-120b and compatible checkpoints)."""
    register(
        "gpt_oss",
        description="gpt-oss: attention sinks, alternating sliding windows, routed "
        "clamped-SwiGLU experts (moe_experts)",
    )


def mxfp4_load_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """``from_pretrained`` arguments that dequantize an MXFP4 checkpoint to bf16; ``{}``
    for any other checkpoint. Raises ``ValueError`` when the caller also asked for a
    bitsandbytes quantization (the checkpoint is quantized already)."""
    quantization = getattr(spec.config, "quantization_config", None)
    if isinstance(quantization, dict):
        method = quantization.get("quant_method")
    else:
        method = getattr(quantization, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "mxfp4":
        return {}
    if spec.quantization_plan is not None or spec.quantization:
        raise ValueError(
            f"{spec.model_name} is an MXFP4 checkpoint (quantized already); sloth loads it "
            f"dequantized to bf16 and cannot quantize it again with {spec.quantization!r}: "
            "drop the quantization option (LoRA on the bf16 weights), or start from a bf16 "
            "copy of the model to use QLoRA"
        )
    if "quantization_config" in spec.extra:
        return {}  # the caller chose (e.g. Mxfp4Config() to keep MXFP4 for inference)
    import torch
    from transformers.utils.quantization_config import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True), "dtype": torch.bfloat16}


@hookimpl
def load_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """Load a gpt-oss checkpoint with ``sloth_attention`` unless the caller chose one;
    an MXFP4 checkpoint dequantized to bf16 (see :func:`mxfp4_load_kwargs`)."""
    if spec.model_type not in MODEL_TYPES:
        return None
    for key, value in mxfp4_load_kwargs(spec).items():
        if key == "dtype":
            spec.dtype = value if spec.dtype in (None, value) else spec.dtype
        else:
            spec.extra[key] = value
    return load_with_sloth_attention(spec, MODEL_TYPES)


def attention_kwargs(attention) -> dict[str, Any]:
    """What gpt-oss's attention forward passes its attention function: the layer's
    ``sliding_window`` (``None`` on full layers) and the sinks as ``s_aux``."""
    return {**sliding_window_kwargs(attention), "s_aux": attention.sinks}


@hookimpl
def patch_layers(model, ops) -> PatchReport | None:
    """Route gpt-oss's norms, attention (sinks, windows), sparse blocks and causal-LM loss
    through ``ops``."""
    if model_type_of(model) not in MODEL_TYPES:
        return None  # before importing transformers' gpt-oss for a model that is not one
    from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss

    report = patch_architecture(
        model,
        ops,
        plugin=PLUGIN,
        model_types=MODEL_TYPES,
        moe=gpt_oss.GptOssMLP,
        moe_options=MOE_OPTIONS,
        causal_lm=gpt_oss.GptOssForCausalLM,
    )
    assert report is not None  # the model type was checked
    # patch_architecture's patchers take neither option: these modules are patched here
    # and join the report and its undo. GptOssRMSNorm scales by its weight in fp32 before
    # the downcast (and from_pretrained keeps its weights in fp32): rms_norm's
    # cast_after_weight; the attention's rotary embedding is half-width (half_rotary).
    patchers = {
        "rms_norm": (
            gpt_oss.GptOssRMSNorm,
            lambda module: patch_rms_norm(module, ops, cast_after_weight=True),
        ),
        "attention": (
            gpt_oss.GptOssAttention,
            lambda module: patch_attention(
                module, ops, attention_kwargs=attention_kwargs, half_rotary=True
            ),
        ),
    }
    modules = list(unwrap_model(model).modules())
    patched = {
        kind: [m for m in modules if isinstance(m, cls) and patch(m)]
        for kind, (cls, patch) in patchers.items()
    }
    undo_rest = report.undo
    undo_here = restorer([m for group in patched.values() for m in group])

    def undo() -> None:
        undo_here()
        if undo_rest is not None:
            undo_rest()

    report.patched = {**report.patched, **{kind: len(group) for kind, group in patched.items()}}
    report.undo = undo
    return report
