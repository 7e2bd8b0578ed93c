"""sloth-qwen against Hugging Face's qwen2 and qwen3: logits, loss and LoRA gradients
through the core's parity harness (fp32 and bf16; torch references and Triton kernels,
the interpreter on the CPU, real on a GPU), packed rows, Qwen's sliding window, the
convergence test, and what the report counts (Qwen3's q_norm/k_norm are rms_norm calls).

``tiny_config("qwen2")`` has non-zero q/k/v biases; ``tiny_config("qwen3")`` has
perturbed q_norm/k_norm. ``pytest -rA`` (or ``-s``) prints each report's table.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sloth_qwen import plugin

from sloth_core.patches import SLOTH_ATTENTION, sliding_window_kwargs
from sloth_core.patching import is_patched
from sloth_core.plugins import SlothPluginManager
from sloth_core.testing import (
    check_plugin_parity,
    init_tiny_model,
    installed_manager,
    parity_shape,
    tiny_config,
)
from sloth_core.testing.convergence import assert_converges_alike

MODEL_TYPES = ["qwen2", "qwen3"]
#: Config overrides of the tiny configs (4 heads, 2 kv heads, head_dim 16, 2 layers).
#: The default is untied, so "untied" is the default tiny config (checked below).
CONFIGS = {
    "tied": {"tie_word_embeddings": True},
    "untied": {"tie_word_embeddings": False},
    # 8 x 12 = 96 query features from a hidden size of 64: nothing may assume they match.
    "gqa4": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 12},
}
#: Layer 1 windowed (window 6 < the 24-token rows), layer 0 full: Qwen's layer_types.
SLIDING = {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: 2 layers: input + post-attention norm each, the final norm; Qwen3 adds q_norm, k_norm.
RMS_NORMS = {"qwen2": 2 * 2 + 1, "qwen3": 2 * 4 + 1}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def manager():
    """Every installed plugin, as users get them (sloth-qwen, sloth-kernels, ...)."""
    return installed_manager("sloth-qwen")


def _check(manager, config, **options):
    return check_plugin_parity(manager, config, rms_norms=RMS_NORMS[config.model_type], **options)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parity(manager, model_type, name, dtype, kernels):
    """As FastLanguageModel loads it: sloth-qwen's attention (``sloth_attention``)."""
    config = tiny_config(model_type, **CONFIGS[name])
    assert tiny_config(model_type).tie_word_embeddings is False  # "untied" is the default
    shape = parity_shape(kernels)
    options = dict(dtype=DTYPES[dtype], attn_implementation=SLOTH_ATTENTION, **shape)
    report = _check(manager, config, kernels=kernels, **options)
    assert set(report.patched) == {"rms_norm", "mlp", "attention", "causal_lm"}


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parity_fp16(manager, model_type, kernels):
    """fp16: other casts than bf16's in every kernel, bounds relative to an fp32 run."""
    config = tiny_config(model_type)
    options = dict(dtype=torch.float16, attn_implementation=SLOTH_ATTENTION)
    _check(manager, config, kernels=kernels, **options, **parity_shape(kernels))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parity_with_transformers_attention(manager, model_type):
    """A model loaded without sloth (transformers' ``sdpa``), patched afterwards."""
    _check(manager, tiny_config(model_type), kernels="torch")


@pytest.mark.parametrize(
    ("kernels", "attn"),
    [("torch", "sdpa"), ("torch", SLOTH_ATTENTION), ("triton", SLOTH_ATTENTION)],
)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_packed_parity(manager, model_type, kernels, attn):
    """Several sequences per row, positions restarting, no attention mask."""
    shape = parity_shape(kernels, batch_size=3)
    config = tiny_config(model_type)
    _check(manager, config, kernels=kernels, packed=True, attn_implementation=attn, **shape)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sliding_window_parity(manager, model_type, packed):
    """use_sliding_window: the windowed layer gets its window, the full one none."""
    config = tiny_config(model_type, **SLIDING)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    _check(manager, config, kernels="torch", packed=packed, attn_implementation=SLOTH_ATTENTION)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_attention_gets_qwens_sliding_window(model_type):
    """What Qwen's own attention passes: its module's window, None on full layers."""
    model = init_tiny_model(tiny_config(model_type, **SLIDING))
    windows = [sliding_window_kwargs(layer.self_attn) for layer in model.model.layers]
    assert windows == [{"sliding_window": None}, {"sliding_window": 6}]
    model = init_tiny_model(tiny_config(model_type))  # use_sliding_window=False
    assert all(
        sliding_window_kwargs(layer.self_attn) == {"sliding_window": None}
        for layer in model.model.layers
    )


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_report_counts_and_rms_norm_calls(manager, model_type):
    """Qwen3's q_norm/k_norm are patched and run through ``rms_norm`` per head."""
    config = tiny_config(model_type)
    model = init_tiny_model(config)
    (report,) = manager.patch_layers(model=model)
    assert (report.plugin, report.model_type) == ("sloth-qwen", model_type)
    assert report.patched == {
        "rms_norm": RMS_NORMS[model_type], "mlp": 2, "attention": 2, "causal_lm": 1,
    }  # fmt: skip
    attention = model.model.layers[0].self_attn
    assert is_patched(attention)
    if model_type == "qwen3":
        assert is_patched(attention.q_norm) and is_patched(attention.k_norm)
    else:
        assert attention.q_proj.bias is not None and attention.q_proj.bias.abs().sum() > 0
    shapes = []
    resolve = manager.ops.resolve

    def recording(name, *args):
        impl = resolve(name, *args)
        if name != "rms_norm":
            return impl

        def rms_norm(x, *rest, **options):
            shapes.append(x.shape[-1])  # the normalised size: hidden, or head_dim per head
            return impl.fn(x, *rest, **options)

        return dataclasses.replace(impl, fn=rms_norm)

    manager.ops.resolve = recording
    try:
        with torch.no_grad():
            model(torch.randint(0, config.vocab_size, (1, 5)))
    finally:
        del manager.ops.resolve
    heads = 2 * 2 if model_type == "qwen3" else 0  # q_norm, k_norm in each of 2 layers
    assert shapes.count(config.head_dim) == heads
    assert shapes.count(config.hidden_size) == RMS_NORMS[model_type] - heads
    report.undo()
    assert not any(is_patched(m) for m in model.modules())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_qwen_trains_like_the_unpatched_one(manager, model_type):
    unpatched, patched = assert_converges_alike(
        tiny_config(model_type), manager=manager, kernels="torch"
    )
    assert len(unpatched) == len(patched) == 30


def test_entry_point_lists_sloth_qwen():
    record = SlothPluginManager(entry_points=True).records["sloth-qwen"]
    assert (record.status, record.kind, record.architectures) == (
        "active", "architecture", ["qwen2", "qwen3", "qwen3_moe"],
    )  # fmt: skip


def test_other_model_types_are_left_alone(manager):
    model = init_tiny_model(tiny_config("llama"))
    assert plugin.patch_layers(model=model, ops=manager.ops) is None


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_from_pretrained_selects_sloth_attention(plugin_manager, register_plugin, make_tiny_model,
                                            model_type):  # fmt: skip
    from sloth_core import FastLanguageModel

    register_plugin(plugin, name=plugin.PLUGIN)
    path = make_tiny_model(model_type)
    model, _ = FastLanguageModel.from_pretrained(str(path))
    assert model.config._attn_implementation == "sloth_attention"
    assert model.sloth_patches[0].patched["rms_norm"] == RMS_NORMS[model_type]
    model, _ = FastLanguageModel.from_pretrained(str(path), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
