"""The MoE references against transformers' eager experts and routers, with PEFT LoRA."""

import pytest
import torch
from _helpers import assert_close, draw
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import GptOssConfig, MixtralConfig, Qwen3MoeConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeTopKRouter

from sloth_core.ops.reference import ExpertLinear, expert_linears, moe_experts, moe_route
from sloth_core.testing.moe_routing import uneven_routing

#: Keyword arguments of moe_experts per architecture: (activation, gate_up_layout).
KINDS = {"qwen3_moe": ("swiglu", "halves"), "mixtral": ("swiglu", "halves"),
         "gpt_oss": ("gpt_oss", "interleaved")}  # fmt: skip


def _config(kind, hidden, inter, experts, top_k):
    common = dict(hidden_size=hidden, num_experts_per_tok=top_k, experts_implementation="eager")
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(moe_intermediate_size=inter, num_experts=experts, **common)
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=inter, num_local_experts=experts, **common)
    # Off their defaults, so that a reference ignoring them fails.
    return GptOssConfig(intermediate_size=inter, num_local_experts=experts, swiglu_limit=1.5,
                        swiglu_alpha=1.3, **common)  # fmt: skip


class _Block(nn.Module):
    """A parent for the experts, so that PEFT's target names match ``experts.<param>``."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts


def _experts(kind, hidden, inter, experts, top_k, lora_r):
    config = _config(kind, hidden, inter, experts, top_k)
    cls = {"qwen3_moe": Qwen3MoeExperts, "mixtral": MixtralExperts, "gpt_oss": GptOssExperts}[kind]
    block = _Block(cls(config))
    for param in block.parameters():
        nn.init.normal_(param, 0.0, 0.5)
    if lora_r:
        targets = ["experts.gate_up_proj", "experts.down_proj"]
        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r + 1, target_parameters=targets)
        block = inject_adapter_in_model(lora, block)
        for name, param in block.named_parameters():
            if "lora_B" in name:  # PEFT inits it to 0, which would hide a wrong layout
                nn.init.normal_(param, 0.0, 0.3)
    return block.experts, config


def _extra(kind, module):
    """gpt-oss's activation constants as the experts module holds them: transformers 5.17
    fixes them at 1.702 and 7.0, later versions read the config's swiglu_alpha/limit."""
    if kind != "gpt_oss":
        return {}
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return {"alpha": base.alpha, "limit": base.limit}


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_moe_experts_matches_hf_eager_experts(kind, lora):
    seed, (tokens, hidden, inter, top_k, r) = draw((2, 11), (3, 20), (2, 13), (1, 3), (1, 4))
    experts = top_k + 3 + seed % 3
    module, config = _experts(kind, hidden, inter, experts, top_k, r if lora else 0)
    gate_up, down = expert_linears(module)
    assert gate_up.has_lora == down.has_lora == lora
    assert gate_up.weight.shape == (experts, 2 * inter, hidden)
    assert down.weight.shape == (experts, hidden, inter)
    index, weights = uneven_routing(tokens, experts, top_k)
    x = torch.randn(tokens, hidden)
    x_ref, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    w_ref, w_hf = weights.clone().requires_grad_(), weights.clone().requires_grad_()
    out_hf = module(x_hf, index, w_hf)
    activation, layout = KINDS[kind]
    out_ref = moe_experts(x_ref, index, w_ref, gate_up, down, activation=activation,
                          gate_up_layout=layout, **_extra(kind, module))  # fmt: skip
    what = f"{kind} lora={lora} T={tokens} H={hidden} I={inter} E={experts} k={top_k} seed={seed}"
    assert_close(out_ref, out_hf, f"{what} forward")
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert any("lora_B" in n for n, _ in params) == lora
    names, trainable = zip(*params, strict=True)
    upstream = torch.randn_like(out_hf)
    grads_ref = torch.autograd.grad(out_ref, [x_ref, w_ref, *trainable], upstream)
    grads_hf = torch.autograd.grad(out_hf, [x_hf, w_hf, *trainable], upstream)
    for label, g_ref, g_hf in zip(["x", "weights", *names], grads_ref, grads_hf, strict=True):
        assert_close(g_ref, g_hf, f"{what} grad {label}")


def test_expert_linear_reads_the_stored_weight_during_peft_forward():
    module, _ = _experts("qwen3_moe", 6, 4, 5, 2, 2)
    seen = []

    def hook(experts, args):  # runs inside PEFT's forward, LoRA folded into the weight
        seen.append(ExpertLinear.from_parameter(module, "gate_up_proj").weight)
        seen.append(experts.gate_up_proj)

    handle = module.get_base_layer().register_forward_pre_hook(hook)
    index, weights = uneven_routing(3, 5, 2)
    module(torch.randn(3, 6), index, weights)
    handle.remove()
    stored = ExpertLinear.from_parameter(module, "gate_up_proj").weight
    assert torch.equal(seen[0], stored), "the builder read PEFT's parametrized W + delta"
    assert not torch.equal(seen[1], stored), "PEFT no longer folds LoRA into the weight"


def test_expert_linear_rejects_merged_adapters():
    module, _ = _experts("mixtral", 6, 4, 5, 2, 2)
    module.merge()
    with pytest.raises(ValueError, match="merged"):
        ExpertLinear.from_parameter(module, "down_proj")


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3_moe_unnormalized", "mixtral", "gpt_oss"])
def test_moe_route_matches_hf_routers(kind):
    seed, (tokens, hidden, experts, top_k) = draw((1, 9), (2, 12), (2, 9), (1, 2))
    top_k = min(top_k, experts)
    config = _config(kind.split("_unnorm")[0], hidden, 4, experts, top_k)
    config.norm_topk_prob = kind != "qwen3_moe_unnormalized"
    cls = {"mixtral": MixtralTopKRouter, "gpt_oss": GptOssTopKRouter}.get(kind, Qwen3MoeTopKRouter)
    router = cls(config)
    for param in router.parameters():
        nn.init.normal_(param, 0.0, 1.0)
    logits, scores, indices = router(torch.randn(tokens, hidden))
    weights, ref_indices = moe_route(logits, top_k, normalize=config.norm_topk_prob)
    what = f"{kind} T={tokens} E={experts} k={top_k} seed={seed}"
    assert torch.equal(ref_indices, indices), what
    assert weights.dtype == torch.float32
    assert_close(weights, scores.float(), what)


def test_uneven_routing_has_the_corner_cases():
    index, weights = uneven_routing(7, 8, 3)
    counts = torch.bincount(index.reshape(-1), minlength=8)
    assert counts[0] == 6 and counts[1] == 1 and counts[7] == 0
    assert all(len(set(row.tolist())) == 3 for row in index)
    assert (weights > 0).all()
