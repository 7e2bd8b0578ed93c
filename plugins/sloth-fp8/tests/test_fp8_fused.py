"""FP8 layers in sloth's fused LoRA ops (``LoRALinear.base``): the fused projections and
MLP (sloth-kernels' implementations, reached through the op registry of the installed
plugins) run the FP8 products themselves and give what PEFT's LoRA around the same FP8
layers gives, forward and backward (the input's and every adapter's gradient)."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from sloth_fp8 import linear as linear_module
from sloth_fp8.linear import Fp8Linear
from torch import nn

from sloth_core.ops import LoRALinear
from sloth_core.patches import lift_linear


class _Mlp(nn.Module):
    def __init__(self, hidden: int, inter: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _fp8_lora_mlp(hidden: int, inter: int, bias: bool, seed: int, device="cpu",
                  dtype=torch.float32):  # fmt: skip
    torch.manual_seed(seed)
    mlp = _Mlp(hidden, inter, bias).to(device=device, dtype=dtype)
    with torch.no_grad():  # rows of other magnitudes: the row scales differ
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            scale = torch.rand(linear.out_features, 1, device=device) * 4 + 0.05
            linear.weight.mul_(scale.to(dtype))
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, Fp8Linear(getattr(mlp, name)))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(mlp, config, autocast_adapter_dtype=False)
    with torch.no_grad():  # LoRA's B starts at zero: adapters that change the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model


#: sloth-kernels serves CPU tensors only through Triton's interpreter (switched on before
#: Python starts: nox and the README's test command do); a GPU machine's run without it
#: has the CUDA test below instead.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="sloth-kernels runs on the CPU only under TRITON_INTERPRET=1",
)


@pytest.fixture
def fused(installed, monkeypatch):
    """The installed plugins' op registry, sloth-kernels serving every op it implements."""
    monkeypatch.setenv("SLOTH_KERNELS", "sloth-kernels")
    for op in ("lora_mlp", "lora_linear"):
        assert installed.ops.resolve(op, "cpu", torch.float32).provider == "sloth-kernels"
    return installed.ops


def _grads(model, x, out, grad):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(out, [x, *params], grad)


