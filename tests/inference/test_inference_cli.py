"""``sloth generate`` and ``sloth chat`` on tiny models: JSON output, streaming, scripted
chat with ``/reset`` and ``/exit``, adapters and train outputs, and bad input."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

from sloth_core import FastLanguageModel
from sloth_core.api import export
from sloth_core.inference import SamplingOptions, generate, open_engine, resolve_source
from sloth_core.inference.engines import TransformersEngine

QUESTION = "What is the capital of France?"


def _expected(model_dir, prompt=QUESTION, system=None):
    """The greedy reply as the library gives it, to compare the CLI with."""
    engine = open_engine(model_dir, device="cpu")  # as the CLI tests run it (conftest)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    ids, completion = engine.reply(messages, SamplingOptions(max_new_tokens=256))
    return ids, completion


def test_generate_json_on_a_model_dir(llama_dir, generate_json):
    record = generate_json(llama_dir, QUESTION, "--system", "Be brief.")
    ids, completion = _expected(llama_dir, system="Be brief.")
    assert record["prompt"] == QUESTION and record["system"] == "Be brief."
    assert record["completion"] == completion.text and record["tokens"] == completion.ids
    assert record["prompt_ids"] == ids and record["prompt_tokens"] == len(ids)
    assert record["completion_tokens"] == len(completion.ids)
    assert record["backend"] == "transformers" and record["chat_template"] == "tokenizer"
    assert record["finish_reason"] in ("stop", "length")
    assert record["options"]["temperature"] == 0.0
    # The prompt is the chat template's, ending where the assistant's turn starts.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def test_generate_streams_the_reply_to_stdout(llama_dir, sloth):
    status, out, _ = sloth(
        "generate", llama_dir, "--prompt", QUESTION, "--max-new-tokens", "12", "--device", "cpu"
    )
    assert status == 0
    _, completion = _expected(llama_dir)
    assert out == _cut(completion.ids, 12, llama_dir) + "\n"


def _cut(ids, n, model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).decode(ids[:n], skip_special_tokens=True)


def test_generate_samples_reproducibly_with_a_seed(llama_dir, generate_json):
    flags = ("--temperature", "0.9", "--top-p", "0.95", "--top-k", "40",
             "--repetition-penalty", "1.2", "--seed", "3", "--max-new-tokens", "16")  # fmt: skip
    first = generate_json(llama_dir, QUESTION, *flags)
    assert first == generate_json(llama_dir, QUESTION, *flags)
    assert first["options"] == {"max_new_tokens": 16, "temperature": 0.9, "top_p": 0.95,
                                "top_k": 40, "repetition_penalty": 1.2, "seed": 3}  # fmt: skip


def test_chat_driven_by_a_script_keeps_history_until_reset(llama_dir, sloth, monkeypatch):
    seen = []
    reply = TransformersEngine.reply

    def spy(self, messages, options, *, stream=None):
        result = reply(self, messages, options, stream=stream)
        seen.append(([m["role"] for m in messages], result[1].text))
        return result

    monkeypatch.setattr(TransformersEngine, "reply", spy)
    script = f"{QUESTION}\n\n{QUESTION}\n/reset\n{QUESTION}\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    status, out, err = sloth("chat", llama_dir, "--system", "Be brief.", "--max-new-tokens", "8")
    assert status == 0
    assert [roles for roles, _ in seen] == [
        ["system", "user"],
        ["system", "user", "assistant", "user"],
        ["system", "user"],
    ]
    replies = [text for _, text in seen]
    assert out == "".join(text + "\n" for text in replies)
    assert replies[0] == replies[2]  # after /reset the model sees the first question afresh
    assert "(conversation reset)" in err and "chatting with model" in err


def test_chat_ends_at_end_of_input_and_survives_an_overlong_message(llama_dir, sloth, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 400 + "\n/help\n/bogus\nhello\n"))
    status, out, err = sloth("chat", llama_dir, "--max-new-tokens", "4")
    assert status == 0
    assert "this message does not fit" in err and "context is 256 tokens" in err
    assert "/reset" in err and "unknown command /bogus" in err
    assert out.count("\n") == 1  # the one reply, to "hello"


def _lora_adapter(llama_dir, path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(llama_dir), max_seq_length=None)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a visible adapter: B = 0 would change nothing
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    export(model, tokenizer, path, format="lora")
    FastLanguageModel.for_inference(model, tokenizer)
    return model, tokenizer


def test_adapter_dir_and_sloth_train_outputs_load_base_and_adapter(
    llama_dir, tmp_path, generate_json
):
    adapter = tmp_path / "adapter"
    model, tokenizer = _lora_adapter(llama_dir, adapter)
    assert resolve_source(adapter).kind == "adapter"
    messages = [{"role": "user", "content": QUESTION}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    from sloth_core.inference import stop_token_ids

    want = generate(model, tokenizer, ids, SamplingOptions(max_new_tokens=20),
                    stop_ids=stop_token_ids(tokenizer, model))  # fmt: skip
    base = generate_json(llama_dir, QUESTION, "--max-new-tokens", "20")
    record = generate_json(adapter, QUESTION, "--max-new-tokens", "20")
    assert record["tokens"] == want.ids and record["tokens"] != base["tokens"]

    # A sloth train output without final/: the newest checkpoint's adapter (no tokenizer
    # in it: the base model's), and the run's chat template from train_config.json.
    run = tmp_path / "run"
    for step in (2, 4):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    shutil.copytree(adapter, run / "checkpoint-4" / "adapter",
                    ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))  # fmt: skip
    (run / "train_config.json").write_text(json.dumps({"chat_template": ""}))
    source = resolve_source(run)
    assert source.kind == "adapter" and source.path == run / "checkpoint-4" / "adapter"
    assert source.tokenizer == str(llama_dir)
    assert generate_json(run, QUESTION, "--max-new-tokens", "20")["tokens"] == want.ids
    assert generate_json(run / "checkpoint-4", QUESTION, "--max-new-tokens", "20")["tokens"] == (
        want.ids
    )
    (run / "train_config.json").write_text(json.dumps({"chat_template": "alpaca"}))
    record = generate_json(run, QUESTION, "--max-new-tokens", "4")
    assert record["chat_template"] == "train_config"
    assert "### Response:" in tokenizer.decode(record["prompt_ids"])
    # final/ wins over the checkpoints.
    shutil.copytree(llama_dir, run / "final")
    assert resolve_source(run).path == run / "final"


# -- bad input --------------------------------------------------------------------------


def test_a_directory_without_a_model_is_refused(tmp_path, sloth):
    status, out, err = sloth("generate", tmp_path, "--prompt", "hi")
    assert status == 1 and out == ""
    assert "holds no model: expected config.json" in err and "sloth train output" in err
    status, _, err = sloth("chat", tmp_path / "missing")
    assert status == 1 and "no such file or directory" in err
    (tmp_path / "notes.txt").write_text("hi")
    status, _, err = sloth("generate", tmp_path / "notes.txt", "--prompt", "hi")
    assert status == 1 and "not a .gguf file" in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    status, _, err = sloth("generate", tmp_path, "--prompt", "hi")
    assert status == 1 and "no model weights" in err


def test_a_prompt_longer_than_the_context_is_refused(llama_dir, sloth):
    status, out, err = sloth("generate", llama_dir, "--prompt", "word " * 300)
    assert status == 1 and out == ""
    assert "the model's context is 256 tokens (max_position_embeddings)" in err


def test_max_new_tokens_is_cut_to_the_context(llama_dir, generate_json):
    record = generate_json(llama_dir, "word " * 100, "--max-new-tokens", "5000")
    assert record["prompt_tokens"] + record["completion_tokens"] <= 256


def test_bad_sampling_options_are_refused(llama_dir, sloth):
    status, _, err = sloth("generate", llama_dir, "--prompt", "hi", "--top-p", "0")
    assert status == 1 and "top_p must be in (0, 1]" in err
    status, _, err = sloth("generate", llama_dir, "--prompt", "hi", "--max-new-tokens", "0")
    assert status == 1 and "max_new_tokens must be at least 1" in err


def test_a_tokenizer_without_chat_template_falls_back_to_plain_text(llama_dir, tmp_path, sloth):
    from transformers import AutoTokenizer

    plain = tmp_path / "plain"
    shutil.copytree(llama_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(plain).chat_template is None

    status, out, err = sloth("generate", plain, "--prompt", QUESTION, "--json")
    assert status == 0 and "has no chat template" in err and "plain text" in err
    record = json.loads(out)
    assert record["chat_template"] == "none"
    assert record["prompt_ids"] == AutoTokenizer.from_pretrained(plain)(QUESTION)["input_ids"]

    status, out, err = sloth("generate", plain, "--prompt", QUESTION, "--json",
                             "--chat-template", "chatml")  # fmt: skip
    assert status == 0 and "no chat template" not in err
    assert json.loads(out)["chat_template"] == "option"
    status, _, err = sloth("generate", plain, "--prompt", "hi", "--chat-template", "klingon")
    assert status == 1 and "unknown chat template 'klingon'" in err


def test_a_gguf_file_without_llama_cpp_is_refused_clearly(tmp_path, sloth, monkeypatch):
    try:
        from sloth_core.sdk import llama_cpp
    except ImportError:
        pass
    else:  # as on a machine without llama-cpp-python
        monkeypatch.setattr(llama_cpp, "available", lambda: False)
    from sloth_core.catalog import install_command

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    status, _, err = sloth("generate", gguf, "--prompt", "hi")
    assert status == 1 and "pip install llama-cpp-python" in err
    assert install_command("sloth-gguf", "llama-cpp") in err and "GGML_NATIVE=OFF" in err
    status, _, err = sloth("chat", tmp_path)  # the one .gguf in a directory
    assert status == 1 and "pip install llama-cpp-python" in err
    assert install_command("sloth-gguf", "llama-cpp") in err
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    status, _, err = sloth("generate", tmp_path, "--prompt", "hi")
    assert status == 1 and "several GGUF files (model.gguf, other.gguf): name one" in err


@pytest.mark.parametrize("argv", [["generate", "x"], ["chat"]])
def test_missing_arguments_are_usage_errors(argv):
    from sloth_core.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
