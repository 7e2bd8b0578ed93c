"""The LoRA references against Hugging Face MLPs/attention projections wrapped by PEFT."""

import pytest
import torch
from _helpers import assert_close as _assert_close
from _helpers import draw as _draw
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import GemmaConfig, LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from sloth_core.ops.reference import LoRALinear, lora_linear, lora_mlp, lora_o, lora_qkv

MLP_PROJ = ["gate_proj", "up_proj", "down_proj"]


def _add_lora(module, targets, r, dropout=0.0):
    """PEFT LoRA on ``targets`` with a random, non-zero ``lora_B`` (PEFT inits it to 0)."""
    config = LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=targets, lora_dropout=dropout)
    module = inject_adapter_in_model(config, module)
    for name, param in module.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, 0.0, 0.3)
    return module


def _compare_grads(out_ref, out_hf, inputs_ref, inputs_hf, params, what):
    """Grads of the inputs and the trainable ``params`` under one random upstream grad."""
    outs_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    outs_hf = out_hf if isinstance(out_hf, tuple) else (out_hf,)
    upstream = [torch.randn_like(t) for t in outs_hf]
    names, trainable = zip(*params, strict=True)
    grads_ref = torch.autograd.grad(outs_ref, [*inputs_ref, *trainable], upstream)
    grads_hf = torch.autograd.grad(outs_hf, [*inputs_hf, *trainable], upstream)
    labels = [f"input {i}" for i in range(len(inputs_ref))] + list(names)
    assert len(grads_ref) > len(inputs_ref), f"{what}: no trainable parameter was checked"
    for label, g_ref, g_hf in zip(labels, grads_ref, grads_hf, strict=True):
        _assert_close(g_ref, g_hf, f"{what} grad {label}")


def _tiny_mlp(kind, hidden, inter, bias):
    if kind == "llama":
        config = LlamaConfig(
            hidden_size=hidden, intermediate_size=inter, num_attention_heads=1,
            num_key_value_heads=1, head_dim=8, hidden_act="silu", mlp_bias=bias,
        )  # fmt: skip
        return LlamaMLP(config), "swiglu"
    config = GemmaConfig(
        hidden_size=hidden, intermediate_size=inter, num_attention_heads=1,
        num_key_value_heads=1, head_dim=8, hidden_act="gelu_pytorch_tanh",
    )  # fmt: skip
    return GemmaMLP(config), "geglu_tanh"


@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_lora_mlp_matches_hf_mlp(kind, with_lora):
    seed, (b, s, hidden, inter, r, bias) = _draw((1, 3), (1, 13), (3, 48), (3, 80), (1, 8), (0, 1))
    mlp, activation = _tiny_mlp(kind, hidden, inter, bool(bias))
    if with_lora:
        mlp = _add_lora(mlp, MLP_PROJ, r)
    layers = [LoRALinear.from_module(getattr(mlp, name)) for name in MLP_PROJ]
    assert all(layer.has_lora == with_lora for layer in layers)
    x = torch.randn(b, s, hidden)
    x_ref, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_hf = mlp(x_hf)
    out_ref = lora_mlp(x_ref, *layers, activation=activation)
    what = f"{kind} mlp lora={with_lora} x={[b, s, hidden]} inter={inter} r={r} seed={seed}"
    _assert_close(out_ref, out_hf, f"{what} forward")
    params = [(n, p) for n, p in mlp.named_parameters() if p.requires_grad]
    _compare_grads(out_ref, out_hf, [x_ref], [x_hf], params, what)


def test_lora_mlp_dropout_draws_the_same_masks_as_peft():
    seed, (n, hidden, inter, r) = _draw((2, 9), (4, 32), (4, 48), (1, 6))
    mlp = _add_lora(_tiny_mlp("llama", hidden, inter, False)[0], MLP_PROJ, r, dropout=0.3)
    layers = [LoRALinear.from_module(getattr(mlp, name)) for name in MLP_PROJ]
    assert all(isinstance(layer.dropout, nn.Dropout) for layer in layers)
    x = torch.randn(n, hidden)
    x_ref, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    mask_seed = int(torch.randint(0, 2**31, ()).item())
    with torch.random.fork_rng():
        torch.manual_seed(mask_seed)
        out_hf = mlp(x_hf)
        torch.manual_seed(mask_seed)
        out_ref = lora_mlp(x_ref, *layers)
        torch.manual_seed(mask_seed + 1)
        other_masks = lora_mlp(x, *layers)
    what = f"llama mlp dropout x={[n, hidden]} I={inter} r={r} seed={seed} mask_seed={mask_seed}"
    _assert_close(out_ref, out_hf, f"{what} forward")
    assert not torch.allclose(other_masks, out_hf.detach()), f"{what}: dropout had no effect"
    params = [(n, p) for n, p in mlp.named_parameters() if p.requires_grad]
    _compare_grads(out_ref, out_hf, [x_ref], [x_hf], params, what)


