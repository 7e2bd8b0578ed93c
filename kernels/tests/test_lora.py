"""The fused LoRA ops against the torch references and PEFT's own LoRA modules."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES, assert_close
from peft import LoraConfig, inject_adapter_in_model
from sloth_kernels import lora_mlp as lora_mlp_module
from sloth_kernels.lora import lora_linear, lora_o, lora_qkv
from sloth_kernels.lora_mlp import lora_mlp
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from sloth_core.ops import reference
from sloth_core.ops.reference import LoRALinear
from sloth_core.testing.seeds import draw as _draw  # the test's recorded seed, random sizes

bnb_functional = pytest.importorskip("bitsandbytes.functional")

DTYPES = list(TOLERANCES)
MLP_PROJ = ["gate_proj", "up_proj", "down_proj"]
# The brief's odd sizes: hidden 48 + 3, intermediate 100 + 7, N = 5 * 7 tokens.
HIDDEN, INTER, BATCH, SEQ = 51, 107, 5, 7


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    with torch.compiler.set_stance("force_eager"):  # bnb's CPU quantizer compiles per shape
        yield


def _layer(out_f, in_f, dtype, *, r=None, nf4=False, bias=False, nested=False):
    """A LoRALinear on DEVICE: dense or NF4 base (quantized by bnb on the CPU), with an
    adapter of rank ``r`` (non-zero ``lora_B``, as after some training) unless ``r`` is None."""
    weight = torch.randn(out_f, in_f, device=DEVICE) / in_f**0.5
    quant_state = None
    if nf4:  # bnb quantizes where the weight is: on the CPU in CI
        weight, quant_state = bnb_functional.quantize_4bit(
            weight.to(dtype), blocksize=64, compress_statistics=nested, quant_type="nf4"
        )
    layer = LoRALinear(
        weight=weight if nf4 else weight.to(dtype),
        bias=(torch.randn(out_f) * 0.5).to(DEVICE, dtype) if bias else None,
        quant_state=quant_state,
    )
    if r is None:
        return layer
    lora_a = (torch.randn(r, in_f) / in_f**0.5).to(DEVICE, dtype).requires_grad_()
    lora_b = (torch.randn(out_f, r) * 0.3).to(DEVICE, dtype).requires_grad_()
    return replace(layer, lora_A=lora_a, lora_B=lora_b, scaling=16.0 / r)


def _fp32_twin(layer: LoRALinear) -> LoRALinear:
    """The same layer in fp32 (an NF4 base stays packed: its dequantized values are the
    same), with fresh leaves so its gradients are its own."""
    twin = replace(
        layer,
        weight=layer.weight if layer.quant_state is not None else layer.weight.float(),
        bias=None if layer.bias is None else layer.bias.float(),
    )
    if layer.has_lora:
        twin.lora_A = layer.lora_A.detach().float().requires_grad_()
        twin.lora_B = layer.lora_B.detach().float().requires_grad_()
    return twin


def _trainables(layers):
    return [t for layer in layers if layer.has_lora for t in (layer.lora_A, layer.lora_B)]


def _assert_close(actual, expected, dtype, *, what):
    """Per-dtype tolerance, the absolute part relative to the tensor's largest entry.

    Outputs and grads here are sums of many products (over hidden, intermediate or token
    dimensions), so their rounding error scales with the size of the terms, i.e. with the
    tensor's magnitude, not with each (possibly cancelled, near-zero) entry.
    """
    magnitude = max(1.0, expected.abs().max().item())
    assert_close(actual / magnitude, expected / magnitude, dtype, what=what)


def _check(fn, ref_fn, x, layers, dtype, what):
    """Forward and grads of x and every lora_A/lora_B, against the reference in fp32."""
    twins = [_fp32_twin(layer) for layer in layers]
    x_k = x.detach().clone().requires_grad_()
    x_r = x.detach().float().requires_grad_()
    out_k, out_r = fn(x_k, *layers), ref_fn(x_r, *twins)
    outs_k = out_k if isinstance(out_k, tuple) else (out_k,)
    outs_r = out_r if isinstance(out_r, tuple) else (out_r,)
    for i, (a, e) in enumerate(zip(outs_k, outs_r, strict=True)):
        assert a.dtype == dtype and a.shape == e.shape, f"{what} output {i}: {a.dtype} {a.shape}"
        assert type(a.grad_fn).__name__.startswith("_LoRA"), f"{what}: fell back to the reference"
        _assert_close(a, e, dtype, what=f"{what} forward {i}")
    upstream = [torch.randn_like(t) for t in outs_k]
    inputs_k, inputs_r = [x_k, *_trainables(layers)], [x_r, *_trainables(twins)]
    grads_k = torch.autograd.grad(outs_k, inputs_k, upstream)
    grads_r = torch.autograd.grad(outs_r, inputs_r, [g.float() for g in upstream])
    labels = ["x"] + [
        f"layer {i} lora_{ab}" for i, layer in enumerate(layers) if layer.has_lora for ab in "AB"
    ]
    for label, a, e in zip(labels, grads_k, grads_r, strict=True):
        assert a.dtype == dtype, f"{what} grad {label}: {a.dtype}"
        _assert_close(a, e, dtype, what=f"{what} grad {label}")


# -- each op against the reference -----------------------------------------------------------


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_linear(dtype, nf4):
    seed, (r_pick, bias, nested) = _draw((0, 1), (0, 1), (0, 1))
    r = (4, 8)[r_pick]
    layer = _layer(INTER, HIDDEN, dtype, r=r, nf4=nf4, bias=bool(bias), nested=bool(nested))
    x = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE).to(dtype)
    what = f"lora_linear [{INTER}, {HIDDEN}] r={r} nf4={nf4} bias={bias} nested={nested}"
    what += f" {dtype} seed={seed}"
    _check(lora_linear, reference.lora_linear, x, [layer], dtype, what)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_qkv_gqa_with_bias(dtype, nf4):
    # GQA: k and v have fewer heads than q; qwen2-style bias on the three bases.
    seed, (hk, groups, r_pick, d_pick) = _draw((1, 2), (2, 3), (0, 1), (0, 1))
    head_dim = (8, 12)[d_pick]
    r = (4, 8)[r_pick]
    q = _layer(hk * groups * head_dim, HIDDEN, dtype, r=r, nf4=nf4, bias=True)
    k = _layer(hk * head_dim, HIDDEN, dtype, r=8, nf4=nf4, bias=True)
    v = _layer(hk * head_dim, HIDDEN, dtype, r=4, nf4=nf4, bias=True)
    x = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE).to(dtype)
    what = f"lora_qkv hq={hk * groups} hk={hk} D={head_dim} r={r} nf4={nf4} {dtype} seed={seed}"
    _check(lora_qkv, reference.lora_qkv, x, [q, k, v], dtype, what)


def test_lora_qkv_adapter_on_q_and_v_only():
    # PEFT's default targets for Llama are q_proj and v_proj: k has no adapter.
    dtype = torch.float32
    q, v = _layer(24, HIDDEN, dtype, r=4), _layer(8, HIDDEN, dtype, r=8)
    k = _layer(8, HIDDEN, dtype)
    x = torch.randn(BATCH * SEQ, HIDDEN, device=DEVICE)
    _check(lora_qkv, reference.lora_qkv, x, [q, k, v], dtype, "lora_qkv without k adapter")


@pytest.mark.parametrize("op", ["lora_o", "lora_qkv", "lora_linear"])
def test_projections_without_any_adapter_give_dx(op):
    # PEFT on q_proj and v_proj only: o_proj (and a phi3 fused projection) has no adapter,
    # and the input of the op still needs its gradient (the layers below train).
    dtype = torch.float32
    count = 3 if op == "lora_qkv" else 1
    layers = [_layer(8 * (i + 1), HIDDEN, dtype, bias=i == 0) for i in range(count)]
    fn, ref_fn = {"lora_o": (lora_o, reference.lora_o),
                  "lora_qkv": (lora_qkv, reference.lora_qkv),
                  "lora_linear": (lora_linear, reference.lora_linear)}[op]  # fmt: skip
    x = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE, requires_grad=True)
    got = fn(x, *layers)
    got = got if isinstance(got, tuple) else (got,)
    assert type(got[0].grad_fn).__name__.startswith("_LoRA"), "fell back to the reference"
    expected_x = x.detach().clone().requires_grad_()
    expected = ref_fn(expected_x, *layers)
    expected = expected if isinstance(expected, tuple) else (expected,)
    upstream = [torch.randn_like(t) for t in got]
    for a, e in zip(got, expected, strict=True):
        _assert_close(a, e, dtype, what=f"{op} forward")
    (dx,) = torch.autograd.grad(got, [x], upstream)
    (expected_dx,) = torch.autograd.grad(expected, [expected_x], upstream)
    _assert_close(dx, expected_dx, dtype, what=f"{op} dx")


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_o(dtype, nf4):
    seed, (heads, r_pick) = _draw((2, 7), (0, 1))
    r = (4, 8)[r_pick]
    o = _layer(HIDDEN, heads * 8, dtype, r=r, nf4=nf4)
    x = torch.randn(BATCH, SEQ, heads * 8, device=DEVICE).to(dtype)
    what = f"lora_o [{HIDDEN}, {heads * 8}] r={r} nf4={nf4} {dtype} seed={seed}"
    _check(lora_o, reference.lora_o, x, [o], dtype, what)


def _mlp(activation):
    def run(x, gate, up, down):
        return lora_mlp(x, gate, up, down, activation=activation)

    def ref(x, gate, up, down):
        return reference.lora_mlp(x, gate, up, down, activation=activation)

    return run, ref


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu_tanh"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_mlp(dtype, nf4, activation):
    seed, (r_pick, bias, nested) = _draw((0, 1), (0, 1), (0, 1))
    r = (4, 8)[r_pick]
    kw = dict(nf4=nf4, bias=bool(bias), nested=bool(nested))
    gate = _layer(INTER, HIDDEN, dtype, r=r, **kw)
    up = _layer(INTER, HIDDEN, dtype, r=12 - r, **kw)
    down = _layer(HIDDEN, INTER, dtype, r=r, **kw)
    x = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE).to(dtype)
    what = f"lora_mlp {activation} H={HIDDEN} I={INTER} r={r} nf4={nf4} bias={bias}"
    what += f" {dtype} seed={seed}"
    _check(*_mlp(activation), x, [gate, up, down], dtype, what)


@pytest.mark.parametrize("down_r", [None, 4], ids=["no-adapters", "down-only"])
def test_mlp_without_gate_up_adapters_gives_dx(down_r):
    # Attention-only LoRA: the MLP's input still needs its gradient (the layers below
    # train), though gate/up have no adapter and x is not saved for them.
    dtype = torch.float32
    layers = (_layer(INTER, HIDDEN, dtype), _layer(INTER, HIDDEN, dtype),
              _layer(HIDDEN, INTER, dtype, r=down_r))  # fmt: skip
    x = torch.randn(BATCH * SEQ, HIDDEN, device=DEVICE, requires_grad=True)
    out = lora_mlp(x, *layers)
    expected_x = x.detach().clone().requires_grad_()
    expected = reference.lora_mlp(expected_x, *layers)
    _assert_close(out, expected, dtype, what="forward")
    upstream = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, [x], upstream)
    (expected_dx,) = torch.autograd.grad(expected, [expected_x], upstream)
    _assert_close(dx, expected_dx, dtype, what="dx")


def test_grads_of_lora_only_and_frozen_lora_b():
    # x without grad (dx skipped) and one frozen lora_B: the other grads still match.
    dtype = torch.float32
    gate, up, down = (_layer(INTER, HIDDEN, dtype, r=4), _layer(INTER, HIDDEN, dtype, r=8),
                      _layer(HIDDEN, INTER, dtype, r=4))  # fmt: skip
    up.lora_B.requires_grad_(False)
    x = torch.randn(BATCH * SEQ, HIDDEN, device=DEVICE)
    out = lora_mlp(x, gate, up, down)
    expected = reference.lora_mlp(x, gate, up, down)
    _assert_close(out, expected, dtype, what="forward")
    params = [gate.lora_A, gate.lora_B, up.lora_A, down.lora_A, down.lora_B]
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, upstream)
    expected_grads = torch.autograd.grad(expected, params, upstream)
    for i, (a, e) in enumerate(zip(grads, expected_grads, strict=True)):
        _assert_close(a, e, dtype, what=f"grad of trainable {i}")


def test_no_grad_inference_and_inactive_dropout_take_the_fast_path():
    dtype = torch.float32
    q, k, v = (_layer(16, HIDDEN, dtype, r=4) for _ in range(3))
    q.dropout = nn.Dropout(0.0)
    k.dropout = nn.Dropout(0.5).eval()
    x = torch.randn(BATCH * SEQ, HIDDEN, device=DEVICE)
    outs = lora_qkv(x, q, k, v)
    assert all(type(t.grad_fn).__name__ == "_LoRAProjectionsBackward" for t in outs)
    with torch.no_grad():
        for a, e in zip(lora_qkv(x, q, k, v), reference.lora_qkv(x, q, k, v), strict=True):
            _assert_close(a, e, dtype, what="no_grad")
        # Without grad no Function runs (a checkpoint's first pass): the same bits as with.
        assert all(torch.equal(a, b) for a, b in zip(lora_qkv(x, q, k, v), outs, strict=True))
        gate, up = (_layer(INTER, HIDDEN, dtype, r=4) for _ in range(2))
        down = _layer(HIDDEN, INTER, dtype, r=4)
        plain = lora_mlp(x, gate, up, down)
    assert torch.equal(plain, lora_mlp(x, gate, up, down))


def _fell_back(out):
    return not type(out.grad_fn).__name__.startswith("_LoRA")


def test_settings_the_kernel_does_not_serve_use_the_reference():
    x = torch.randn(BATCH * SEQ, HIDDEN, device=DEVICE)

    # Active dropout: the reference, drawing the same masks.
    layer = _layer(INTER, HIDDEN, torch.float32, r=4)
    layer.dropout = nn.Dropout(0.3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        out = lora_linear(x.requires_grad_(), layer)
        torch.manual_seed(1)
        expected = reference.lora_linear(x, layer)
    assert _fell_back(out) and torch.equal(out, expected), "dropout"

    # A trainable base bias, and an FP4 base.
    biased = _layer(INTER, HIDDEN, torch.float32, r=4, bias=True)
    biased.bias.requires_grad_()
    assert _fell_back(lora_o(x, biased)), "trainable bias"
    packed, state = bnb_functional.quantize_4bit(
        torch.randn(INTER, HIDDEN), blocksize=64, quant_type="fp4"
    )
    state.to(DEVICE)
    fp4 = replace(
        _layer(INTER, HIDDEN, torch.float32, r=4), weight=packed.to(DEVICE), quant_state=state
    )
    gate, up, down = (
        fp4,
        _layer(INTER, HIDDEN, torch.float32, r=4),
        _layer(HIDDEN, INTER, torch.float32, r=4),
    )
    out = lora_mlp(x, gate, up, down)
    assert _fell_back(out) and torch.equal(out, reference.lora_mlp(x, gate, up, down)), "fp4"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_on_a_16bit_base_take_the_fused_path(dtype):
    # PEFT keeps adapters in fp32 on 16-bit models (autocast_adapter_dtype): the fused
    # path computes in the input dtype and hands fp32 gradients to the fp32 adapters.
    gate, up = _layer(INTER, HIDDEN, dtype, r=4), _layer(INTER, HIDDEN, dtype, r=4)
    down = _layer(HIDDEN, INTER, dtype, r=4)
    for layer in (gate, up, down):
        layer.lora_A = layer.lora_A.detach().float().requires_grad_()
        layer.lora_B = layer.lora_B.detach().float().requires_grad_()
    x = torch.randn(BATCH * SEQ, HIDDEN, device=DEVICE, dtype=dtype, requires_grad=True)
    out = lora_mlp(x, gate, up, down)
    assert not _fell_back(out)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [x.grad, *(t.grad for layer in (gate, up, down) for t in (layer.lora_A, layer.lora_B))]
    assert all(g.dtype == torch.float32 for g in got[1:]), "adapter grads must stay fp32"
    x32 = x.detach().float().requires_grad_()
    ref_layers = [_fp32_twin(layer) for layer in (gate, up, down)]
    expected = reference.lora_mlp(x32, *ref_layers)
    expected.backward(grad.float())
    want = [x32.grad, *(t.grad for layer in ref_layers for t in (layer.lora_A, layer.lora_B))]
    _assert_close(out, expected, dtype, what="fp32-adapter forward")
    for name, a, e in zip(["x", "gA", "gB", "uA", "uB", "dA", "dB"], got, want, strict=True):
        _assert_close(a.to(e.dtype), e, dtype, what=f"fp32-adapter grad {name}")

    qkv_out = lora_qkv(x.detach(), gate, up, up)
    assert not any(_fell_back(t) for t in qkv_out)


def test_mlp_backward_runs_once_per_forward():
    # The backward overwrites its saved gate/up outputs with their gradients.
    gate, up = _layer(INTER, HIDDEN, torch.float32, r=4), _layer(INTER, HIDDEN, torch.float32, r=4)
    down = _layer(HIDDEN, INTER, torch.float32, r=4)
    out = lora_mlp(torch.randn(3, HIDDEN, device=DEVICE, requires_grad=True), gate, up, down)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        out.sum().backward()


def test_registrations():
    from sloth_kernels import lora
    from sloth_kernels import lora_mlp as mlp_module

    ops = {e["op"]: e["fn"] for e in [*lora.REGISTRATIONS, *mlp_module.REGISTRATIONS]}
    assert ops == {
        "lora_linear": lora_linear,
        "lora_qkv": lora_qkv,
        "lora_o": lora_o,
        "lora_mlp": lora_mlp,
    }


# -- against PEFT's own modules ----------------------------------------------------------------


def _peft(module, targets, r):
    config = LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=targets, lora_dropout=0.0)
    module = inject_adapter_in_model(config, module)
    for name, param in module.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, 0.0, 0.3)  # PEFT initialises lora_B to 0
    return module.to(DEVICE)


def _llama_mlp(r, hidden=HIDDEN, inter=INTER):
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=1,
                         num_key_value_heads=1, head_dim=8, hidden_act="silu")  # fmt: skip
    return _peft(LlamaMLP(config), MLP_PROJ, r)


def test_lora_mlp_matches_peft_llama_mlp():
    seed, (r_pick,) = _draw((0, 1))
    r = (4, 8)[r_pick]
    mlp = _llama_mlp(r)
    layers = [LoRALinear.from_module(getattr(mlp, name)) for name in MLP_PROJ]
    x = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE)
    x_k, x_p = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_k, out_p = lora_mlp(x_k, *layers), mlp(x_p)
    what = f"LlamaMLP+PEFT H={HIDDEN} I={INTER} r={r} seed={seed}"
    assert not _fell_back(out_k), what
    _assert_close(out_k, out_p, torch.float32, what=f"{what} forward")
    names = [n for n, p in mlp.named_parameters() if p.requires_grad]
    params = [p for p in mlp.parameters() if p.requires_grad]
    assert len(params) == 6, what
    upstream = torch.randn_like(out_p)
    grads_k = torch.autograd.grad(out_k, [x_k, *params], upstream)
    grads_p = torch.autograd.grad(out_p, [x_p, *params], upstream)
    for name, a, e in zip(["x", *names], grads_k, grads_p, strict=True):
        _assert_close(a, e, torch.float32, what=f"{what} grad {name}")


# -- what is saved for backward ------------------------------------------------------------------


def _saved_bytes(fn, params):
    """``(all, activations)``: bytes of the distinct storages autograd saves while ``fn``
    runs; ``activations`` leaves out the storages of ``params`` (they exist anyway)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()), sum(n for ptr, n in seen.items() if ptr not in param_storages)


