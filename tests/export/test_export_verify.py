"""sloth_core.export.verify: reload, compare logits and token ids, judge by tolerance."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from export_helpers import lora_model
from safetensors.torch import load_file, save_file

import sloth_core
from sloth_core.export import verify
from sloth_core.export.verify import TOLERANCES, tolerance_for, verify_export


def test_merged_16bit_verifies(plugin_manager, llama_lora, tmp_path, capsys):
    model, tokenizer = llama_lora
    out = sloth_core.export(model, tokenizer, tmp_path / "m").path
    report = verify_export(out, model, tokenizer)
    assert report.passed, report.problems
    assert report.kind == "safetensors" and report.weight_type == "f32"
    assert report.top1 == 1.0 and report.max_rel < 1e-5 and report.positions > 50
    assert report.texts == report.texts_matching == len(verify.SAMPLE_TEXTS) + 1  # + chat
    verify.print_report(report)
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and "verified" in printed


def test_a_corrupted_export_fails(plugin_manager, llama_lora, tmp_path):
    model, tokenizer = llama_lora
    out = sloth_core.export(model, tokenizer, tmp_path / "m").path
    weights = load_file(str(out / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"] *= 1.5
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    report = verify_export(out, model, tokenizer)
    assert not report.passed
    assert any("max relative logit error" in p for p in report.problems)


def test_a_changed_tokenizer_fails(plugin_manager, llama_lora, tmp_path):
    model, tokenizer = llama_lora
    out = sloth_core.export(model, tokenizer, tmp_path / "m").path
    (out / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    report = verify_export(out, model, tokenizer)
    assert any("chat template differs" in p for p in report.problems)


def test_lora_export_verifies_tensor_by_tensor(plugin_manager, llama_lora, tmp_path):
    model, tokenizer = llama_lora
    out = sloth_core.export(model, tokenizer, tmp_path / "a", format="lora").path
    report = verify_export(out, model, tokenizer)
    assert report.passed and report.kind == "lora" and report.max_abs == 0


def test_tolerances_name_every_type_and_fall_back_to_top1():
    assert tolerance_for("F16") == ("f16", TOLERANCES["f16"])
    assert tolerance_for("bfloat16")[0] == "bf16" and tolerance_for("q4_k")[0] == "q4_k_m"
    assert TOLERANCES["f32"].max_rel == 1e-3 and TOLERANCES["q8_0"].max_rel == 3e-2
    assert TOLERANCES["q4_k_m"].max_rel is None and TOLERANCES["q4_k_m"].min_top1 == 0.9
    assert tolerance_for("iq2_xxs")[1] == verify.UNKNOWN_TOLERANCE


# -- top-1 at the confident positions ------------------------------------------------------
def _judged(quantization, reference, exported):
    name, tolerance = tolerance_for(quantization)
    report = verify.VerifyReport(Path("m.gguf"), "gguf", name, tolerance)
    verify._compare(report, [reference], [exported])
    return report


def _positions(sure: int, unsure: int, vocab: int = 32) -> np.ndarray:
    """``sure`` rows whose token ``i`` has a probability near 1, then ``unsure`` rows where
    tokens 0 and 1 are within 0.01 of each other (probability 0.08 each)."""
    rows = np.zeros((sure + unsure, vocab), dtype=np.float32)
    rows[np.arange(sure), np.arange(sure) % vocab] = 10.0
    rows[sure:, 0], rows[sure:, 1] = 1.0, 0.99
    return rows


def test_top1_is_judged_where_the_model_is_confident():
    reference = _positions(sure=12, unsure=20)
    flipped = reference.copy()
    flipped[12:, [0, 1]] = flipped[12:, [1, 0]]  # every coin toss lost
    report = _judged("q4_k_m", reference, flipped)
    assert report.passed, report.problems
    assert (report.confident, report.top1_confident) == (12, 1.0)
    assert report.top1 == 12 / 32 and 0 < report.kl_divergence < 1e-4
    flipped[0, 0], flipped[0, 5] = 0.0, 10.0  # two answers changed: 10/12 < 90%
    flipped[1, 1], flipped[1, 6] = 0.0, 10.0
    report = _judged("q4_k_m", reference, flipped)
    assert report.top1_confident == 10 / 12 and report.kl_divergence > 0.5
    assert report.problems == [
        "top-1 agreement 83.3% on the 12 confident positions < 90% required for q4_k_m"
    ]
    assert _judged("q4_k_m", reference, reference).kl_divergence == pytest.approx(0, abs=1e-12)


def test_with_few_confident_positions_every_position_counts():
    reference = _positions(sure=verify.MIN_CONFIDENT - 1, unsure=20)
    flipped = reference.copy()
    flipped[verify.MIN_CONFIDENT - 1 :, [0, 1]] = flipped[verify.MIN_CONFIDENT - 1 :, [1, 0]]
    report = _judged("q4_k_m", reference, flipped)
    assert report.top1_confident == 1.0 and not report.passed
    assert "on every position" in report.problems[0]
    assert any("confident (p >= 0.5) at only 9 of 29 positions" in n for n in report.notes)


# -- GGUF, through a stand-in for sloth_core.export.llama_cpp ---------------------------------
def _fake_runner(model, tokenizer, *, shift=0.0, shuffle=False, tokens_off=False, available=True):
    """Answers as llama.cpp would for a GGUF holding exactly ``model``; ``shift`` moves every
    logit by that much (an error that keeps the ranking), ``shuffle`` reverses the ranking."""

    def run_logits(path, token_id_lists, *, n_ctx=512):
        assert str(path).endswith(".gguf") and n_ctx >= max(map(len, token_id_lists))
        out = verify._all_logits(model, [list(ids) for ids in token_id_lists])
        out = [o + np.float32(shift) for o in out]
        return [o[:, ::-1].copy() if shuffle else o for o in out]

    def run_tokenize(path, texts, *, add_special=True, parse_special=True):
        ids = [list(tokenizer(t).input_ids) for t in texts]
        return [i[1:] for i in ids] if tokens_off else ids

    return types.SimpleNamespace(
        available=lambda: available, run_logits=run_logits, run_tokenize=run_tokenize
    )


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "model.Q4_K_M.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_gguf_verify_passes_for_matching_logits(llama_lora, gguf_file):
    model, tokenizer = llama_lora
    runner = _fake_runner(model, tokenizer)
    report = verify_export(gguf_file, model, tokenizer, quantization="f16", runner=runner)
    assert report.passed, report.problems
    assert report.kind == "gguf" and report.top1 == 1.0 and report.texts_matching == report.texts


def test_low_bit_gguf_is_judged_by_top1(llama_lora, gguf_file):
    model, tokenizer = llama_lora
    noisy = _fake_runner(model, tokenizer, shift=0.5)
    report = verify_export(gguf_file, model, tokenizer, quantization="q4_k_m", runner=noisy)
    assert report.passed and report.max_rel > 0.05  # reported, not judged
    report = verify_export(gguf_file, model, tokenizer, quantization="q8_0", runner=noisy)
    assert not report.passed  # the same error is too much for q8_0
    shuffled = _fake_runner(model, tokenizer, shuffle=True)
    report = verify_export(
        gguf_file.parent, model, tokenizer, quantization="q4_k_m", runner=shuffled
    )
    assert any("top-1 agreement" in p for p in report.problems)


def test_gguf_tokenizer_mismatch_and_missing_llama_cpp_fail(llama_lora, gguf_file):
    model, tokenizer = llama_lora
    off = _fake_runner(model, tokenizer, tokens_off=True)
    report = verify_export(gguf_file, model, tokenizer, quantization="f32", runner=off)
    assert any("exported tokenizer encodes" in p for p in report.problems)
    absent = _fake_runner(model, tokenizer, available=False)
    report = verify_export(gguf_file, model, tokenizer, runner=absent)
    assert not report.passed and "pip install llama-cpp-python" in report.problems[0]


def test_gguf_verify_with_llama_cpp(llama_lora, tmp_path, monkeypatch):
    """The real thing, where llama.cpp and a gguf exporter are installed."""
    from sloth_core.export import llama_cpp
    from sloth_core.plugins import SlothPluginManager, reset_plugin_manager

    manager = SlothPluginManager()
    if "gguf" not in manager.exporters or not llama_cpp.available():
        pytest.skip("needs a gguf exporter (sloth-gguf) and llama-cpp-python")
    monkeypatch.setenv("SLOTH_LLAMA_CPP_THREADS", "1")
    reset_plugin_manager(manager)
    try:
        model, tokenizer = llama_lora
        out = sloth_core.export(
            model, tokenizer, tmp_path / "m.gguf", format="gguf", quantization="f32"
        )
    finally:
        reset_plugin_manager(None)
    report = verify_export(out.path, model, tokenizer)
    assert report.passed, report.problems
    assert report.weight_type == "f32" and report.top1 == 1.0


def test_verify_refuses_a_path_without_an_export(tmp_path):
    model, tokenizer = lora_model("llama")
    with pytest.raises(FileNotFoundError, match="nothing to verify"):
        verify_export(tmp_path, model, tokenizer)
