"""LoRA on part of a layer's projections, as users often ask (PEFT's usual ``q_proj`` and
``v_proj``; the MLP alone): every dense architecture against the unpatched Hugging Face
model through sloth-kernels, where an op's layers may have no adapter at all and its input
still needs its gradient for the layers below (sessions 1-12 crashed there in backward)."""

from __future__ import annotations

import pytest

from sloth_core.testing import check_plugin_parity, installed_manager, parity_shape
from sloth_core.testing.varied import varied_config

#: architecture: its plugin, the attention's part (k and o without adapters), the MLP
ARCHITECTURES = {
    "llama": ("sloth-llama", ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]),
    "mistral": ("sloth-mistral", ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]),
    "qwen2": ("sloth-qwen", ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]),
    "qwen3": ("sloth-qwen", ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]),
    "gemma": ("sloth-gemma", ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]),
    "gemma2": ("sloth-gemma", ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]),
    "gemma3_text": (
        "sloth-gemma",
        ["q_proj", "v_proj"],
        ["gate_proj", "up_proj", "down_proj"],
    ),  # fmt: skip
    "phi3": ("sloth-phi", ["qkv_proj"], ["gate_up_proj", "down_proj"]),
}


@pytest.mark.parametrize("part", ["attention", "mlp"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_parity_with_lora_on_part_of_the_projections(arch, part, single_thread):
    plugin, attention, mlp = ARCHITECTURES[arch]
    manager = installed_manager(plugin)
    modules = attention if part == "attention" else mlp
    check_plugin_parity(manager, varied_config(arch), kernels="triton", lora_modules=modules,
                        **parity_shape("triton"))  # fmt: skip
