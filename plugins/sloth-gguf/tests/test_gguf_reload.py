"""``--verify``'s pure-Python level (sloth_gguf.reload): the GGUF read back by the gguf
package and rebuilt in transformers, without llama.cpp; a corrupted file fails naming
what is wrong."""

from __future__ import annotations

import io

import gguf
import pytest
from gguf_helpers import (
    ARCHS,
    ROPE_SCALING,
    export,
    requires_llama_cpp,
    rounded_like,
    spm_tokenizer,
    tiny,
    tokenizer_texts,
    verify_reload,
)
from sloth_gguf import architectures
from sloth_gguf.reload import _fields, _file_tokenizer
from sloth_gguf.verify import NEEDS

from sloth_core.sdk import install_command
from sloth_core.verify import print_report


def _model(arch: str, models):
    # Mistral's tiny window (16) is one llama.cpp's llama graph does not have: keep it off.
    return tiny("mistral", sliding_window=256) if arch == "mistral" else models(arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_reload_passes_on_every_architecture(arch, models, tokenizer, tmp_path, manager):
    model = _model(arch, models)
    path = export(model, tokenizer, tmp_path / f"{arch}.gguf", "f32")
    report = verify_reload(path, model, tokenizer, manager)
    assert report.passed, report.problems
    assert report.max_rel < 1e-5 and report.top1 == 1.0
    assert report.texts and report.texts_matching == report.texts
    assert [level.name for level in report.levels] == ["gguf-py reload", "llama.cpp"]
    assert report.levels[0].status == "passed" and report.levels[1].status == "not installed"


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # q/k permuted; 1 + w norms, softcaps
@pytest.mark.parametrize("quantization", ["f16", "bf16", "q8_0", "q4_0"])
def test_reload_passes_on_every_type_gguf_writes(
    arch, quantization, models, tokenizer, tmp_path, manager
):
    # A model whose matrices already hold what the type stores: the file gives back that
    # model, whatever the type's own error would be on another one (but the output matrix,
    # q8_0 under q4_0: rounded twice).
    model = rounded_like(models(arch), quantization)
    path = export(model, tokenizer, tmp_path / "m.gguf", quantization)
    report = verify_reload(path, model, tokenizer, manager)
    assert report.passed, report.problems
    assert report.weight_type == quantization and report.max_rel < 1e-2


@requires_llama_cpp
@pytest.mark.parametrize("quantization", ["q4_k_m", "q6_k"])
def test_reload_reads_llama_cpp_k_quants(quantization, small_lms, tokenizer, tmp_path, manager):
    model = small_lms("llama")
    path = export(model, tokenizer, tmp_path / "m.gguf", quantization)
    report = verify_reload(path, model, tokenizer, manager)
    assert report.passed, report.problems
    stored = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert stored & {"Q4_K", "Q6_K"}  # dequantized by gguf's numpy code


def test_the_report_says_llama_cpp_did_not_run(models, tokenizer, tmp_path, manager):
    from rich.console import Console

    model = rounded_like(models("qwen2"), "q8_0")
    path = export(model, tokenizer, tmp_path / "m.gguf", "q8_0")
    report = verify_reload(path, model, tokenizer, manager)
    assert report.passed and not any("llama.cpp" in p for p in report.problems)
    assert install_command("sloth-gguf", "llama-cpp") in NEEDS
    assert report.levels[1].detail == NEEDS
    assert any("llama.cpp did not run" in note for note in report.notes)
    out = io.StringIO()
    print_report(report, Console(file=out, width=400))
    text = out.getvalue()
    assert "levels: gguf-py reload: passed (max rel" in text
    assert f"llama.cpp: not installed ({install_command('sloth-gguf', 'llama-cpp')}" in text
    assert "verified" in text


def _corrupt(monkeypatch, method: str, change):
    original = getattr(gguf.GGUFWriter, method)
    monkeypatch.setattr(
        gguf.GGUFWriter, method, lambda self, value, *a: original(self, change(value), *a)
    )


@pytest.mark.parametrize(
    ("arch", "method", "change", "named"),
    [
        ("llama", "add_rope_freq_base", lambda v: v * 2, "llama.rope.freq_base"),
        ("qwen3", "add_layer_norm_rms_eps", lambda v: v * 10, "attention.layer_norm_rms_epsilon"),
        ("llama", "add_bos_token_id", lambda v: v + 1, "tokenizer.ggml.bos_token_id"),
        ("gemma2", "add_final_logit_softcapping", lambda v: v * 2, "final_logit_softcapping"),
        ("phi3", "add_chat_template", lambda v: "{{ messages }}", "tokenizer.chat_template"),
    ],
)  # fmt: skip
def test_wrong_metadata_fails_naming_the_field(
    arch, method, change, named, models, tokenizer, tmp_path, monkeypatch, manager
):
    model = models(arch)
    _corrupt(monkeypatch, method, change)
    path = export(model, tokenizer, tmp_path / "bad.gguf", "f32")
    monkeypatch.undo()
    report = verify_reload(path, model, tokenizer, manager)
    assert not report.passed
    assert report.levels[0].status == "failed"
    assert any(named in p and "in the file" in p for p in report.problems), report.problems


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_q_and_k_written_unpermuted_fail_naming_the_tensor(
    arch, models, tokenizer, tmp_path, monkeypatch, manager
):
    model = _model(arch, models)
    monkeypatch.setattr(architectures, "_interleave_rope_rows", lambda weight, n_head: weight)
    path = export(model, tokenizer, tmp_path / "bad.gguf", "f32")
    monkeypatch.undo()
    report = verify_reload(path, model, tokenizer, manager)
    assert not report.passed
    for tensor in ("blk.0.attn_q.weight", "blk.1.attn_k.weight"):
        assert any(tensor in p and "relative error" in p for p in report.problems), tensor
    assert any("max relative logit error" in p for p in report.problems)


def test_a_file_that_is_no_gguf_fails(models, tokenizer, tmp_path, manager):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    report = verify_reload(path, models("llama"), tokenizer, manager, quantization="f32")
    assert not report.passed and "gguf package cannot read" in report.problems[0]


@pytest.mark.parametrize("scaling", ROPE_SCALING)
def test_reload_keeps_rope_scaling(scaling, tokenizer, tmp_path, monkeypatch, manager):
    model = tiny("llama", rope_parameters={**ROPE_SCALING[scaling], "rope_theta": 10000.0})
    path = export(model, tokenizer, tmp_path / "m.gguf", "f32")
    report = verify_reload(path, model, tokenizer, manager)
    assert report.passed, report.problems
    if scaling == "llama3":
        return  # its factors travel as the rope_freqs tensor, which llama.cpp alone reads
    _corrupt(monkeypatch, "add_rope_scaling_factor", lambda v: v * 2)
    path = export(model, tokenizer, tmp_path / "bad.gguf", "f32")
    monkeypatch.undo()
    report = verify_reload(path, model, tokenizer, manager)
    assert any("llama.rope.scaling.factor is" in p for p in report.problems), report.problems


def test_sloth_export_verify_without_llama_cpp_passes_and_says_so(
    make_tiny_model, tmp_path, capsys, monkeypatch
):
    from sloth_core.cli import main
    from sloth_core.sdk import llama_cpp

    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    argv = ["export", str(make_tiny_model("llama")), "--format", "gguf", "--quantization",
            "f32", "--output", str(tmp_path / "m.gguf"), "--verify"]  # fmt: skip
    code = main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 0, text
    assert "levels: gguf-py reload: passed (max rel" in text
    assert f"llama.cpp: not installed ({install_command('sloth-gguf', 'llama-cpp')}" in text
    assert "verified: the export matches" in text


@pytest.mark.parametrize("vocabulary", ["byte-level BPE", "SentencePiece BPE"])
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_the_files_vocabulary_tokenizes_as_llama_cpp_does(vocabulary, arch, tokenizer, tmp_path):
    """transformers' GGUF tokenizer, with llama.cpp's SentencePiece spaces: the same ids as
    the tokenizer for texts that start with spaces, digits, unicode and special tokens."""
    sentencepiece = vocabulary == "SentencePiece BPE"
    tokenizer = spm_tokenizer() if sentencepiece else tokenizer
    path = export(tiny(arch, tokenizer=tokenizer), tokenizer, tmp_path / "m.gguf", "f32")
    exported = _file_tokenizer(path, _fields(gguf.GGUFReader(path)))
    for text in tokenizer_texts(tokenizer, specials=not sentencepiece):
        assert exported(text).input_ids == tokenizer(text).input_ids, text
