"""sloth-phi against Hugging Face's phi3: logits, loss and LoRA gradients through the
core's parity harness (fp32 and bf16; torch references and Triton kernels, the
interpreter on the CPU, real on a GPU), packed rows, Phi-3's sliding window, LoRA on the
fused ``qkv_proj``/``gate_up_proj``, the convergence test, and what the report counts.

``tiny_config("phi3")`` has partial rotary (``partial_rotary_factor=0.5``: the rotary
covers 8 of each head's 16 dims). ``pytest -rA`` (or ``-s``) prints each report's table.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sloth_phi import plugin

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

#: Config overrides of the tiny config (4 heads, 2 kv heads, head_dim 16, 2 layers).
#: The default is untied, so "untied" is the default tiny config (checked below). Phi-3's
#: config has no head_dim: it is hidden_size // num_attention_heads (8 for "gqa4").
CONFIGS = {
    "tied": {"tie_word_embeddings": True},
    "untied": {"tie_word_embeddings": False},
    "gqa4": {"num_attention_heads": 8, "num_key_value_heads": 2},
    # Phi-3.5's long-context rope: per-dimension factors, the long ones past the original
    # context (16 < the rows' 24 tokens; 12 under the interpreter uses the short ones).
    "longrope": {
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 16,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 20000.0,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.1, 1.3, 1.6],
            "long_factor": [1.2, 1.9, 3.1, 5.3],
            "original_max_position_embeddings": 16,
        },
    },
}
#: Phi-3 windows every layer (window 6 < the 24-token rows).
SLIDING = {"sliding_window": 6}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: 2 layers: input + post-attention norm each, the final norm.
RMS_NORMS = 2 * 2 + 1
#: What the fused projections run through: never the unfused lora_qkv/lora_mlp.
FUSED_OPS = {"lora_linear", "lora_o", "rope", "swiglu"}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def manager():
    """Every installed plugin, as users get them (sloth-phi, sloth-kernels, ...)."""
    return installed_manager("sloth-phi")


def _check(manager, config, **options):
    report = check_plugin_parity(manager, config, rms_norms=RMS_NORMS, **options)
    assert FUSED_OPS <= set(report.providers), report.providers
    assert not {"lora_qkv", "lora_mlp"} & set(report.providers), report.providers
    # LoRA on the fused projections: one adapter each, its gradients compared.
    grads = {check.name for check in report.checks if check.name.startswith("grad ")}
    assert {"grad qkv_proj.lora_A", "grad qkv_proj.lora_B"} <= grads
    assert {"grad gate_up_proj.lora_A", "grad gate_up_proj.lora_B"} <= grads
    return report


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(manager, name, dtype, kernels):
    """As FastLanguageModel loads it: sloth-phi's attention (``sloth_attention``)."""
    config = tiny_config("phi3", **CONFIGS[name])
    default = tiny_config("phi3")
    assert default.tie_word_embeddings is False  # "untied" is the default
    assert default.rope_parameters["partial_rotary_factor"] == 0.5  # partial rotary
    shape = parity_shape(kernels)
    options = dict(dtype=DTYPES[dtype], attn_implementation=SLOTH_ATTENTION, **shape)
    report = _check(manager, config, kernels=kernels, **options)
    assert set(report.patched) == {"rms_norm", "mlp", "attention", "causal_lm"}


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_parity_fp16(manager, kernels):
    """fp16: other casts than bf16's in every kernel, bounds relative to an fp32 run."""
    config = tiny_config("phi3")
    options = dict(dtype=torch.float16, attn_implementation=SLOTH_ATTENTION)
    _check(manager, config, kernels=kernels, **options, **parity_shape(kernels))


def test_parity_with_transformers_attention(manager):
    """A model loaded without sloth (transformers' ``sdpa``), patched afterwards."""
    _check(manager, tiny_config("phi3"), kernels="torch")


@pytest.mark.parametrize(
    ("kernels", "attn"),
    [("torch", "sdpa"), ("torch", SLOTH_ATTENTION), ("triton", SLOTH_ATTENTION)],
)
def test_packed_parity(manager, kernels, attn):
    """Several sequences per row, positions restarting, no attention mask."""
    shape = parity_shape(kernels, batch_size=3)
    config = tiny_config("phi3")
    _check(manager, config, kernels=kernels, packed=True, attn_implementation=attn, **shape)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sliding_window_parity(manager, packed):
    """Phi-3's sliding window: every layer gets it."""
    config = tiny_config("phi3", **SLIDING)
    _check(manager, config, kernels="torch", packed=packed, attn_implementation=SLOTH_ATTENTION)


