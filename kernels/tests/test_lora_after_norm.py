"""LoRA ops fed by ``rms_norm``: they keep the norm's input instead of its output.

The norm's backward keeps its input ``x`` anyway, so a LoRA op that needs its own input
``y = rms_norm(x)`` for the adapter gradients saves ``x`` and the norm weight and
recomputes ``y`` in backward (same kernel, same bits); ``y`` itself is saved by no one.
Checked here: gradients bitwise equal to the same kernels without the shortcut, and
equal to the references within tolerance; the norm output's storage is not saved; an
output changed in place after the norm takes the ordinary path.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES, assert_close
from sloth_kernels.lora import lora_linear, lora_qkv
from sloth_kernels.lora_mlp import lora_mlp
from sloth_kernels.norms import norm_source, rms_norm

from sloth_core.ops import reference
from sloth_core.ops.reference import LoRALinear

HIDDEN, INTER, ROWS = 51, 107, 5 * 7


def _layer(out_f, in_f, dtype, r=4):
    weight = (torch.randn(out_f, in_f) / in_f**0.5).to(DEVICE, dtype)
    lora_a = (torch.randn(r, in_f) / in_f**0.5).to(DEVICE, dtype).requires_grad_()
    lora_b = (torch.randn(out_f, r) * 0.3).to(DEVICE, dtype).requires_grad_()
    return LoRALinear(weight=weight, lora_A=lora_a, lora_B=lora_b, scaling=2.0)


def _fresh(layers):
    return [
        replace(
            layer,
            lora_A=layer.lora_A.detach().clone().requires_grad_(),
            lora_B=layer.lora_B.detach().clone().requires_grad_(),
        )
        for layer in layers
    ]


def _ops(name):
    if name == "lora_qkv":
        return lora_qkv, reference.lora_qkv, (INTER, 24, 24)
    if name == "lora_linear":
        return lora_linear, reference.lora_linear, (INTER,)
    return (
        lambda x, *ls: lora_mlp(x, *ls, activation="swiglu"),
        lambda x, *ls: reference.lora_mlp(x, *ls, activation="swiglu"),
        (INTER, INTER, HIDDEN),
    )


def _run(norm, op, x, weight, layers, grads, *, detach_norm_output=False):
    """Forward + backward of op(norm(x)); returns outputs, grads and the saved storages."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = norm(x, weight, 1e-6)
        if detach_norm_output:  # the same values through an ordinary op: no shortcut
            y = y * 1
        out = op(y, *layers)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grads)
    tensors = [x.grad, weight.grad] + [
        t.grad for layer in layers for t in (layer.lora_A, layer.lora_B)
    ]
    return outs, tensors, saved, y


@pytest.mark.parametrize("name", ["lora_qkv", "lora_mlp", "lora_linear"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_lora_after_norm_recomputes_the_norm_output(name, dtype, seed):
    what = f"{name} {dtype} seed={seed}"  # inputs from the test's recorded seed (conftest)
    kernel, ref, outs = _ops(name)
    layers = (
        [_layer(o, HIDDEN, dtype) for o in outs]
        if name != "lora_mlp"
        else [
            _layer(INTER, HIDDEN, dtype),
            _layer(INTER, HIDDEN, dtype),
            _layer(HIDDEN, INTER, dtype),
        ]
    )
    x = torch.randn(5, 7, HIDDEN, device=DEVICE).to(dtype)
    weight = (1 + 0.1 * torch.randn(HIDDEN, device=DEVICE)).to(dtype)
    out_dims = [layer.weight.shape[0] for layer in layers] if name != "lora_mlp" else [HIDDEN]
    grads = [torch.randn(5, 7, d, device=DEVICE).to(dtype) for d in out_dims]

    fast_out, fast, saved, y = _run(rms_norm, kernel, x, weight, _fresh(layers), grads)
    assert y.untyped_storage().data_ptr() not in saved, what  # the norm output is kept by no one
    plain_out, plain, _, _ = _run(rms_norm, kernel, x, weight, _fresh(layers), grads,
                                  detach_norm_output=True)  # fmt: skip
    for a, b in zip([*fast_out, *fast], [*plain_out, *plain], strict=True):
        assert torch.equal(a, b), what  # the recomputed input gives the very same bits

    # Bitwise equal to the kernels without the shortcut, whose own tests cover half
    # precision against the references; the chain against the references in fp32 here.
    if dtype != torch.float32:
        return
    ref_layers = [replace(layer, weight=layer.weight.float(),
                          lora_A=layer.lora_A.detach().float().requires_grad_(),
                          lora_B=layer.lora_B.detach().float().requires_grad_())
                  for layer in layers]  # fmt: skip
    ref_out, ref_grads, _, _ = _run(reference.rms_norm, ref, x.float(), weight.float(), ref_layers,
                                    [g.float() for g in grads])  # fmt: skip
    for a, b in zip([*fast_out, *fast], [*ref_out, *ref_grads], strict=True):
        # the absolute part relative to the tensor's largest entry, as in test_lora.py
        assert_close(
            a, b.to(a.dtype), dtype, scale=max(1.0, float(b.detach().abs().max())), what=what
        )


def test_only_an_untouched_norm_output_takes_the_shortcut():
    x = torch.randn(ROWS, HIDDEN, device=DEVICE, requires_grad=True)
    weight = torch.ones(HIDDEN, device=DEVICE)
    y = rms_norm(x, weight, 1e-6)
    assert norm_source(y) is not None
    assert norm_source(y.clone()) is None and norm_source(y * 2) is None
    with torch.no_grad():
        y.mul_(2)  # the version moves
    assert norm_source(y) is None
    with torch.no_grad():
        assert norm_source(rms_norm(x, weight, 1e-6)) is None  # no graph, nothing to save
