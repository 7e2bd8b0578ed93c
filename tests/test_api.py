"""The public API end to end on a tiny llama: load, LoRA, train, export, reload."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

import sloth_core
from sloth_core import FastLanguageModel
from sloth_core.catalog import install_command
from sloth_core.errors import (
    ModelNotFoundError,
    OutputExistsError,
    PluginMissingError,
    UnsafeWeightsError,
)


def _batch(tokenizer, texts=("The quick brown fox jumps.", "Tea is made with hot water.")):
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    return {**batch, "labels": labels}


@pytest.fixture
def llama_dir(make_tiny_model):
    return make_tiny_model("llama", tie_word_embeddings=False)


def _train(model, batch, steps=5, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_trains_and_merged_export_reloads_in_plain_transformers(
    plugin_manager, llama_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    model, tokenizer = FastLanguageModel.from_pretrained(str(llama_dir), max_seq_length=128)
    assert model.dtype == torch.float32 and tokenizer.model_max_length == 128
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 7 * model.config.num_hidden_layers
    batch = _batch(tokenizer)
    losses = _train(model, batch)
    assert losses[-1] < losses[0], losses

    out = tmp_path / "merged"
    result = sloth_core.export(model, tokenizer, out, format="merged_16bit")
    assert result.path == out and (out / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()

    model.eval()
    with torch.no_grad():
        expected = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (got - expected).abs().max().item() <= 1e-5


def test_merged_export_shards_with_an_index(plugin_manager, llama_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(llama_dir))
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    out = sloth_core.export(model, tokenizer, tmp_path / "m", max_shard_size="100KB").path
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not any("lora" in k or "base_layer" in k for k in index["weight_map"])


def test_lora_export_reloads_with_peft(plugin_manager, llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = FastLanguageModel.from_pretrained(str(llama_dir))
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False)
    out = sloth_core.export(model, tokenizer, tmp_path / "adapter", format="lora").path
    assert (out / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    again = PeftModel.from_pretrained(base, out).eval()
    ids = _batch(tokenizer)["input_ids"]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)


def test_export_refuses_to_overwrite_without_force(plugin_manager, llama_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(llama_dir))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="force"):
        sloth_core.export(model, tokenizer, out)
    assert (out / "keep.txt").read_text() == "precious"
    sloth_core.export(model, tokenizer, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_export_leaves_nothing_behind(plugin_manager, llama_dir, tmp_path, monkeypatch):
    model, tokenizer = FastLanguageModel.from_pretrained(str(llama_dir))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", explode)
    exports = tmp_path / "exports"
    with pytest.raises(OSError, match="disk full"):
        sloth_core.export(model, tokenizer, exports / "out")
    assert list(exports.iterdir()) == []


def test_options_without_a_plugin_name_the_plugin_to_install(plugin_manager, llama_dir, tmp_path):
    with pytest.raises(PluginMissingError, match=re.escape(install_command("sloth-bnb"))):
        FastLanguageModel.from_pretrained(str(llama_dir), load_in_4bit=True)
    with pytest.raises(PluginMissingError, match=re.escape(install_command("sloth-bnb"))):
        FastLanguageModel.from_pretrained(str(llama_dir), load_in_8bit=True)
    model, tokenizer = FastLanguageModel.from_pretrained(str(llama_dir))
    with pytest.raises(PluginMissingError, match=re.escape(install_command("sloth-gguf"))):
        sloth_core.export(model, tokenizer, tmp_path / "x.gguf", format="gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_bad_model_paths_fail_clearly(plugin_manager, llama_dir, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        FastLanguageModel.from_pretrained(str(tmp_path))
    for weights in llama_dir.glob("*.safetensors"):
        state = __import__("safetensors.torch").torch.load_file(weights)
        torch.save(state, llama_dir / "pytorch_model.bin")
        weights.unlink()
    with pytest.raises(UnsafeWeightsError, match="allow_pickle=True"):
        FastLanguageModel.from_pretrained(str(llama_dir))
    model, _ = FastLanguageModel.from_pretrained(str(llama_dir), allow_pickle=True)
    assert model.config.model_type == "llama"


def test_conflicting_options_are_refused(plugin_manager, llama_dir):
    with pytest.raises(ValueError, match="exclude each other"):
        FastLanguageModel.from_pretrained(str(llama_dir), load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="cannot be quantized"):
        FastLanguageModel.from_pretrained(str(llama_dir), full_finetuning=True, load_in_4bit=True)
    model, _ = FastLanguageModel.from_pretrained(str(llama_dir), full_finetuning=True)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="full_finetuning"):
        FastLanguageModel.get_peft_model(model)


def test_lora_dropout_warns_that_it_leaves_the_fused_path(plugin_manager, llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(llama_dir))
    with pytest.warns(UserWarning, match=r"lora_dropout=0.05: .*lora_dropout=0 is sloth's fast"):
        FastLanguageModel.get_peft_model(model, r=4, lora_dropout=0.05)
    model, _ = FastLanguageModel.from_pretrained(str(llama_dir))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lora_dropout")
        FastLanguageModel.get_peft_model(model, r=4)  # no dropout: no warning
