"""sloth-mistral against Hugging Face's mistral: logits, loss and LoRA gradients with the
parity harness (fp32 and bf16; torch references and Triton kernels), the sliding window
really in effect in every attention path, the convergence test and the plugin listing.

Sequences are longer than the tiny config's ``sliding_window`` (16), so a lost window
shows. ``pytest -rA`` (or ``-s``) prints each report's table.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from sloth_mistral import plugin

from sloth_core.patches import SLOTH_ATTENTION, register_sloth_attention
from sloth_core.plugins import SlothPluginManager
from sloth_core.testing import (
    check_plugin_parity,
    init_tiny_model,
    installed_manager,
    parity_shape,
    tiny_config,
)
from sloth_core.testing.convergence import assert_converges_alike
from sloth_core.testing.parity import kernels_mode

WINDOW = 16  # tiny_config("mistral")'s sliding_window
#: Config overrides of ``tiny_config("mistral")`` (4 heads, 2 kv heads, window 16).
CONFIGS = {
    "untied": {"tie_word_embeddings": False},
    "tied": {"tie_word_embeddings": True},
    # 8 x 12 = 96 query features from a hidden size of 64: nothing may assume they match.
    "gqa4": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 12},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATCHED = {"rms_norm": 5, "mlp": 2, "attention": 2, "causal_lm": 1}


@pytest.fixture(scope="module")
def manager():
    """Every installed plugin, as users get them (sloth-mistral, sloth-kernels, ...)."""
    return installed_manager("sloth-mistral")


def _shape(kernels: str, batch_size: int = 2, seq_len: int = 40) -> dict[str, int]:
    """Rows past the window; under Triton's CPU interpreter, where each program runs in
    Python (the rope kernel's one per token), one row just past it: 5 tokens past, so that
    the long packed sequence ``make_batch`` puts first (all but 4 tokens) crosses it too."""
    return parity_shape(kernels, batch_size, seq_len, interpreted=(1, WINDOW + 5))


def _check(manager, config, **options):
    report = check_plugin_parity(manager, config, **options)
    assert report.patched == PATCHED
    return report


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(manager, name, dtype, kernels):
    """As FastLanguageModel loads it: ``sloth_attention``, sequences past the window."""
    config = tiny_config("mistral", **CONFIGS[name])
    assert config.sliding_window == WINDOW
    options = dict(dtype=DTYPES[dtype], attn_implementation=SLOTH_ATTENTION, **_shape(kernels))
    _check(manager, config, kernels=kernels, **options)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_parity_fp16(manager, kernels):
    """fp16: other casts than bf16's in every kernel, bounds relative to an fp32 run."""
    config = tiny_config("mistral")
    options = dict(dtype=torch.float16, attn_implementation=SLOTH_ATTENTION)
    _check(manager, config, kernels=kernels, **options, **_shape(kernels))


def test_parity_with_transformers_attention(manager):
    """A model loaded without sloth (transformers' ``sdpa``), patched afterwards."""
    _check(manager, tiny_config("mistral"), kernels="torch", **_shape("torch"))


@pytest.mark.parametrize(
    ("kernels", "attn"),
    [("torch", "sdpa"), ("torch", SLOTH_ATTENTION), ("triton", SLOTH_ATTENTION)],
)
def test_packed_parity(manager, kernels, attn):
    """Several sequences per row, positions restarting, no attention mask."""
    config = tiny_config("mistral")
    shape = _shape(kernels, batch_size=2, seq_len=24)  # test_sloth_attention_keeps_... : longer
    _check(manager, config, kernels=kernels, packed=True, attn_implementation=attn, **shape)


def _logits(model, ids, **inputs):
    with torch.no_grad():
        return model.eval()(ids, **inputs).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa", SLOTH_ATTENTION])
def test_sliding_window_is_in_effect(manager, attn):
    """The patched model equals Hugging Face's with the window, not without it."""
    register_sloth_attention()
    base = init_tiny_model(tiny_config("mistral"))
    unwindowed = init_tiny_model(tiny_config("mistral", sliding_window=None))
    unwindowed.load_state_dict(base.state_dict())
    reference, patched = copy.deepcopy(base), copy.deepcopy(base)
    with kernels_mode("torch"):
        (report,) = manager.patch_layers(model=patched)
        assert report.plugin == "sloth-mistral" and report.patched == PATCHED
        ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
        for model in (reference, patched, unwindowed):
            model.set_attn_implementation(attn)
        expected, got = _logits(reference, ids), _logits(patched, ids)
        assert (got - expected).abs().max() <= 1e-5
        assert (got[:, WINDOW:] - _logits(unwindowed, ids)[:, WINDOW:]).abs().max() > 1e-3
        # Within the window nothing differs: the window is the only difference.
        assert (got[:, :WINDOW] - _logits(unwindowed, ids)[:, :WINDOW]).abs().max() <= 1e-5


def test_sloth_attention_keeps_windowed_packed_sequences_apart(manager):
    """Packed rows longer than the window, in eval (where transformers keeps a cache and
    its sliding mask ignores packing): each sequence gets the logits it gets alone."""
    base = init_tiny_model(tiny_config("mistral"))
    patched = copy.deepcopy(base)
    with kernels_mode("torch"):
        manager.patch_layers(model=patched)
        patched.set_attn_implementation(register_sloth_attention())
        ids = torch.randint(0, 500, (1, 44), generator=torch.Generator().manual_seed(1))
        positions = torch.tensor([list(range(24)) + list(range(20))])
        got = _logits(patched, ids, position_ids=positions)
        for begin, end in ((0, 24), (24, 44)):
            alone = _logits(base, ids[:, begin:end], use_cache=False)
            assert (got[:, begin:end] - alone).abs().max() <= 1e-5


def test_patched_mistral_trains_like_the_unpatched_one(manager):
    # Triton: ~400 s under the interpreter; the parity tests cover the kernels there.
    unpatched, patched = assert_converges_alike(
        tiny_config("mistral"), manager=manager, kernels="torch"
    )
    assert len(unpatched) == len(patched) == 30


def test_other_model_types_are_left_alone(manager):
    model = init_tiny_model(tiny_config("llama"))
    assert plugin.patch_layers(model=model, ops=manager.ops) is None


def test_plugins_list_shows_sloth_mistral(plugin_manager, capsys):
    from sloth_core.cli import main
    from sloth_core.plugins import reset_plugin_manager

    reset_plugin_manager(SlothPluginManager(entry_points=True))  # the fixture restores it
    assert main(["plugins", "list", "--json"]) == 0
    (record,) = [r for r in json.loads(capsys.readouterr().out) if r["name"] == "sloth-mistral"]
    assert (record["status"], record["architectures"], record["kind"]) == (
        "active", ["mistral", "mixtral"], "architecture",
    )  # fmt: skip
    assert record["version"] == "0.1.0"
