"""Tests of sloth-template: the patched model against Hugging Face's unpatched one, on
tiny random cwm models, through sloth's parity harness and convergence test.

Run with ``HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 python -m pytest tests`` (``pip install
'sloth-core[test]'`` installs what they need); ``-rA`` prints each parity table. Without
``TRITON_INTERPRET=1`` on a machine without a GPU, the Triton runs are skipped.
"""

from __future__ import annotations

import pytest
import torch
from sloth_template import plugin

from sloth_core.sdk import SLOTH_ATTENTION, is_patched
from sloth_core.testing import (
    assert_converges_alike,
    check_plugin_parity,
    init_tiny_model,
    installed_manager,
    parity_shape,
    tiny_config,
    varied_config,
)

MODEL_TYPE = plugin.MODEL_TYPES[0]
#: Config overrides, one parity run each: the tiny config; "varied", every float field of
#: the config class off its default and every flag that changes the forward flipped (read
#: from transformers at test time, see varied_config), so a patch that ignores a field of
#: real checkpoints fails; and what else differs in real models.
CONFIGS = {
    "default": {},
    "varied": {"varied": True},
    "window": {"sliding_window": 6},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def config(varied=False, **overrides):
    """A tiny random config of MODEL_TYPE: 2 layers, hidden 64, 4 heads over 2 k/v heads;
    ``varied``: with every float field off its default and every flag flipped."""
    make = varied_config if varied else tiny_config
    return make("llama", model_type=MODEL_TYPE, **overrides)


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny matrices: threads only contend


@pytest.fixture(scope="module")
def manager():
    """Every installed plugin, as users get them (sloth-kernels too): this one active."""
    return installed_manager(plugin.PLUGIN)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(manager, name, dtype, kernels):
    """Eval logits, train loss and every LoRA gradient, with the attention sloth loads."""
    shape = parity_shape(kernels)  # short rows for Triton's interpreter on the CPU
    options = dict(dtype=DTYPES[dtype], attn_implementation=SLOTH_ATTENTION, **shape)
    report = check_plugin_parity(manager, config(**CONFIGS[name]), kernels=kernels, **options)
    assert all(report.patched.values()), f"a module kind was never patched: {report.patched}"


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_parity(manager, name, kernels):
    """Several sequences per row (positions restarting, no attention mask), as sloth packs."""
    options = dict(packed=True, attn_implementation=SLOTH_ATTENTION, **parity_shape(kernels))
    check_plugin_parity(manager, config(**CONFIGS[name]), kernels=kernels, **options)


def test_trains_like_the_unpatched_model(manager):
    """30 LoRA steps on the bundled data set: the per-step losses of both models agree."""
    unpatched, patched = assert_converges_alike(config(), manager=manager, kernels="torch")
    assert len(unpatched) == len(patched) == 30


def test_patch_is_idempotent_and_reversible(manager):
    model = init_tiny_model(config())
    report = plugin.patch_layers(model=model, ops=manager.ops)
    assert report.plugin == plugin.PLUGIN and report.total > 0
    # patch_layers runs again once LoRA adapters are attached: nothing is patched twice.
    assert plugin.patch_layers(model=model, ops=manager.ops).total == 0
    report.undo()
    assert not any(is_patched(module) for module in model.modules())


def test_other_model_types_are_left_alone(manager):
    model = init_tiny_model(tiny_config("llama"))
    assert plugin.patch_layers(model=model, ops=manager.ops) is None


def test_entry_point_lists_the_plugin(manager):
    record = manager.records[plugin.PLUGIN]
    assert (record.kind, record.architectures) == ("architecture", list(plugin.MODEL_TYPES))


def test_from_pretrained_loads_and_patches(plugin_manager, register_plugin, make_tiny_model):
    from sloth_core import FastLanguageModel

    register_plugin(plugin, name=plugin.PLUGIN)
    path = make_tiny_model("llama", model_type=MODEL_TYPE)
    model, _ = FastLanguageModel.from_pretrained(str(path))
    assert model.config.model_type == MODEL_TYPE
    assert model.config._attn_implementation == SLOTH_ATTENTION  # chosen by load_model
    assert [report.plugin for report in model.sloth_patches] == [plugin.PLUGIN]
