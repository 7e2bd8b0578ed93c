"""The ``gguf`` export: hooks, options, LoRA merging, quantization, metadata and bad input."""

from __future__ import annotations

import errno

import gguf
import numpy as np
import pytest
from gguf_helpers import (
    export,
    relative_error,
    requires_llama_cpp,
    stored_model,
    tiny,
    torch_logits,
)
from sloth_gguf import plugin, writer
from sloth_gguf.quantization import QUANTIZATIONS

import sloth_core.io
from sloth_core.errors import OutputExistsError
from sloth_core.plugins import SlothPluginManager
from sloth_core.sdk import llama_cpp

ROPE_LLAMA3 = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}  # fmt: skip


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- hooks and options -------------------------------------------------------------------


def test_entry_point_lists_sloth_gguf():
    record = SlothPluginManager(entry_points=True).records["sloth-gguf"]
    assert (record.status, record.kind, record.exporters) == ("active", "exporter", ["gguf"])


def test_export_through_the_public_api(register_plugin, models, tokenizer, tmp_path):
    register_plugin(plugin, name=plugin.PLUGIN)
    import sloth_core.sdk.llama_cpp  # noqa: F401  (no export package shadows the function)

    result = sloth_core.export(models("llama"), tokenizer, tmp_path / "m.gguf", format="gguf")
    assert (result.format, result.path, result.files) == (
        "gguf",
        tmp_path / "m.gguf",
        [tmp_path / "m.gguf"],
    )
    fields = _fields(result.path)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0  # the default
    alias = sloth_core.export(models("llama"), tokenizer, tmp_path / "a.gguf", format="llama.cpp",
                              quantization="f16")  # fmt: skip
    assert _fields(alias.path)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16


def test_other_formats_are_left_to_other_plugins(models, tokenizer, tmp_path):
    assert plugin.export(model=models("llama"), tokenizer=tokenizer, format="lora",
                         path=tmp_path / "x", options={}) is None  # fmt: skip


def test_a_path_without_gguf_suffix_is_a_directory(models, tokenizer, tmp_path):
    result = writer.export_gguf(
        models("qwen2"), tokenizer, tmp_path / "out", {"quantization": "q4_0"}
    )
    assert result.path == tmp_path / "out" and result.path.is_dir()
    assert result.files == [tmp_path / "out" / "model.Q4_0.gguf"]
    assert result.files[0].is_file() and _leftovers(tmp_path) == []


