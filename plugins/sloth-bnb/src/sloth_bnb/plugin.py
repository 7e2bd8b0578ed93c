"""Hook implementations of sloth-bnb; the entry point names this module.

``quantize`` returns a plan whose ``load_kwargs`` carry a ``BitsAndBytesConfig``:
transformers then quantizes every linear weight of the decoder as it loads (never the
``lm_head``), on the GPU and on the CPU alike. ``finalize`` guards the 4-bit layers
against bitsandbytes' CPU inference repacking (:mod:`sloth_bnb.cpu_layout`).

Nothing else of ``peft.prepare_model_for_kbit_training`` is needed: the non-quantized
weights keep the load dtype (it would upcast them to fp32: more memory, and a different
model from the 16-bit one), PEFT freezes the base weights itself, and the activation
checkpointing sloth and transformers 5 enable is non-reentrant, so no embedding output
has to require grad.

``export`` serves the ``merged_4bit`` format (:mod:`sloth_bnb.export`): LoRA merged,
re-quantized to NF4 and saved with its ``quantization_config``.
"""

from __future__ import annotations

from typing import Any

from sloth_core import hookimpl
from sloth_core.sdk import (
    ExportFormat,
    ModelSpec,
    QuantizationMethod,
    QuantizationPlan,
    Tolerance,
    WeightType,
    verify_safetensors,
)

from .config import BYTES_PER_WEIGHT, METHODS, bnb_config, take_options

PLUGIN = "sloth-bnb"


@hookimpl
def register_quantizers(register):
    """Declare ``nf4``, ``fp4`` and ``int8``."""
    for method, description in METHODS.items():
        register(QuantizationMethod(method, description, bytes_per_weight=BYTES_PER_WEIGHT[method]))


def finalize(model: Any) -> Any:
    """Run once on the loaded model: guard its 4-bit layers (see :mod:`.cpu_layout`)."""
    from .cpu_layout import guard_cpu_layout

    guard_cpu_layout(model)
    return model


def plan(spec: ModelSpec) -> QuantizationPlan:
    """The plan for ``spec.quantization``; ``BitsAndBytesConfig`` fields in ``spec.extra``
    (``bnb_4bit_use_double_quant=False``, ...) move from the load keywords into it.

    4-bit matmuls compute in bf16, or in fp16 when the model loads in fp16 (GPUs
    without bf16).

    Raises:
        ValueError: for a method this plugin does not serve, or an unknown option.
    """
    import torch

    options = take_options(spec.extra)
    compute = torch.float16 if spec.dtype == torch.float16 else torch.bfloat16
    if spec.quantization != "int8":
        options.setdefault("bnb_4bit_compute_dtype", compute)
    config = bnb_config(str(spec.quantization), **options)
    return QuantizationPlan(
        method=str(spec.quantization),
        provider=PLUGIN,
        load_kwargs={"quantization_config": config},
        finalize=None if spec.quantization == "int8" else finalize,
    )


@hookimpl
def quantize(spec: ModelSpec) -> QuantizationPlan | None:
    """Plan ``nf4``/``fp4``/``int8`` loading through bitsandbytes; ``None`` for other methods."""
    if spec.quantization not in METHODS:
        return None
    return plan(spec)


@hookimpl
def register_exporters(register):
    """Declare ``merged_4bit``: NF4 (default) or FP4, reloaded by transformers to verify."""
    from .export import FORMAT, METHODS

    # 4-bit weights lose too much for the logits to be bounded: top-1 agreement decides.
    min_top1 = {"nf4": 0.9, "fp4": 0.85}
    register(
        ExportFormat(
            FORMAT,
            description="LoRA merged, re-quantized to bitsandbytes NF4 (quantization='fp4' "
            "for FP4) and saved with its quantization_config: transformers reloads it 4-bit",
            quantizations=tuple(
                WeightType(m, BYTES_PER_WEIGHT[m], Tolerance(None, min_top1[m])) for m in METHODS
            ),
            default_quantization=METHODS[0],
            verify=verify_safetensors,
        )
    )


@hookimpl
def export(model, tokenizer, format, path, options):
    """Write ``merged_4bit``; ``None`` for other formats."""
    from .export import FORMAT, export_merged_4bit

    if format != FORMAT:
        return None
    return export_merged_4bit(model, tokenizer, path, options)