def test_saved_for_backward_mlp_vs_peft():
    r, n = 8, BATCH * SEQ
    mlp = _llama_mlp(r)
    layers = [LoRALinear.from_module(getattr(mlp, name)) for name in MLP_PROJ]
    x = torch.randn(n, HIDDEN, device=DEVICE, requires_grad=True)
    params = list(mlp.parameters())
    peft_all, peft_act = _saved_bytes(lambda: mlp(x), params)
    ours_all, ours_act = _saved_bytes(lambda: lora_mlp(x, *layers), params)
    what = f"saved bytes: kernel {ours_all} ({ours_act} activations), PEFT {peft_all} ({peft_act})"
    # Everything autograd holds (PEFT also saves the three base weights): at most half.
    assert ours_all <= peft_all / 2, what
    # Activations alone: x, gate and up outputs and the [N, r] products, where PEFT also
    # keeps act(gate) and h; (H + 2I) / (H + 4I) is the floor of that ratio, > 1/2.
    assert ours_act == 4 * n * (HIDDEN + 2 * INTER + 3 * r), what
    assert peft_act == 4 * n * (HIDDEN + 4 * INTER + 3 * r), what


def test_saved_for_backward_qkv_vs_peft():
    r, n, hq, hk, head_dim = 8, BATCH * SEQ, 3, 1, 16
    config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=hq, num_key_value_heads=hk,
                         head_dim=head_dim, attention_bias=True)  # fmt: skip
    attn = _peft(LlamaAttention(config, layer_idx=0), ["q_proj", "k_proj", "v_proj"], r)
    layers = [LoRALinear.from_module(getattr(attn, f"{p}_proj")) for p in "qkv"]
    x = torch.randn(n, HIDDEN, device=DEVICE, requires_grad=True)
    params = list(attn.parameters())
    peft_all, peft_act = _saved_bytes(
        lambda: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)), params
    )
    ours_all, ours_act = _saved_bytes(lambda: lora_qkv(x, *layers), params)
    what = f"saved bytes: kernel {ours_all} ({ours_act} activations), PEFT {peft_all} ({peft_act})"
    # PEFT saves x once and the three [N, r] products, and so do we (the products kept
    # rather than made again from x in backward: a GEMM over x less). PEFT's F.linear
    # also keeps a handle on the base weights, we do not.
    assert peft_act == 4 * n * (HIDDEN + 3 * r), what
    assert ours_act == 4 * n * (HIDDEN + 3 * r), what
    lora_bytes = sum(4 * t.numel() for layer in layers for t in (layer.lora_A, layer.lora_B))
    assert ours_all == ours_act + lora_bytes, what


