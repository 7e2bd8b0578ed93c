"""FP8 base weights on the CPU (``torch._scaled_mm`` runs there too): the row-wise
quantization, the FP8 matmul against the dequantized weight, the backward, LoRA on an
FP8 model through ``FastLanguageModel`` and its merged export, and a LoRA fine-tune that
ends within 1% of the 16-bit model's eval loss."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fp8_helpers import train_losses
from sloth_fp8.linear import (
    FP8_MAX,
    Fp8Linear,
    dequantize_rows,
    fp8_group_matmul_grad,
    quantize_rows,
    transposed,
)

from sloth_core import FastLanguageModel
from sloth_core.plugins import using_plugin_manager
from sloth_core.sdk.merge import merged_state_dict


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape", [(48, 80), (33, 17)])
def test_rows_round_trip_within_e4m3s_step(shape):
    weight = torch.randn(shape) * torch.rand(shape[0], 1) * 4  # rows of other magnitudes
    values, scales = quantize_rows(weight)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (shape[0],)
    back = dequantize_rows(values, scales, torch.float32)
    # e4m3 keeps 3 mantissa bits: within 1/16 of each value, and of the row's max near 0.
    step = weight.abs() / 16 + scales[:, None] * FP8_MAX / 2**9
    assert ((back - weight).abs() <= step).all()


@pytest.mark.parametrize("shape", [(48, 80), (33, 17), (1, 129)])
def test_transposed_weight_is_the_exact_transpose(shape):
    """The backward's transposed copy (compiled on CUDA, where that path is tested) holds
    the same bytes as torch's own transpose, on odd shapes too."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    values, _ = quantize_rows(torch.randn(shape, device=device))
    out = transposed(values)
    assert out.dtype == values.dtype and out.shape == shape[::-1] and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), values.view(torch.uint8).t())


