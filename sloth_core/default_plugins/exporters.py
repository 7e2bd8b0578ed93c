"""Built-in exporters: the LoRA adapter alone, and the model with LoRA merged in 16-bit.

``merged_16bit`` is the layout transformers and vLLM load: sharded safetensors with
``model.safetensors.index.json``, ``config.json``, a ``generation_config.json`` naming
every token that ends a reply (the eos and the chat template's end-of-turn tokens), and
the tokenizer with its chat template. ``vllm`` is another name for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sloth_core import hookimpl
from sloth_core.errors import SlothError
from sloth_core.formats import ExportFormat
from sloth_core.io import atomic_directory
from sloth_core.sdk.merge import DEFAULT_SHARD_SIZE, is_peft, save_tokenizer, write_merged
from sloth_core.types import ExportResult
from sloth_core.verify import verify_lora, verify_safetensors

MERGED_ALIASES = ("merged", "vllm")


def _adapter_bytes(model: Any, options: dict) -> int:
    return sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if "lora_" in name or ".modules_to_save." in name
    )


LORA = ExportFormat(
    "lora",
    description="the PEFT LoRA adapter directory (adapter_config + weights)",
    quantizations=(),
    verify=verify_lora,
    estimate_bytes=_adapter_bytes,
)
MERGED_16BIT = ExportFormat(
    "merged_16bit",
    description="LoRA merged into the base weights: sharded safetensors, config, generation "
    "config (every EOS id) and tokenizer with its chat template, for transformers; alias "
    "'vllm' writes the same directory, which `vllm serve` loads",
    aliases=MERGED_ALIASES,
    quantizations=(),
    verify=verify_safetensors,
)


@hookimpl
def register_exporters(register):
    register(LORA)
    register(MERGED_16BIT)


def _no_quantization(format: str, options: dict) -> None:
    if options.get("quantization"):
        raise SlothError(
            f"format {format!r} takes no quantization (got {options['quantization']!r}); "
            "use dtype= (--dtype) for merged_16bit, or a quantized format (`sloth plugins "
            "list` shows which are installed)"
        )


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
