"""What a bitsandbytes 4-bit model computes, written out in plain float32: the known value
that a 4-bit model's logits are compared with (an export's reload, a 4-bit load)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["dequantized_twin", "compute_in_float32"]


def compute_in_float32(model: Any) -> Any:
    """Make ``model`` compute in float32: its 16-bit tensors cast up, every
    ``bnb.nn.Linear4bit`` dequantizing to and multiplying in float32 (they follow the
    model's 16-bit dtype otherwise), so that its logits equal :func:`dequantized_twin`'s
    up to float32 rounding. Returns ``model``; call it before building the twin."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32
            # Linear4bit's weight is a Params4bit (typed as nn.Linear's Tensor).
            quant_state = cast(bnb.nn.Params4bit, module.weight).quant_state
            assert quant_state is not None  # set when the layer was quantized
            quant_state.dtype = torch.float32
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    return model


def dequantized_twin(model: Any) -> torch.nn.Module:
    """A float32 model of ``model``'s config whose every ``bnb.nn.Linear4bit`` weight is
    that layer's dequantized 4-bit weight and every other tensor ``model``'s own.

    The 4-bit model computes ``x @ dequantize(W).T`` in its compute dtype, so the two agree
    up to that dtype's rounding; a layer quantized from the wrong weights, or loaded with
    the wrong quantization state, does not.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    # Read first: sloth-bnb's state-dict hook puts weights that bitsandbytes repacked for
    # CPU inference back in the standard layout, which dequantize_4bit reads.
    tensors = model.state_dict()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            quant_state = cast(bnb.nn.Params4bit, module.weight).quant_state
            weight = dequantize_4bit(module.weight.data, quant_state)
            state[f"{name}.weight"] = weight.float().cpu()
    for name, tensor in tensors.items():
        stem = name.rsplit(".", 1)[0]
        if f"{stem}.weight" in state and name != f"{stem}.weight" and "bias" not in name:
            continue  # quantization state of a 4-bit layer (absmax, quant_map, ...)
        if name not in state and tensor.is_floating_point():
            state[name] = tensor.float().cpu()
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    twin = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, _ = twin.load_state_dict(state, strict=False)
    missing = [n for n in missing if n not in _tied(twin)]
    if missing:
        raise ValueError(f"no weights for {missing[:5]}")
    return twin.eval()


def _tied(model: PreTrainedModel) -> set[str]:
    return {"lm_head.weight"} if model.config.tie_word_embeddings else set()
