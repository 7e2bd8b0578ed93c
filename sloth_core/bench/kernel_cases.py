"""Benchmark cases of the named ops: inputs at LLM shapes, forward + backward, bytes moved.

Each case builds its inputs once and runs one implementation of its op (forward and, where
the op trains, backward), so that the registry's choice, the eager reference and
``torch.compile`` of the reference are timed on the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sloth_core.ops import ExpertLinear, LoRALinear
from sloth_core.ops.reference import moe_route


@dataclass
class Shapes:
    """Sizes of the benchmark (defaults: Llama 3.1 8B, 8192 tokens)."""

    tokens: int = 8192
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    rank: int = 16
    # The MoE layer of Qwen3-30B-A3B (its own hidden size; its token count is ``tokens``).
    moe_hidden: int = 2048
    experts: int = 128
    top_k: int = 8
    moe_intermediate: int = 768
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"


@dataclass
class Case:
    """One op at one shape: ``run(fn)`` does forward (+ backward) with implementation fn."""

    name: str
    op: str
    run: Callable[[Callable[..., Any]], Any]
    min_bytes: int | None = None  # the least a fused fwd+bwd must read and write
    params: list[torch.Tensor] = field(default_factory=list)  # weights: not activations
    #: Further systems to time with the op's signature, e.g. a library's own function.
    baselines: dict[str, Callable[..., Any]] = field(default_factory=dict)
    #: ``from_norm(fn, producer, phase)``: the op fed by ``producer(x)`` as in a decoder
    #: layer (``phase[0]`` says which call runs), for :func:`saved_bytes_after_norm`.
    from_norm: Callable[..., Any] | None = None
    #: What feeds the op in a decoder layer: ``"rms_norm"`` (q/k/v, MLP) or ``"sdpa"`` (o).
    producer: str | None = None


def _rand(shape, shapes: Shapes, grad: bool = False, scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(shape, dtype=shapes.dtype, device=shapes.device) * scale
    return t.requires_grad_(grad)


def _backward(out: Any, grads: Any) -> None:
    outs = out if isinstance(out, tuple) else (out,)
    gs = grads if isinstance(grads, tuple) else (grads,)
    torch.autograd.backward(outs, gs)


def _elementwise_case(name, op, inputs, grads, kwargs, min_bytes) -> Case:
    def run(fn):
        for t in inputs:
            t.grad = None
        out = fn(*inputs, **kwargs)
        _backward(out, grads)
        return out

    return Case(name, op, run, min_bytes)


def rms_norm_case(s: Shapes, *, gemma: bool = False) -> Case:
    x = _rand((s.tokens, s.hidden), s, grad=True)
    w = _rand((s.hidden,), s, grad=True)
    dy = _rand((s.tokens, s.hidden), s)
    size = x.element_size()
    # read x, write y; backward reads dy and x, writes dx (weight-sized terms are noise)
    min_bytes = 5 * x.numel() * size
    name = "rms_norm_gemma" if gemma else "rms_norm"
    return _elementwise_case(name, "rms_norm", (x, w), dy, {"eps": 1e-6, "gemma": gemma}, min_bytes)


def layer_norm_case(s: Shapes) -> Case:
    x = _rand((s.tokens, s.hidden), s, grad=True)
    w, b = _rand((s.hidden,), s, grad=True), _rand((s.hidden,), s, grad=True)
    dy = _rand((s.tokens, s.hidden), s)
    return _elementwise_case(
        "layer_norm", "layer_norm", (x, w, b), dy, {"eps": 1e-5}, 5 * x.numel() * x.element_size()
    )


def rope_case(s: Shapes) -> Case:
    batch = max(1, s.tokens // 2048)
    seq = s.tokens // batch
    q = _rand((batch, s.heads, seq, s.head_dim), s, grad=True)
    k = _rand((batch, s.kv_heads, seq, s.head_dim), s, grad=True)
    angles = torch.arange(seq, device=s.device, dtype=torch.float32)[:, None] * torch.rand(
        s.head_dim // 2, device=s.device
    )
    emb = torch.cat([angles, angles], dim=-1)[None].expand(batch, -1, -1)
    cos, sin = emb.cos().to(s.dtype), emb.sin().to(s.dtype)
    grads = (_rand(q.shape, s), _rand(k.shape, s))
    # read q, k; write both; backward reads and writes the same again
    min_bytes = 4 * (q.numel() + k.numel()) * q.element_size()
    return _elementwise_case("rope", "rope", (q, k, cos, sin), grads, {}, min_bytes)


def gated_case(s: Shapes, op: str, **kwargs: Any) -> Case:
    gate = _rand((s.tokens, s.intermediate), s, grad=True)
    up = _rand((s.tokens, s.intermediate), s, grad=True)
    dh = _rand((s.tokens, s.intermediate), s)
    # read gate, up; write h; backward reads dh, gate, up and writes dgate, dup
    min_bytes = 8 * gate.numel() * gate.element_size()
    name = op if not kwargs else f"{op}_{kwargs['approximate']}"
    return _elementwise_case(name, op, (gate, up), dh, kwargs, min_bytes)


def _lora_layer(s: Shapes, out_features: int, in_features: int, quantized: bool) -> LoRALinear:
    weight = _rand((out_features, in_features), s, scale=in_features**-0.5)
    quant_state = None
    if quantized:
        import bitsandbytes.functional as bnbf

        weight, quant_state = bnbf.quantize_4bit(
            weight, quant_type="nf4", compress_statistics=True, blocksize=64
        )
    return LoRALinear(
        weight=weight,
        lora_A=_rand((s.rank, in_features), s, grad=True, scale=in_features**-0.5),
        lora_B=_rand((out_features, s.rank), s, grad=True, scale=0.01),
        scaling=1.0,
        quant_state=quant_state,
    )


def _layer_params(*layers: LoRALinear) -> list[torch.Tensor]:
    params = []
    for layer in layers:
        params += [
            t for t in (layer.weight, layer.lora_A, layer.lora_B, layer.bias) if t is not None
        ]
        if layer.quant_state is not None:
            params.append(layer.quant_state.absmax)
    return params


def _lora_case(name, op, x, layers, grads, kwargs, *, producer: str | None = None) -> Case:
    lora = [t for layer in layers for t in (layer.lora_A, layer.lora_B)]
    norm_weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)

    def run(fn):
        for t in (x, *lora):
            t.grad = None
        out = fn(x, *layers, **kwargs)
        _backward(out, grads)
        return out

    def from_norm(fn, norm, phase):
        for t in (x, *lora):
            t.grad = None
        phase[0] = "norm"
        if producer == "sdpa":  # x as attention's output: [tokens, heads * head_dim]
            y = sdpa_output(x)
        else:
            y = norm(x, norm_weight, 1e-6, gemma=False)
        phase[0] = "op"
        out = fn(y, *layers, **kwargs)
        _backward(out, grads)
        return out

    params = [*_layer_params(*layers), norm_weight]
    return Case(name, op, run, None, params, from_norm=from_norm if producer else None,
                producer=producer)  # fmt: skip


_SDPA_HEAD_DIM = 128


def sdpa_output(x: torch.Tensor) -> torch.Tensor:
    """``[tokens, H * D]`` from SDPA with ``x`` as q, k and v, laid out as the patched
    attention hands it to ``o_proj`` (transformers' layout: no copy where SDPA writes
    ``[B, S, H, D]``)."""
    tokens, width = x.shape
    heads = max(1, width // _SDPA_HEAD_DIM)
    q = x.view(1, tokens, heads, width // heads).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    return out.transpose(1, 2).contiguous().view(tokens, width)


def lora_mlp_case(s: Shapes, quantized: bool = False) -> Case:
    x = _rand((s.tokens, s.hidden), s, grad=True)
    layers = (
        _lora_layer(s, s.intermediate, s.hidden, quantized),
        _lora_layer(s, s.intermediate, s.hidden, quantized),
        _lora_layer(s, s.hidden, s.intermediate, quantized),
    )
    name = "lora_mlp_nf4" if quantized else "lora_mlp"
    return _lora_case(name, "lora_mlp", x, layers, _rand(x.shape, s), {"activation": "swiglu"},
                      producer="rms_norm")  # fmt: skip


def lora_qkv_case(s: Shapes, quantized: bool = False) -> Case:
    x = _rand((s.tokens, s.hidden), s, grad=True)
    q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
    q = _lora_layer(s, q_out, s.hidden, quantized)
    k = _lora_layer(s, kv_out, s.hidden, quantized)
    v = _lora_layer(s, kv_out, s.hidden, quantized)
    grads = tuple(_rand((s.tokens, layer_out), s) for layer_out in (q_out, kv_out, kv_out))
    name = "lora_qkv_nf4" if quantized else "lora_qkv"
    return _lora_case(name, "lora_qkv", x, (q, k, v), grads, {}, producer="rms_norm")


def lora_o_case(s: Shapes, quantized: bool = False) -> Case:
    x = _rand((s.tokens, s.heads * s.head_dim), s, grad=True)
    o = _lora_layer(s, s.hidden, s.heads * s.head_dim, quantized)
    name = "lora_o_nf4" if quantized else "lora_o"
    return _lora_case(name, "lora_o", x, (o,), _rand((s.tokens, s.hidden), s), {},
                      producer="sdpa")  # fmt: skip


def flce_case(s: Shapes) -> Case:
    hidden = _rand((s.tokens, s.hidden), s, grad=True)
    weight = _rand((s.vocab, s.hidden), s, scale=s.hidden**-0.5)  # frozen lm_head (LoRA)
    labels = torch.randint(0, s.vocab, (s.tokens,), device=s.device)
    labels[::7] = -100

    def run(fn):
        hidden.grad = None
        loss = fn(hidden, weight, labels)
        loss.backward()
        return loss

    return Case("fused_linear_cross_entropy", "fused_linear_cross_entropy", run, None, [weight],
                {"torch_unfused": unfused_linear_cross_entropy})  # fmt: skip


def unfused_linear_cross_entropy(hidden, weight, labels, **_: Any) -> torch.Tensor:
    """What a plain training step does: the full logits, upcast, then cross entropy."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)


