"""merged_16bit (alias vllm) and merged_4bit: the files transformers and vLLM load."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from export_helpers import PROMPT, logits, lora_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import sloth_core
import sloth_core.io
from sloth_core.catalog import install_command
from sloth_core.default_plugins import exporters
from sloth_core.errors import PluginMissingError, SlothError
from sloth_core.sdk import merged_state_dict, stop_tokens
from sloth_core.testing import TINY_CONFIGS
from sloth_core.testing.quantized import compute_in_float32, dequantized_twin
from sloth_core.testing.tokenizer import build_tokenizer


def _reload(path, arch):
    # Gemma 2's softcap needs eager attention (see sloth_core.testing.models).
    extra = {"attn_implementation": "eager"} if arch == "gemma2" else {}
    return AutoModelForCausalLM.from_pretrained(path, **extra).eval()


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_merged_16bit_reloads_with_the_merged_models_logits(plugin_manager, tmp_path, arch):
    model, tokenizer = lora_model(arch)
    merged = copy.deepcopy(model).merge_and_unload()  # PEFT's own merge, in memory
    result = sloth_core.export(model, tokenizer, tmp_path / "out", format="merged_16bit")
    assert result.format == "merged_16bit"
    reloaded = _reload(result.path, arch)
    expected = logits(merged, PROMPT)
    torch.testing.assert_close(logits(reloaded, PROMPT), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, PROMPT), expected, atol=2e-5, rtol=1e-5)
    assert not any("lora" in key for key in reloaded.state_dict())
    names = {p.name for p in result.path.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= names


def test_modules_to_save_replace_their_originals(plugin_manager, tmp_path):
    from peft import LoraConfig, get_peft_model

    from sloth_core.testing.models import init_tiny_model, tiny_config

    tokenizer = build_tokenizer()
    base = init_tiny_model(tiny_config("llama", tokenizer=tokenizer, tie_word_embeddings=False))
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    state = merged_state_dict(model)
    assert [k for k in state if "lm_head" in k] == ["lm_head.weight"]
    out = sloth_core.export(model, tokenizer, tmp_path / "m").path
    torch.testing.assert_close(logits(_reload(out, "llama"), PROMPT), logits(model, PROMPT))


def test_sharding_writes_an_index_naming_every_shard(plugin_manager, llama_lora, tmp_path):
    model, tokenizer = llama_lora
    out = sloth_core.export(model, tokenizer, tmp_path / "m", max_shard_size="100KB").path
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    torch.testing.assert_close(logits(_reload(out, "llama"), PROMPT), logits(model, PROMPT))


def test_generation_config_names_every_eos(plugin_manager, llama_lora, tmp_path):
    model, tokenizer = llama_lora  # ChatML: <|im_end|> (4) ends a turn, eos is 1
    out = sloth_core.export(model, tokenizer, tmp_path / "m").path
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 4]
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.chat_template == tokenizer.chat_template


def test_eos_ids_are_the_end_of_turn_tokens_the_template_uses(plugin_manager, tmp_path):
    from sloth_core.data import CHAT_TEMPLATES

    tokenizer = build_tokenizer(chat_template=CHAT_TEMPLATES["llama-3"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<end_of_turn>"]})
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    # <|im_end|> and <end_of_turn> are in the vocabulary, but this template never writes them.
    assert stop_tokens(tokenizer) == [("<|end_of_text|>", 1), ("<|eot_id|>", eot)]
    model, _ = lora_model("llama", tokenizer=tokenizer)
    out = sloth_core.export(model, tokenizer, tmp_path / "m").path
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, eot]


def test_vllm_is_an_alias_that_says_so(plugin_manager, llama_lora, tmp_path):
    described = []
    exporters.register_exporters(described.append)
    merged = next(f for f in described if f.name == "merged_16bit")
    assert "vllm" in merged.aliases and "vllm serve" in merged.description
    assert plugin_manager.exporters["vllm"] == "builtin:exporters"
    assert plugin_manager.export_format("vllm").name == "merged_16bit"
    model, tokenizer = llama_lora
    result = sloth_core.export(model, tokenizer, tmp_path / "v", format="vllm")
    assert result.format == "merged_16bit" and (result.path / "model.safetensors").is_file()


def test_merged_16bit_takes_no_quantization(plugin_manager, llama_lora, tmp_path):
    model, tokenizer = llama_lora
    with pytest.raises(SlothError, match="takes no quantization"):
        sloth_core.export(model, tokenizer, tmp_path / "m", quantization="q4_k_m")
    assert not (tmp_path / "m").exists()


def test_not_enough_disk_space_refuses_before_writing(
    plugin_manager, llama_lora, tmp_path, monkeypatch
):
    model, tokenizer = llama_lora
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(sloth_core.io.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(SlothError, match="not enough free disk space"):
        sloth_core.export(model, tokenizer, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_export_function_survives_the_export_helpers(plugin_manager, llama_lora, tmp_path):
    import sloth_core.verify  # noqa: F401  (the export helpers: no package shadows the function)

    model, tokenizer = llama_lora
    assert sloth_core.export(model, tokenizer, tmp_path / "m").format == "merged_16bit"


def test_merged_4bit_needs_sloth_bnb(plugin_manager, llama_lora, tmp_path):
    model, tokenizer = llama_lora
    with pytest.raises(PluginMissingError, match=re.escape(install_command("sloth-bnb"))):
        sloth_core.export(model, tokenizer, tmp_path / "m", format="merged_4bit")


@pytest.fixture
def with_bnb(plugin_manager, register_plugin):
    plugin = pytest.importorskip("sloth_bnb.plugin")
    register_plugin(plugin, name=plugin.PLUGIN)
    return plugin_manager


def test_merged_4bit_reloads_as_nf4(with_bnb, llama_lora, tmp_path):
    model, tokenizer = llama_lora
    result = sloth_core.export(model, tokenizer, tmp_path / "q", format="merged_4bit")
    config = json.loads((result.path / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert json.loads((result.path / "generation_config.json").read_text())["eos_token_id"] == [
        1,
        4,
    ]
    assert not (result.path / ".merged-16bit").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(result.path)
    assert type(reloaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    # The reload computes what its dequantized weights compute...
    # In float32 throughout (the 16-bit tensors too), so that only the weights can differ.
    reloaded32 = compute_in_float32(AutoModelForCausalLM.from_pretrained(result.path))
    twin = dequantized_twin(reloaded32)
    # In training mode (no dropout here): in eval mode under no_grad bitsandbytes repacks
    # 4-bit weights for its bf16 inference kernel on CPUs with AVX512-BF16.
    got = logits(reloaded32.train(), PROMPT)
    torch.testing.assert_close(got, logits(twin, PROMPT), atol=1e-4, rtol=1e-4)
    # ...and those are the merged weights, rounded to NF4: nearer them than the base's.
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    base = {k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items()
            if "lora_" not in k}  # fmt: skip
    for name, weight in twin.state_dict().items():
        if "_proj" in name and name.endswith("weight"):
            to_merged = (weight - merged[name].float()).norm() / merged[name].float().norm()
            to_base = (weight - base[name].float()).norm() / merged[name].float().norm()
            assert to_merged < 0.2 and to_merged < to_base, (name, to_merged, to_base)
    with pytest.raises(SlothError, match="nf4, fp4"):
        sloth_core.export(
            model, tokenizer, tmp_path / "x", format="merged_4bit", quantization="q4_0"
        )


def test_qlora_model_merges_into_dense_16bit(with_bnb, make_tiny_model, tmp_path):
    from sloth_core import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        str(make_tiny_model("llama")), load_in_4bit=True, max_seq_length=None
    )
    model = FastLanguageModel.get_peft_model(
        model, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        use_gradient_checkpointing=False,
    )  # fmt: skip
    out = sloth_core.export(model, tokenizer, tmp_path / "m").path
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded.model.layers[0].mlp.up_proj).__name__ == "Linear"
    got, expected = logits(reloaded, PROMPT), logits(model, PROMPT)
    # The 4-bit model computes in bf16; the merged one holds the same weights in fp32.
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)


def test_exports_are_readable_by_other_users(plugin_manager, llama_lora, tmp_path):
    """tempfile makes private (0700/0600) folders and files: an export renamed from them must
    get the umask's permissions, or vLLM's or Ollama's service account cannot read it."""
    import os
    import stat

    model, tokenizer = llama_lora
    previous = os.umask(0o022)
    try:
        for format in ("merged_16bit", "lora"):
            out = sloth_core.export(model, tokenizer, tmp_path / format, format=format).path
            assert stat.S_IMODE(out.stat().st_mode) == 0o755, format
            files = [p for p in out.rglob("*") if p.is_file()]
            assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}, format
        os.umask(0o077)  # a user who wants privacy keeps it
        out = sloth_core.export(model, tokenizer, tmp_path / "private").path
        assert stat.S_IMODE(out.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}
    finally:
        os.umask(previous)
