"""Built-in exporters: the LoRA adapter alone, and the model with LoRA merged in 16-bit.

``merged_16bit`` is the layout transformers and vLLM load: sharded safetensors with
``model.safetensors.index.json``, ``config.json``, a ``generation_config.json`` naming
every token that ends a reply (the eos and the chat template's end-of-turn tokens), and
the tokenizer with its chat template. ``vllm`` is another name for it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sloth_core import hookimpl
from sloth_core.errors import SlothError
from sloth_core.io import atomic_directory
from sloth_core.sdk.merge import DEFAULT_SHARD_SIZE, is_peft, save_tokenizer, write_merged
from sloth_core.types import ExportResult

MERGED_ALIASES = ("merged", "vllm")
#: Bytes per weight of each export, for the free-space check (GGUF types by their block
#: layout: q8_0 is 34 bytes per 32 weights, q4_k 144 per 256, ...).
BYTES_PER_WEIGHT = {
    "f32": 4.0, "float32": 4.0, "f16": 2.0, "float16": 2.0, "bf16": 2.0, "bfloat16": 2.0,
    "q8_0": 1.07, "q6_k": 0.83, "q5_k_m": 0.72, "q5_k_s": 0.69, "q5_0": 0.69, "q5_1": 0.75,
    "q4_k_m": 0.61, "q4_k_s": 0.57, "q4_0": 0.57, "q4_1": 0.63, "q3_k_m": 0.49,
    "q3_k_s": 0.43, "q3_k_l": 0.53, "q2_k": 0.36, "nf4": 0.57, "fp4": 0.57,
}  # fmt: skip


@hookimpl
def register_exporters(register):
    register(
        "lora", description="the PEFT LoRA adapter directory (adapter_config + weights)",
        quantizations=(),
    )  # fmt: skip
    register(
        "merged_16bit",
        description="LoRA merged into the base weights: sharded safetensors, config, "
        "generation config (every EOS id) and tokenizer with its chat template, for "
        "transformers; alias 'vllm' writes the same directory, which `vllm serve` loads",
        aliases=MERGED_ALIASES,
        quantizations=(),
    )


def _no_quantization(format: str, options: dict) -> None:
    if options.get("quantization"):
        raise SlothError(
            f"format {format!r} takes no quantization (got {options['quantization']!r}); "
            "use dtype= (--dtype) for merged_16bit, or a quantized format: merged_4bit, gguf"
        )


def estimate_export_bytes(model: torch.nn.Module, format: str, options: dict) -> int:
    """About how many bytes ``format`` writes for ``model`` (for the free-space check)."""
    if not hasattr(model, "parameters"):
        return 0
    params = list(model.parameters())
    if format == "lora":
        return sum(
            p.numel() * p.element_size()
            for name, p in model.named_parameters()
            if "lora_" in name or ".modules_to_save." in name
        )
    total = 0
    for p in params:
        # A bitsandbytes 4-bit parameter packs two weights per uint8 element.
        total += p.numel() * (2 if p.dtype == torch.uint8 and hasattr(p, "quant_state") else 1)
    dtype = options.get("dtype")
    if isinstance(dtype, torch.dtype):
        width = torch.empty((), dtype=dtype).element_size()
    elif format in ("merged_16bit", *MERGED_ALIASES):
        width = max((p.element_size() for p in params if p.is_floating_point()), default=2)
    else:
        quant = str(options.get("quantization") or "").lower()
        width = BYTES_PER_WEIGHT.get(quant, 0.57 if format == "merged_4bit" else 2.0)
    return int(total * width)


@hookimpl
def export(model, tokenizer, format, path, options):
    """Write the ``lora`` adapter or the ``merged_16bit`` model (alias ``merged``, ``vllm``)."""
    if format == "lora":
        _no_quantization(format, options)
        if not is_peft(model):
            raise ValueError("format 'lora' needs a model with LoRA adapters (get_peft_model)")
        with atomic_directory(path, force=options.get("force", False)) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            save_tokenizer(tokenizer, staging)
        return ExportResult(format, Path(path), sorted(Path(path).iterdir()))
    if format in ("merged_16bit", *MERGED_ALIASES):
        _no_quantization(format, options)
        with atomic_directory(path, force=options.get("force", False)) as staging:
            write_merged(
                model,
                tokenizer,
                staging,
                dtype=options.get("dtype"),
                max_shard_size=options.get("max_shard_size") or DEFAULT_SHARD_SIZE,
            )
        return ExportResult("merged_16bit", Path(path), sorted(Path(path).iterdir()))
    return None