@pytest.mark.parametrize("op", ["mlp", "qkv"])
def test_saved_for_backward_with_nf4_bases_vs_reference(op):
    # The reference (on layers lifted off PEFT modules) keeps each dequantized weight for
    # backward; the kernels dequantize again instead.
    n, dtype = BATCH * SEQ, torch.float32
    if op == "mlp":
        shapes = [(INTER, HIDDEN, False), (INTER, HIDDEN, False), (HIDDEN, INTER, False)]
        fn, ref = lora_mlp, reference.lora_mlp
    else:
        shapes = [(48, HIDDEN, True), (16, HIDDEN, True), (16, HIDDEN, True)]
        fn, ref = lora_qkv, reference.lora_qkv
    layers = [_layer(o, i, dtype, r=8, nf4=True, bias=bias) for o, i, bias in shapes]
    x = torch.randn(n, HIDDEN, device=DEVICE, requires_grad=True)
    params = _trainables(layers)
    _, ref_act = _saved_bytes(lambda: ref(x, *layers), params)
    _, ours_act = _saved_bytes(lambda: fn(x, *layers), params)
    # Beyond the adapters (saved by both): at most half, the dense weights being the gap.
    assert ours_act <= ref_act / 2, f"{op}: kernel saves {ours_act} bytes, reference {ref_act}"


