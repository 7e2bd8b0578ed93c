"""RMSNorm and LayerNorm kernels against the torch references and transformers' modules."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import DTYPES, TOLERANCES, assert_close
from sloth_kernels import norms
from sloth_kernels._utils import MAX_FUSED_SIZE

from sloth_core.ops import reference

# Odd widths (not powers of 2), one-row tiles, many-row tiles, and Qwen3's per-head input.
SHAPES = [(5, 123), (2, 37, 300), (2, 3, 4, 40), (7, 1000)]


def _leaf(t):
    return t.detach().requires_grad_()


def _inputs(shape, dtype, device, *, affine_dtype=None):
    x = _leaf(torch.randn(shape, device=device).to(dtype))
    w = _leaf((torch.randn(shape[-1], device=device) * 0.5 + 1).to(affine_dtype or dtype))
    return x, w


def _rows(shape):
    return math.prod(shape[:-1])


def _assert_weight_grad(actual, expected, dtype, n_rows, *, rounded_per_row, what):
    """The weight gradient, a sum over ``n_rows`` rows.

    Where HF rounds each row's normalised value to x's dtype before the product with the
    weight (Llama), the kernel does too while the fp32 reference does not: those rounding
    errors add up like a random walk, so the absolute tolerance grows with sqrt(n_rows).
    """
    if not rounded_per_row or dtype == torch.float32:
        assert_close(actual, expected, dtype, what=what)
        return
    atol, rtol = TOLERANCES[dtype]
    assert not torch.isnan(actual).any(), f"{what}: NaN in output"
    torch.testing.assert_close(
        actual.float(),
        expected.float(),
        atol=atol * math.sqrt(n_rows),
        rtol=rtol,
        msg=lambda m: f"{what}: {m}",
    )


def _rms_fp32_reference(x, w, dy, eps, gemma):
    x32, w32 = _leaf(x.detach().float()), _leaf(w.detach().float())
    y = reference.rms_norm(x32, w32, eps, gemma=gemma)
    y.backward(dy.float())
    return y, x32.grad, w32.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_rms_norm_matches_reference(gemma, shape, dtype, device):
    eps = 1e-6
    x, w = _inputs(shape, dtype, device)
    y = norms.rms_norm(x, w, eps, gemma=gemma)
    dy = torch.randn_like(y)
    y.backward(dy)
    what = f"rms_norm gemma={gemma} {shape} {dtype}"
    assert y.shape == x.shape and y.dtype == dtype, what
    # Forward: the reference in the input dtype (normalises in fp32, rounds as HF does).
    assert_close(
        y, reference.rms_norm(x.detach(), w.detach(), eps, gemma=gemma), dtype, what=f"{what} y"
    )
    _, dx, dw = _rms_fp32_reference(x, w, dy, eps, gemma)
    assert_close(x.grad, dx, dtype, what=f"{what} dx")
    _assert_weight_grad(
        w.grad, dw, dtype, _rows(shape), rounded_per_row=not gemma, what=f"{what} dw"
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cast_after_weight_is_the_reference(dtype, device):
    """gpt-oss's order is declined (the LoRA kernels' norm recompute knows Llama's and
    Gemma's only): the reference's bits, forward and backward, fp32 weight as gpt-oss's."""
    x, w = _inputs((2, 5, 37), dtype, device, affine_dtype=torch.float32)
    y = norms.rms_norm(x, w, 1e-5, cast_after_weight=True)
    assert not hasattr(y, "_sloth_norm") and y.dtype == dtype
    x_ref, w_ref = _leaf(x.detach()), _leaf(w.detach())
    expected = reference.rms_norm(x_ref, w_ref, 1e-5, cast_after_weight=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy)
    for got, want in ((y, expected), (x.grad, x_ref.grad), (w.grad, w_ref.grad)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_rms_norm_matches_transformers_modules(gemma, dtype, device):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    shape, eps = (3, 11, 200), 1e-5
    module = (GemmaRMSNorm if gemma else LlamaRMSNorm)(shape[-1], eps=eps).to(device)
    with torch.no_grad():
        module.weight.copy_(torch.randn(shape[-1]) * 0.3 + (0.0 if gemma else 1.0))
    module = module.to(dtype)
    x = _leaf(torch.randn(shape, device=device).to(dtype))
    w = _leaf(module.weight.detach().clone())
    y = norms.rms_norm(x, w, eps, gemma=gemma)
    dy = torch.randn_like(y)
    y.backward(dy)
    what = f"{type(module).__name__} {shape} {dtype}"
    assert_close(y, module(x.detach()), dtype, what=f"{what} y")
    # Gradients against the same module run in fp32.
    module32 = module.float()
    x32 = _leaf(x.detach().float())
    module32(x32).backward(dy.float())
    assert_close(x.grad, x32.grad, dtype, what=f"{what} dx")
    _assert_weight_grad(
        w.grad,
        module32.weight.grad,
        dtype,
        _rows(shape),
        rounded_per_row=not gemma,
        what=f"{what} dw",
    )


@pytest.mark.parametrize(
    "x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_rms_norm_mixed_dtypes_promote_like_llama(x_dtype, w_dtype, device):
    x, w = _inputs((4, 96), x_dtype, device, affine_dtype=w_dtype)
    y = norms.rms_norm(x, w)
    dy = torch.randn_like(y)
    y.backward(dy)
    x_ref, w_ref = _leaf(x.detach()), _leaf(w.detach())
    expected = reference.rms_norm(x_ref, w_ref)
    expected.backward(dy)
    what = f"x {x_dtype} w {w_dtype} (4, 96)"
    assert y.dtype == expected.dtype == torch.float32, f"{what}: Llama's weight * normed promotes"
    assert_close(y, expected, torch.bfloat16, what=f"{what} y")
    assert x.grad.dtype == x_dtype and w.grad.dtype == w_dtype, what
    assert_close(x.grad, x_ref.grad, torch.bfloat16, what=f"{what} dx")
    # The normalised rows are rounded to bf16 before the product with the weight: a value
    # on a rounding boundary may round one way here and the other in the reference.
    _assert_weight_grad(w.grad, w_ref.grad, torch.bfloat16, 4,
                        rounded_per_row=x_dtype != torch.float32, what=f"{what} dw")  # fmt: skip


def test_rms_norm_frozen_weight_and_non_contiguous_input(device):
    base = _leaf(torch.randn(6, 40, 3, device=device))
    x = base.transpose(1, 2)  # rows of 40 elements with stride 3
    w = torch.randn(40, device=device)  # frozen: no weight gradient is computed
    y = norms.rms_norm(x, w, 1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    base32 = _leaf(base.detach())
    ref = reference.rms_norm(base32.transpose(1, 2), w, 1e-6)
    ref.backward(dy)
    assert_close(y, ref, torch.float32, what="transposed (6, 3, 40) y")
    assert_close(base.grad, base32.grad, torch.float32, what="transposed (6, 3, 40) dx")
    assert w.grad is None


def test_rms_norm_no_grad_inference(device):
    x, w = _inputs((9, 64), torch.float16, device)
    with torch.no_grad():
        y = norms.rms_norm(x, w)
    assert not y.requires_grad
    assert_close(y, reference.rms_norm(x.detach(), w.detach()), torch.float16, what="no_grad")
    # A checkpoint's first pass runs without grad and its recompute with: the same bits.
    assert torch.equal(y, norms.rms_norm(x, w))


def _ln_fp32_reference(x, w, b, dy, eps):
    x32 = _leaf(x.detach().float())
    w32 = None if w is None else _leaf(w.detach().float())
    b32 = None if b is None else _leaf(b.detach().float())
    y = reference.layer_norm(x32, w32, b32, eps)
    y.backward(dy.float())
    return y, x32.grad, None if w is None else w32.grad, None if b is None else b32.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (2, 37, 300), (3, 1000)])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm_matches_reference(affine, shape, dtype, device):
    eps = 1e-5
    # An offset and scale per row: the mean matters, unlike in RMSNorm.
    x = _leaf((torch.randn(shape, device=device) * 2 + 0.5).to(dtype))
    w = (
        _leaf((torch.randn(shape[-1], device=device) * 0.5 + 1).to(dtype))
        if affine != "none"
        else None
    )
    b = _leaf(torch.randn(shape[-1], device=device).to(dtype)) if affine == "weight+bias" else None
    y = norms.layer_norm(x, w, b, eps)
    dy = torch.randn_like(y)
    y.backward(dy)
    what = f"layer_norm {affine} {shape} {dtype}"
    assert y.shape == x.shape and y.dtype == dtype, what
    y_ref, dx, dw, db = _ln_fp32_reference(x, w, b, dy, eps)
    assert_close(y, y_ref, dtype, what=f"{what} y")
    assert_close(x.grad, dx, dtype, what=f"{what} dx")
    if w is not None:
        assert w.grad.dtype == dtype
        assert_close(w.grad, dw, dtype, what=f"{what} dw")
    if b is not None:
        assert_close(b.grad, db, dtype, what=f"{what} db")


def test_layer_norm_only_bias_trainable(device):
    x = torch.randn(8, 130, device=device)
    w = torch.randn(130, device=device)
    b = _leaf(torch.randn(130, device=device))
    y = norms.layer_norm(x, w, b)
    y.backward(torch.ones_like(y))
    assert_close(b.grad, torch.full_like(b, 8.0), torch.float32, what="dbias of ones")


def test_oversized_rows_fall_back_to_reference(device):
    x = torch.randn(1, MAX_FUSED_SIZE + 2, device=device)
    w = torch.randn(MAX_FUSED_SIZE + 2, device=device)
    assert_close(norms.rms_norm(x, w), reference.rms_norm(x, w), torch.float32, what="wide rms")
    assert_close(
        norms.layer_norm(x, w, None),
        reference.layer_norm(x, w, None),
        torch.float32,
        what="wide ln",
    )


def test_registrations_cover_both_ops():
    ops = {entry["op"]: entry for entry in norms.REGISTRATIONS}
    assert set(ops) == {"rms_norm", "layer_norm"}
    assert all(set(e["dtypes"]) == set(DTYPES) for e in ops.values())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape, gemma",
    [
        ((8192, 4096), False),
        ((8192, 4096), True),
        ((4, 2048, 32, 128), False),
        ((2, 4096, 8192), False),
    ],
    ids=["llama-4096", "gemma-4096", "qwen3-per-head", "hidden-8192"],
)
def test_rms_norm_llm_sized(shape, gemma, dtype, device):
    x, w = _inputs(shape, dtype, device)
    y = norms.rms_norm(x, w, 1e-6, gemma=gemma)
    dy = torch.randn_like(y)
    y.backward(dy)
    what = f"rms_norm gemma={gemma} {shape} {dtype}"
    assert_close(
        y, reference.rms_norm(x.detach(), w.detach(), 1e-6, gemma=gemma), dtype, what=f"{what} y"
    )
    _, dx, dw = _rms_fp32_reference(x, w, dy, 1e-6, gemma)
    assert_close(x.grad, dx, dtype, what=f"{what} dx")
    _assert_weight_grad(
        w.grad, dw, dtype, _rows(shape), rounded_per_row=not gemma, what=f"{what} dw"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_llm_sized(dtype, device):
    shape = (8192, 4096)
    x = _leaf(torch.randn(shape, device=device).to(dtype))
    w = _leaf((torch.randn(shape[-1], device=device) * 0.5 + 1).to(dtype))
    b = _leaf(torch.randn(shape[-1], device=device).to(dtype))
    y = norms.layer_norm(x, w, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx, dw, db = _ln_fp32_reference(x, w, b, dy, 1e-5)
    what = f"layer_norm {shape} {dtype}"
    assert_close(y, y_ref, dtype, what=f"{what} y")
    assert_close(x.grad, dx, dtype, what=f"{what} dx")
    assert_close(w.grad, dw, dtype, what=f"{what} dw")
    assert_close(b.grad, db, dtype, what=f"{what} db")
