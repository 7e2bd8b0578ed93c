"""sloth-mistral's Mixtral against Hugging Face's mixtral: logits, loss (the router's
load-balancing loss included) and every LoRA gradient, with LoRA on the experts (PEFT's
``target_parameters``) or on attention only; packed rows, the varied config in bf16,
gradient checkpointing, and router jitter left alone with its reason.

``tiny_config("mixtral")``: 4 experts, top 2, expert width 32, a sliding window of 16 on
every layer (the 24-token rows cross it). ``pytest -rA`` prints each report's table.
"""

from __future__ import annotations

import pytest
import torch

from sloth_core.patching import is_patched
from sloth_core.testing import (
    assert_checkpointing_parity,
    check_moe_parity,
    init_tiny_model,
    installed_manager,
    parity_shape,
    tiny_config,
    varied_config,
)
from sloth_core.testing.moe_checks import MOE_LORA, ROUTER_LOSS

PATCHED = {"rms_norm": 5, "attention": 2, "moe": 2, "causal_lm": 1}

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def manager():
    return installed_manager("sloth-mistral")


@pytest.mark.parametrize("lora", list(MOE_LORA))
def test_parity_with_router_loss(manager, lora):
    config = tiny_config("mixtral", **ROUTER_LOSS)
    check_moe_parity(manager, config, patched=PATCHED, lora=lora)


def test_parity_triton(manager):
    """sloth-kernels' kernels (interpreted on the CPU), moe_experts's where it serves it."""
    config = tiny_config("mixtral", **ROUTER_LOSS)
    check_moe_parity(manager, config, patched=PATCHED, kernels="triton", **parity_shape("triton"))


def test_parity_varied_bf16(manager):
    config = varied_config("mixtral")
    assert config.output_router_logits
    check_moe_parity(manager, config, patched=PATCHED, dtype=torch.bfloat16)


def test_packed_parity(manager):
    config = tiny_config("mixtral", **ROUTER_LOSS)
    check_moe_parity(manager, config, patched=PATCHED, packed=True, batch_size=3)


def test_gradient_checkpointing(manager):
    assert_checkpointing_parity(manager, tiny_config("mixtral", **ROUTER_LOSS))


def test_router_jitter_is_left_alone_with_its_reason(manager):
    """Jitter noise is random: no patch can match it, so the blocks keep HF's forward."""
    model = init_tiny_model(tiny_config("mixtral", router_jitter_noise=0.1))
    (report,) = manager.patch_layers(model=model)
    assert report.patched["moe"] == 0
    reason = "router jitter noise (random)"
    assert report.skipped == {f"model.layers.{i}.mlp": reason for i in range(2)}
    assert not is_patched(model.model.layers[0].mlp)
    assert is_patched(model.model.layers[0].self_attn)
    report.undo()
    assert not any(is_patched(m) for m in model.modules())
