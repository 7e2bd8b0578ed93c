"""The norm references against transformers' RMSNorms and torch's LayerNorm, fp32, fwd + bwd."""

import functools

import pytest
import torch
from _helpers import assert_close as _assert_close
from _helpers import draw as _draw
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from sloth_core.ops.reference import layer_norm, rms_norm


def _compare_module(module, fn, x, what):
    """Forward and backward of ``fn(x, weight)`` against ``module(x)``, same upstream grad."""
    x_ref = x.clone().requires_grad_()
    x_hf = x.clone().requires_grad_()
    out_hf = module(x_hf)
    out_ref = fn(x_ref)
    _assert_close(out_ref, out_hf, f"{what} forward")
    upstream = torch.randn_like(out_hf)
    params = [p for p in module.parameters()]
    grads_hf = torch.autograd.grad(out_hf, [x_hf, *params], upstream)
    grads_ref = torch.autograd.grad(out_ref, [x_ref, *params], upstream)
    for i, (g_ref, g_hf) in enumerate(zip(grads_ref, grads_hf, strict=True)):
        _assert_close(g_ref, g_hf, f"{what} grad {'x' if i == 0 else f'param {i}'}")


@pytest.mark.parametrize("norm_cls", [LlamaRMSNorm, Qwen3RMSNorm])
def test_rms_norm_matches_llama_style(norm_cls):
    seed, (b, s, d) = _draw((1, 3), (1, 17), (5, 130))
    eps = float(torch.rand(()) * 1e-5 + 1e-6)
    module = norm_cls(d, eps=eps)
    nn.init.normal_(module.weight, 1.0, 0.5)
    x = torch.randn(b, s, d) * 3
    what = f"{norm_cls.__name__} x={[b, s, d]} eps={eps:.3g} seed={seed}"
    _compare_module(module, lambda t: rms_norm(t, module.weight, eps), x, what)


def test_rms_norm_matches_qwen3_per_head():
    # Qwen3's q_norm/k_norm normalise each head: x is [B, S, H, head_dim].
    seed, (b, s, h, d) = _draw((1, 3), (1, 9), (1, 6), (4, 64))
    module = Qwen3RMSNorm(d, eps=1e-6)
    nn.init.normal_(module.weight, 1.0, 0.5)
    x = torch.randn(b, s, h, d)
    what = f"Qwen3RMSNorm per-head x={[b, s, h, d]} seed={seed}"
    _compare_module(module, lambda t: rms_norm(t, module.weight, 1e-6), x, what)


def test_rms_norm_matches_gemma():
    seed, (b, s, d) = _draw((1, 3), (1, 17), (5, 130))
    module = GemmaRMSNorm(d, eps=1e-6)
    nn.init.normal_(module.weight, 0.0, 0.5)  # Gemma stores w where the scale is 1 + w
    x = torch.randn(b, s, d) * 3
    what = f"GemmaRMSNorm x={[b, s, d]} seed={seed}"
    _compare_module(module, lambda t: rms_norm(t, module.weight, 1e-6, gemma=True), x, what)


@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_bf16_rounds_like_transformers(gemma):
    # Llama casts to bf16 before the weight, Gemma after: bit-exact equality shows the
    # reference rounds at the same places.
    seed, (n, d) = _draw((1, 40), (8, 96))
    module = GemmaRMSNorm(d) if gemma else LlamaRMSNorm(d)
    nn.init.normal_(module.weight, 0.0 if gemma else 1.0, 0.5)
    module = module.to(torch.bfloat16)
    x = torch.randn(n, d, dtype=torch.bfloat16)
    expected = module(x)
    actual = rms_norm(x, module.weight, 1e-6, gemma=gemma)
    what = f"gemma={gemma} x={[n, d]} seed={seed}"
    assert actual.dtype == expected.dtype == torch.bfloat16, what
    assert torch.equal(actual, expected), what


def test_rms_norm_matches_gpt_oss():
    seed, (b, s, d) = _draw((1, 3), (1, 17), (5, 130))
    module = GptOssRMSNorm(d, eps=3e-3)
    nn.init.normal_(module.weight, 1.0, 0.5)
    x = torch.randn(b, s, d) * 3
    what = f"GptOssRMSNorm x={[b, s, d]} seed={seed}"
    fn = functools.partial(rms_norm, weight=module.weight, eps=3e-3, cast_after_weight=True)
    _compare_module(module, fn, x, what)


@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32,) * 2],
    ids=["bf16-fp32-weight", "bf16", "fp32"],
)
def test_rms_norm_cast_after_weight_is_gpt_oss_bit_for_bit(x_dtype, w_dtype):
    # gpt-oss multiplies by the weight in fp32, then casts: with from_pretrained's fp32
    # norm weights on bf16 hidden states the result is bf16, rounded once.
    seed, (n, d) = _draw((1, 40), (8, 96))
    module = GptOssRMSNorm(d)
    nn.init.normal_(module.weight, 1.0, 0.5)
    module = module.to(w_dtype)
    x = torch.randn(n, d).to(x_dtype)
    expected = module(x)
    actual = rms_norm(x, module.weight, 1e-6, cast_after_weight=True)
    what = f"x {x_dtype} weight {w_dtype} x={[n, d]} seed={seed}"
    assert actual.dtype == expected.dtype == x_dtype, what
    assert torch.equal(actual, expected), what
    if x_dtype != w_dtype:  # the Llama order would differ: promoted dtype, two roundings
        assert rms_norm(x, module.weight, 1e-6).dtype == torch.float32, what


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_nn_layer_norm(affine, bias):
    seed, (b, s, d) = _draw((1, 3), (1, 17), (2, 130))
    module = nn.LayerNorm(d, eps=1e-5, elementwise_affine=affine, bias=bias)
    if affine:
        nn.init.normal_(module.weight, 1.0, 0.5)
    if module.bias is not None:
        nn.init.normal_(module.bias, 0.0, 0.5)
    x = torch.randn(b, s, d) * 2 + 1
    what = f"LayerNorm affine={affine} bias={bias} x={[b, s, d]} seed={seed}"
    _compare_module(module, lambda t: layer_norm(t, module.weight, module.bias, 1e-5), x, what)