def token_log_probs_case(s: Shapes) -> Case:
    """A preference loss's log-probs: frozen lm_head, a gradient per token (DPO's signs)."""
    hidden = _rand((s.tokens, s.hidden), s, grad=True)
    weight = _rand((s.vocab, s.hidden), s, scale=s.hidden**-0.5)
    labels = torch.randint(0, s.vocab, (s.tokens,), device=s.device)
    labels[::7] = -100
    upstream = torch.randn(s.tokens, device=s.device)

    def run(fn):
        hidden.grad = None
        out = fn(hidden, weight, labels)
        out.backward(upstream)
        return out

    return Case("token_log_probs", "token_log_probs", run, None, [weight],
                {"torch_unfused": unfused_token_log_probs})  # fmt: skip


def unfused_token_log_probs(hidden, weight, labels, **_: Any) -> torch.Tensor:
    """What TRL computes: the full logits, upcast, log_softmax, the labels' entries."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    valid = labels != -100
    targets = torch.where(valid, labels, 0).unsqueeze(-1)
    return torch.where(valid, logits.log_softmax(-1).gather(-1, targets).squeeze(-1), 0.0)


def dequantize_case(s: Shapes) -> Case:
    import bitsandbytes.functional as bnbf

    weight = _rand((s.hidden, s.intermediate), s)
    data, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    out_bytes = weight.numel() * weight.element_size()
    min_bytes = out_bytes + data.numel() * data.element_size()
    return Case("dequantize_nf4", "dequantize_nf4", lambda fn: fn(data, state), min_bytes,
                baselines={"bitsandbytes": bnb_dequantize})  # fmt: skip


def bnb_dequantize(data: torch.Tensor, quant_state: Any, **_: Any) -> torch.Tensor:
    """bitsandbytes' own dequantization, as a baseline with the op's signature."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(data, quant_state)