def test_unknown_quantization_lists_the_types(models, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown GGUF quantization 'q4_k_xl'") as info:
        writer.export_gguf(
            models("llama"), tokenizer, tmp_path / "m.gguf", {"quantization": "q4_k_xl"}
        )
    assert all(name in str(info.value) for name in QUANTIZATIONS)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(models, tokenizer, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    with pytest.raises(OutputExistsError, match="force"):
        writer.export_gguf(models("llama"), tokenizer, out, {"quantization": "f16"})
    assert out.read_text() == "keep me"
    writer.export_gguf(models("llama"), tokenizer, out, {"quantization": "f16", "force": True})
    assert _fields(out)["general.architecture"] == "llama"
    assert _leftovers(tmp_path) == []


def test_not_enough_disk_space_writes_nothing(models, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(
        sloth_core.io.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})()
    )
    with pytest.raises(OSError, match="not enough free disk space") as info:
        writer.export_gguf(models("llama"), tokenizer, tmp_path / "m.gguf", {"quantization": "f32"})
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_nothing(models, tokenizer, tmp_path, monkeypatch):
    def explode(data, qtype):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(writer, "quantize_array", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        writer.export_gguf(
            models("llama"), tokenizer, tmp_path / "m.gguf", {"quantization": "q8_0"}
        )
    with pytest.raises(RuntimeError, match="disk on fire"):
        writer.export_gguf(models("llama"), tokenizer, tmp_path / "d", {"quantization": "q8_0"})
    assert list(tmp_path.iterdir()) == []


def test_k_quants_without_llama_cpp_name_the_package(models, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    with pytest.raises(llama_cpp.LlamaCppMissingError, match="pip install llama-cpp-python"):
        writer.export_gguf(
            models("llama"), tokenizer, tmp_path / "m.gguf", {"quantization": "q4_k_m"}
        )
    assert list(tmp_path.iterdir()) == []


def test_unsupported_models_are_refused(tokenizer, tmp_path):
    model = tiny("llama", model_type="cwm")
    with pytest.raises(ValueError, match="does not support model_type 'cwm'"):
        writer.export_gguf(model, tokenizer, tmp_path / "m.gguf", {})
    with pytest.raises(ValueError, match="needs the tokenizer"):
        writer.export_gguf(tiny("llama"), None, tmp_path / "m.gguf", {})
    with pytest.raises(ValueError, match="query_pre_attn_scalar=32"):
        writer.export_gguf(
            tiny("gemma2", query_pre_attn_scalar=32), tokenizer, tmp_path / "m.gguf", {}
        )
    llama3 = {**ROPE_LLAMA3, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="qwen2 has no rope scaling 'llama3'"):
        writer.export_gguf(
            tiny("qwen2", rope_parameters=llama3), tokenizer, tmp_path / "m.gguf", {}
        )
    assert list(tmp_path.iterdir()) == []


# --- what the file holds -------------------------------------------------------------------


def test_metadata_llama_cpp_reads(exported):
    fields = _fields(exported("gemma2", "f32"))
    assert fields["general.architecture"] == "gemma2"
    expected = {
        "gemma2.context_length": 256, "gemma2.embedding_length": 64, "gemma2.block_count": 2,
        "gemma2.feed_forward_length": 128, "gemma2.attention.head_count": 4,
        "gemma2.attention.head_count_kv": 2, "gemma2.attention.key_length": 16,
        "gemma2.attention.value_length": 16, "gemma2.rope.dimension_count": 16,
        "gemma2.attention.sliding_window": 16,
        "gemma2.attention.sliding_window_pattern": [True, False],
        "gemma2.attn_logit_softcapping": 2.0, "gemma2.final_logit_softcapping": 3.0,
        "gemma2.rope.freq_base": 20000.0, "general.file_type": gguf.LlamaFileType.ALL_F32,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.eot_token_id": 4,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
    }  # fmt: skip
    assert {k: fields[k] for k in expected} == expected  # floats exact in float32
    assert fields["gemma2.attention.layer_norm_rms_epsilon"] == pytest.approx(3e-3)
    assert fields["tokenizer.chat_template"].startswith("{{- bos_token }}")
    # Padded vocabulary: the model has one more embedding than the tokenizer has tokens.
    assert len(fields["tokenizer.ggml.tokens"]) == 513
    assert fields["tokenizer.ggml.tokens"][-1] == "[PAD512]"
    assert fields["tokenizer.ggml.token_type"][:5] == [gguf.TokenType.CONTROL] * 5

    gemma3 = _fields(exported("gemma3_text", "f32"))
    assert gemma3["gemma3.rope.freq_base"] == 4e5 and gemma3["gemma3.rope.freq_base_swa"] == 1.5e4
    phi3 = _fields(exported("phi3", "f32"))
    assert phi3["phi3.rope.dimension_count"] == 8  # partial rotary: half of each 16-wide head
    assert phi3["phi3.rope.scaling.original_context_length"] == 256


def test_tensors_follow_llama_cpp(exported, models):
    names = {t.name: t for t in gguf.GGUFReader(exported("phi3", "f32")).tensors}
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "output.weight"} <= set(names)
    assert list(names["blk.0.ffn_up.weight"].shape) == [64, 256]  # gate and up, fused
    gemma = {t.name: t for t in gguf.GGUFReader(exported("gemma", "f32")).tensors}
    assert "output.weight" not in gemma  # tied: llama.cpp reuses token_embd
    norm = models("gemma").model.norm.weight.detach().numpy()
    np.testing.assert_array_equal(gemma["output_norm.weight"].data, norm + 1)  # Gemma's 1 + w
    llama = {t.name: t for t in gguf.GGUFReader(exported("llama", "f32")).tensors}
    k = models("llama").model.layers[0].self_attn.k_proj.weight.detach().numpy()  # 2 heads x 16
    # Rows of each head interleaved: (0, 8, 1, 9, ...), llama.cpp's rope pairs.
    order = np.arange(16).reshape(2, 8).T.reshape(-1)
    np.testing.assert_array_equal(
        llama["blk.0.attn_k.weight"].data, np.concatenate([k[order], k[16 + order]])
    )


@requires_llama_cpp
@pytest.mark.parametrize("quantization", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16"])
def test_quantized_tensors_are_llama_cpps_own(quantization, exported, tmp_path):
    """The numpy quantizers write the bytes llama.cpp's quantizer writes from the f32 file."""
    ours = {t.name: t for t in gguf.GGUFReader(exported("qwen2", quantization)).tensors}
    theirs_path = llama_cpp.quantize(exported("qwen2", "f32"), tmp_path / "q.gguf", quantization)
    theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert tensor.tensor_type == theirs[name].tensor_type, name
        np.testing.assert_array_equal(tensor.data, theirs[name].data, err_msg=name)


# --- LoRA and k-quants ---------------------------------------------------------------------


@requires_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "phi3"])  # phi3: LoRA on the fused qkv/gate_up
def test_lora_is_merged_exactly(arch, tokenizer, prompts, tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model

    base = tiny(arch)
    before = torch_logits(base, prompts)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config)  # init_lora_weights=False: B is random, not zero
    merged = copy.deepcopy(model).merge_and_unload()
    want = torch_logits(merged, prompts)
    assert relative_error(want, before) > 0.05  # the adapter matters
    got = llama_cpp.run_logits(export(model, tokenizer, tmp_path / "m.gguf", "f32"), prompts)
    error = relative_error(got, want)
    print(f"{arch} LoRA f32: {error:.2e}")
    assert error <= 1e-3
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))  # left as it was


