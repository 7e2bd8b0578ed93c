"""GGUF files in ``sloth generate`` / ``sloth chat``: the metadata read on the Python side
(chat template, stop ids, decoding) matches the Hugging Face tokenizer, and llama.cpp
answers a tiny model's f32 export exactly as transformers answers the model."""

from __future__ import annotations

import io

import pytest

from sloth_core.inference import stop_token_ids

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


def _metadata_only_gguf(path, tokenizer, *, template=True):
    """A GGUF file with the tokenizer's metadata and no tensors, as an exporter writes it."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_tokenizer_model("gpt2")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    writer.add_token_list(tokens)
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if template:
        writer.add_chat_template(tokenizer.chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_metadata_gives_the_tokenizers_template_stop_ids_and_text(tmp_path, tokenizer):
    from sloth_core.inference.gguf_file import read_gguf
    from sloth_core.inference.prompt import choose_format

    info = read_gguf(_metadata_only_gguf(tmp_path / "m.gguf", tokenizer))
    assert info.context_length == 256 and info.architecture == "llama"
    assert info.chat_template == tokenizer.chat_template
    assert info.stop_ids(info.chat_template) == stop_token_ids(tokenizer)
    text = "Héllo, wörld! 12 + 30 = 42\n\tdone ✓"
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    assert info.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True) == text
    # Rendering with the GGUF's specials gives the prompt the tokenizer renders.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    rendered = choose_format(info.chat_template, origin="gguf",
                             special_tokens=info.special_tokens()).render(messages)  # fmt: skip
    assert rendered == tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=False)  # fmt: skip


def _ready() -> str | None:
    from sloth_core.plugins import get_plugin_manager

    if "gguf" not in get_plugin_manager().exporters:
        return "no installed plugin exports gguf (pip install sloth-gguf)"
    try:
        from sloth_core.sdk import llama_cpp
    except ImportError:
        return "sloth_core.sdk.llama_cpp is missing"
    return None if llama_cpp.available() else "llama-cpp-python is not installed"


@pytest.fixture(scope="module")
def gguf_file(llama_dir, tmp_path_factory):
    reason = _ready()
    if reason:
        pytest.skip(reason)
    from sloth_core import FastLanguageModel
    from sloth_core.api import export

    model, tokenizer = FastLanguageModel.from_pretrained(str(llama_dir), max_seq_length=None)
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    export(model, tokenizer, path, format="gguf", quantization="f32")
    return path


def test_llama_cpp_answers_like_transformers(llama_dir, gguf_file, generate_json):
    for flags in ((), ("--system", "Be brief.", "--max-new-tokens", "12")):
        hf = generate_json(llama_dir, QUESTION, *flags)
        cpp = generate_json(gguf_file, QUESTION, *flags)
        assert cpp["backend"] == "llama.cpp" and cpp["chat_template"] == "gguf"
        assert cpp["prompt_ids"] == hf["prompt_ids"]
        assert cpp["tokens"] == hf["tokens"] and cpp["completion"] == hf["completion"]
        assert cpp["finish_reason"] == hf["finish_reason"]


def test_gguf_chat_and_its_limits(gguf_file, sloth, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/reset\n{QUESTION}\n/exit\n"))
    status, out, err = sloth("chat", gguf_file, "--max-new-tokens", "6")
    assert status == 0 and "through llama.cpp" in err
    first, second = out.splitlines()
    assert first == second
    status, _, err = sloth("generate", gguf_file, "--prompt", "hi", "--temperature", "0.7")
    assert status == 1 and "greedy only" in err
    status, _, err = sloth("generate", gguf_file, "--prompt", "word " * 300)
    assert status == 1 and "context is 256 tokens" in err
