"""Mixture-of-experts exports: LoRA on the experts' 3-D weights (PEFT's ``target_parameters``,
one ``ParamWrapper`` per parameter, nested when both of a module's are targeted) merged into
them by ``merged_16bit``, and saved as a plain PEFT adapter by ``lora``.

The models are built with plain transformers and PEFT (no sloth patching): tiny Qwen3-MoE,
Mixtral and gpt-oss configs of :func:`moe_config`, LoRA with B not zero on the attention and on the
experts.
"""

from __future__ import annotations

import copy

import pytest
import torch
from export_helpers import PROMPT, logits
from transformers import AutoModelForCausalLM

import sloth_core
from sloth_core.sdk import merged_state_dict
from sloth_core.testing.models import init_tiny_model, tiny_config
from sloth_core.testing.tokenizer import build_tokenizer
from sloth_core.verify import verify_export

#: model type -> (the dense tiny config it starts from, its expert fields): 4 experts of
#: width 32, top 2, renormalised (Qwen3-MoE's real checkpoints set norm_topk_prob).
MOE = {
    "qwen3_moe": ("qwen3", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                norm_topk_prob=True)),
    "mixtral": ("llama", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    # [E, in, out] experts (PEFT's is_transposed), biases beside them, interleaved gate/up
    "gpt_oss": ("llama", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
}  # fmt: skip
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_config(model_type: str, tokenizer, **overrides):
    dense, fields = MOE[model_type]
    return tiny_config(dense, model_type=model_type, tokenizer=tokenizer, **fields, **overrides)


def moe_lora(model_type: str, experts=tuple(EXPERTS), dtype=torch.float32):
    """A tiny MoE model with LoRA (B not zero) on q/v and on ``experts``, and its tokenizer."""
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tokenizer()
    base = init_tiny_model(moe_config(model_type, tokenizer), dtype=dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        target_parameters=list(experts), init_lora_weights=False)  # fmt: skip
    return get_peft_model(base, config).eval(), tokenizer


@pytest.mark.parametrize(
    ("model_type", "experts"),
    [
        ("qwen3_moe", EXPERTS),
        ("mixtral", EXPERTS),
        ("mixtral", EXPERTS[1:]),
        ("gpt_oss", EXPERTS),
        ("qwen3_moe", ["mlp.gate.weight", *EXPERTS]),  # the router's 2-D weight too
    ],
    ids=["qwen3_moe", "mixtral", "mixtral-down-only", "gpt_oss", "qwen3_moe-router-too"],
)
def test_merged_16bit_merges_expert_lora(plugin_manager, tmp_path, model_type, experts):
    model, tokenizer = moe_lora(model_type, experts)
    with model.disable_adapter():
        without = logits(model, PROMPT)
    want = logits(model, PROMPT)
    peft_merged = logits(copy.deepcopy(model).merge_and_unload(), PROMPT)
    out = sloth_core.export(model, tokenizer, tmp_path / "m", format="merged_16bit").path
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k or "base_layer" in k for k in reloaded.state_dict())
    got = logits(reloaded, PROMPT)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got, peft_merged, atol=2e-5, rtol=1e-5)
    assert (want - without).abs().max() > 1e-2  # the adapters matter
    report = verify_export(out, model, tokenizer, format="merged_16bit")
    assert report.passed and report.top1 == 1.0 and report.max_rel < 1e-5, report.problems


def test_expert_lora_alone_changes_exactly_the_experts():
    """Each expert's update is its own rank-r product (PEFT's layout): a merged expert
    weight differs from the base by ``s * B_e @ A_e`` and nothing else changed."""
    model, _ = moe_lora("qwen3_moe")
    state = merged_state_dict(model)
    base = model.get_base_model()
    wrapper = base.model.layers[1].mlp.experts  # down_proj's, around gate_up_proj's
    inner = wrapper.base_layer
    experts, r = 4, 4
    for target, key in ((wrapper, "down_proj"), (inner, "gate_up_proj")):
        a = target.lora_A["default"].weight.reshape(experts, r, -1)
        b = target.lora_B["default"].weight.reshape(-1, r, experts)
        for e in range(experts):
            delta = target.scaling["default"] * b[:, :, e] @ a[e]
            merged = state[f"model.layers.1.mlp.experts.{key}"][e]
            original = getattr(inner.base_layer, key)[e]
            torch.testing.assert_close(merged - original, delta.detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(
        state["model.layers.1.mlp.gate.weight"], base.model.layers[1].mlp.gate.weight
    )


def test_bf16_merges_in_float32_then_casts():
    model, _ = moe_lora("mixtral")
    reference = copy.deepcopy(model).merge_and_unload()  # PEFT's merge, in float32
    state = merged_state_dict(model, torch.bfloat16)
    for key, want in reference.state_dict().items():
        assert state[key].dtype == torch.bfloat16, key
        # one bf16 rounding of the float32 sum (not the bf16 base plus a bf16 update)
        torch.testing.assert_close(state[key].float(), want.bfloat16().float(), atol=0, rtol=0)


def test_an_adapter_already_merged_is_refused():
    model, _ = moe_lora("qwen3_moe")
    model.base_model.model.model.layers[0].mlp.experts.merge()
    with pytest.raises(ValueError, match="already merged"):
        merged_state_dict(model)


def test_lora_export_loads_in_plain_peft(plugin_manager, tmp_path):
    from peft import PeftModel

    model, tokenizer = moe_lora("qwen3_moe")
    out = sloth_core.export(model, tokenizer, tmp_path / "a", format="lora").path
    assert verify_export(out, model, tokenizer, format="lora").passed
    base = init_tiny_model(moe_config("qwen3_moe", tokenizer))
    loaded = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(logits(loaded, PROMPT), logits(model, PROMPT), atol=0, rtol=0)
