"""The gated-activation references against transformers' ACT2FN, fp32, fwd + bwd."""

import pytest
import torch
from _helpers import assert_close as _assert_close
from _helpers import draw as _draw
from transformers.activations import ACT2FN

from sloth_core.ops.reference import geglu, swiglu

CASES = {
    # op name -> (reference, transformers hidden_act it replaces)
    "swiglu": (swiglu, "silu"),
    "geglu": (lambda g, u: geglu(g, u), "gelu"),
    "geglu_tanh": (lambda g, u: geglu(g, u, approximate="tanh"), "gelu_pytorch_tanh"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gated_activation_matches_act2fn(case):
    fn, hidden_act = CASES[case]
    act = ACT2FN[hidden_act]
    seed, (n, i) = _draw((1, 37), (1, 200))
    gate, up = torch.randn(n, i) * 3, torch.randn(n, i)
    g_ref, u_ref = gate.clone().requires_grad_(), up.clone().requires_grad_()
    g_hf, u_hf = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out_ref, out_hf = fn(g_ref, u_ref), act(g_hf) * u_hf
    what = f"{case} vs ACT2FN[{hidden_act!r}] shape={[n, i]} seed={seed}"
    _assert_close(out_ref, out_hf, f"{what} forward")
    upstream = torch.randn_like(out_hf)
    for name, a, e in zip(
        ("gate", "up"),
        torch.autograd.grad(out_ref, [g_ref, u_ref], upstream),
        torch.autograd.grad(out_hf, [g_hf, u_hf], upstream),
        strict=True,
    ):
        _assert_close(a, e, f"{what} grad {name}")


def test_geglu_tanh_differs_from_exact():
    # Guards against the two approximations collapsing into one path.
    gate = torch.linspace(-4, 4, 101)
    up = torch.ones_like(gate)
    assert not torch.allclose(geglu(gate, up), geglu(gate, up, "tanh"), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="approximate"):
        geglu(gate, up, "sigmoid")


def test_swiglu_keeps_input_dtype():
    gate = torch.randn(3, 8, dtype=torch.bfloat16)
    up = torch.randn(3, 8, dtype=torch.bfloat16)
    out = swiglu(gate, up)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ACT2FN["silu"](gate) * up)
