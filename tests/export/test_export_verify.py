"""sloth_core.verify: reload, compare logits and token ids, judge by tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from export_helpers import lora_model
from safetensors.torch import load_file, save_file

import sloth_core
from sloth_core import verify
from sloth_core.formats import FLOAT_TYPES, UNKNOWN_TOLERANCE, ExportFormat, WeightType
from sloth_core.verify import VerifyRequest, verify_export


def test_merged_16bit_verifies(plugin_manager, llama_lora, tmp_path, capsys):
    model, tokenizer = llama_lora
    out = sloth_core.export(model, tokenizer, tmp_path / "m").path
    report = verify_export(out, model, tokenizer, format="merged_16bit")
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
    report = verify_export(out, model, tokenizer, format="merged_16bit")
    assert not report.passed
    assert any("max relative logit error" in p for p in report.problems)


def test_a_changed_tokenizer_fails(plugin_manager, llama_lora, tmp_path):
    model, tokenizer = llama_lora
    out = sloth_core.export(model, tokenizer, tmp_path / "m").path
    (out / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    report = verify_export(out, model, tokenizer, format="vllm")
    assert any("chat template differs" in p for p in report.problems)


def test_lora_export_verifies_tensor_by_tensor(plugin_manager, llama_lora, tmp_path):
    model, tokenizer = llama_lora
    out = sloth_core.export(model, tokenizer, tmp_path / "a", format="lora").path
    report = verify_export(out, model, tokenizer, format="lora")
    assert report.passed and report.kind == "lora" and report.max_abs == 0


#: A format as a plugin would declare it: two weight types, one of them by alias.
TOY = ExportFormat(
    "toy",
    quantizations=(
        WeightType("q4_k_m", 0.61, verify.Tolerance(None, 0.9), ("q4_k",)),
        WeightType("q8_0", 1.07, verify.Tolerance(3e-2, 0.95), ("q8",)),
    ),
)


def _tolerance(format, weight_type):
    report = VerifyRequest(format, Path("x"), None, None).report("toy", weight_type)
    return report.weight_type, report.tolerance


def test_tolerances_come_from_the_format_and_fall_back_to_top1():
    f32 = next(t for t in FLOAT_TYPES if t.name == "f32")
    assert _tolerance(TOY, "F32") == ("f32", f32.tolerance)  # float types: every format's
    assert _tolerance(TOY, "torch.bfloat16")[0] == "bf16"
    assert _tolerance(TOY, "Q4_K") == ("q4_k_m", TOY.quantizations[0].tolerance)
    assert _tolerance(TOY, "q8")[1].max_rel == 3e-2
    assert _tolerance(TOY, "iq2_xxs") == ("iq2_xxs", UNKNOWN_TOLERANCE)
    assert f32.tolerance.max_rel == 1e-3


# -- top-1 at the confident positions ------------------------------------------------------
def _judged(quantization, reference, exported):
    name, tolerance = _tolerance(TOY, quantization)
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


def test_verify_refuses_a_path_without_an_export(tmp_path):
    model, tokenizer = lora_model("llama")
    for format in ("merged_16bit", "lora"):
        with pytest.raises(FileNotFoundError, match="nothing to verify"):
            verify_export(tmp_path, model, tokenizer, format=format)


def test_a_format_without_a_verifier_fails_verification(register_plugin, llama_lora, tmp_path):
    from sloth_core import hookimpl

    class Plugin:
        @hookimpl
        def register_exporters(self, register):
            register("plain", quantizations=())

    register_plugin(Plugin(), "plain-exporter")
    model, tokenizer = llama_lora
    report = verify_export(tmp_path, model, tokenizer, format="plain")
    assert not report.passed and "declares no verifier" in report.problems[0]
    with pytest.raises(sloth_core.errors.PluginMissingError, match="'nope'"):
        verify_export(tmp_path, model, tokenizer, format="nope")