@pytest.mark.parametrize(("k", "outs"), [(64, (48, 16, 16)), (48, (32, 96)), (33, (17, 48))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_group_of_input_gradients_in_one_product(k, outs, dtype):
    """``sum_i g_i W_i`` of the layers of one input (q/k/v, gate/up) as one FP8 product of
    the gradients side by side: within e4m3's rounding of the exact sum, and no further
    from it than a product each. The one row scale spans every part's ``g_i`` times its
    weight's row scales, what each adds to the sum: a part rounded far below it adds
    little to the sum either. Where a layer does not take FP8, the sum of their own
    backward products, exactly."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = [torch.randn(n, k, device=device) * (torch.rand(n, 1, device=device) * 4 + 0.05)
               for n in outs]  # fmt: skip
    quantized = [quantize_rows(w) for w in weights]
    values, scales = [q[0] for q in quantized], [q[1] for q in quantized]
    grads = [torch.randn(3, 29, n, device=device, dtype=dtype) for n in outs]
    got = fp8_group_matmul_grad(grads, values, scales)
    assert got.shape == (3, 29, k) and got.dtype == dtype
    exact = sum(g.float() @ dequantize_rows(v, s, torch.float32)
                for g, v, s in zip(grads, values, scales, strict=True))  # fmt: skip
    layers = []
    for w in weights:
        linear = torch.nn.Linear(k, w.shape[0], bias=False, device=device)
        linear.weight.data.copy_(w)
        layers.append(Fp8Linear(linear))
    each = sum(layer.sloth_input_grad(g) for layer, g in zip(layers, grads, strict=True))
    if k % 16 or any(n % 16 for n in outs):  # a shape _scaled_mm refuses: the sum itself
        torch.testing.assert_close(got, each, rtol=0, atol=0)
    else:
        assert _rel(each, exact) < 0.05
        assert _rel(got, exact) < 1.25 * _rel(each, exact)
    assert torch.equal(Fp8Linear.sloth_input_grads(layers, grads), got)


@pytest.mark.parametrize(("tokens", "k", "n"), [(37, 64, 48), (5, 33, 17)])  # fp8 / fallback
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8_backward", [True, False], ids=["fp8-grad", "dequant-grad"])
def test_matmul_and_its_backward(tokens, k, n, dtype, fp8_backward, monkeypatch):
    # On a GPU machine on CUDA: the compiled quantizations and cuBLAS's FP8 GEMMs held to
    # the exact product by the same bounds (the fused ops' GPU test compares them with
    # PEFT's path, which runs the same products).
    monkeypatch.setattr(Fp8Linear, "fp8_backward", fp8_backward)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    linear = torch.nn.Linear(k, n, bias=True).to(device=device, dtype=dtype)
    with torch.no_grad():  # rows of other magnitudes: the row scales differ
        linear.weight.mul_(torch.rand(n, 1, device=device, dtype=dtype) * 4 + 0.05)
    layer = Fp8Linear(linear)
    x = torch.randn(2, tokens, k, device=device, dtype=dtype, requires_grad=True)
    dense = layer.dense_weight(torch.float32)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, tokens, n)
    expected = x.detach().float() @ dense.t() + linear.bias.detach().float()
    # Per-token e4m3 inputs (the fp8 path) cost about 2% of the product; the fallback
    # multiplies the dequantized weight (bf16 rounding only).
    assert _rel(out, expected) < (0.05 if k % 16 == 0 and n % 16 == 0 else 0.01)
    grad = torch.randn_like(out)
    out.backward(grad)
    want = grad.float() @ dense
    fp8 = k % 16 == 0 and n % 16 == 0
    # The FP8 gradient: per-row e4m3 of grad x the row scales, about 2% like the forward.
    bound = 0.05 if fp8 and fp8_backward else 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(x.grad, want) < bound
    assert not layer.weight.requires_grad and layer.weight.grad is None


@pytest.mark.parametrize(("setting", "want"), [(None, True), ("1", True), ("0", False)])
def test_the_environment_sets_the_backward(setting, want):
    """``SLOTH_FP8_BACKWARD=0`` before the import: the input's gradient through the
    dequantized weight (a bench's ``sloth[SLOTH_FP8_BACKWARD=0]`` A/B); a fresh Python, as
    a bench's process is."""
    env = {k: v for k, v in os.environ.items() if k != "SLOTH_FP8_BACKWARD"}
    if setting is not None:
        env["SLOTH_FP8_BACKWARD"] = setting
    code = "from sloth_fp8.linear import Fp8Linear; print(Fp8Linear.fp8_backward)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == str(want)


def test_lora_on_an_fp8_model_trains_and_merges(installed, make_tiny_model, monkeypatch):
    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    with using_plugin_manager(installed):
        model, tokenizer = FastLanguageModel.from_pretrained(
            str(make_tiny_model("llama")), quantization="fp8", dtype=torch.float32
        )  # fmt: skip
        fp8 = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
        assert len(fp8) == 7 * model.config.num_hidden_layers  # q k v o gate up down
        assert not isinstance(model.lm_head, Fp8Linear)
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
        batch = tokenizer(["The quick brown fox jumps over the lazy dog."] * 2,
                          return_tensors="pt")  # fmt: skip
        losses = train_losses(model, batch)
        assert losses[-1] < losses[0]
        merged = merged_state_dict(model)
    plain = {k for k in merged if "weight_scale" in k or "lora_" in k}
    assert not plain  # dequantized and merged: the plain model's keys only
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    delta = layer.get_delta_weight("default").float()
    want = layer.base_layer.dense_weight(torch.float32) + delta
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"].float(), want)


@pytest.mark.parametrize("on_gpu", [
    False,
    pytest.param(True, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")]),
])  # fmt: skip
def test_a_200_step_fine_tune_ends_within_1pc_of_the_16_bit_one(installed, tmp_path, monkeypatch,
                                                                on_gpu):  # fmt: skip
    """The issue's quality bar: the same seed, data and steps, the base in FP8 or not. On
    the CPU in float32 with the op references; on a GPU as it trains there: bf16, the
    fused kernels, the inputs and gradients through ``_scaled_mm`` in e4m3."""
    if not on_gpu:
        # The op references: 400 steps of interpreted Triton kernels would take many minutes.
        monkeypatch.setenv("SLOTH_KERNELS", "torch")
    from sloth_core.testing import datasets, tiny_model
    from sloth_core.testing.models import pretrain
    from sloth_core.train import TrainConfig, train

    # A small model trained a little first: a random one's flat logits say nothing.
    path = tiny_model("llama", tmp_path / "model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(path),
        AutoTokenizer.from_pretrained(path),
    )
    lines = [row["output"] for row in datasets.load_tiny_instructions()]
    data = Path(datasets.__file__).parent / "data" / "tiny_instructions.jsonl"
    pretrain(model, tokenizer, lines, steps=60, batch_size=8, window=32, learning_rate=3e-3)
    model.save_pretrained(path)
    losses = {}
    for quantization in ("", "fp8"):
        config = TrainConfig.from_mapping({
            "model_name": str(path), "dataset": str(data),
            "output_dir": str(tmp_path / (quantization or "16bit")), "quantization": quantization,
            "eval_fraction": 0.2, "max_steps": 200, "per_device_train_batch_size": 4,
            "learning_rate": 2e-3, "max_seq_length": 64, "seed": 3, "save_method": "none",
            "gradient_checkpointing": "off", "report_to": "none",
            "dtype": "bf16" if on_gpu else "fp32",
        })  # fmt: skip
        with using_plugin_manager(installed):
            losses[quantization] = train(config, show_progress=False).eval_after["eval_loss"]
    assert losses["fp8"] == pytest.approx(losses[""], rel=0.01), losses