# 64/48: _scaled_mm's shapes (FP8 both ways); 40/24: not multiples of 16 (the dequantized
# fallback inside the FP8 layer).
@needs_interpreter
@pytest.mark.parametrize(("hidden", "inter"), [(64, 48), (40, 24)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fp8_backward", [True, False], ids=["fp8-grad", "dequant-grad"])
def test_the_fused_mlp_runs_fp8_layers_as_peft_does(hidden, inter, bias, fp8_backward, fused,
                                                    monkeypatch):  # fmt: skip
    monkeypatch.setattr(Fp8Linear, "fp8_backward", fp8_backward)
    model = _fp8_lora_mlp(hidden, inter, bias, seed=hidden + bias)
    inner = model.get_base_model()
    layers = [lift_linear(getattr(inner, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    assert all(isinstance(layer, LoRALinear) and layer.base is not None for layer in layers)
    assert all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)

    calls = {"sloth_matmul": 0, "sloth_input_grad": 0}
    for name in calls:  # the fused op, not a fallback to PEFT's path, multiplies
        original = getattr(Fp8Linear, name)

        def counted(self, tensor, *rest, original=original, name=name):
            calls[name] += 1
            return original(self, tensor, *rest)

        monkeypatch.setattr(Fp8Linear, name, counted)
    grouped = []  # the layers gate/up's backward multiplies in one call
    original_grads = Fp8Linear.sloth_input_grads

    def counted_grads(layers, grads):
        grouped.append(len(layers))
        return original_grads(layers, grads)

    monkeypatch.setattr(Fp8Linear, "sloth_input_grads", staticmethod(counted_grads))

    quantized = []  # the inputs each path rounds to e4m3 rows in its forward
    rows = linear_module._quantize_activation_rows

    def counted_rows(flat, *rest):
        quantized.append(flat.shape)
        return rows(flat, *rest)

    monkeypatch.setattr(linear_module, "_quantize_activation_rows", counted_rows)
    x = torch.randn(2, 19, hidden, requires_grad=True)
    want = model(x)
    peft_quantized, quantized[:] = list(quantized), []
    got = fused.lora_mlp(x, *layers, activation="swiglu")
    assert calls == {"sloth_matmul": 3, "sloth_input_grad": 0}
    # gate and up share x's e4m3 rows: made once (PEFT makes them per projection)
    takes = hidden % 16 == 0 and inter % 16 == 0 and linear_module._rowwise("cpu", x.dtype)
    assert len(peft_quantized) == (3 if takes else 0)
    assert quantized == ([(38, hidden), (38, inter)] if takes else [])
    # The FP8 products are the same calls on the same inputs; only the LoRA sums' order
    # differs (fused addmm against PEFT's separate add).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    got_grads, want_grads = _grads(model, x, got, grad), _grads(model, x, want, grad)
    # gate/up's input gradient: one FP8 product over both gradients side by side, rounded
    # to e4m3 per row of the two (PEFT rounds each alone), where FP8 runs both ways;
    # every adapter's gradient is the same.
    joined = takes and fp8_backward
    relative = (got_grads[0] - want_grads[0]).norm() / want_grads[0].norm()
    assert relative < (0.05 if joined else 1e-5)
    for g, w in zip(got_grads[1:], want_grads[1:], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # the fused backward's input gradients: down's, then gate and up's in one call (which
    # runs one per layer where the backward dequantizes)
    assert grouped == [2]
    assert calls["sloth_input_grad"] == (1 if fp8_backward else 3)


@needs_interpreter
def test_the_fused_projections_run_an_fp8_layer_as_peft_does(fused):
    model = _fp8_lora_mlp(64, 48, bias=True, seed=3)
    module = model.get_base_model().gate_proj
    layer = lift_linear(module)
    assert layer is not None and layer.base is module.get_base_layer()
    x = torch.randn(3, 7, 64, requires_grad=True)
    want, got = module(x), fused.lora_linear(x, layer)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    for g, w in zip(_grads(module, x, got, grad), _grads(module, x, want, grad), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # Outputs the fused op updates in place downstream are its own, not views.
    got2 = fused.lora_linear(x, layer)
    got2.add_(1.0)
    got2.sum().backward()
    assert x.grad is not None


@needs_interpreter
def test_a_patched_fp8_model_routes_its_projections_through_the_fused_ops(
    installed, make_tiny_model, monkeypatch
):
    from sloth_core import FastLanguageModel
    from sloth_core.plugins import using_plugin_manager

    monkeypatch.delenv("SLOTH_KERNELS", raising=False)  # sloth-kernels serves the LoRA ops
    calls = []
    original = Fp8Linear.sloth_matmul

    def counted(self, x, *rest):
        calls.append(self)
        return original(self, x, *rest)

    monkeypatch.setattr(Fp8Linear, "sloth_matmul", counted)
    with using_plugin_manager(installed):
        model, tokenizer = FastLanguageModel.from_pretrained(
            str(make_tiny_model("llama")), quantization="fp8", dtype=torch.float32
        )  # fmt: skip
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
        ids = tokenizer(["The quick brown fox."], return_tensors="pt").input_ids
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    # Every FP8 projection of every layer multiplied through the fused ops (the reference
    # path calls the layer's forward, which does not go through sloth_matmul).
    fp8_layers = {id(m) for m in model.modules() if isinstance(m, Fp8Linear)}
    assert {id(m) for m in calls} == fp8_layers
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None for p in lora_b)


def _exact(model, x, grad):
    """The MLP in float32 on the same (dequantized) weights, without the FP8 rounding of
    the activations: ``(out, grads of x and of every adapter)``, what both FP8 paths
    approximate."""
    inner = model.get_base_model()
    xf = x.detach().float().requires_grad_()
    params = []

    def proj(name, t):
        module = getattr(inner, name)
        weight = module.get_base_layer().dense_weight(torch.float32)
        a, b = (getattr(module, n)["default"].weight.detach().float().requires_grad_()
                for n in ("lora_A", "lora_B"))  # fmt: skip
        params.extend([a, b])
        return t @ weight.t() + (t @ a.t()) @ b.t() * module.scaling["default"]

    gate, up = proj("gate_proj", xf), proj("up_proj", xf)
    out = proj("down_proj", nn.functional.silu(gate) * up)
    return out, torch.autograd.grad(out, [xf, *params], grad.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp8_backward", [True, False], ids=["fp8-grad", "dequant-grad"])
def test_the_fused_mlp_runs_fp8_layers_on_the_gpu_as_peft_does(installed, fp8_backward,
                                                               monkeypatch):  # fmt: skip
    # bf16 on CUDA: _scaled_mm's row-wise FP8 kernels, both ways, at a layer's shapes. The
    # activations are rounded to e4m3 (3 mantissa bits), so a bf16 ulp of difference
    # before that rounding (the fused activation's against torch's) can move an element
    # by an e4m3 step: both paths are judged against the float32 computation, the fused
    # one within twice PEFT's own error.
    monkeypatch.setattr(Fp8Linear, "fp8_backward", fp8_backward)
    monkeypatch.delenv("SLOTH_KERNELS", raising=False)
    assert installed.ops.resolve("lora_mlp", "cuda", torch.bfloat16).provider == "sloth-kernels"
    model = _fp8_lora_mlp(512, 1408, bias=False, seed=7, device="cuda", dtype=torch.bfloat16)
    inner = model.get_base_model()
    layers = [lift_linear(getattr(inner, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    assert all(layer is not None and layer.base is not None for layer in layers)
    x = torch.randn(4, 96, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    want = model(x)
    got = installed.ops.lora_mlp(x, *layers, activation="swiglu")
    assert type(got.grad_fn).__name__ == "_LoRAMLPBackward"
    grad = torch.randn_like(want)
    exact, exact_grads = _exact(model, x, grad)

    def error(t, ref):
        return ((t.float() - ref).abs().max() / ref.abs().max()).item()

    fused_grads = _grads(model, x, got, grad)
    peft_grads = _grads(model, x, want, grad)
    named = [("forward", got, want, exact)] + [
        (f"grad {i}", f, p, e)
        for i, (f, p, e) in enumerate(zip(fused_grads, peft_grads, exact_grads, strict=True))
    ]
    for what, fused_t, peft_t, exact_t in named:
        fused_err, peft_err = error(fused_t, exact_t), error(peft_t, exact_t)
        assert fused_err <= 2 * peft_err + 1e-3, (
            f"{what}: fused {fused_err:.4g}, peft {peft_err:.4g}"
        )