def _expert_layer(s: Shapes, out_features: int, in_features: int) -> ExpertLinear:
    """A frozen expert stack with a trainable per-expert LoRA of rank ``s.rank``."""
    shape = (s.experts, out_features, in_features)
    return ExpertLinear(
        weight=_rand(shape, s, scale=in_features**-0.5),
        lora_A=_rand((s.experts, s.rank, in_features), s, grad=True, scale=in_features**-0.5),
        lora_B=_rand((s.experts, out_features, s.rank), s, grad=True, scale=0.01),
    )


def moe_experts_case(s: Shapes) -> Case:
    """The routed experts of one MoE layer with LoRA on every expert, forward + backward."""
    x = _rand((s.tokens, s.moe_hidden), s, grad=True)
    logits = torch.randn(s.tokens, s.experts, device=s.device)
    weights, index = moe_route(logits, s.top_k, normalize=True)
    weights.requires_grad_()
    gate_up = _expert_layer(s, 2 * s.moe_intermediate, s.moe_hidden)
    down = _expert_layer(s, s.moe_hidden, s.moe_intermediate)
    lora = [t for layer in (gate_up, down) for t in (layer.lora_A, layer.lora_B) if t is not None]
    dy = _rand(x.shape, s)

    def run(fn):
        for t in (x, weights, *lora):
            t.grad = None
        out = fn(x, index, weights, gate_up, down)
        out.backward(dy)
        return out

    params = [gate_up.weight, down.weight, *lora]
    return Case("moe_experts", "moe_experts", run, None, params)


