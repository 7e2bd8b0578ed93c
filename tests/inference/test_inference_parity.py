"""Patched layers decode like the unpatched model: the same greedy continuation, with the
KV cache (prompts longer than the sliding windows), with LoRA, and batched with left padding.
Also the stop ids."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sloth_core import FastLanguageModel
from sloth_core.inference import SamplingOptions, generate, stop_token_ids
from sloth_core.plugins import get_plugin_manager
from sloth_core.testing.models import tiny_model
from sloth_core.testing.parity import attach_lora

# Longer than the tiny configs' 16-token sliding windows, so the cache crosses them.
STORY = "Tell me a long story about the sea, the ships that sail on it and the people aboard."
GREEDY = SamplingOptions(max_new_tokens=24)
# Gemma 2's attention softcap needs eager attention in the unpatched model.
LOAD = {"gemma2": {"attn_implementation": "eager"}}


def _prompt(tokenizer, text=STORY):
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def _no_eos(*models):
    """Decode the whole ``max_new_tokens`` (tiny random models hit their EOS early)."""
    for model in models:
        model.config.eos_token_id = model.generation_config.eos_token_id = None


def _patched(arch: str) -> int:
    return arch in get_plugin_manager().architectures


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_patched_model_decodes_like_the_unpatched_one(tmp_path, arch):
    if not _patched(arch):
        pytest.skip(f"no installed plugin patches {arch}")
    path = tiny_model(arch, tmp_path / arch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, **LOAD.get(arch, {})).eval()
    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=None,
                                                 **LOAD.get(arch, {}))  # fmt: skip
    assert sum(report.total for report in model.sloth_patches) > 0
    FastLanguageModel.for_inference(model, tokenizer)
    ids = _prompt(tokenizer)
    assert len(ids) > 16
    _no_eos(reference, model)
    expected = generate(reference, tokenizer, ids, GREEDY, stop_ids=[])
    got = generate(model, tokenizer, ids, GREEDY, stop_ids=[])
    assert got.ids == expected.ids and len(got.ids) == GREEDY.max_new_tokens


def test_patched_lora_model_decodes_like_the_unpatched_one_batched(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    reference = attach_lora(AutoModelForCausalLM.from_pretrained(llama_dir), r=4, seed=0)
    model, _ = FastLanguageModel.from_pretrained(str(llama_dir), max_seq_length=None)
    model = attach_lora(model, r=4, seed=0)  # the same adapter weights, name by name
    get_plugin_manager().patch_layers(model=model)
    FastLanguageModel.for_inference(model, tokenizer)
    reference.eval()
    _no_eos(reference, model)
    ids = _prompt(tokenizer)
    expected = generate(reference, tokenizer, ids, GREEDY, stop_ids=[])
    assert generate(model, tokenizer, ids, GREEDY, stop_ids=[]).ids == expected.ids
    assert len(expected.ids) == GREEDY.max_new_tokens

    prompts = [STORY, "hello", "What is 11 plus 5?"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left" and (batch["attention_mask"] == 0).any()
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        want = reference.generate(**batch, **kwargs)
        got = model.generate(**batch, **kwargs)
    assert torch.equal(got, want)


def test_stop_ids_gather_every_eos_and_the_templates_end_of_turn(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    eos, im_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer, model) == sorted({eos, im_end})
    model.generation_config.eos_token_id = [eos, 7]
    model.config.eos_token_id = 9
    assert stop_token_ids(tokenizer, model) == sorted({eos, im_end, 7, 9})
    # A template that does not use <|im_end|> does not stop on it.
    assert stop_token_ids(tokenizer, chat_template="{{ messages[0]['content'] }}") == [eos]
    # Llama 3's and Gemma's markers, when the vocabulary has them.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<end_of_turn>"]})
    eot, eot_gemma = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<end_of_turn>"])
    template = "{{ '<|eot_id|>' }}{{ '<end_of_turn>' }}"
    assert stop_token_ids(tokenizer, chat_template=template) == sorted({eos, eot, eot_gemma})


def test_generation_stops_at_the_end_of_turn_and_streams(llama_dir, capsys):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    _no_eos(model)
    ids = _prompt(tokenizer)
    free = generate(model, tokenizer, ids, GREEDY, stop_ids=[])
    stop = free.ids[5]  # pretend the sixth token ends the turn
    done = generate(model, tokenizer, ids, GREEDY, stop_ids=[stop], stream=None)
    assert done.ids == free.ids[: free.ids.index(stop)]
    assert done.finish_reason == "stop" and done.stop_id == stop
    assert free.finish_reason == "length"
    import io

    out = io.StringIO()
    streamed = generate(model, tokenizer, ids, GREEDY, stop_ids=[stop], stream=out)
    assert out.getvalue() == streamed.text + "\n"
