"""LoRA on mixture-of-experts weights through the API and ``sloth train``'s config:
``target_parameters`` passed to PEFT, the ``target_experts`` shorthand, the adapter
loading in plain PEFT, and dropout refused naming the option (PEFT's ``ParamWrapper``
cannot apply it)."""

from __future__ import annotations

import pytest
import torch

from sloth_core import FastLanguageModel
from sloth_core.patches import expert_parameter_names
from sloth_core.testing import init_tiny_model, tiny_config
from sloth_core.train import ConfigError, TrainConfig

EXPERTS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _lora_names(model) -> set[str]:
    return {n.split(".lora_")[0] for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_expert_parameter_names(arch):
    assert expert_parameter_names(init_tiny_model(tiny_config(arch))) == EXPERTS
    assert expert_parameter_names(init_tiny_model(tiny_config("llama"))) == []


def test_target_experts_trains_what_peft_target_parameters_would(plugin_manager):
    from peft import LoraConfig, get_peft_model

    config = tiny_config("qwen3_moe")
    ours = FastLanguageModel.get_peft_model(
        init_tiny_model(config), r=4, target_modules=ATTENTION, target_experts=True
    )
    theirs = get_peft_model(
        init_tiny_model(config),
        LoraConfig(r=4, lora_alpha=16, target_modules=ATTENTION, target_parameters=EXPERTS),
    )
    trained = {n: p.shape for n, p in ours.named_parameters() if p.requires_grad}
    assert trained == {n: p.shape for n, p in theirs.named_parameters() if p.requires_grad}
    assert any("experts" in n for n in trained)
    assert ours.peft_config["default"].target_parameters == set(EXPERTS)
    same = FastLanguageModel.get_peft_model(
        init_tiny_model(config), r=4, target_modules=ATTENTION, target_parameters=EXPERTS
    )
    assert _lora_names(same) == _lora_names(ours)


def test_adapter_on_experts_loads_in_plain_peft(plugin_manager, tmp_path):
    from peft import PeftModel

    config = tiny_config("mixtral")
    model = FastLanguageModel.get_peft_model(
        init_tiny_model(config), r=4, target_modules="all-linear", target_experts=True,
        init_lora_weights=False,  # B != 0: the adapter changes the logits
    )  # fmt: skip
    model.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(init_tiny_model(config), tmp_path / "adapter").eval()
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = init_tiny_model(config)(ids).logits
        expected = plain(ids).logits
        got = model.eval()(ids).logits
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dropout_on_expert_lora_is_refused_naming_the_option(plugin_manager):
    model = init_tiny_model(tiny_config("qwen3_moe"))
    with pytest.raises(ValueError, match="lora_dropout=0.1"):
        FastLanguageModel.get_peft_model(model, lora_dropout=0.1, target_experts=True)
    # PEFT's own mapping of gate/up/down_proj onto Qwen3-MoE's experts: the same message.
    with pytest.raises(ValueError, match="lora_dropout=0.1: .*set lora_dropout=0"):
        FastLanguageModel.get_peft_model(model, lora_dropout=0.1)
    with pytest.raises(ValueError, match="target_experts=True: llama has no 3-D expert"):
        FastLanguageModel.get_peft_model(init_tiny_model(tiny_config("llama")), target_experts=True)


def _train_config(tmp_path, **options):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    return TrainConfig(model_name="m", dataset=str(data), output_dir=str(tmp_path / "o"), **options)


def test_train_config_takes_expert_lora_and_names_bad_combinations(tmp_path):
    config = _train_config(tmp_path, target_experts=True, target_parameters=EXPERTS)
    assert config.validate(check_output=False).target_experts
    _train_config(tmp_path, target_modules=[], target_experts=True).validate(check_output=False)
    with pytest.raises(ConfigError, match="target_experts=True: .*lora_dropout"):
        _train_config(tmp_path, target_experts=True, lora_dropout=0.1).validate(check_output=False)
    with pytest.raises(ConfigError, match="target_parameters=.*full_finetuning"):
        _train_config(
            tmp_path, target_parameters=EXPERTS, full_finetuning=True, save_method="merged_16bit"
        ).validate(check_output=False)
    with pytest.raises(ConfigError, match="option .target_experts. takes true or false"):
        TrainConfig.from_mapping({"target_experts": "yes please"})
