"""Built-in exporters: the LoRA adapter alone, and the model with LoRA merged in 16-bit.

``merged_16bit`` is the layout transformers and vLLM load: sharded safetensors with
``model.safetensors.index.json``, ``config.json``, a ``generation_config.json`` naming
every token that ends a reply (the eos and the chat template's end-of-turn tokens), and
the tokenizer with its chat template. ``vllm`` is another name for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sloth_core import hookimpl
from sloth_core.errors import SlothError
from sloth_core.io import atomic_directory
from sloth_core.types import ExportResult

DEFAULT_SHARD_SIZE = "5GB"
MERGED_ALIASES = ("merged", "vllm")
#: Tokens that end a turn in the chat-template families sloth knows (ChatML/Qwen,
#: Llama 3, Gemma, Phi-3, older Llama/Mistral); one counts when the vocabulary has it
#: and the chat template writes it.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
    "</s>", "<|end_of_text|>",
)  # fmt: skip
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


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """LoRA-wrapped linear layers of ``model`` by module path, duck-typed on PEFT's API."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")
    }


def _quantized_layers(model: torch.nn.Module, skip: dict[str, Any]) -> dict[str, Any]:
    """Layers outside ``skip`` whose weight is bitsandbytes-quantized (duck-typed)."""
    found, skipped = {}, set(skip)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if _under(f"{name}.weight", skipped):
            continue
        if getattr(weight, "quant_state", None) is not None or hasattr(weight, "SCB"):
            found[name] = module
    return found


def _under(key: str, modules: set[str]) -> bool:
    """Whether state-dict ``key`` belongs to one of ``modules`` (or a submodule of one)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def _dense(module: Any, name: str) -> torch.Tensor:
    from sloth_core.ops import LoRALinear

    weight = getattr(module, "weight", None)
    if hasattr(weight, "SCB") and getattr(weight, "quant_state", None) is None:
        raise SlothError(
            f"{name}: int8 (LLM.int8) weights cannot be merged exactly; load the base model "
            "in 16-bit, attach the adapter (PeftModel.from_pretrained) and export that"
        )
    return LoRALinear.from_module(module).dense_weight()


def merged_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """The base model's state dict with every active LoRA adapter added in fp32.

    The model itself is not changed (merging in place and back is not exact in 16-bit).
    4-bit (bitsandbytes) base weights are dequantized. ``dtype`` casts floating weights
    (default: each keeps the dtype of its base weight, a 4-bit one its compute dtype).
    """
    base = model.get_base_model() if _is_peft(model) else model
    layers = _lora_layers(base)
    merged: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        if module.merged:
            raise ValueError(f"{name}: adapter already merged into the weights; unmerge first")
        weight = _dense(module.base_layer, name)
        total = weight.float()
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                total = total + module.get_delta_weight(adapter).float()
        merged[f"{name}.weight"] = total.to(dtype or weight.dtype)
        bias = getattr(module.base_layer, "bias", None)
        if bias is not None:
            merged[f"{name}.bias"] = bias.detach().to(dtype or bias.dtype)
    quantized = _quantized_layers(base, layers)
    for name, module in quantized.items():
        merged[f"{name}.weight"] = _dense(module, name)
        if getattr(module, "bias", None) is not None:
            merged[f"{name}.bias"] = module.bias.detach()
    done = set(layers) | set(quantized)
    for key, tensor in base.state_dict().items():
        if "lora_" in key or _under(key, done):
            continue  # adapters, wrapped and packed 4-bit weights: written above
        if ".modules_to_save." in key or ".original_module." in key:
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


def chat_template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template as one string ('' when it has none)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or "\n".join(template.values())
    return template if isinstance(template, str) else ""


def stop_tokens(tokenizer: Any) -> list[tuple[str, int]]:
    """``(token, id)`` of every token that ends a reply: the tokenizer's eos first, then
    each of :data:`END_OF_TURN_TOKENS` that the vocabulary has and the chat template uses.
    """
    if tokenizer is None:
        return []
    found: dict[str, int] = {}
    eos = getattr(tokenizer, "eos_token", None)
    if eos is not None and tokenizer.eos_token_id is not None:
        found[str(eos)] = int(tokenizer.eos_token_id)
    template = chat_template_text(tokenizer)
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab and token in template:
            found.setdefault(token, int(vocab[token]))
    return list(found.items())


def eos_token_ids(tokenizer: Any, config: Any = None) -> list[int]:
    """Every id generation should stop at: the config's eos ids, then :func:`stop_tokens`."""
    ids: list[int] = []
    configured = getattr(config, "eos_token_id", None) if config is not None else None
    for value in configured if isinstance(configured, (list, tuple)) else [configured]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    for _, token_id in stop_tokens(tokenizer):
        if token_id not in ids:
            ids.append(token_id)
    return ids


def _generation_config(base: Any, tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    existing = getattr(base, "generation_config", None)
    config = (
        GenerationConfig.from_dict(existing.to_dict())
        if existing is not None
        else GenerationConfig.from_model_config(base.config)
    )
    ids = eos_token_ids(tokenizer, config) or eos_token_ids(tokenizer, base.config)
    if ids:
        config.eos_token_id = ids if len(ids) > 1 else ids[0]
    if tokenizer is not None:
        for attr in ("bos_token_id", "pad_token_id"):
            if getattr(config, attr, None) is None and getattr(tokenizer, attr, None) is not None:
                setattr(config, attr, int(getattr(tokenizer, attr)))
    return config


def _save_tokenizer(tokenizer: Any, path: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _main_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding the most elements: what config.json declares."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32


def write_merged(
    model: torch.nn.Module,
    tokenizer: Any,
    directory: Path,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> None:
    """Write the merged model into the existing, empty ``directory`` (no staging here)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    state = merged_state_dict(model, dtype)
    base = model.get_base_model() if _is_peft(model) else model
    # transformers saves a quantized model's own packed state and ignores ``state_dict``;
    # the merged state is dense, so its quantizer steps aside for this one save.
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:
        base.hf_quantizer = None
    try:
        base.save_pretrained(
            directory, state_dict=state, max_shard_size=max_shard_size, safe_serialization=True
        )
    finally:
        if quantizer is not None:
            base.hf_quantizer = quantizer
    # A 4-bit base leaves its quantization_config behind; the weights are dense now, and
    # the config must name the dtype they have.
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config["dtype"] = str(_main_dtype(state)).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _generation_config(base, tokenizer).save_pretrained(directory)
    _save_tokenizer(tokenizer, directory)


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
        if not _is_peft(model):
            raise ValueError("format 'lora' needs a model with LoRA adapters (get_peft_model)")
        with atomic_directory(path, force=options.get("force", False)) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            _save_tokenizer(tokenizer, staging)
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