@requires_llama_cpp
def test_k_quant_through_llama_cpp(tokenizer, prompts, tmp_path):
    # 256 wide, so that rows split into q4_K's 256-value super-blocks (narrower tensors
    # get llama.cpp's fallback types); the init scale follows the width (1/sqrt(256)).
    model = tiny(
        "llama", hidden_size=256, intermediate_size=512, head_dim=64, initializer_range=0.0625
    )
    result = writer.export_gguf(model, tokenizer, tmp_path / "m.gguf", {"quantization": "q4_k_m"})
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # the 16-bit source is gone
    reader = gguf.GGUFReader(result.path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert {t.tensor_type.name for t in reader.tensors} >= {"Q4_K", "Q6_K"}
    batch = prompts[:2]
    want = torch_logits(model, batch)
    error = relative_error(llama_cpp.run_logits(result.path, batch), want)
    format_cost = relative_error(torch_logits(stored_model(model, result.path), batch), want)
    print(f"llama q4_k_m: {error:.2e} (the stored weights alone: {format_cost:.2e})")
    # As for f16/q8_0 (test_gguf_logits): within what the format's rounding explains.
    assert error <= 2 * format_cost + 1e-3


def test_the_gguf_file_and_folder_are_readable_by_other_users(models, tokenizer, tmp_path):
    """mkstemp's files are 0600: llama.cpp's or Ollama's user must be able to read the GGUF."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        single = writer.export_gguf(models("llama"), tokenizer, tmp_path / "m.gguf",
                                    {"quantization": "f16"})  # fmt: skip
        assert stat.S_IMODE(single.path.stat().st_mode) == 0o644
        folder = writer.export_gguf(models("llama"), tokenizer, tmp_path / "out",
                                    {"quantization": "q8_0"})  # fmt: skip
        assert stat.S_IMODE(folder.path.stat().st_mode) == 0o755
        assert stat.S_IMODE(folder.files[0].stat().st_mode) == 0o644
    finally:
        os.umask(previous)
