"""``patch_moe_block`` on gpt-oss's layout, which no plugin claims yet: router module
``router`` with a bias, experts stored ``[E, in, out]`` with biases, interleaved gate/up,
the clamped activation, the block returning its routing weights; against transformers'
``GptOssMLP`` with PEFT LoRA on both expert weights, forward and gradients in fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from sloth_core.ops import default_registry
from sloth_core.patches import moe_block_mismatch, patch_moe_block
from sloth_core.patching import is_patched
from sloth_core.testing import tiny_config

GPT_OSS = dict(router="router", activation="gpt_oss", gate_up_layout="interleaved",
               normalize=True, returns_scores=True)  # fmt: skip
BOUND = 5e-5


def _gpt_oss_mlp():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    torch.manual_seed(0)
    block = GptOssMLP(tiny_config("gpt_oss"))
    with torch.no_grad():
        for param in block.parameters():  # the clamp at 1.5 bites at this scale
            param.normal_(0, 0.3)
    return block


def _lora(block):
    from peft import LoraConfig, get_peft_model

    class Holder(torch.nn.Module):  # PEFT cannot wrap a parameter of the top-level module
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x)

    names = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = get_peft_model(Holder(block), LoraConfig(r=2, lora_alpha=4, target_parameters=names))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    return model


def test_gpt_oss_block_matches_transformers_with_expert_lora():
    reference = _lora(_gpt_oss_mlp())
    patched = copy.deepcopy(reference)
    block = patched.base_model.model.mlp
    assert moe_block_mismatch(block) == "no gate (router) and experts modules"
    assert moe_block_mismatch(block, **GPT_OSS) is None
    assert patch_moe_block(block, default_registry(), **GPT_OSS) and is_patched(block)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    x_ref, x_got = x.clone().requires_grad_(), x.clone().requires_grad_()
    (want, want_scores), (got, got_scores) = reference(x_ref), patched(x_got)
    # fp32 on either device (PEFT adds the LoRA delta to the weight, the op runs it apart):
    # the parity harness's bound, the worst error over the tensor's largest value.
    assert _relative(got, want) < BOUND and _relative(got_scores, want_scores) < BOUND
    (want.square().sum() + want_scores.sum()).backward()
    (got.square().sum() + got_scores.sum()).backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    assert _relative(x_got.grad, x_ref.grad) < BOUND
    got_grads = {n: p.grad for n, p in patched.named_parameters() if p.grad is not None}
    assert got_grads.keys() == grads.keys()
    for name, grad in got_grads.items():
        assert _relative(grad, grads[name]) < BOUND, name


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """The worst element's error over the tensor's largest (the parity harness's grad bound)."""
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (dict(activation="swiglu"), "is not SiLU"),
        (dict(normalize=None), "renormalisation is unknown"),
    ],
)
def test_what_the_ops_do_not_compute_is_named(change, reason):
    block = _gpt_oss_mlp()
    assert reason in moe_block_mismatch(block, **{**GPT_OSS, **change})
    assert not patch_moe_block(block, default_registry(), **{**GPT_OSS, **change})
    assert not is_patched(block)
