"""sloth-fp8's layers in sloth-kernels' fused MLP: gate's and up's adapters added in the
gated kernels (``sloth_kernels.gated_lora``), the FP8 products being unable to take them
in their GEMMs' epilogues. Against the same MLP adding them by ``addmm_``
(``SLOTH_GATED_LORA=0``): the same output and every gradient."""

from __future__ import annotations

import os

import pytest
import sloth_kernels.lora_mlp as lora_mlp_module
import torch
from peft import LoraConfig, get_peft_model
from sloth_fp8.linear import Fp8Linear
from torch import nn

from sloth_core.patches import lift_linear
from sloth_core.testing import installed_manager

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="sloth-kernels runs on the CPU only under TRITON_INTERPRET=1",
)
NAMES = ("gate_proj", "up_proj", "down_proj")


def _fp8_mlp(hidden: int, inter: int, seed: int) -> nn.Module:
    """A gated MLP whose three projections are FP8 layers (rows of unlike magnitudes),
    under PEFT's LoRA with nonzero B."""
    torch.manual_seed(seed)
    mlp = nn.Module()
    for name, (n_in, n_out) in zip(NAMES, [(hidden, inter)] * 2 + [(inter, hidden)], strict=True):
        linear = nn.Linear(n_in, n_out, bias=True)
        with torch.no_grad():
            linear.weight.mul_(torch.rand(n_out, 1) * 4 + 0.05)
        setattr(mlp, name, Fp8Linear(linear))
    model = get_peft_model(mlp, LoraConfig(r=4, lora_alpha=8, target_modules=list(NAMES)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("output", [True, False], ids=["output", "recompute"])
def test_gate_and_up_adapters_are_added_in_the_gated_kernels(output, monkeypatch):
    """The forward, the backward and the backward's row chunks of ``h`` (for down's
    adapter, which a forward with ``output=False`` leaves to it) add the adapters; the
    results equal the ``addmm_`` path's within the order of float32 sums."""
    ops = installed_manager("sloth-fp8", "sloth-llama").ops
    monkeypatch.setenv("SLOTH_KERNELS", "sloth-kernels")
    assert ops.resolve("lora_mlp", "cpu", torch.float32).provider == "sloth-kernels"
    monkeypatch.setattr(lora_mlp_module, "_H_CHUNK_ELEMENTS", 5 * 48)  # h in chunks of 5 rows
    calls = []
    for name in ("gated_lora_forward", "gated_lora_backward_inplace"):
        original = getattr(lora_mlp_module, name)

        def counted(*args, original=original, name=name, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(lora_mlp_module, name, counted)
    model = _fp8_mlp(64, 48, seed=11)
    layers = [lift_linear(getattr(model.get_base_model(), n)) for n in NAMES]
    assert all(layer is not None and layer.base is not None for layer in layers)
    params = [p for p in model.parameters() if p.requires_grad]
    x, grad = torch.randn(2, 13, 64), torch.randn(2, 13, 64)
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(lora_mlp_module.GATED_LORA_ENV, setting)
        calls.clear()
        x_k = x.clone().requires_grad_()
        out = ops.lora_mlp(x_k, *layers, activation="swiglu", output=output)
        results[setting] = (out, *torch.autograd.grad(out, [x_k, *params], grad))
        chunks = 6  # 26 rows of h in 5s, for down's dB (recompute) or dA
        forward = ["gated_lora_forward"] if output else []
        want = [*forward, *["gated_lora_forward"] * chunks, "gated_lora_backward_inplace"]
        assert sorted(calls) == (sorted(want) if setting == "1" else [])
    deferred, added = results["1"], results["0"]
    assert len(deferred) == 2 + 6  # out, dx, and A and B of gate, up and down
    for i, (got, want) in enumerate(zip(deferred, added, strict=True)):
        if output or i:  # output=False: an output whose values are not computed
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"result {i}")
