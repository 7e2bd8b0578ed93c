"""Built-in exporters: the LoRA adapter alone, and the model with LoRA merged in 16-bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sloth_core import hookimpl
from sloth_core.io import atomic_directory
from sloth_core.types import ExportResult

DEFAULT_SHARD_SIZE = "5GB"


@hookimpl
def register_exporters(register):
    register("lora", description="the PEFT LoRA adapter directory (adapter_config + weights)")
    register(
        "merged_16bit",
        description="LoRA merged into the base weights: sharded safetensors for transformers",
        aliases=("merged",),
    )


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """LoRA-wrapped linear layers of ``model`` by module path, duck-typed on PEFT's API."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")
    }


def merged_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """The base model's state dict with every active LoRA adapter added in fp32.

    The model itself is not changed (merging in place and back is not exact in 16-bit).
    ``dtype`` casts floating weights (default: each keeps the dtype of its base weight).
    """
    from sloth_core.ops import LoRALinear

    base = model.get_base_model() if _is_peft(model) else model
    layers = _lora_layers(base)
    merged: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        if module.merged:
            raise ValueError(f"{name}: adapter already merged into the weights; unmerge first")
        weight = LoRALinear.from_module(module.base_layer).dense_weight()
        total = weight.float()
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                total = total + module.get_delta_weight(adapter).float()
        merged[f"{name}.weight"] = total.to(dtype or weight.dtype)
        bias = getattr(module.base_layer, "bias", None)
        if bias is not None:
            merged[f"{name}.bias"] = bias.detach().to(dtype or bias.dtype)
    for key, tensor in base.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if "lora_" in key or owner.endswith(".base_layer") or owner in layers:
            continue  # adapter tensors and the wrapped weights: merged above
        if ".modules_to_save." in key:
            continue  # the trained copies replace their originals below
        merged[key] = tensor
    # Modules trained in full (modules_to_save) take the place of their originals.
    for key, tensor in base.state_dict().items():
        if ".modules_to_save." in key:
            prefix, rest = key.split(".modules_to_save.", 1)
            merged[f"{prefix}.{rest.split('.', 1)[1]}"] = tensor
    if dtype is not None:
        merged = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged.items()}
    return {k: v.detach().contiguous() for k, v in merged.items()}


def _save_tokenizer(tokenizer: Any, path: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


@hookimpl
def export(model, tokenizer, format, path, options):
    """Write the ``lora`` adapter or the ``merged_16bit`` model."""
    if format == "lora":
        if not _is_peft(model):
            raise ValueError("format 'lora' needs a model with LoRA adapters (get_peft_model)")
        with atomic_directory(path, force=options.get("force", False)) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            _save_tokenizer(tokenizer, staging)
        return ExportResult(format, Path(path), sorted(Path(path).iterdir()))
    if format in ("merged_16bit", "merged"):
        dtype = options.get("dtype")
        state = merged_state_dict(model, dtype)
        base = model.get_base_model() if _is_peft(model) else model
        with atomic_directory(path, force=options.get("force", False)) as staging:
            base.save_pretrained(
                staging,
                state_dict=state,
                max_shard_size=options.get("max_shard_size", DEFAULT_SHARD_SIZE),
                safe_serialization=True,
            )
            if dtype is not None:  # the config must name the dtype the weights now have
                import json

                config_file = staging / "config.json"
                config = json.loads(config_file.read_text())
                config["dtype"] = str(dtype).removeprefix("torch.")
                config_file.write_text(json.dumps(config, indent=2) + "\n")
            _save_tokenizer(tokenizer, staging)
        return ExportResult("merged_16bit", Path(path), sorted(Path(path).iterdir()))
    return None
