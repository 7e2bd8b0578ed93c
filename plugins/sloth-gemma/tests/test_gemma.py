"""sloth-gemma against Hugging Face's gemma, gemma2 and gemma3_text: logits, loss and LoRA
gradients through the core's parity harness (fp32 and bf16; torch references and Triton
kernels, the interpreter on the CPU, real on a GPU), packed rows, Gemma's alternating
sliding windows, Gemma 2's attention and final-logit softcaps, the convergence test, and
what the report counts.

The tiny configs (``sloth_core.testing.models``) make the Gemma features bite: softcaps
far below the real ones (2 and 3), a 16-token window that the 24-token rows cross,
perturbed ``1 + w`` norms, and different rope bases on local and global Gemma 3 layers.
``pytest -rA`` (or ``-s``) prints each report's table.
"""

from __future__ import annotations

import pytest
import torch
from sloth_gemma import plugin

from sloth_core.patches import SLOTH_ATTENTION
from sloth_core.patches.softcap import eager_softcap_attention, softcap_attention
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
from sloth_core.testing.seeds import current_seed

MODEL_TYPES = ["gemma", "gemma2", "gemma3_text"]
#: Config overrides of the tiny configs (4 heads, 2 kv heads, head_dim 16, 2 layers).
CONFIGS = {
    "tied": {"tie_word_embeddings": True},
    "untied": {"tie_word_embeddings": False},
    # 8 x 12 = 96 query features from a hidden size of 64, and Gemma 2/3's query scale
    # 1/sqrt(20), not 1/sqrt(head_dim): nothing may assume either.
    "gqa4": {
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "query_pre_attn_scalar": 20,
    },  # fmt: skip
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: 2 layers. Gemma: input + post-attention norm, and the final norm. Gemma 2 adds the
#: pre- and post-feedforward norms; Gemma 3 also q_norm and k_norm.
RMS_NORMS = {"gemma": 2 * 2 + 1, "gemma2": 2 * 4 + 1, "gemma3_text": 2 * 6 + 1}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def manager():
    """Every installed plugin, as users get them (sloth-gemma, sloth-kernels, ...)."""
    return installed_manager("sloth-gemma")


def _check(manager, config, **options):
    return check_plugin_parity(manager, config, rms_norms=RMS_NORMS[config.model_type], **options)


def _shape(kernels: str, model_type: str, batch_size: int = 2) -> dict[str, int]:
    """Under Triton's CPU interpreter the batch is small; for the windowed Gemma 2 and 3,
    one row 5 tokens past the window, so a lost window shows there too (and the long
    packed sequence ``make_batch`` opens a packed row with crosses it)."""
    if model_type == "gemma":
        return parity_shape(kernels, batch_size)
    window = tiny_config(model_type).sliding_window
    return parity_shape(kernels, batch_size, interpreted=(1, window + 5))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parity(manager, model_type, name, dtype, kernels):
    """As FastLanguageModel loads it: sloth-gemma's attention (``sloth_attention``), against the
    unpatched model with transformers' attention (eager for Gemma 2: exact softcap)."""
    config = tiny_config(model_type, **CONFIGS[name])
    shape = _shape(kernels, model_type)
    options = dict(dtype=DTYPES[dtype], attn_implementation=SLOTH_ATTENTION, **shape)
    report = _check(manager, config, kernels=kernels, **options)
    assert set(report.patched) == {"rms_norm", "mlp", "attention", "causal_lm"}


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parity_fp16(manager, model_type, kernels):
    """fp16: other casts than bf16's in every kernel, bounds relative to an fp32 run."""
    config = tiny_config(model_type)
    options = dict(dtype=torch.float16, attn_implementation=SLOTH_ATTENTION)
    _check(manager, config, kernels=kernels, **options, **_shape(kernels, model_type))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parity_with_transformers_attention(manager, model_type):
    """A model loaded without sloth (its own attention), patched afterwards."""
    _check(manager, tiny_config(model_type), kernels="torch")


@pytest.mark.parametrize(
    ("kernels", "attn"),
    [("torch", "eager"), ("torch", SLOTH_ATTENTION), ("triton", SLOTH_ATTENTION)],
)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_packed_parity(manager, model_type, kernels, attn):
    """Several sequences per row, positions restarting, no attention mask; the rows are
    longer than the window, so packed sequences and the window overlap."""
    shape = _shape(kernels, model_type, batch_size=3)
    config = tiny_config(model_type)
    _check(manager, config, kernels=kernels, packed=True, attn_implementation=attn, **shape)


def test_softcaps_bite():
    """The tiny Gemma 2's caps change its logits: parity above is not vacuous."""
    config = tiny_config("gemma2")
    model = init_tiny_model(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        capped = model(ids).logits
        assert capped.abs().max() <= config.final_logit_softcapping
        config.attn_logit_softcapping = None
        config.final_logit_softcapping = None
        uncapped = model(ids).logits
    assert (capped - uncapped).abs().max() > 0.1


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_report_counts_and_attention_kwargs(manager, model_type):
    model = init_tiny_model(tiny_config(model_type))
    (report,) = manager.patch_layers(model=model)
    assert (report.plugin, report.model_type) == ("sloth-gemma", model_type)
    assert report.patched == {
        "rms_norm": RMS_NORMS[model_type], "mlp": 2, "attention": 2, "causal_lm": 1,
    }  # fmt: skip
    layers = model.model.layers
    if model_type == "gemma2":
        kwargs = [plugin.gemma2_attention_kwargs(layer.self_attn) for layer in layers]
        assert kwargs == [
            {"sliding_window": 16, "softcap": 2.0}, {"sliding_window": None, "softcap": 2.0},
        ]  # fmt: skip
    if model_type == "gemma3_text":
        assert is_patched(layers[0].self_attn.q_norm) and is_patched(layers[0].self_attn.k_norm)
    report.undo()
    assert not any(is_patched(m) for m in model.modules())


def _random_attention(generator, *, batch, heads, kv_heads, q_len, kv_len, dim, dtype, device):
    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()

    return (
        randn(batch, heads, q_len, dim),
        randn(batch, kv_heads, kv_len, dim),
        randn(batch, kv_heads, kv_len, dim),
    )


def _reference(query, key, value, mask, scaling, softcap):
    """transformers' own eager attention with Gemma 2's softcap (additive float mask)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = query.shape[1] // key.shape[1]
    module.training = False
    additive = None
    if mask is not None:
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        additive = additive.masked_fill(~mask, torch.finfo(query.dtype).min)
    out, _ = eager_attention_forward(
        module, query, key, value, additive, scaling=scaling, softcap=softcap
    )
    return out


def _masks(batch, length, device):
    """Padding (last row), a sliding window of 5, and two packed sequences per row."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    padded = causal.expand(batch, 1, length, length).clone()
    padded[-1, :, :, -3:] = False
    index = torch.arange(length, device=device)
    window = causal & ((index[:, None] - index[None, :]) < 5)
    half = length // 2
    sequence = (index >= half).long()
    packed = causal & (sequence[:, None] == sequence[None, :])
    return {
        "causal": None,
        "padded": padded,
        "window": window[None, None],
        "packed": packed[None, None],
    }


@pytest.mark.parametrize("mask_name", ["causal", "padded", "window", "packed"])
def test_softcap_attention_matches_transformers_eager(mask_name):
    """The eager path (the CPU's, and CUDA's fallback) against transformers, fwd + bwd,
    fresh random inputs, odd length, GQA."""
    generator = torch.Generator().manual_seed(current_seed())  # replayable: conftest
    q, k, v = _random_attention(
        generator, batch=2, heads=4, kv_heads=2, q_len=13, kv_len=13, dim=16,
        dtype=torch.float32, device="cpu",
    )  # fmt: skip
    mask = _masks(2, 13, "cpu")[mask_name]
    out = softcap_attention(q, k, v, mask, causal=True, scaling=0.3, softcap=2.0)
    full = mask if mask is not None else torch.ones(13, 13, dtype=torch.bool).tril()[None, None]
    expected = _reference(q, k, v, full.expand(2, 1, 13, 13), 0.3, 2.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention path: CUDA only")
@pytest.mark.parametrize("mask_name", ["causal", "padded", "window", "packed"])
@pytest.mark.parametrize("dim", [128, 256])
def test_flex_softcap_attention_matches_eager(mask_name, dim):
    """CUDA's flex path at LLM-like sizes (Gemma 2: head_dim 256, GQA 2) against the eager
    math in fp32, bf16 inputs, forward and backward."""
    generator = torch.Generator().manual_seed(current_seed())  # replayable: conftest
    length = 1000  # not a multiple of flex's 128-row blocks
    q, k, v = _random_attention(
        generator, batch=2, heads=8, kv_heads=4, q_len=length, kv_len=length, dim=dim,
        dtype=torch.bfloat16, device="cuda",
    )  # fmt: skip
    mask = _masks(2, length, "cuda")[mask_name]
    out = softcap_attention(q, k, v, mask, causal=True, scaling=dim**-0.5, softcap=50.0,
                            use_flex=True)  # fmt: skip
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    expected = eager_softcap_attention(q32, k32, v32, mask, causal=True, scaling=dim**-0.5,
                                       softcap=50.0)  # fmt: skip
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q32, k32, v32), grad.float())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_gemma_trains_like_the_unpatched_one(manager, model_type):
    # The tiny Gemma 2 caps its logits at +-3 (to make the cap bite): the gradients through
    # tanh shrink and it learns slower, about 14 % in 30 steps instead of the usual 20.
    min_drop = 0.1 if model_type == "gemma2" else 0.15
    unpatched, patched = assert_converges_alike(
        tiny_config(model_type), manager=manager, kernels="torch", min_drop=min_drop
    )
    assert len(unpatched) == len(patched) == 30


def test_entry_point_lists_sloth_gemma():
    record = SlothPluginManager(entry_points=True).records["sloth-gemma"]
    assert (record.status, record.kind, record.architectures) == (
        "active", "architecture", ["gemma", "gemma2", "gemma3_text"],
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
