"""``sloth train`` on a tiny Qwen3-MoE: LoRA on every expert weight (``target_experts``)
with packing and gradient checkpointing, the adapter saved in PEFT's layout; wrong
expert options named before any training."""

from __future__ import annotations

import json

import pytest

from sloth_core.train import ConfigError, TrainConfig, train


@pytest.fixture(scope="module")
def tiny_qwen3_moe(tmp_path_factory):
    from sloth_core.testing.models import tiny_model

    return tiny_model("qwen3_moe", tmp_path_factory.mktemp("models") / "qwen3_moe")


def _options(model, data, out, **extra):
    return {
        "model_name": str(model), "dataset": str(data), "output_dir": str(out),
        "max_seq_length": 64, "per_device_train_batch_size": 2, "max_steps": 3,
        "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "save_method": "lora",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], **extra,
    }  # fmt: skip


def test_expert_lora_trains_packed_and_checkpointed(tiny_qwen3_moe, alpaca_file, tmp_path):
    out = tmp_path / "out"
    options = _options(tiny_qwen3_moe, alpaca_file, out, target_experts=True, packing=True,
                       gradient_checkpointing="on")  # fmt: skip
    result = train(TrainConfig.from_mapping(options), show_progress=False)
    assert len(result.losses) == 3 and all(loss > 0 for loss in result.losses)
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == [
        "mlp.experts.down_proj", "mlp.experts.gate_up_proj",
    ]  # fmt: skip


def test_wrong_expert_options_are_named(tiny_qwen3_moe, tiny_llama, alpaca_file, tmp_path):
    options = _options(tiny_qwen3_moe, alpaca_file, tmp_path / "a",
                       target_parameters=["mlp.experts.gate_proj"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"target_parameters=.*'mlp.experts.gate_proj'"):
        train(TrainConfig.from_mapping(options), show_progress=False)
    options = _options(tiny_qwen3_moe, alpaca_file, tmp_path / "c", target_modules=["w1"])
    with pytest.raises(ConfigError, match=r"no module named 'w1' .*its experts take LoRA"):
        train(TrainConfig.from_mapping(options), show_progress=False)
    options = _options(tiny_llama, alpaca_file, tmp_path / "b", target_experts=True)
    with pytest.raises(ConfigError, match="target_experts=True: .* has no expert weights"):
        train(TrainConfig.from_mapping(options), show_progress=False)


def test_full_finetuning_over_processes_loads_moe_whole(tiny_qwen3_moe, alpaca_file, tmp_path):
    """transformers stores MoE experts per expert and fuses them while loading: sharded
    loading, which reads parameters by name, finds them missing before it allocates
    anything, and the model loads whole (FSDP2 shards it after, as before)."""
    from sloth_core.train import distributed, loop
    from sloth_core.train.sharded_loading import NamesDiffer, SliceReader, check_names

    config = TrainConfig.from_mapping(
        {**_options(tiny_qwen3_moe, alpaca_file, tmp_path / "out"), "full_finetuning": True}
    )  # fmt: skip
    tokenizer = loop._load_tokenizer(config)
    model = loop._load_model(config, tokenizer, shard_over=distributed.Group())
    assert not any(p.is_meta for p in model.parameters())
    assert any(name.endswith("experts.gate_up_proj") for name, _ in model.named_parameters())
    with pytest.raises(NamesDiffer, match="experts.gate_up_proj"):
        check_names(model, SliceReader(sorted(tiny_qwen3_moe.glob("*.safetensors"))))