@pytest.mark.parametrize("overrides", [SLIDING, {}], ids=["sliding", "full"])
def test_attention_gets_phi3s_sliding_window(manager, overrides):
    """The patched attention hands the attention function what Phi-3's own does: the
    config's ``sliding_window`` (or ``None``) on every layer."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen = []

    def recording(module, *args, **kwargs):
        seen.append(kwargs.get("sliding_window", "missing"))
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("sloth_phi_test_recording", recording)
    AttentionMaskInterface.register("sloth_phi_test_recording", sdpa_mask)
    config = tiny_config("phi3", **overrides)
    config._attn_implementation = "sloth_phi_test_recording"
    model = init_tiny_model(config)
    ids = torch.randint(0, config.vocab_size, (1, 9))
    with torch.no_grad():
        model(ids)
        unpatched, seen[:] = list(seen), []
        (report,) = manager.patch_layers(model=model)
        model(ids)
    report.undo()
    window = overrides.get("sliding_window")
    assert unpatched == seen == [window, window]
    windows = [sliding_window_kwargs(layer.self_attn) for layer in model.model.layers]
    assert windows == [{"sliding_window": window}] * 2


def test_report_counts_and_fused_op_calls(manager):
    """Phi-3's modules are patched; the fused projections run whole through
    ``lora_linear`` and the rotary covers the first 8 of 16 dims."""
    config = tiny_config("phi3")
    model = init_tiny_model(config)
    (report,) = manager.patch_layers(model=model)
    assert (report.plugin, report.model_type) == ("sloth-phi", "phi3")
    assert report.patched == {"rms_norm": RMS_NORMS, "mlp": 2, "attention": 2, "causal_lm": 1}
    layer = model.model.layers[0]
    assert is_patched(layer.self_attn) and is_patched(layer.mlp)
    calls = []
    resolve = manager.ops.resolve

    def recording(name, *args):
        impl = resolve(name, *args)

        def fn(*inputs, **options):
            if name == "lora_linear":
                calls.append((name, inputs[1].weight.shape[0]))  # out features
            elif name == "rope":
                calls.append((name, inputs[2].shape[-1], inputs[0].shape[-1]))  # R, D
            else:
                calls.append((name,))
            return impl.fn(*inputs, **options)

        return dataclasses.replace(impl, fn=fn)

    manager.ops.resolve = recording
    try:
        with torch.no_grad():
            model(torch.randint(0, config.vocab_size, (1, 5)))
    finally:
        del manager.ops.resolve
    qkv = (4 + 2 * 2) * 16  # q heads + k and v heads, times head_dim
    per_layer = [
        ("rms_norm",), ("lora_linear", qkv), ("rope", 8, 16), ("lora_o",), ("rms_norm",),
        ("lora_linear", 2 * config.intermediate_size), ("swiglu",),
        ("lora_linear", config.hidden_size),
    ]  # fmt: skip
    assert calls[: 2 * len(per_layer)] == per_layer * 2
    report.undo()
    assert not any(is_patched(m) for m in model.modules())


def test_patched_phi3_trains_like_the_unpatched_one(manager):
    unpatched, patched = assert_converges_alike(
        tiny_config("phi3"), manager=manager, kernels="torch"
    )
    assert len(unpatched) == len(patched) == 30


def test_entry_point_lists_sloth_phi():
    record = SlothPluginManager(entry_points=True).records["sloth-phi"]
    assert (record.status, record.kind, record.architectures) == (
        "active", "architecture", ["phi3"],
    )  # fmt: skip


def test_other_model_types_are_left_alone(manager):
    model = init_tiny_model(tiny_config("llama"))
    assert plugin.patch_layers(model=model, ops=manager.ops) is None


def test_from_pretrained_selects_sloth_attention(plugin_manager, register_plugin, make_tiny_model):
    from sloth_core import FastLanguageModel

    register_plugin(plugin, name=plugin.PLUGIN)
    path = make_tiny_model("phi3")
    model, _ = FastLanguageModel.from_pretrained(str(path))
    assert model.config._attn_implementation == SLOTH_ATTENTION
    assert model.sloth_patches[0].patched["rms_norm"] == RMS_NORMS
    model, _ = FastLanguageModel.from_pretrained(str(path), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
