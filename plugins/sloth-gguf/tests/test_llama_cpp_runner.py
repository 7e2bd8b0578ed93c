"""sloth_core.sdk.llama_cpp: llama.cpp in a child process (generation, errors, absence).

Here because these tests need a GGUF file, which sloth-gguf writes.
"""

from __future__ import annotations

import pytest
import torch
from gguf_helpers import requires_llama_cpp

from sloth_core.sdk import llama_cpp


@requires_llama_cpp
def test_greedy_generation_matches_transformers(models, exported, tokenizer):
    model = models("qwen3")
    prompt = tokenizer("The kettle had been whistling")["input_ids"]
    new = llama_cpp.run_generate(exported("qwen3", "f32"), prompt, max_new_tokens=12, stop_ids=[])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert new == out[0, len(prompt) :].tolist()
    assert len(new) == 12


@requires_llama_cpp
def test_generation_stops_after_a_stop_id(exported, tokenizer):
    path = exported("qwen3", "f32")
    prompt = tokenizer("The kettle")["input_ids"]
    free = llama_cpp.run_generate(path, prompt, max_new_tokens=6)
    stopped = llama_cpp.run_generate(path, prompt, max_new_tokens=6, stop_ids=[free[2]])
    assert stopped == free[: free.index(free[2]) + 1]


@requires_llama_cpp
def test_llama_cpp_failures_carry_its_stderr(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(llama_cpp.LlamaCppError, match="could not load") as info:
        llama_cpp.run_logits(bad, [[1, 2, 3]])
    assert "--- llama.cpp stderr ---" in str(info.value) and info.value.stderr
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        llama_cpp.run_tokenize(tmp_path / "missing.gguf", ["x"])


@requires_llama_cpp
def test_unknown_quantize_type_is_reported(exported, tmp_path):
    with pytest.raises(llama_cpp.LlamaCppError, match="no file type 'q9_k'"):
        llama_cpp.quantize(exported("llama", "f32"), tmp_path / "q.gguf", "q9_k")


@requires_llama_cpp
def test_a_hung_child_times_out(exported):
    with pytest.raises(llama_cpp.LlamaCppError, match="timed out after 0.01s"):
        llama_cpp.run_logits(exported("llama", "f32"), [[0, 5]], timeout=0.01)


def test_missing_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    with pytest.raises(llama_cpp.LlamaCppMissingError, match="pip install llama-cpp-python"):
        llama_cpp.run_tokenize(tmp_path / "x.gguf", ["x"])


def test_empty_prompts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one token"):
        llama_cpp.run_logits(tmp_path / "x.gguf", [[1], []])
    assert llama_cpp.run_logits(tmp_path / "x.gguf", []) == []
