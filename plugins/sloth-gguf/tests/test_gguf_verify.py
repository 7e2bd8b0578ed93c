"""sloth-gguf's verifier (``sloth export --format gguf --verify``): llama.cpp's logits and
token ids against the model in memory, judged by each GGUF type's declared tolerance (its
first, pure-Python level: test_gguf_reload.py)."""

from __future__ import annotations

import types

import numpy as np
import pytest
from peft import LoraConfig, get_peft_model

import sloth_core
from sloth_core.testing.models import init_tiny_model, tiny_config
from sloth_core.testing.tokenizer import build_tokenizer
from sloth_core.verify import _all_logits, verify_export


@pytest.fixture(scope="module")
def llama_lora():
    tokenizer = build_tokenizer()
    base = init_tiny_model(tiny_config("llama", tokenizer=tokenizer))
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, config).eval(), tokenizer


def _verify(path, model, tokenizer, manager, **options):
    return verify_export(path, model, tokenizer, format="gguf", manager=manager, **options)


# -- through a stand-in for sloth_core.sdk.llama_cpp ---------------------------------------
def _fake_runner(model, tokenizer, *, shift=0.0, shuffle=False, tokens_off=False, available=True):
    """Answers as llama.cpp would for a GGUF holding exactly ``model``; ``shift`` moves every
    logit by that much (an error that keeps the ranking), ``shuffle`` reverses the ranking."""

    def run_logits(path, token_id_lists, *, n_ctx=512):
        assert str(path).endswith(".gguf") and n_ctx >= max(map(len, token_id_lists))
        out = _all_logits(model, [list(ids) for ids in token_id_lists])
        out = [o + np.float32(shift) for o in out]
        return [o[:, ::-1].copy() if shuffle else o for o in out]

    def run_tokenize(path, texts, *, add_special=True, parse_special=True):
        ids = [list(tokenizer(t).input_ids) for t in texts]
        return [i[1:] for i in ids] if tokens_off else ids

    return types.SimpleNamespace(
        available=lambda: available, run_logits=run_logits, run_tokenize=run_tokenize
    )


@pytest.fixture(scope="module")
def gguf_file(llama_lora, tmp_path_factory, manager):
    """The model's f32 GGUF: the pure-Python level passes on it, so what these tests
    judge is the llama.cpp level (the stand-in runner)."""
    model, tokenizer = llama_lora
    path = tmp_path_factory.mktemp("verify") / "model.gguf"
    return sloth_core.export(
        model, tokenizer, path, format="gguf", quantization="f32", manager=manager
    ).path


def test_gguf_verify_passes_for_matching_logits(llama_lora, gguf_file, manager):
    model, tokenizer = llama_lora
    runner = _fake_runner(model, tokenizer)
    report = _verify(gguf_file, model, tokenizer, manager, quantization="f16", runner=runner)
    assert report.passed, report.problems
    assert report.kind == "gguf" and report.top1 == 1.0 and report.texts_matching == report.texts


def test_low_bit_gguf_is_judged_by_top1(llama_lora, gguf_file, manager):
    model, tokenizer = llama_lora
    noisy = _fake_runner(model, tokenizer, shift=0.5)
    report = _verify(gguf_file, model, tokenizer, manager, quantization="q4_k_m", runner=noisy)
    assert report.passed and report.max_rel > 0.05  # reported, not judged
    report = _verify(gguf_file, model, tokenizer, manager, quantization="q8_0", runner=noisy)
    assert not report.passed  # the same error is too much for q8_0
    shuffled = _fake_runner(model, tokenizer, shuffle=True)
    report = _verify(
        gguf_file.parent, model, tokenizer, manager, quantization="q4_k_m", runner=shuffled
    )
    assert any("top-1 agreement" in p for p in report.problems)


def test_gguf_tokenizer_mismatch_fails_and_missing_llama_cpp_is_a_note(
    llama_lora, gguf_file, manager
):
    model, tokenizer = llama_lora
    off = _fake_runner(model, tokenizer, tokens_off=True)
    report = _verify(gguf_file, model, tokenizer, manager, quantization="f32", runner=off)
    assert any("llama.cpp: the exported tokenizer encodes" in p for p in report.problems)
    assert [str(level).split(" (")[0] for level in report.levels] == [
        "gguf-py reload: passed",
        "llama.cpp: failed",
    ]
    absent = _fake_runner(model, tokenizer, available=False)
    report = _verify(gguf_file, model, tokenizer, manager, runner=absent)
    assert report.passed and report.weight_type == "f32" and report.top1 == 1.0
    assert report.levels[1].status == "not installed"
    assert "[llama-cpp]" in report.levels[1].detail  # the extra, wherever typed
    # a short spelling of a type is the type: q8 is q8_0, judged by q8_0's tolerance
    report = _verify(gguf_file, model, tokenizer, manager, quantization="q8", runner=off)
    assert report.weight_type == "q8_0" and report.tolerance.max_rel == 3e-2


def test_gguf_verify_with_llama_cpp(llama_lora, tmp_path, monkeypatch, manager):
    """The real thing, where llama.cpp is installed."""
    from sloth_core.sdk import llama_cpp

    if not llama_cpp.available():
        pytest.skip("needs llama-cpp-python")
    monkeypatch.setenv("SLOTH_LLAMA_CPP_THREADS", "1")
    model, tokenizer = llama_lora
    out = sloth_core.export(
        model, tokenizer, tmp_path / "m.gguf", format="gguf", quantization="f32", manager=manager
    )
    report = _verify(out.path, model, tokenizer, manager)
    assert report.passed, report.problems
    assert report.weight_type == "f32" and report.top1 == 1.0
    assert [level.status for level in report.levels] == ["passed", "passed"]
