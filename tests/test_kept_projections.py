"""sloth-kernels' attention projections in an offloaded layer: the first pass keeps the
q/k/v and o outputs with the layer input, and the recompute takes them back instead of
multiplying again. Gradients as without checkpointing (llama; qwen3's q/k norms; gemma2's
softcap and post-attention norm, on configs whose every field is varied), no base
product in any recompute; off (the default until measured on a GPU) they are computed
again."""

from __future__ import annotations

import collections
import os
import sys

import pytest
import sloth_kernels.lora_mlp  # noqa: F401  (bound to group_forward before any spy)
import torch
from peft import LoraConfig, get_peft_model
from sloth_kernels import lora as kernel_lora

from sloth_core.checkpointing import device_checkpoint, offloaded_checkpoint
from sloth_core.memory_plan import measure_layer_costs
from sloth_core.ops import default_registry
from sloth_core.patches import patch_architecture
from sloth_core.testing import init_tiny_model, repeated_step_grads
from sloth_core.testing.varied import varied_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _classes(arch: str) -> dict:
    import importlib

    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    prefix = {"llama": "Llama", "qwen3": "Qwen3", "gemma2": "Gemma2"}[arch]
    classes = {"mlp": getattr(module, f"{prefix}MLP"),
               "attention": getattr(module, f"{prefix}Attention"),
               "rms_norm": getattr(module, f"{prefix}RMSNorm")}  # fmt: skip
    return {**classes, "gemma_norm": arch == "gemma2"}


def _registry(device: str):
    """The reference ops, with sloth-kernels' LoRA projections (plain torch products: no
    Triton, so no interpreter, on the CPU)."""
    ops = default_registry()
    for op in ("lora_qkv", "lora_o", "lora_linear"):
        ops.register(op, getattr(kernel_lora, op), provider="sloth-kernels", devices=(device,))
    return ops


def _model(arch: str, device: str = "cpu", targets=TARGETS, **fields):
    config = varied_config(arch, tie_word_embeddings=False, **fields)
    model = init_tiny_model(config, seed=4).to(device)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    model = get_peft_model(model, lora)
    patch_architecture(model, _registry(device), plugin="test", model_types=arch,
                       **_classes(arch))  # fmt: skip
    return model.train()


def _grads(arch: str, checkpoint, steps: int = 2, device: str = "cpu", **fields):
    model = _model(arch, device, **fields)
    assert sum("lora_A" in n for n, _ in model.named_parameters())  # something trains
    grads = repeated_step_grads(model, checkpoint, steps=steps, device=device)
    return grads, model.config.num_hidden_layers


@pytest.fixture(autouse=True)
def _keep(monkeypatch):
    monkeypatch.setenv("SLOTH_KEEP_PROJECTIONS", "1")


@pytest.fixture
def products(monkeypatch):
    """How many times the projections' forward products ran, per group size (3: q/k/v),
    counting the LoRA projections' own calls only (not ``lora_mlp``'s)."""
    counts: collections.Counter[int] = collections.Counter()
    original = kernel_lora.group_forward

    def counted(x, group, lora):
        if sys._getframe(1).f_code.co_filename == kernel_lora.__file__:
            counts[len(group.layers)] += 1
        return original(x, group, lora)

    monkeypatch.setattr(kernel_lora, "group_forward", counted)
    return counts


