"""sloth-qwen's Qwen3-MoE against Hugging Face's qwen3_moe: logits, loss (the router's
load-balancing loss included) and every LoRA gradient, with LoRA on the experts (PEFT's
``target_parameters``) or on attention only; packed rows, bf16, gradient checkpointing,
the varied config, idempotence and undo, and the convergence test.

``tiny_config("qwen3_moe")``: 4 experts, top 2, expert width 32; layer 0 is a dense MLP
(``mlp_only_layers``), layer 1 sparse. ``pytest -rA`` prints each report's table.
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
from sloth_core.testing.convergence import assert_converges_alike
from sloth_core.testing.moe_checks import MOE_LORA, ROUTER_LOSS

#: Layer 0 dense, layer 1 sparse: 2 x 4 norms (q/k norms included) + the final one.
PATCHED = {"rms_norm": 9, "mlp": 1, "attention": 2, "moe": 1, "causal_lm": 1}

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def manager():
    return installed_manager("sloth-qwen")


@pytest.mark.parametrize("lora", list(MOE_LORA))
def test_parity_with_router_loss(manager, lora):
    config = tiny_config("qwen3_moe", **ROUTER_LOSS)
    check_moe_parity(manager, config, patched=PATCHED, lora=lora)


@pytest.mark.parametrize("lora", list(MOE_LORA))
def test_parity_triton(manager, lora):
    """sloth-kernels' kernels (interpreted on the CPU): moe_experts's on the sparse layer,
    lora_mlp's on the dense one, whose MLP has no adapter under attention-only LoRA (its
    backward once crashed there: the input's gradient without gate/up adapters)."""
    config = tiny_config("qwen3_moe", **ROUTER_LOSS)
    check_moe_parity(manager, config, patched=PATCHED, lora=lora, kernels="triton",
                     **parity_shape("triton"))  # fmt: skip


def test_parity_varied(manager):
    """norm_topk_prob, output_router_logits, attention_bias, tied embeddings flipped."""
    config = varied_config("qwen3_moe")
    assert config.norm_topk_prob and config.output_router_logits
    check_moe_parity(manager, config, patched=PATCHED)


def test_parity_bf16(manager):
    config = tiny_config("qwen3_moe", **ROUTER_LOSS)
    check_moe_parity(manager, config, patched=PATCHED, dtype=torch.bfloat16)


def test_packed_parity(manager):
    config = tiny_config("qwen3_moe", **ROUTER_LOSS)
    check_moe_parity(manager, config, patched=PATCHED, packed=True, batch_size=3)


def test_gradient_checkpointing(manager):
    assert_checkpointing_parity(manager, tiny_config("qwen3_moe", **ROUTER_LOSS))


def test_report_counts_idempotence_and_undo(manager):
    model = init_tiny_model(tiny_config("qwen3_moe"))
    (report,) = manager.patch_layers(model=model)
    assert (report.plugin, report.model_type, report.skipped) == ("sloth-qwen", "qwen3_moe", {})
    assert report.patched == PATCHED
    assert is_patched(model.model.layers[1].mlp)
    (again,) = manager.patch_layers(model=model)
    assert again.total == 0
    report.undo()
    assert not any(is_patched(m) for m in model.modules())


def test_patched_qwen3_moe_trains_like_the_unpatched_one(manager):
    unpatched, patched = assert_converges_alike(
        tiny_config("qwen3_moe", **ROUTER_LOSS), manager=manager, kernels="torch"
    )
    assert len(unpatched) == len(patched) == 30


def test_disabled_and_merged_expert_adapters(manager):
    """``disable_adapter`` drops the experts' LoRA; merged adapters run PEFT's forward."""
    from sloth_core.testing.parity import attach_lora, kernels_mode

    config = tiny_config("qwen3_moe")
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    model = attach_lora(init_tiny_model(config), r=4, seed=0).eval()
    manager.patch_layers(model=model)
    reference = attach_lora(init_tiny_model(config), r=4, seed=0).eval()
    with torch.no_grad(), kernels_mode("torch"):
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
        with model.disable_adapter(), reference.disable_adapter():
            torch.testing.assert_close(model(ids).logits, reference(ids).logits)
            base = reference(ids).logits
        assert (reference(ids).logits - base).abs().max() > 1e-2  # the adapters matter
        model.merge_adapter()
        reference.merge_adapter()
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
