"""The template's own tests: what a third-party plugin's test suite starts from."""

from __future__ import annotations

import torch

from sloth_core.patching import is_patched
from sloth_core.testing import init_tiny_model, tiny_config
from sloth_template import plugin


def _model():
    model = init_tiny_model(tiny_config("llama"))
    model.config.model_type = plugin.MODEL_TYPES[0]  # pretend to be the plugin's type
    return model.eval()


def test_registers_its_model_types(register_plugin, plugin_manager):
    record = register_plugin(plugin, name="sloth-template")
    assert record.architectures == list(plugin.MODEL_TYPES)
    assert record.kind == "architecture"


def test_patch_is_exact_idempotent_and_reversible(register_plugin, plugin_manager):
    register_plugin(plugin, name="sloth-template")
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    (report,) = plugin_manager.patch_layers(model=model)
    assert report.patched == {"rms_norm": 2 * model.config.num_hidden_layers + 1}
    assert plugin_manager.patch_layers(model=model)[0].total == 0  # second run: no-op
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-6)
    report.undo()
    assert not any(is_patched(m) for m in model.modules())


def test_other_model_types_are_left_alone(register_plugin, plugin_manager):
    from transformers import AutoModelForCausalLM

    register_plugin(plugin, name="sloth-template")
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert plugin_manager.patch_layers(model=model) == []
