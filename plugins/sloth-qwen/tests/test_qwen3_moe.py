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

from sloth_core.testing import init_tiny_model, installed_manager, tiny_config, varied_config
from sloth_core.testing.moe_checks import MOE_CHECKS, MoEArchitecture, run_moe_check

QWEN3_MOE = MoEArchitecture(
    "sloth-qwen",
    "qwen3_moe",
    # Layer 0 dense, layer 1 sparse: 2 x 4 norms (q/k norms included) + the final one.
    patched={"rms_norm": 9, "mlp": 1, "attention": 2, "moe": 1, "causal_lm": 1},
    patched_modules=("model.layers.1.mlp",),
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def manager():
    return installed_manager(QWEN3_MOE.plugin)


# triton-attention: lora_mlp's kernel on the dense layer, whose MLP has no adapter under
# attention-only LoRA (its backward once crashed there: the input's gradient without
# gate/up adapters).
@pytest.mark.parametrize("check", [*MOE_CHECKS, "triton-attention", "trains_alike"])
def test_moe_check(manager, check):
    run_moe_check(manager, QWEN3_MOE, check)


def test_parity_varied(manager):
    """norm_topk_prob, output_router_logits, attention_bias, tied embeddings flipped."""
    config = varied_config("qwen3_moe")
    assert config.norm_topk_prob and config.output_router_logits
    QWEN3_MOE.parity(manager, config)


def test_parity_bf16(manager):
    QWEN3_MOE.parity(manager, dtype=torch.bfloat16)


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


def test_a_router_loss_without_gradient_is_named(manager, monkeypatch):
    """Under sloth's checkpointing the patched blocks hand their router logits to the
    checkpoint (``side_output``), so the load-balancing loss passes its gradient back; a
    block that did not (here: the call taken away) leaves a loss without it, and a warning
    says so rather than training on silently."""
    import warnings

    from sloth_core.checkpointing import device_checkpoint
    from sloth_core.patches import moe
    from sloth_core.testing.parity import attach_lora

    config = tiny_config("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.05)
    model = attach_lora(init_tiny_model(config), r=4, seed=0)
    manager.patch_layers(model=model)
    model.get_base_model()._set_gradient_checkpointing(
        enable=True, gradient_checkpointing_func=device_checkpoint
    )
    model.train()
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert model(input_ids=ids, labels=ids).aux_loss.requires_grad
    assert not [w for w in seen if "load-balancing" in str(w.message)]
    monkeypatch.setattr(moe, "side_output", lambda t: None)
    with pytest.warns(RuntimeWarning, match="load-balancing loss .* passes no gradient"):
        assert not model(input_ids=ids, labels=ids).aux_loss.requires_grad
