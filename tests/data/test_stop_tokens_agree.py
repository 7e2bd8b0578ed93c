"""One end-of-turn table: for every published chat template, a merged export's
``generation_config.json`` stops on exactly the ids ``sloth chat``/``generate`` stop on."""

from __future__ import annotations

import json

import pytest
from official_templates import MODELS, model_tokenizer

import sloth_core
from sloth_core.inference.engines import open_engine
from sloth_core.testing.models import init_tiny_model, tiny_config


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exported_generation_config_stops_where_chat_does(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SLOTH_KERNELS", "torch")  # the loop of a chat, not the kernels
    tokenizer = model_tokenizer(name)
    model = init_tiny_model(tiny_config("llama", tokenizer=tokenizer))
    sloth_core.export(model, tokenizer, tmp_path / "m", format="merged_16bit")
    written = json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"]
    written = sorted(set(written if isinstance(written, list) else [written]))
    engine = open_engine(tmp_path / "m", device="cpu")
    assert written == engine.stop_ids
    # The template's own end of turn is among them (the bug this guards: tables drifted).
    turn_end = {
        "llama-3": "<|eot_id|>",
        "llama-3.1": "<|eot_id|>",
        "gemma-2": "<end_of_turn>",
        "qwen2.5": "<|im_end|>",
        "qwen3": "<|im_end|>",
        "phi-3.5": "<|end|>",
    }[name]
    assert tokenizer.convert_tokens_to_ids(turn_end) in written