def saved_activation_bytes(case: Case, fn: Callable[..., Any]) -> int:
    """Bytes of distinct storages autograd saves for backward, weights not counted."""
    skip = {p.untyped_storage().data_ptr() for p in case.params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        case.run(fn)
    return sum(seen.values())


def saved_bytes_after_norm(case: Case, fn: Callable[..., Any], norm: Callable[..., Any]) -> int:
    """Bytes the op adds to what the op feeding it in a decoder layer saves for backward.

    The q/k/v projections and the MLP read an ``rms_norm``'s output (whose backward keeps
    the norm's input), ``o_proj`` reads SDPA's output (whose backward keeps that output).
    Counted: distinct storages the op saves that its producer did not, weights excluded.
    """
    skip = {p.untyped_storage().data_ptr() for p in case.params}
    phase = ["norm"]
    seen: dict[str, dict[int, int]] = {"norm": {}, "op": {}}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[phase[0]][storage.data_ptr()] = storage.nbytes()
        return t

    assert case.from_norm is not None  # the caller checks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        case.from_norm(fn, norm, phase)
    return sum(n for ptr, n in seen["op"].items() if ptr not in seen["norm"])


def all_cases(s: Shapes, *, nf4: bool) -> list[tuple[str, Callable[[], Case]]]:
    """Every benchmark case at shapes ``s`` as ``(name, build)``, built one at a time so
    only one case's tensors live on the device; NF4 cases only with bitsandbytes."""
    builders: list[tuple[str, Callable[[], Case]]] = [
        ("rms_norm", lambda: rms_norm_case(s)),
        ("rms_norm_gemma", lambda: rms_norm_case(s, gemma=True)),
        ("layer_norm", lambda: layer_norm_case(s)),
        ("rope", lambda: rope_case(s)),
        ("swiglu", lambda: gated_case(s, "swiglu")),
        ("geglu_none", lambda: gated_case(s, "geglu", approximate="none")),
        ("geglu_tanh", lambda: gated_case(s, "geglu", approximate="tanh")),
        ("lora_mlp", lambda: lora_mlp_case(s)),
        ("lora_qkv", lambda: lora_qkv_case(s)),
        ("lora_o", lambda: lora_o_case(s)),
        ("fused_linear_cross_entropy", lambda: flce_case(s)),
        ("token_log_probs", lambda: token_log_probs_case(s)),
        ("moe_experts", lambda: moe_experts_case(s)),
    ]
    if nf4:
        builders += [
            ("lora_mlp_nf4", lambda: lora_mlp_case(s, True)),
            ("lora_qkv_nf4", lambda: lora_qkv_case(s, True)),
            ("lora_o_nf4", lambda: lora_o_case(s, True)),
            ("dequantize_nf4", lambda: dequantize_case(s)),
        ]
    return builders
