"""The ``ollama`` format end to end: the GGUF through the ``gguf`` hook, and the Modelfile."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from sloth_ollama import plugin

import sloth_core
from sloth_core.errors import PluginMissingError
from sloth_core.plugins import SlothPluginManager, reset_plugin_manager
from sloth_core.sdk import install_command
from sloth_core.testing import build_tokenizer, init_tiny_model, tiny_config


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    return init_tiny_model(tiny_config("llama", tokenizer=tokenizer)), tokenizer


def test_ollama_needs_a_gguf_exporter(plugin_manager, register_plugin, tiny, tmp_path):
    register_plugin(plugin, name=plugin.PLUGIN)
    model, tokenizer = tiny
    with pytest.raises(PluginMissingError, match=re.escape(install_command("sloth-gguf"))):
        sloth_core.export(model, tokenizer, tmp_path / "o", format="ollama")
    assert not (tmp_path / "o").exists()


def test_ollama_directory_holds_the_gguf_and_a_modelfile(tiny, tmp_path):
    manager = SlothPluginManager()  # installed plugins, as users get them
    if "gguf" not in manager.exporters:
        pytest.skip("no plugin serves the gguf format (pip install sloth-gguf)")
    if manager.exporters.get("ollama") != plugin.PLUGIN:
        manager.register(plugin, name=plugin.PLUGIN)
    reset_plugin_manager(manager)
    try:
        model, tokenizer = tiny
        result = sloth_core.export(
            model, tokenizer, tmp_path / "o", format="ollama", quantization="q8_0"
        )
    finally:
        reset_plugin_manager(None)
    assert result.format == "ollama"
    assert sorted(p.name for p in result.path.iterdir()) == ["Modelfile", "model.gguf"]
    assert (result.path / "model.gguf").read_bytes()[:4] == b"GGUF"
    text = (result.path / "Modelfile").read_text()
    assert "FROM ./model.gguf" in text and "<|im_start|>{{ .Role }}" in text
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no staging left behind


def test_the_plugin_never_imports_another_plugin():
    source = Path(plugin.__file__).parent
    for path in source.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                assert not any(
                    n.startswith("sloth_") and not n.startswith("sloth_core") for n in names
                ), path
