"""SwiGLU / GeGLU kernels against the torch references, forward and backward."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, assert_close
from sloth_kernels import activations

from sloth_core.ops import reference

# (op name, kernel, reference, keyword arguments)
OPS = [
    ("swiglu", activations.swiglu, reference.swiglu, {}),
    ("geglu", activations.geglu, reference.geglu, {"approximate": "none"}),
    ("geglu-tanh", activations.geglu, reference.geglu, {"approximate": "tanh"}),
]
SHAPES = [(5, 123), (3, 7, 333), (2049,)]


def _inputs(shape, dtype, device):
    # Scale 3: reaches the saturated tails of silu/gelu as well as the curved middle.
    gate = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    up = torch.randn(shape, device=device).to(dtype).requires_grad_()
    return gate, up


def _fp32_reference(ref, gate, up, grad, kwargs):
    gate32 = gate.detach().float().requires_grad_()
    up32 = up.detach().float().requires_grad_()
    out = ref(gate32, up32, **kwargs)
    out.backward(grad.float())
    return out, gate32.grad, up32.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name, op, ref, kwargs", OPS, ids=[o[0] for o in OPS])
def test_forward_backward_match_reference(name, op, ref, kwargs, shape, dtype, device):
    gate, up = _inputs(shape, dtype, device)
    out = op(gate, up, **kwargs)
    grad = torch.randn_like(out)
    out.backward(grad)
    what = f"{name} {shape} {dtype}"
    assert out.shape == gate.shape and out.dtype == dtype, what
    # The forward is compared with the reference in the input dtype (what HF computes,
    # the activation rounded before the product) and the gradients with fp32 autograd.
    assert_close(out, ref(gate.detach(), up.detach(), **kwargs), dtype, what=f"{what} out")
    _, dgate, dup = _fp32_reference(ref, gate, up, grad, kwargs)
    assert_close(gate.grad, dgate, dtype, what=f"{what} dgate")
    assert_close(up.grad, dup, dtype, what=f"{what} dup")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["swiglu", "none", "tanh"])
def test_plain_functions_and_inplace_backward(act, dtype, device):
    """The launchers the fused LoRA MLP uses: forward, backward, and in-place backward."""
    shape = (37, 257)
    gate, up = (t.detach() for t in _inputs(shape, dtype, device))
    grad = torch.randn(shape, device=device).to(dtype)
    if act == "swiglu":
        ref, kwargs = reference.swiglu, {}
        forward, backward = activations.swiglu_forward, activations.swiglu_backward
    else:
        ref, kwargs = reference.geglu, {"approximate": act}
        forward = lambda g, u: activations.geglu_forward(g, u, act)
        backward = lambda d, g, u, **kw: activations.geglu_backward(d, g, u, act, **kw)
    what = f"{act} {shape} {dtype}"
    assert_close(forward(gate, up), ref(gate, up, **kwargs), dtype, what=f"{what} forward")

    _, dgate_ref, dup_ref = _fp32_reference(ref, gate, up, grad, kwargs)
    gate_before, up_before = gate.clone(), up.clone()
    dgate, dup = backward(grad, gate, up)
    assert torch.equal(gate, gate_before) and torch.equal(up, up_before), f"{what}: inputs modified"
    assert_close(dgate, dgate_ref, dtype, what=f"{what} dgate")
    assert_close(dup, dup_ref, dtype, what=f"{what} dup")

    dgate_in, dup_in = backward(grad, gate, up, inplace=True)
    assert dgate_in.data_ptr() == gate.data_ptr() and dup_in.data_ptr() == up.data_ptr(), what
    assert torch.equal(dgate_in, dgate) and torch.equal(dup_in, dup), f"{what}: inplace differs"


def test_only_one_input_requires_grad(device):
    gate = torch.randn(4, 96, device=device).requires_grad_()
    up = torch.randn(4, 96, device=device)
    out = activations.swiglu(gate, up)
    out.sum().backward()
    gate32 = gate.detach().requires_grad_()
    reference.swiglu(gate32, up).sum().backward()
    assert_close(gate.grad, gate32.grad, torch.float32, what="dgate with up constant")


def test_broadcast_and_mixed_dtypes_fall_back_to_reference(device):
    gate = torch.randn(3, 5, 64, device=device)
    up = torch.randn(64, device=device)
    expected = reference.swiglu(gate, up)
    assert_close(activations.swiglu(gate, up), expected, torch.float32, what="broadcast up")
    mixed = activations.geglu(gate, torch.randn(3, 5, 64, device=device).half(), "tanh")
    assert mixed.dtype == torch.float32, "mixed dtypes promote like torch"


def test_bad_approximate_raises(device):
    gate = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="approximate"):
        activations.geglu(gate, gate, approximate="sigmoid")


def test_registrations_cover_both_ops():
    ops = {entry["op"]: entry for entry in activations.REGISTRATIONS}
    assert set(ops) == {"swiglu", "geglu"}
    assert all(set(e["dtypes"]) == set(DTYPES) for e in ops.values())
    assert ops["swiglu"]["fn"] is activations.swiglu and ops["geglu"]["fn"] is activations.geglu


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, op, ref, kwargs", OPS, ids=[o[0] for o in OPS])
def test_llm_sized(name, op, ref, kwargs, dtype, device):
    shape = (8192, 14336)  # Llama-3-8B's intermediate size at 8192 tokens
    gate, up = _inputs(shape, dtype, device)
    out = op(gate, up, **kwargs)
    grad = torch.randn_like(out)
    out.backward(grad)
    what = f"{name} {shape} {dtype}"
    assert_close(out, ref(gate.detach(), up.detach(), **kwargs), dtype, what=f"{what} out")
    _, dgate, dup = _fp32_reference(ref, gate, up, grad, kwargs)
    assert_close(gate.grad, dgate, dtype, what=f"{what} dgate")
    assert_close(up.grad, dup, dtype, what=f"{what} dup")
