"""Merging LoRA into the base weights, and writing the merged model as transformers
loads it: the shared piece of every format that starts from merged weights (merged_16bit,
merged_4bit, GGUF).

``merged_state_dict`` adds each active adapter to its base weight in float32 without
touching the model: LoRA on linear layers, and LoRA on parameters (PEFT's
``target_parameters``, a ``ParamWrapper`` per parameter, nested when one module has several
targeted, as the 3-D expert weights of a mixture of experts); ``write_merged`` writes
sharded safetensors, ``config.json``, a ``generation_config.json`` naming every token that
ends a reply (:func:`sloth_core.sdk.stop.eos_token_ids`) and the tokenizer with its chat
template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch

from sloth_core.errors import SlothError

from .stop import eos_token_ids

__all__ = [
    "DEFAULT_SHARD_SIZE", "is_peft", "merged_state_dict", "save_tokenizer", "write_merged",
    "write_model_files",
]  # fmt: skip

DEFAULT_SHARD_SIZE = "5GB"


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _base_model(model: Any) -> Any:
    """The transformers model of ``model``: a PEFT model's base, else ``model`` itself."""
    return model.get_base_model() if is_peft(model) else model


def _is_lora(module: Any) -> bool:
    return hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")


def _is_param_wrapper(module: Any) -> bool:
    """PEFT's LoRA on one parameter of a module (``target_parameters``), duck-typed."""
    return _is_lora(module) and hasattr(module, "parameter_name")


def _lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """LoRA-wrapped linear layers of ``model`` by module path, duck-typed on PEFT's API."""
    return {
        name: module
        for name, module in model.named_modules()
        if _is_lora(module) and not _is_param_wrapper(module)
    }


def _param_wrappers(model: torch.nn.Module) -> dict[str, Any]:
    """PEFT's parameter wrappers of ``model`` by the path of the parameter they adapt, as
    the unwrapped model names it (``model.layers.0.mlp.experts.gate_up_proj``): a module
    with two targeted parameters holds one wrapper inside the other, each ``base_layer``
    deeper, around the module that owns both."""
    return {
        f"{_unwrapped(name)}.{module.parameter_name}": module
        for name, module in model.named_modules()
        if _is_param_wrapper(module)
    }


def _unwrapped(key: str) -> str:
    """``key`` without PEFT's ``base_layer`` steps: the name in the unwrapped model."""
    return ".".join(part for part in key.split(".") if part != "base_layer")


def _parameter_delta(wrapper: Any, adapter: str) -> torch.Tensor:
    """One adapter's update of the parameter ``wrapper`` adapts, in float32, in the
    parameter's shape; the update PEFT's ``ParamWrapper.get_delta_weight`` adds when it
    merges, without its cast to the parameter's dtype.

    PEFT stores the ``E`` experts' factors side by side: ``lora_A.weight`` is
    ``[E * r, in]`` (expert-major rows), ``lora_B.weight`` is ``[out, r * E]`` (expert-minor
    columns). For a 3-D parameter laid out ``[E, out, in]`` (transformers' experts; PEFT
    swaps its in and out features for it) expert ``e`` adds ``s * B_e @ A_e``; for one laid
    out ``[E, in, out]`` (``is_transposed``) the transpose; a 2-D parameter is one expert.
    """
    lora_a = wrapper.lora_A[adapter].weight.detach().float()
    lora_b = wrapper.lora_B[adapter].weight.detach().float()
    experts = int(getattr(wrapper, "num_experts", 1) or 1)
    a = lora_a.reshape(experts, -1, lora_a.shape[-1])  # [E, r, in]
    b = lora_b.reshape(lora_b.shape[0], -1, experts).permute(2, 0, 1)  # [E, out, r]
    delta = torch.bmm(b, a) * float(wrapper.scaling[adapter])  # [E, out, in]
    param = wrapper.get_param()
    if param.ndim == 3 and _transposed(wrapper, param.shape, delta.shape):
        delta = delta.transpose(1, 2)  # the parameter is [E, in, out]
    return delta.reshape(param.shape).to(param.device)


def _transposed(wrapper: Any, shape: torch.Size, delta: torch.Size) -> bool:
    """Whether a 3-D parameter is laid out ``[E, in, out]``: read from the shapes, or, for
    square experts, from PEFT's record of whether it swapped in and out for this one."""
    if shape[1] != shape[2]:
        return tuple(shape) != tuple(delta)
    return not getattr(wrapper, "_did_swap_in_out_features", False)


