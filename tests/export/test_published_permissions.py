"""What sloth writes for others to serve is readable by them: under a umask of 022 every
folder is 0755 and every file 0644, for each installed export format and for ``sloth
train``'s output (checkpoints, metrics, the final model). tempfile's private 0700/0600,
which staging folders and files start with, must not survive the rename into place."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import sloth_core
from sloth_core.plugins import get_plugin_manager
from sloth_core.testing.datasets import load_tiny_instructions
from sloth_core.testing.models import tiny_model
from sloth_core.train import TrainConfig, train

#: The cheapest weight type of formats that have several (the permissions are the point).
CHEAP = {"gguf": "f16", "ollama": "f16", "merged_4bit": "nf4"}


def _modes(root: Path) -> dict[str, int]:
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def _wrong(root: Path) -> dict[str, str]:
    """Each path under ``root`` (itself included) without 0755 (folders) or 0644 (files)."""
    return {
        path: oct(mode)
        for path, mode in _modes(root).items()
        if mode != (0o755 if (root.parent / path).is_dir() else 0o644)
    }


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _formats() -> list[str]:
    manager = get_plugin_manager()
    return sorted({fmt.name for fmt in manager.formats.values()})


@pytest.mark.parametrize("format", _formats())
def test_every_export_format_writes_readable_outputs(format, llama_lora, tmp_path, umask_022):
    if format == "merged_4bit":
        pytest.importorskip("bitsandbytes")
    model, tokenizer = llama_lora
    target = tmp_path / ("model.gguf" if format == "gguf" else format)
    options = {"quantization": CHEAP[format]} if format in CHEAP else {}
    result = sloth_core.export(model, tokenizer, target, format=format, **options)
    assert _wrong(Path(result.path)) == {}, format


def test_train_outputs_are_readable(tmp_path, umask_022, monkeypatch):
    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    data = tmp_path / "data.jsonl"
    rows = load_tiny_instructions()[:16]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "run"
    config = TrainConfig.from_mapping({
        "model_name": str(tiny_model("llama", tmp_path / "base")), "dataset": str(data),
        "output_dir": str(out), "max_seq_length": 48, "per_device_train_batch_size": 2,
        "max_steps": 2, "save_steps": 1, "gradient_checkpointing": "off",
        "eval_fraction": 0.2, "save_method": "merged_16bit", "logging_steps": 1,
    })  # fmt: skip
    train(config, show_progress=False)
    assert (out / "final" / "config.json").is_file() and list(out.glob("checkpoint-*"))
    assert _wrong(out) == {}