def test_lora_qkv_and_o_match_peft_attention_projections():
    seed, (b, s, hk, groups, half, width, r) = _draw(
        (1, 3), (1, 11), (1, 3), (1, 3), (2, 8), (1, 9), (1, 8)
    )
    # hidden_size need not be heads * head_dim: the projections must not assume it.
    hq, head_dim = hk * groups, 2 * half
    config = LlamaConfig(
        hidden_size=hq * width, num_attention_heads=hq, num_key_value_heads=hk,
        head_dim=head_dim, attention_bias=True,
    )  # fmt: skip
    attn = _add_lora(LlamaAttention(config, layer_idx=0), [f"{p}_proj" for p in "qkvo"], r)
    q, k, v, o = (LoRALinear.from_module(getattr(attn, f"{p}_proj")) for p in "qkvo")
    assert q.bias is not None and q.has_lora
    what = f"attn hq={hq} hk={hk} D={head_dim} x={[b, s, config.hidden_size]} r={r} seed={seed}"
    params = [(n, p) for n, p in attn.named_parameters() if p.requires_grad]

    x = torch.randn(b, s, config.hidden_size)
    x_ref, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = lora_qkv(x_ref, q, k, v)
    out_hf = (attn.q_proj(x_hf), attn.k_proj(x_hf), attn.v_proj(x_hf))
    for name, a, e in zip("qkv", out_ref, out_hf, strict=True):
        _assert_close(a, e, f"{what} {name}_proj forward")
    qkv_params = [p for p in params if "o_proj" not in p[0]]
    _compare_grads(out_ref, out_hf, [x_ref], [x_hf], qkv_params, what)

    y = torch.randn(b, s, hq * head_dim)
    y_ref, y_hf = y.clone().requires_grad_(), y.clone().requires_grad_()
    o_ref, o_hf = lora_o(y_ref, o), attn.o_proj(y_hf)
    _assert_close(o_ref, o_hf, f"{what} o_proj forward")
    _compare_grads(o_ref, o_hf, [y_ref], [y_hf], [p for p in params if "o_proj" in p[0]], what)


@torch.compiler.set_stance("force_eager")  # bnb's CPU path would torch.compile per shape
def test_lora_linear_on_a_bitsandbytes_4bit_base():
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    # An odd in_features keeps bnb 0.50's CPU dequantize on its pure-torch path (its C
    # kernel disagrees with the quantizer's layout for some even row lengths).
    seed, (n, half_in, out_features, r) = _draw((1, 9), (3, 40), (2, 50), (1, 6))
    in_features = 2 * half_in + 1
    base = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32)
    base = base.to("cpu")  # quantizes
    nn.init.normal_(base.bias)
    config = LoraConfig(r=r, lora_alpha=16)
    layer_hf = LoraLinear4bit(base, "default", config=config, r=r, lora_alpha=16)
    nn.init.normal_(layer_hf.lora_B["default"].weight, 0.0, 0.3)
    layer = LoRALinear.from_module(layer_hf)
    what = f"4-bit base [{out_features}, {in_features}] x=[{n}, {in_features}] r={r} seed={seed}"
    assert layer.quant_state is base.weight.quant_state and layer.has_lora, what
    expected_weight = dequantize_4bit(base.weight.data, base.weight.quant_state)
    assert torch.equal(layer.dense_weight(), expected_weight), f"{what}: dense_weight"

    x = torch.randn(n, in_features)
    x_ref, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_hf = lora_linear(x_ref, layer), layer_hf(x_hf)
    _assert_close(out_ref, out_hf, f"{what} forward")
    params = [(n, p) for n, p in layer_hf.named_parameters() if "lora_" in n]
    _compare_grads(out_ref, out_hf, [x_ref], [x_hf], params, what)


def test_from_module_plain_linear_and_disabled_adapters():
    linear = nn.Linear(6, 4)
    layer = LoRALinear.from_module(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias and not layer.has_lora
    x = torch.randn(3, 6)
    assert torch.equal(lora_linear(x, layer), linear(x))

    holder = _add_lora(nn.Sequential(nn.Linear(6, 4)), ["0"], r=2)
    holder[0].enable_adapters(False)
    layer = LoRALinear.from_module(holder[0])
    assert not layer.has_lora, "a disabled adapter must not be applied"
    assert torch.equal(lora_linear(x, layer), holder(x))


def _peft_linear(**lora_kwargs):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["0"], **lora_kwargs)
    return inject_adapter_in_model(config, nn.Sequential(nn.Linear(6, 4)))[0]


def test_from_module_rejects_what_is_not_plain_lora():
    with pytest.raises(ValueError, match="DoRA"):
        LoRALinear.from_module(_peft_linear(use_dora=True))
    with pytest.raises(ValueError, match="bias on lora_B"):
        LoRALinear.from_module(_peft_linear(lora_bias=True))

    merged = _peft_linear()
    merged.merge()
    with pytest.raises(ValueError, match="merged"):
        LoRALinear.from_module(merged)

    several = _peft_linear()
    several.update_layer("second", 2, lora_alpha=4, config=LoraConfig(r=2, lora_alpha=4))
    several.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="several active"):
        LoRALinear.from_module(several)


def test_lora_mlp_rejects_unknown_activation():
    layer = LoRALinear(weight=torch.randn(4, 4))
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(torch.randn(2, 4), layer, layer, layer, activation="relu")