def _merged_parameters(
    wrappers: dict[str, Any], dtype: torch.dtype | None, dense: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    merged = {}
    for key, wrapper in wrappers.items():
        if wrapper.merged:
            raise ValueError(f"{key}: adapter already merged into the weights; unmerge first")
        param = dense[key] if key in dense else wrapper.get_param().detach()
        total = param.float()
        for adapter in wrapper.active_adapters:
            if adapter in wrapper.lora_A:
                total = total + _parameter_delta(wrapper, adapter)
        merged[key] = total.to(dtype or param.dtype)
    return merged


def _scaled_parameters(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The 3-D parameters a quantizer plugin stores with row scales (sloth-fp8's experts:
    e4m3 values, the scales in the buffer ``<name>_row_scales``), dequantized to ``dtype``
    in the layout they are stored in, by their key in the unwrapped model."""
    from sloth_core.ops.reference import ROW_SCALES, ExpertLinear

    dense = {}
    for name, module in model.named_modules():
        if _is_param_wrapper(module):
            continue  # the module it wraps owns the parameter and its scales
        for buffer, _ in module.named_buffers(recurse=False):
            if not buffer.endswith(ROW_SCALES):
                continue
            param = buffer[: -len(ROW_SCALES)]
            weight = ExpertLinear.from_parameter(module, param).dense_weight(dtype)
            if getattr(module, "is_transposed", False):  # stored [E, in, out]
                weight = weight.transpose(1, 2)
            dense[_unwrapped(f"{name}.{param}" if name else param)] = weight
    return dense


def _quantized_layers(model: torch.nn.Module, skip: dict[str, Any]) -> dict[str, Any]:
    """Layers outside ``skip`` whose weight is quantized (duck-typed): bitsandbytes', or a
    quantizer plugin's layer with a ``dense_weight()`` method (sloth-fp8's)."""
    found, skipped = {}, set(skip)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if _under(f"{name}.weight", skipped):
            continue
        if (
            getattr(weight, "quant_state", None) is not None
            or hasattr(weight, "SCB")
            or callable(getattr(module, "dense_weight", None))
        ):
            found[name] = module
    return found


def _under(key: str, modules: set[str]) -> bool:
    """Whether state-dict ``key`` belongs to one of ``modules`` (or a submodule of one)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def _dense(module: Any, name: str) -> torch.Tensor:
    from sloth_core.ops import LoRALinear

    if callable(getattr(module, "dense_weight", None)):  # a quantizer plugin's layer
        return module.dense_weight()
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
    base = _base_model(model)
    layers = _lora_layers(base)
    wrappers = _param_wrappers(base)
    state = base.state_dict()
    # Quantized expert stacks come back in the dtype of the model's other weights.
    dense = _scaled_parameters(base, dtype or _main_dtype(_unquantized(state)))
    merged = _merged_parameters(wrappers, dtype, dense)
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
    for key, tensor in state.items():
        if "lora_" in key or _under(key, done):
            continue  # adapters, wrapped and packed 4-bit weights: written above
        if ".modules_to_save." in key or ".original_module." in key:
            continue  # the trained copies replace their originals below
        key = _unwrapped(key) if wrappers else key  # the wrapped modules' other tensors
        if _is_row_scales(key, dense):
            continue  # folded into the dequantized stack
        if key not in wrappers:
            merged[key] = dense.get(key, tensor)
    # Modules trained in full (modules_to_save) take the place of their originals.
    for key, tensor in state.items():
        if ".modules_to_save." in key:
            prefix, rest = key.split(".modules_to_save.", 1)
            merged[f"{prefix}.{rest.split('.', 1)[1]}"] = tensor
    if dtype is not None:
        merged = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged.items()}
    return {k: v.detach().contiguous() for k, v in merged.items()}


def _is_row_scales(key: str, dense: dict[str, torch.Tensor]) -> bool:
    from sloth_core.ops.reference import ROW_SCALES

    return key.endswith(ROW_SCALES) and key[: -len(ROW_SCALES)] in dense


def _unquantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating tensors of ``state`` of 16 bits or more."""
    return {k: v for k, v in state.items() if v.is_floating_point() and v.element_size() > 1}


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


def save_tokenizer(tokenizer: Any, path: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _main_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding the most elements: what config.json declares."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return max(sizes, key=sizes.__getitem__) if sizes else torch.float32


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
        dtype = cast(torch.dtype, getattr(torch, dtype.removeprefix("torch.")))
    state = merged_state_dict(model, dtype)
    base = _base_model(model)
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
    write_model_files(base, tokenizer, directory, _main_dtype(state))


def write_model_files(base: Any, tokenizer: Any, directory: Path, dtype: torch.dtype) -> None:
    """Beside merged weights in ``directory``: ``config.json`` naming their ``dtype``
    (written from ``base.config`` unless ``save_pretrained`` wrote it with the weights),
    the generation config with the tokenizer's stop tokens, and the tokenizer."""
    config_file = directory / "config.json"
    if not config_file.exists():
        base.config.save_pretrained(directory)
    # A 4-bit base leaves its quantization_config behind; the weights are dense now, and
    # the config must name the dtype they have.
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _generation_config(base, tokenizer).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
