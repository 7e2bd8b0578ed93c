"""``sloth export``: sources (model, adapter, training run), bad inputs, --verify, --force."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import PROMPT, logits, lora_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import sloth_core
from sloth_core import hookimpl
from sloth_core.catalog import install_command
from sloth_core.cli import main
from sloth_core.train.checkpoint import STATE_FILE, TRAINABLE_FILE


@pytest.fixture
def model_dir(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture
def adapter_dir(plugin_manager, model_dir, tmp_path):
    """A LoRA adapter (B not zero) of ``model_dir`` as PEFT writes it, and its model."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model


def _sloth(capsys, *args) -> tuple[int, str]:
    code = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_model_dir_exports_and_verifies(plugin_manager, model_dir, tmp_path, capsys):
    code, text = _sloth(capsys, model_dir, "--format", "vllm", "-o", tmp_path / "out", "--verify")
    assert code == 0, text
    assert "alias of merged_16bit" in text and "vllm serve" in text
    assert "top-1 agreement" in text and "verified" in text
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), PROMPT),
        logits(AutoModelForCausalLM.from_pretrained(model_dir), PROMPT),
    )


def test_adapter_dir_loads_its_base_and_merges(adapter_dir, tmp_path, capsys):
    adapter, model = adapter_dir
    code, text = _sloth(
        capsys, adapter, "-f", "merged_16bit", "-o", tmp_path / "m", "--max-shard-size", "100KB"
    )
    assert code == 0, text
    assert "LoRA adapter" in text and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(
        logits(reloaded, PROMPT), logits(model, PROMPT), atol=2e-5, rtol=1e-5
    )


def _training_run(root, adapter, model_dir, *, final: bool):
    """The layout `sloth train` leaves: checkpoint-N/{trainer_state.json, adapter/}, final/."""
    import shutil

    checkpoint = root / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    shutil.copytree(adapter, checkpoint / "adapter")
    (checkpoint / TRAINABLE_FILE).write_bytes(b"")
    state = {"step": 4, "config": {"model_name": str(model_dir), "chat_template": "llama-3"}}
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    if final:
        shutil.copytree(adapter, root / "final")
    return root


@pytest.mark.parametrize("final", [True, False], ids=["final", "checkpoint"])
def test_training_run_exports_final_or_newest_checkpoint(
    adapter_dir, model_dir, tmp_path, capsys, final
):
    from sloth_core.data import CHAT_TEMPLATES

    adapter, model = adapter_dir
    run = _training_run(tmp_path / "run", adapter, model_dir, final=final)
    code, text = _sloth(capsys, run, "-f", "merged_16bit", "-o", tmp_path / "m")
    assert code == 0, text
    assert ("final" if final else "checkpoint-4") in text and "sloth train run" in text
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(
        logits(reloaded, PROMPT), logits(model, PROMPT), atol=2e-5, rtol=1e-5
    )
    # The run trained with the llama-3 template: the export carries it.
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template == CHAT_TEMPLATES["llama-3"]


def test_full_finetune_checkpoint_applies_its_trainable_tensors(
    plugin_manager, model_dir, tmp_path, capsys
):
    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    save_file(
        {"model.norm.weight": model.model.norm.weight.detach()}, str(checkpoint / TRAINABLE_FILE)
    )
    (checkpoint / STATE_FILE).write_text(json.dumps({"config": {"model_name": str(model_dir)}}))
    code, text = _sloth(capsys, checkpoint, "-f", "merged_16bit", "-o", tmp_path / "m")
    assert code == 0, text
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(reloaded, PROMPT), logits(model, PROMPT))


def test_missing_source(plugin_manager, tmp_path, capsys):
    code, text = _sloth(capsys, tmp_path / "nope", "-f", "merged_16bit", "-o", tmp_path / "o")
    assert code == 1 and "no such file or directory" in text and not (tmp_path / "o").exists()


def test_directory_without_a_model(plugin_manager, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    code, text = _sloth(capsys, tmp_path / "empty", "-f", "merged_16bit", "-o", tmp_path / "o")
    assert code == 1 and "holds no model" in text and "adapter_config.json" in text


def test_unknown_format_lists_formats_and_the_plugin_to_install(
    plugin_manager, model_dir, tmp_path, capsys
):
    code, text = _sloth(capsys, model_dir, "-f", "ggfu", "-o", tmp_path / "o")
    assert code == 1 and "unknown export format 'ggfu'" in text and "did you mean 'gguf'" in text
    assert "lora [builtin:exporters]; merged_16bit, merged, vllm [builtin:exporters]" in text
    gguf, ollama = install_command("sloth-gguf"), install_command("sloth-ollama")
    assert f"gguf (`{gguf}`)" in text and f"ollama (`{ollama}`)" in text
    code, text = _sloth(capsys, model_dir, "-f", "gguf", "-o", tmp_path / "o")
    assert code == 1 and "needs the plugin sloth-gguf" in text and f"`{gguf}`" in text
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(plugin_manager, model_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, text = _sloth(capsys, model_dir, "-f", "merged_16bit", "-o", out)
    assert code == 1 and "--force" in text and (out / "keep.txt").read_text() == "precious"
    code, text = _sloth(capsys, model_dir, "-f", "merged_16bit", "-o", out, "--force")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_over_the_source_is_refused(plugin_manager, model_dir, capsys):
    code, text = _sloth(capsys, model_dir, "-f", "merged_16bit", "-o", model_dir, "--force")
    assert code == 1 and "would replace the source" in text
    assert (model_dir / "config.json").is_file()


def test_verify_fails_with_nonzero_exit_on_a_corrupted_export(
    plugin_manager, model_dir, tmp_path, capsys, monkeypatch
):
    from sloth_core.sdk import merge

    real = merge.merged_state_dict

    def corrupted(model, dtype=None):
        state = real(model, dtype)
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"] * 3
        return state

    monkeypatch.setattr(merge, "merged_state_dict", corrupted)  # what write_merged calls
    code, text = _sloth(capsys, model_dir, "-f", "merged_16bit", "-o", tmp_path / "o", "--verify")
    assert code == 1 and "FAIL" in text and "verification failed" in text
    assert (tmp_path / "o" / "config.json").is_file()  # kept, for a look


def test_python_api_passes_quantization_to_the_exporter(plugin_manager, register_plugin, tmp_path):
    seen = {}

    class Recorder:
        @hookimpl
        def register_exporters(self, register):
            register("probe")

        @hookimpl
        def export(self, format, path, options):
            if format == "probe":
                seen.update(options)
                return sloth_core.types.ExportResult(format, path)
            return None

    register_plugin(Recorder(), name="recorder")
    model, tokenizer = lora_model("llama")
    sloth_core.export(model, tokenizer, tmp_path / "p", format="probe", quantization="q4_k_m")
    assert seen == {"quantization": "q4_k_m", "force": False}


def test_lora_of_a_model_without_adapters_is_an_error_not_a_traceback(
    plugin_manager, model_dir, tmp_path, capsys
):
    code, text = _sloth(capsys, model_dir, "-f", "lora", "-o", tmp_path / "a")
    assert code == 1 and "needs a model with LoRA adapters" in text
    assert not (tmp_path / "a").exists()
