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
from sloth_core.testing import init_tiny_model, installed_manager, tiny_config, varied_config
from sloth_core.testing.moe_checks import MOE_CHECKS, MoEArchitecture, run_moe_check

MIXTRAL = MoEArchitecture(
    "sloth-mistral",
    "mixtral",
    patched={"rms_norm": 5, "attention": 2, "moe": 2, "causal_lm": 1},
    patched_modules=("model.layers.1.mlp",),
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def manager():
    return installed_manager(MIXTRAL.plugin)


@pytest.mark.parametrize("check", MOE_CHECKS)
def test_moe_check(manager, check):
    run_moe_check(manager, MIXTRAL, check)


def test_parity_varied_bf16(manager):
    config = varied_config("mixtral")
    assert config.output_router_logits
    MIXTRAL.parity(manager, config, dtype=torch.bfloat16)


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
