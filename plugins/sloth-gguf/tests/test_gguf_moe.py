"""Mixtures of experts as GGUF: Qwen3-MoE (llama.cpp's ``qwen3moe``) and Mixtral (its
``llama`` with experts), with LoRA on the attention and on the experts' 3-D weights (PEFT's
``target_parameters``) merged on the way; gpt-oss refused, naming what to use instead.

The random and trained models of every architecture (these two included) are also in
test_gguf_logits.py (f32, f16, q8_0 through llama.cpp) and test_gguf_reload.py.
"""

from __future__ import annotations

import gguf
import pytest
import torch
from gguf_helpers import (
    MOE,
    export,
    relative_error,
    requires_llama_cpp,
    tiny,
    torch_logits,
    verify_reload,
)
from sloth_gguf import architectures

from sloth_core.sdk import llama_cpp

MOE_ARCHS = sorted(MOE)


@pytest.fixture(scope="module")
def lora_models():
    """``lora_models(arch)``: the tiny ``arch`` with LoRA (B not zero) on q/v and on both
    expert weights of every layer (nested ParamWrappers), built once."""
    from peft import LoraConfig, get_peft_model

    cache = {}

    def get(arch: str):
        if arch not in cache:
            config = LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                init_lora_weights=False,
            )  # fmt: skip
            cache[arch] = get_peft_model(tiny(arch), config).eval()
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def lora_exports(lora_models, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe")
    return {arch: export(lora_models(arch), tokenizer, folder / f"{arch}.gguf", "f32")
            for arch in MOE_ARCHS}  # fmt: skip


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_the_file_holds_llama_cpps_expert_tensors_and_counts(arch, lora_exports):
    reader = gguf.GGUFReader(lora_exports[arch])
    fields = {name: f.contents() for name, f in reader.fields.items()}
    name = "qwen3moe" if arch == "qwen3_moe" else "llama"
    assert fields["general.architecture"] == name
    assert fields[f"{name}.expert_count"] == 4 and fields[f"{name}.expert_used_count"] == 2
    if arch == "qwen3_moe":
        assert fields[f"{name}.expert_feed_forward_length"] == 32
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml's order
    hidden, width = 64, 32
    assert shapes["blk.1.ffn_gate_inp.weight"] == (hidden, 4)
    assert shapes["blk.1.ffn_gate_exps.weight"] == shapes["blk.1.ffn_up_exps.weight"]
    assert shapes["blk.1.ffn_up_exps.weight"] == (hidden, width, 4)
    assert shapes["blk.1.ffn_down_exps.weight"] == (width, hidden, 4)
    types_ = {t.name: t.tensor_type for t in reader.tensors}
    assert types_["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_gate_and_up_are_the_halves_of_gate_up_proj(arch, lora_models, lora_exports):
    from sloth_core.sdk import merged_state_dict

    merged = merged_state_dict(lora_models(arch))["model.layers.0.mlp.experts.gate_up_proj"]
    tensors = {t.name: t for t in gguf.GGUFReader(lora_exports[arch]).tensors}
    gate, up = (torch.from_numpy(tensors[f"blk.0.ffn_{n}_exps.weight"].data.copy())
                for n in ("gate", "up"))  # fmt: skip
    assert torch.equal(gate, merged[:, :32]) and torch.equal(up, merged[:, 32:])


@requires_llama_cpp
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_lora_merged_runs_in_llama_cpp_as_in_peft(arch, lora_models, lora_exports, prompts):
    model = lora_models(arch)
    want = torch_logits(model, prompts)
    with model.disable_adapter():
        assert relative_error(torch_logits(model, prompts), want) > 1e-2  # LoRA matters
    error = relative_error(llama_cpp.run_logits(lora_exports[arch], prompts), want)
    print(f"{arch} + expert LoRA f32: {error:.2e}")
    assert error <= 1e-3


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_the_pure_python_level_rebuilds_the_moe_model(
    arch, lora_models, lora_exports, tokenizer, manager
):
    report = verify_reload(lora_exports[arch], lora_models(arch), tokenizer, manager)
    assert report.passed, report.problems
    assert report.max_rel < 1e-5 and report.top1 == 1.0


@requires_llama_cpp
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_both_verify_levels_pass(arch, lora_models, lora_exports, tokenizer, manager):
    from sloth_core.verify import verify_export

    report = verify_export(
        lora_exports[arch], lora_models(arch), tokenizer, format="gguf", manager=manager
    )
    assert report.passed, report.problems
    assert [(level.name, level.status) for level in report.levels] == [
        ("gguf-py reload", "passed"),
        ("llama.cpp", "passed"),
    ]
    assert report.max_rel < 1e-5 and report.top1 == 1.0


@pytest.mark.parametrize(
    ("arch", "part", "tensor"),
    [("qwen3_moe", 1, "blk.1.ffn_up_exps.weight"), ("mixtral", 0, "blk.0.ffn_down_exps.weight")],
)
def test_a_corrupted_expert_tensor_fails_naming_it(
    arch, part, tensor, lora_models, tokenizer, tmp_path, monkeypatch, manager
):
    model = lora_models(arch)
    convert = architectures.TensorConverter.convert_part
    layer, kind = tensor.split(".")[1], "gate_up_proj" if "up" in tensor else "down_proj"

    def corrupted(self, hf_name, values, index):
        out = convert(self, hf_name, values, index)
        hit = hf_name == f"model.layers.{layer}.mlp.experts.{kind}" and index == part
        return out.flip(0) if hit else out  # the experts in the wrong order

    monkeypatch.setattr(architectures.TensorConverter, "convert_part", corrupted)
    path = export(model, tokenizer, tmp_path / "bad.gguf", "f32")
    monkeypatch.undo()
    report = verify_reload(path, model, tokenizer, manager)
    assert not report.passed
    named = [p for p in report.problems if "relative error" in p and tensor in p]
    assert named and len([p for p in report.problems if "relative error" in p]) == 1, (
        report.problems
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"norm_topk_prob": False}, "norm_topk_prob=False"),
        ({"mlp_only_layers": [0]}, r"dense MLP layers \[0\]"),
        ({"decoder_sparse_step": 2}, r"dense MLP layers \[0\]"),
    ],
)
def test_qwen3_moe_that_llama_cpp_would_run_differently_is_refused(
    overrides, match, tokenizer, tmp_path
):
    with pytest.raises(ValueError, match=match):
        export(tiny("qwen3_moe", **overrides), tokenizer, tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.iterdir())


def test_sloth_export_gguf_of_gpt_oss_says_what_to_use_instead(tokenizer, tmp_path, capsys):
    from transformers import GptOssConfig, GptOssForCausalLM

    from sloth_core.cli import main

    config = GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    source = tmp_path / "gpt-oss"
    GptOssForCausalLM(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    code = main(["export", str(source), "--format", "gguf", "--output", str(tmp_path / "o.gguf")])
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())
    assert code != 0 and not (tmp_path / "o.gguf").exists()
    assert "gpt_oss: sloth does not write gpt-oss as GGUF" in text
    assert "--format merged_16bit" in text and "convert_hf_to_gguf.py" in text