def _assert_same(got, want):
    assert len(got) == len(want)
    for step_got, step_want in zip(got, want, strict=True):
        assert step_got.keys() == step_want.keys() and step_got
        for name, grad in step_got.items():
            torch.testing.assert_close(grad, step_want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_the_recompute_multiplies_no_attention_projection(arch, products):
    want, layers = _grads(arch, None)
    assert products == {3: 2 * layers, 1: 2 * layers}  # q/k/v and o, a layer a step
    products.clear()
    got, _ = _grads(arch, offloaded_checkpoint)
    # Only the first pass multiplies; every recompute takes the kept outputs.
    assert products == {3: 2 * layers, 1: 2 * layers}, products
    _assert_same(got, want)


def test_lora_on_q_and_v_only(products):
    # PEFT's usual targets: k and o have no adapter, and o's op has none at all; its
    # input still needs its gradient, kept or recomputed.
    want, layers = _grads("llama", None, targets=["q_proj", "v_proj"])
    products.clear()
    got, _ = _grads("llama", offloaded_checkpoint, targets=["q_proj", "v_proj"])
    assert products == {3: 2 * layers, 1: 2 * layers}, products
    _assert_same(got, want)


def test_switched_off_or_on_the_device_the_recompute_multiplies_again(products, monkeypatch):
    want, layers = _grads("llama", None)
    products.clear()
    got, _ = _grads("llama", device_checkpoint)  # plain checkpointing keeps nothing
    assert products == {3: 4 * layers, 1: 4 * layers}
    _assert_same(got, want)
    monkeypatch.delenv("SLOTH_KEEP_PROJECTIONS")
    products.clear()
    got, _ = _grads("llama", offloaded_checkpoint)
    assert products == {3: 4 * layers, 1: 4 * layers}
    _assert_same(got, want)


def test_past_the_host_limit_the_recompute_multiplies_again(products, monkeypatch):
    from sloth_core import checkpointing

    want, layers = _grads("llama", None)
    monkeypatch.setattr(checkpointing, "_host_limit", 0)  # nothing more may be kept
    products.clear()
    got, _ = _grads("llama", offloaded_checkpoint)
    assert products == {3: 4 * layers, 1: 4 * layers}
    _assert_same(got, want)


@pytest.mark.parametrize("caught_up", [True, False])
def test_while_the_copies_lag_by_more_than_a_layer_nothing_more_is_kept(caught_up, products,
                                                                      monkeypatch):  # fmt: skip
    # A GPU's copies to host run on their own stream; here every copy reports itself
    # still running (or done). From the third layer on, a layer whose layer-two-before
    # has copies in flight keeps nothing: its recompute multiplies again.
    from sloth_core import checkpointing

    class Copy:
        def query(self):
            return caught_up

    offload = checkpointing._Slot._offload

    def offload_in_flight(self, t):
        host = offload(self, t)
        self.last_copy = Copy()
        return host

    want, layers = _grads("llama", None, num_hidden_layers=4)
    monkeypatch.setattr(checkpointing._Slot, "_offload", offload_in_flight)
    products.clear()
    got, _ = _grads("llama", offloaded_checkpoint, num_hidden_layers=4)
    recomputed = 0 if caught_up else layers - 2
    assert products == {3: 2 * (layers + recomputed), 1: 2 * (layers + recomputed)}, products
    _assert_same(got, want)


def test_the_memory_plan_counts_the_kept_projections(monkeypatch):
    model = _model("llama")
    config = model.config
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    costs = measure_layer_costs(model, ids)
    monkeypatch.delenv("SLOTH_KEEP_PROJECTIONS")
    without = measure_layer_costs(model, ids)
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_token = (q + 2 * kv + config.hidden_size) * 4  # the float32 q, k, v and o outputs
    assert len(costs) == len(without) == config.num_hidden_layers
    for cost, base in zip(costs, without, strict=True):
        extra = cost.kept_host_bytes_per_token - base.kept_host_bytes_per_token
        assert extra == per_token
        assert cost.kept_device_bytes_per_token == base.kept_device_bytes_per_token


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keeps_through_the_copy_stream(products):
    # On a GPU the kept outputs go to pinned host memory on a side stream and come back
    # ahead of the recompute: any missed wait reads a block before its copy lands.
    want, layers = _grads("llama", None, device="cuda")
    products.clear()
    got, _ = _grads("llama", offloaded_checkpoint, device="cuda")
    assert products == {3: 2 * layers, 1: 2 * layers}, products
    _assert_same(got, want)


_TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


@pytest.mark.skipif(not _TRITON, reason="NF4 bases dequantize through Triton (on the CPU: "
                                         "its interpreter)")  # fmt: skip
def test_qlora_recompute_dequantizes_no_attention_weight(make_tiny_model, products, monkeypatch):
    # NF4 bases (sloth-bnb, loaded as users load them): the kept outputs stand in for the
    # dequantized products too, with the same gradients.
    from sloth_core import FastLanguageModel

    path = make_tiny_model("llama", hidden_size=64, intermediate_size=128)
    results = {}
    for keep in ("0", "1"):
        monkeypatch.setenv("SLOTH_KEEP_PROJECTIONS", keep)
        model, tokenizer = FastLanguageModel.from_pretrained(str(path), quantization="nf4",
                                                             dtype=torch.float32)  # fmt: skip
        model = FastLanguageModel.get_peft_model(
            model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            init_lora_weights=False,
        )  # fmt: skip
        assert any(getattr(m, "quant_state", None) is not None
                   for m in model.modules() if hasattr(m, "weight"))  # fmt: skip
        products.clear()
        grads = repeated_step_grads(model, offloaded_checkpoint, steps=1)
        results[keep] = (dict(products), grads)
    layers = model.config.num_hidden_layers
    assert results["0"][0] == {3: 2 * layers, 1: 2 * layers}
    assert results["1"][0] == {3: layers, 1: layers}  # the first pass only
    _assert_same(results["1"][1], results["0"][1])
