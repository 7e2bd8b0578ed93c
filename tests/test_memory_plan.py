"""The memory planner's model against what a tiny llama holds on the CPU."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from sloth_core.memory_plan import (
    LayerCost,
    LayerCosts,
    LayerMode,
    MemoryPlan,
    apply_plan,
    held_bytes_after_forward,
    measure_layer_costs,
    plan_for_step,
    plan_memory,
)
from sloth_core.testing import init_tiny_model
from sloth_core.testing.varied import varied_config

K, R, OFF = LayerMode.KEEP, LayerMode.RECOMPUTE, LayerMode.OFFLOAD


@pytest.fixture(scope="module")
def config():
    return varied_config("llama", num_hidden_layers=4)


def _model(config):
    return init_tiny_model(config, seed=1).train()


def _ids(config, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (2, seq), generator=g)


@pytest.fixture(scope="module")
def costs(config):
    return measure_layer_costs(_model(config), _ids(config, 32))


def test_saved_bytes_scale_with_tokens(config, costs):
    short = measure_layer_costs(_model(config), _ids(config, 16))
    hidden_bytes = config.hidden_size * 4
    for a, b in zip(short, costs, strict=True):
        assert b.saved_bytes_per_token > 4 * hidden_bytes  # more than the input alone
        assert b.saved_bytes_per_token == pytest.approx(a.saved_bytes_per_token, rel=0.03)
        assert a.input_bytes_per_token == b.input_bytes_per_token == hidden_bytes
        # attention's 4 x seq x hidden grows with the sequence, the matmuls' 2 x params not
        assert b.recompute_flops_per_token - a.recompute_flops_per_token == pytest.approx(
            4 * 16 * config.hidden_size
        )
    assert costs.rest_bytes_per_token == pytest.approx(short.rest_bytes_per_token, rel=0.03)
    assert costs.rest_bytes_per_token > config.vocab_size * 4  # the loss's fp32 logits


@pytest.mark.parametrize("modes", [(R, R, R, R), (K, R, OFF, K), (OFF, K, R, OFF)])
def test_predicted_held_bytes_match_measured(config, costs, modes):
    ids = _ids(config, 32)
    tokens = ids.numel()

    def measured(plan_modes):
        plan = MemoryPlan(plan_modes, costs, tokens, 0, 0)
        model = _model(config)
        apply_plan(model, plan)
        return held_bytes_after_forward(model, ids), plan

    kept, all_keep = measured((K,) * 4)
    held, plan = measured(modes)
    # On the CPU the offloaded inputs' "host" copies are in the same memory as the rest.
    predicted = all_keep.held_after_forward_bytes - (
        plan.held_after_forward_bytes + plan.host_bytes
    )
    ratio = (kept - held) / predicted
    assert ratio == pytest.approx(1.0, abs=0.10), (ratio, kept, held, predicted)


def test_plans_are_monotonic_and_name_the_minimum(costs):
    tokens, fixed = 4096, 10 * 2**20
    all_keep = MemoryPlan((K,) * 4, costs, tokens, fixed, 0).predicted_peak_bytes
    kept = []
    for budget in torch.linspace(all_keep, fixed, 40).tolist():
        try:
            plan = plan_memory(costs, tokens, int(budget), fixed)
        except ValueError as e:
            least = MemoryPlan((OFF,) * 4, costs, tokens, fixed, 0).predicted_peak_bytes
            assert f"{least / 2**30:.2f} GiB" in str(e) and "sequence length" in str(e)
            assert budget < least
            continue
        assert plan.predicted_peak_bytes <= budget
        kept.append(plan.modes.count(K))
        assert not kept[:-1] or kept[-1] <= kept[-2]
    assert kept[0] == 4 and kept[-1] == 0 and len(set(kept)) > 2
    with pytest.raises(ValueError, match="memory budget 0.01 GiB"):
        plan_memory(costs, tokens, fixed, fixed)


def test_peak_model_by_hand():
    layers = tuple(LayerCost(i, 10.0, 1.0, 100.0) for i in range(3))
    costs = LayerCosts(layers, 2.0)

    def peak(modes):
        return MemoryPlan(modes, costs, 1, 5, 0).predicted_peak_bytes

    assert peak((K, K, K)) == 5 + 2 + 30
    # recomputing the first layer: it holds its input after the forward, and all its
    # saved tensors again while its backward runs, when the others have been freed
    assert peak((R, K, K)) == 5 + 2 + max(21, 1 + 10)
    assert peak((K, K, R)) == 5 + 2 + max(21, 21 + 10)
    # an offloaded layer's input comes back while the layer after it runs its backward
    assert peak((OFF, OFF, OFF)) == 5 + 2 + 10 + 1
    assert peak((OFF, OFF, R)) == 5 + 2 + max(1, 1 + 10 + 1)
    # ties go to the first layers, whose recompute comes when the rest is freed
    assert plan_memory(costs, 1, 5 + 2 + 29, 5).modes == (R, K, K)
    assert plan_memory(costs, 1, 5 + 2 + 12, 5).modes == (R, R, K)
    least = plan_memory(costs, 1, 5 + 2 + 11, 5)
    assert least.modes == (OFF, OFF, OFF) and least.host_bytes == 3
    with pytest.raises(ValueError, match="below the least this step needs"):
        plan_memory(costs, 1, 5 + 2 + 10, 5)
    plan = MemoryPlan((OFF, OFF, R), costs, 1, 5, 0)
    console = Console(width=200, record=True)
    console.print(plan.table())
    text = console.export_text()
    assert "recompute" in text and "offload" in text
    assert "1 recomputed, 2 offloaded of 3 layers" in plan.describe()


def test_mixed_plan_gives_the_same_loss_and_gradients(config, costs):
    ids = _ids(config, 24, seed=3)

    def step(modes):
        model = _model(config)
        if modes is not None:
            apply_plan(model, MemoryPlan(modes, costs, ids.numel(), 0, 0))
        runs = [0] * len(model.model.layers)
        for i, layer in enumerate(model.model.layers):
            layer.mlp.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, runs

    loss, grads, runs = step(None)
    mixed_loss, mixed_grads, mixed_runs = step((OFF, K, R, OFF))
    assert runs == [1, 1, 1, 1] and mixed_runs == [2, 1, 2, 2]  # run again in backward
    torch.testing.assert_close(mixed_loss, loss, atol=1e-6, rtol=0)
    assert grads.keys() == mixed_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(mixed_grads[name], grad, atol=1e-6, rtol=1e-6, msg=name)


def test_plan_for_step_measures_over_any_checkpointing_and_applies_its_plan(config, costs):
    """Whatever checkpointing the model had, the plan is measured with every layer kept
    (the same per-token costs as measured directly) and set on its layers."""
    from sloth_core.checkpointing import enable_checkpointing
    from sloth_core.memory_plan import fixed_bytes

    model = _model(config)
    enable_checkpointing(model, offload=True)
    fixed = fixed_bytes(model)
    tokens = 3 * 40
    target = plan_memory(costs, tokens, 2**40, fixed)
    recompute_all = MemoryPlan((R,) * 4, costs, tokens, fixed, 0).predicted_peak_bytes
    budget = int((target.predicted_peak_bytes + recompute_all) / 2)  # somewhere in between
    plan = plan_for_step(model, sequences=3, seq=40, budget_bytes=budget, sample_seq=32)
    assert plan.modes == plan_memory(costs, tokens, budget, fixed).modes
    assert K in plan.modes and R in plan.modes
    layers = model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [m is not K for m in plan.modes]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary tables
    assert fixed == buffers + sum(p.numel() * (4 + 4 + 8) for p in model.parameters())
    with pytest.raises(ValueError, match="below the least this step needs"):
        plan_for_step(model, sequences=3, seq=40, budget_bytes=fixed, sample_seq=32)


def test_an_moe_layer_costs_a_token_its_top_k_experts():
    """Qwen3-MoE with layer 0 dense and layer 1 sparse, LoRA on attention and every
    expert: the sparse layer's recompute counts ``top_k`` of its ``E`` experts and of
    their adapters (PEFT's ``r x E`` wide ones), the dense layer its whole MLP."""
    from sloth_core.testing import tiny_config
    from sloth_core.testing.parity import attach_lora

    config = tiny_config("qwen3_moe")
    h, r, seq = config.hidden_size, 4, 12
    e, k, moe = config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size
    assert config.mlp_only_layers == [0] and k < e
    model = attach_lora(init_tiny_model(config, seed=3), r=r, seed=0).train()
    # Whether the dense layer's MLP has adapters is PEFT's choice: up to 0.21 it mapped an
    # MoE model's gate/up/down_proj onto the expert stacks alone (target_parameters) and
    # left the dense layer's bare; 0.22 adapts those too. The cost counts what is there.
    dense_mlp = model.base_model.model.model.layers[0].mlp
    adapted = [type(getattr(dense_mlp, n)) is not torch.nn.Linear
               for n in ("gate_proj", "up_proj", "down_proj")]  # fmt: skip
    assert len(set(adapted)) == 1, adapted  # all three or none
    costs = measure_layer_costs(model, _ids(config, seq))
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim

    def lora(n_in, n_out):
        return n_in * n_out + r * (n_in + n_out)

    attention = lora(h, q) + 2 * lora(h, kv) + lora(q, h)
    inter = config.intermediate_size
    dense = 2 * lora(h, inter) + lora(inter, h) if adapted[0] else 3 * h * inter
    # per expert: gate_up [2m, h] and down [h, m]; PEFT's adapters of the stacks (every
    # expert's rank, gate_up's at 2r) at top_k / E. transformers' router is a bare [E, h]
    # weight, not an nn.Linear: not counted (a 1 / (3 m top_k) share of the experts').
    stacks = [p for n, p in model.named_parameters() if "layers.1.mlp.experts" in n and "lora" in n]
    assert len(stacks) == 4  # lora_A and lora_B of gate_up_proj and of down_proj
    experts = k * 3 * moe * h + k / e * sum(p.numel() for p in stacks)
    flops = [2 * (attention + dense), 2 * (attention + experts)]
    for cost, matmuls in zip(costs, flops, strict=True):
        assert cost.recompute_flops_per_token == pytest.approx(matmuls + 4 * seq * h)