# -- on the GPU, at Llama-3-8B sizes -------------------------------------------------------------


def _peak_bytes(fn, inputs):
    """Peak CUDA memory above the starting point over ``fn`` forward and backward."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, inputs, [torch.ones_like(t) for t in outs])
    del outs, grads
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def _gpu_8b(op, nf4):
    hidden, inter, r, dtype = 4096, 14336, 16, torch.bfloat16
    if op == "mlp":
        layers = [_layer(inter, hidden, dtype, r=r, nf4=nf4, nested=True),
                  _layer(inter, hidden, dtype, r=r, nf4=nf4, nested=True),
                  _layer(hidden, inter, dtype, r=r, nf4=nf4, nested=True)]  # fmt: skip
        fn, ref = lora_mlp, reference.lora_mlp
    else:
        layers = [_layer(4096, hidden, dtype, r=r, nf4=nf4, nested=True),
                  _layer(1024, hidden, dtype, r=r, nf4=nf4, nested=True),
                  _layer(1024, hidden, dtype, r=r, nf4=nf4, nested=True)]  # fmt: skip
        fn, ref = lora_qkv, reference.lora_qkv
    x = torch.randn(4, 2048, hidden, device=DEVICE, dtype=dtype)
    what = f"8B {op} nf4={nf4} x={list(x.shape)} r={r}"
    _check(fn, ref, x, layers, dtype, what)
    x.requires_grad_()
    inputs = [x, *_trainables(layers)]
    ours = _peak_bytes(lambda: fn(x, *layers), inputs)
    theirs = _peak_bytes(lambda: ref(x, *layers), inputs)
    print(f"{what}: peak memory kernel {ours / 2**20:.0f} MiB, reference {theirs / 2**20:.0f} MiB")
    # The MLP keeps two [N, I] buffers where the reference keeps four: strictly less; qkv
    # saves what PEFT saves, its backward only skips temporaries.
    assert ours < theirs if op == "mlp" or nf4 else ours <= theirs, (
        f"{what}: peak {ours} vs reference {theirs}"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True], ids=["bf16", "nf4"])
def test_gpu_8b_lora_mlp(nf4):
    _gpu_8b("mlp", nf4)


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True], ids=["bf16", "nf4"])
def test_gpu_8b_lora_qkv(nf4):
    _gpu_8b("qkv", nf4)


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("down_r", [None, 4], ids=["down-frozen", "down-adapted"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_mlp_without_its_output_value_gives_the_same_gradients(
    dtype, nf4, down_r, chunked, monkeypatch
):
    # output=False (a checkpoint's recompute whose MLP output only feeds the residual):
    # down's product and h are skipped; the output has its shape and the backward is the
    # same (h A_down^T for dB comes from backward's row chunks of h: "chunks" makes them
    # 8 rows, where only rounding may differ from the forward's one product).
    if chunked:
        monkeypatch.setattr(lora_mlp_module, "_H_CHUNK_ELEMENTS", 8 * INTER)
    seed, (r_pick,) = _draw((0, 1))
    r = (4, 8)[r_pick]
    gate, up = (_layer(INTER, HIDDEN, dtype, r=r, nf4=nf4) for _ in range(2))
    layers = (gate, up, _layer(HIDDEN, INTER, dtype, r=down_r, nf4=nf4))
    x = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE).to(dtype)
    upstream = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE).to(dtype)
    grads = {}
    for output in (True, False):
        x_k = x.detach().clone().requires_grad_()
        out = lora_mlp(x_k, *layers, output=output)
        assert out.shape == x.shape and out.dtype == dtype
        assert type(out.grad_fn).__name__.startswith("_LoRA"), "fell back to the reference"
        grads[output] = torch.autograd.grad(out, [x_k, *_trainables(layers)], upstream)
    assert len(grads[True]) == 1 + 4 + (2 if down_r else 0)
    for i, (a, e) in enumerate(zip(grads[False], grads[True], strict=True)):
        if chunked:
            _assert_close(a, e, dtype, what=f"grad {i} seed={seed}")
        else:
            assert torch.equal(a, e), f"grad {i} differs, seed={seed}"
