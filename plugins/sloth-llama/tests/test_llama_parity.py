"""sloth-llama against Hugging Face's llama: logits, loss and LoRA gradients, on tiny
configs covering what differs between Llama releases, in fp32 and bf16, with the torch
references and with the Triton kernels (the interpreter on the CPU, real on a GPU).

The same tests run on a GPU machine (cuda is used when present): nothing here is
CPU-only. ``pytest -rA`` (or ``-s``) prints each report's table.
"""

from __future__ import annotations

import pytest
import torch

from sloth_core.patches import SLOTH_ATTENTION
from sloth_core.testing import check_plugin_parity, installed_manager, parity_shape, tiny_config

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

#: Config overrides of ``tiny_config("llama")`` (4 heads, 2 kv heads, vocab 513).
CONFIGS = {
    "untied": {"tie_word_embeddings": False},
    "tied": {"tie_word_embeddings": True},
    # 8 x 12 = 96 query features from a hidden size of 64: nothing may assume they match.
    "gqa4": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 12},
    "llama3_rope": {"rope_parameters": LLAMA3_ROPE},
    "odd_vocab": {"vocab_size": 1007},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def manager():
    """Every installed plugin, as users get them (sloth-llama, sloth-kernels, ...)."""
    return installed_manager("sloth-llama")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(manager, name, dtype, kernels):
    """As FastLanguageModel loads it: sloth-llama's attention (``sloth_attention``)."""
    config = tiny_config("llama", **CONFIGS[name])
    shape = parity_shape(kernels)
    options = dict(dtype=DTYPES[dtype], attn_implementation=SLOTH_ATTENTION, **shape)
    report = check_plugin_parity(manager, config, kernels=kernels, **options)
    assert {"rms_norm", "mlp", "attention", "causal_lm"} <= set(report.patched)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers_attention(manager, name, dtype):
    """A model loaded without sloth (transformers' ``sdpa``), patched afterwards."""
    config = tiny_config("llama", **CONFIGS[name])
    check_plugin_parity(manager, config, kernels="torch", dtype=DTYPES[dtype])


@pytest.mark.parametrize(
    ("kernels", "attn"),
    [("torch", "sdpa"), ("torch", SLOTH_ATTENTION), ("triton", SLOTH_ATTENTION)],
)
def test_packed_parity(manager, kernels, attn):
    """Several sequences per row, positions restarting, no attention mask."""
    shape = parity_shape(kernels, batch_size=3)
    config = tiny_config("llama")
    check_plugin_parity(
        manager, config, kernels=kernels, packed=True, attn_implementation=attn, **shape
    )


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_parity_fp16(manager, kernels):
    """fp16: other casts than bf16's in every kernel, bounds relative to an fp32 run."""
    config = tiny_config("llama")
    options = dict(dtype=torch.float16, attn_implementation=SLOTH_ATTENTION)
    check_plugin_parity(manager, config, kernels=kernels, **options, **parity_shape(kernels))
