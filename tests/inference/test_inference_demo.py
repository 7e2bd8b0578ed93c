"""The README's demo end to end: ``sloth train --demo``, then ``sloth chat`` driven by a
script answers in the shape of the fine-tuned task (the untrained base does not), and
``sloth generate --json`` gives the same greedy reply for the merged model and its f32 GGUF
export (when sloth-gguf and llama-cpp-python are installed)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from sloth_core.cli import main

pytestmark = pytest.mark.slow

#: Questions of the demo's data set, and the shape of the answers it teaches.
TASKS = {
    "What is the capital of Kenya?": r"The capital of .+",
    "What is 11 plus 5?": r"\d+ plus \d+ is \d+\.",
    "What is the opposite of 'up'?": r"The opposite of '.+",
    "Is 18 even or odd?": r"\d+ is (even|odd)\.",
}
SCRIPT = "".join(f"{question}\n/reset\n" for question in TASKS) + "/exit\nWhat is 2 plus 2?\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``sloth train --demo`` as the README runs it (on a CPU the torch ops serve it)."""
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLOTH_CACHE", str(root / "cache"))
        patch.setenv("SLOTH_KERNELS", "torch")
        assert main(["train", "--demo", "--output-dir", str(root / "sloth-demo"), "--quiet"]) == 0
    return root


def _env(demo) -> dict[str, str]:
    return {**os.environ, "SLOTH_CACHE": str(demo / "cache"), "SLOTH_KERNELS": "torch",
            "HF_HUB_OFFLINE": "1"}  # fmt: skip


def _chat(model, demo, *flags: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "sloth_core", "chat", str(model), *flags],
        input=SCRIPT, capture_output=True, text=True, env=_env(demo), timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("(conversation reset)") == len(TASKS)
    return done.stdout.splitlines()


def _transformers_replies(model_dir) -> list[str]:
    """What plain transformers answers greedily, with the saved chat template and stopping
    at the end of the turn: the known value of each chat reply (the demo's small model
    learns its answers' shape, not every fact, so the data's answers are not it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stops = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>"])]
    replies = []
    for question in TASKS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )  # fmt: skip
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=256,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, ids["input_ids"].shape[1] :]
        replies.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return replies


def test_chat_with_the_demo_model_answers_from_its_task(demo):
    replies = _chat(demo / "sloth-demo", demo)
    assert len(replies) == len(TASKS), replies  # and nothing after /exit
    for (question, shape), reply in zip(TASKS.items(), replies, strict=True):
        assert re.fullmatch(shape, reply), f"{question!r} -> {reply!r}"
    assert replies == _transformers_replies(demo / "sloth-demo" / "final")
    # The base model before fine-tuning answers none of them so.
    base = "\n".join(_chat(demo / "cache" / "demo-model", demo, "--max-new-tokens", "16"))
    assert not any(re.search(shape, base) for shape in TASKS.values()), base


def _gguf_ready() -> str | None:
    """Why the GGUF comparison cannot run here, or ``None``."""
    from sloth_core.plugins import get_plugin_manager

    if "gguf" not in get_plugin_manager().exporters:
        return "no installed plugin exports gguf (pip install sloth-gguf)"
    try:
        from sloth_core.sdk import llama_cpp
    except ImportError:
        return "sloth_core.sdk.llama_cpp is missing"
    return None if llama_cpp.available() else "llama-cpp-python is not installed"


def test_merged_and_gguf_exports_give_the_same_greedy_answer(demo, capsys, monkeypatch):
    reason = _gguf_ready()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    merged, gguf = demo / "sloth-demo" / "final", demo / "demo-f32.gguf"
    assert main(["export", str(merged), "--format", "gguf", "--quantization", "f32",
                 "--output", str(gguf)]) == 0  # fmt: skip
    import json

    for question in TASKS:
        records = []
        for model in (merged, gguf):
            capsys.readouterr()
            assert main(["generate", str(model), "--prompt", question, "--json"]) == 0
            records.append(json.loads(capsys.readouterr().out))
        hf, cpp = records
        assert (hf["backend"], cpp["backend"]) == ("transformers", "llama.cpp")
        assert cpp["prompt_ids"] == hf["prompt_ids"], question
        assert cpp["tokens"] == hf["tokens"] and cpp["completion"] == hf["completion"], question
        assert cpp["finish_reason"] == hf["finish_reason"] == "stop"

    # And the chat on the GGUF file answers as the merged model does.
    monkeypatch.setattr("sys.stdin", io.StringIO(SCRIPT))
    capsys.readouterr()
    assert main(["chat", str(gguf)]) == 0
    assert capsys.readouterr().out.splitlines() == _chat(merged, demo)
