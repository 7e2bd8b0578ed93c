"""The grouped-GEMM MoE experts against the torch reference: forward and every gradient."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from kernel_helpers import DEVICE, FP32_FLOOR, HAS_CUDA, LOWP_FACTOR, TOLERANCES, assert_close
from sloth_kernels import moe
from sloth_kernels.moe import moe_experts

from sloth_core.ops import reference
from sloth_core.ops.reference import ExpertLinear
from sloth_core.testing.moe_routing import uneven_routing
from sloth_core.testing.rounding import assert_near_fp32
from sloth_core.testing.seeds import draw

#: (activation, gate_up_layout, bias, [E, in, out] storage as gpt-oss) per architecture.
KINDS = {
    "qwen3_moe": ("swiglu", "halves", False, False),
    "gpt_oss": ("gpt_oss", "interleaved", True, True),
}
#: No model's, but the kernels take each choice on its own: the other pairing of each.
MIXED = {
    "mixed": ("gpt_oss", "halves", True, False),
    "mixed_t": ("swiglu", "interleaved", False, True),
}


def _layer(experts, out_f, in_f, *, r, bias, transposed, frozen):
    """An ExpertLinear of leaves on DEVICE (fp32); ``transposed`` stores ``[E, in, out]``."""
    shape = (experts, in_f, out_f) if transposed else (experts, out_f, in_f)
    weight = (torch.randn(shape) / in_f**0.5).to(DEVICE).requires_grad_(not frozen)
    leaves = [weight]
    layer = ExpertLinear(weight.transpose(1, 2) if transposed else weight, scaling=1.5)
    if bias:
        layer.bias = (torch.randn(experts, out_f) * 0.5).to(DEVICE).requires_grad_()
        leaves.append(layer.bias)
    if r:
        layer.lora_A = (torch.randn(experts, r, in_f) / in_f**0.5).to(DEVICE).requires_grad_()
        layer.lora_B = (torch.randn(experts, out_f, r) * 0.3).to(DEVICE).requires_grad_()
        leaves += [layer.lora_A, layer.lora_B]
    return layer, [t for t in leaves if t.requires_grad]


#: The bf16 bound for the expert GEMMs: on a GPU LOWP_FACTOR; in Triton's CPU interpreter,
#: which truncates fp32 -> bf16, the LoRA gradients' error came out at 2-4x torch's with a
#: tail past 4x in about 1 run in 60 (rank-2 adapters: each gradient element is a sum of
#: a few rounded x A^T values), so 6x there.
MOE_LOWP_FACTOR = LOWP_FACTOR if HAS_CUDA else 6.0


def _problem(kind, lora, tokens=(2, 9), ranks=(1, 5), align=1, sizes=None):
    """A random problem; ``sizes``: ``(tokens, hidden, inter, top_k, extra experts, r)``
    fixed instead of drawn (the values still are)."""
    bounds = (tokens, (5, 40), (3, 30), (1, 3), (0, 2), ranks)
    seed, drawn = draw(*bounds)
    tokens, hidden, inter, top_k, extra, r = sizes or drawn
    # ``align``: sizes rounded up to a multiple (CUDA's grouped GEMM takes 16-byte rows).
    hidden, inter = (-(-n // align) * align for n in (hidden, inter))
    activation, layout, bias, transposed = {**KINDS, **MIXED}[kind]
    experts = top_k + 3 + extra  # 4 .. 8
    opts = dict(r=r if lora else 0, bias=bias, transposed=transposed, frozen=lora)
    gate_up, leaves_gu = _layer(experts, 2 * inter, hidden, **opts)
    down, leaves_down = _layer(experts, hidden, inter, **opts)
    index, weights = uneven_routing(tokens, experts, top_k)
    x = torch.randn(tokens, hidden, device=DEVICE).requires_grad_()
    weights = weights.to(DEVICE).requires_grad_()
    kwargs = dict(activation=activation, gate_up_layout=layout, alpha=1.3, limit=1.5)
    sizes = f"T={tokens} H={hidden} I={inter} E={experts} k={top_k} r={r}"
    what = f"{kind} lora={lora} {sizes} seed={seed}"
    inputs = [x, weights, *leaves_gu, *leaves_down]
    return (x, index.to(DEVICE), weights, gate_up, down), kwargs, inputs, what


def _run(fn, args, kwargs, inputs, upstream=None):
    out = fn(*args, **kwargs)
    upstream = torch.randn_like(out) if upstream is None else upstream
    return out, torch.autograd.grad(out, inputs, upstream), upstream


def _cast(args, inputs, dtype, lora_dtype=None):
    """The same problem with every float leaf cast to ``dtype`` (fresh leaves), the adapters
    to ``lora_dtype`` where given (PEFT keeps them in fp32 beside bf16 weights)."""
    wanted = {id(t) for t in inputs}
    mapping: dict[int, torch.Tensor] = {}

    def conv(t, to=dtype):
        if t is None or not t.is_floating_point():
            return t
        if id(t) not in wanted:  # a frozen tensor (or a passing view: ids are reused)
            return t.detach().to(to)
        if id(t) not in mapping:
            mapping[id(t)] = t.detach().to(to).requires_grad_()
        return mapping[id(t)]

    def conv_layer(layer):
        weight = layer.weight
        base = weight.transpose(1, 2) if not weight.is_contiguous() else weight
        new_base = conv(base)
        return ExpertLinear(
            new_base.transpose(1, 2) if base is not weight else new_base,
            conv(layer.bias),
            conv(layer.lora_A, lora_dtype or dtype),
            conv(layer.lora_B, lora_dtype or dtype),
            layer.scaling,
        )

    x, index, weights, gate_up, down = args
    new_args = (conv(x), index, conv(weights), conv_layer(gate_up), conv_layer(down))
    return new_args, [mapping[id(t)] for t in inputs]


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_moe_experts_matches_reference_fp32(kind, lora):
    args, kwargs, inputs, what = _problem(kind, lora)
    out, grads, upstream = _run(moe_experts, args, kwargs, inputs)
    ref_out, ref_grads, _ = _run(reference.moe_experts, args, kwargs, inputs, upstream)
    assert_close(out, ref_out, torch.float32, what=f"{what} forward")
    per_layer = (2 if lora else 1) + KINDS[kind][2]  # LoRA (base frozen) or base, bias
    assert len(grads) == 2 + 2 * per_layer
    for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(g, ref, torch.float32, scale=4, what=f"{what} grad {i}")


def _grouped_mm_calls(monkeypatch, gemm):
    """``SLOTH_MOE_GEMM=gemm`` for the test; the calls of the grouped-GEMM base products."""
    monkeypatch.setenv("SLOTH_MOE_GEMM", gemm)
    calls = []
    real = moe._grouped_mm_base
    monkeypatch.setattr(moe, "_grouped_mm_base", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("kind", [*KINDS, *MIXED])
def test_moe_experts_through_grouped_mm_fp32(kind, monkeypatch):
    """``SLOTH_MOE_GEMM=grouped_mm``: the four base products (gate_up, down, dH', dX) through
    ``torch._grouped_mm`` and the rest in the kernels after them, as the reference computes.
    CUDA's grouped GEMM is bf16 only: there fp32 stays on the Triton GEMMs."""
    calls = _grouped_mm_calls(monkeypatch, "grouped_mm")
    args, kwargs, inputs, what = _problem(kind, True, align=8)
    out, grads, upstream = _run(moe_experts, args, kwargs, inputs)
    ref_out, ref_grads, _ = _run(reference.moe_experts, args, kwargs, inputs, upstream)
    assert len(calls) == (0 if HAS_CUDA else 4)
    assert_close(out, ref_out, torch.float32, what=f"{what} forward")
    for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(g, ref, torch.float32, scale=4, what=f"{what} grad {i}")


@pytest.mark.parametrize("gemm", ["triton", "grouped_mm"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_moe_experts_without_its_output_value_gives_the_same_gradients(kind, gemm, monkeypatch):
    """``output=False`` (a checkpoint's recompute whose block output only feeds the residual
    add): the down products are skipped, the result has its shape and the gradients are
    those of the full call (equal up to the bias sums' atomic adds on CUDA)."""
    calls = _grouped_mm_calls(monkeypatch, gemm)
    args, kwargs, inputs, what = _problem(kind, True, align=8)
    out, grads, upstream = _run(moe_experts, args, kwargs, inputs)
    full = len(calls)
    skipped = moe_experts(*args, **kwargs, output=False)
    assert skipped.shape == out.shape and skipped.dtype == out.dtype
    assert type(skipped.grad_fn).__name__.startswith("_MoEExperts"), "took the reference"
    got = torch.autograd.grad(skipped, inputs, upstream)
    # grouped_mm off CUDA: gate_up, down, dH', dX in the full call; no down without output
    counted = gemm == "grouped_mm" and not HAS_CUDA
    assert (full, len(calls) - full) == ((4, 3) if counted else (0, 0))
    for i, (g, want) in enumerate(zip(got, grads, strict=True)):
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-6, msg=f"{what} grad {i}")


def _within_rounding_of_fp32(problem, lora_dtype=None):
    """The kernels in bf16 (the adapters in ``lora_dtype`` where given) against the
    reference in fp32 on the same rounded values: within ``MOE_LOWP_FACTOR`` of the error the
    reference itself makes in those dtypes, forward and every gradient."""
    args32, kwargs, inputs32, what = problem
    # gpt-oss's own clamp (7): at the test's 1.5 many pre-activations sit by the kink, where
    # rounding alone decides whether a gradient passes (the fp32 tests cover the clamp).
    kwargs["limit"] = 7.0
    args32, inputs32 = _cast(args32, inputs32, torch.bfloat16, lora_dtype)  # rounded ...
    args32, inputs32 = _cast(args32, inputs32, torch.float32)  # ... held in fp32: the truth
    args16, inputs16 = _cast(args32, inputs32, torch.bfloat16, lora_dtype)
    expected, expected_grads, upstream = _run(reference.moe_experts, args32, kwargs, inputs32)
    up16 = upstream.to(torch.bfloat16)
    base, base_grads, _ = _run(reference.moe_experts, args16, kwargs, inputs16, up16)
    args16, inputs16 = _cast(args16, inputs16, torch.bfloat16, lora_dtype)
    out, grads, _ = _run(moe_experts, args16, kwargs, inputs16, up16)
    assert out.dtype == torch.bfloat16
    checks = zip(
        ["forward", *range(len(grads))],
        [out, *grads],
        [expected, *expected_grads],
        [base, *base_grads],
        [out, *inputs16],
        strict=True,
    )
    for label, actual, truth, baseline, leaf in checks:
        assert actual.dtype == leaf.dtype
        assert_near_fp32(
            actual,
            truth,
            baseline,
            factor=MOE_LOWP_FACTOR,
            floor=FP32_FLOOR,
            rows=False,
            what=f"{what} bf16 {label}",
        )


@pytest.mark.parametrize("gemm", ["triton", "grouped_mm"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_moe_experts_bf16_within_rounding_of_fp32(kind, gemm, monkeypatch):
    calls = _grouped_mm_calls(monkeypatch, gemm)
    # Enough tokens that a tensor's relative error is not one or two elements' rounding,
    # and rank >= 2: at rank 1 every element of an expert's lora_B gradient shares the
    # rounding of one x A^T column, so its error is a handful of rounding events, and the
    # interpreter's truncation (CPU) put it past 4x torch's in about 1 run in 20.
    _within_rounding_of_fp32(_problem(kind, True, tokens=(12, 16), ranks=(2, 5), align=8))
    assert len(calls) == (4 if gemm == "grouped_mm" else 0)


@pytest.mark.parametrize("gemm", ["triton", "grouped_mm"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_moe_experts_bf16_weights_fp32_adapters(kind, gemm, monkeypatch):
    """bf16 weights with fp32 adapters (PEFT's layout: the 16-bit GEMMs beside the fp32
    adapter products). On a GPU at sizes of many tiles and row blocks (512 tokens, hidden
    256, expert intermediate 192, 16 experts, top 4, rank 8); in the interpreter smaller."""
    calls = _grouped_mm_calls(monkeypatch, gemm)
    sizes = (512, 256, 192, 4, 9, 8) if HAS_CUDA else (48, 64, 32, 2, 3, 4)
    problem = _problem(kind, True, sizes=sizes)
    _within_rounding_of_fp32(problem, lora_dtype=torch.float32)
    assert len(calls) == (4 if gemm == "grouped_mm" else 0)


@pytest.mark.parametrize("kind", [*KINDS, *MIXED])
def test_moe_experts_across_several_tiles(kind, monkeypatch):
    """Tiles smaller than every dimension: the K loop, column blocks, row blocks per expert."""
    monkeypatch.setattr(moe, "_blocks", lambda: (16, 16, 16, 4, 1))
    args, kwargs, inputs, what = _problem(kind, True)
    out, grads, upstream = _run(moe_experts, args, kwargs, inputs)
    ref_out, ref_grads, _ = _run(reference.moe_experts, args, kwargs, inputs, upstream)
    assert_close(out, ref_out, torch.float32, what=f"{what} forward")
    for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(g, ref, torch.float32, scale=4, what=f"{what} grad {i}")


def test_moe_experts_rank_past_one_tile():
    """Rank 80: the adapters' ``x A^T`` GEMM takes two column tiles of 64, and the
    epilogues an adapter wider than every other dimension."""
    args, kwargs, inputs, what = _problem("qwen3_moe", True, sizes=(10, 24, 16, 2, 2, 80))
    with torch.no_grad():  # the adapters' outputs as large as at the other tests' ranks (5)
        for layer in args[3:]:
            layer.lora_B.mul_((5 / 80) ** 0.5)
    out, grads, upstream = _run(moe_experts, args, kwargs, inputs)
    ref_out, ref_grads, _ = _run(reference.moe_experts, args, kwargs, inputs, upstream)
    assert_close(out, ref_out, torch.float32, what=f"{what} forward")
    for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(g, ref, torch.float32, scale=4, what=f"{what} grad {i}")


def test_an_unknown_gemm_choice_is_named(monkeypatch):
    monkeypatch.setenv("SLOTH_MOE_GEMM", "cublas")
    args, kwargs, _, _ = _problem("qwen3_moe", True)
    with pytest.raises(ValueError, match="SLOTH_MOE_GEMM='cublas': one of auto, triton, "):
        moe_experts(*args, **kwargs)


@pytest.mark.parametrize("faster", [True, False])
def test_auto_takes_the_grouped_gemm_where_it_is_faster(faster, monkeypatch):
    """``SLOTH_MOE_GEMM`` unset (``auto``): torch's grouped GEMM exactly where
    ``_grouped_mm_faster`` says so (CUDA, compute capability 9 and later; never the CPU),
    and the same results either way."""
    calls = _grouped_mm_calls(monkeypatch, "auto")
    monkeypatch.setattr(moe, "_grouped_mm_faster", lambda device: faster)
    args, kwargs, inputs, what = _problem("qwen3_moe", True, align=8)
    out, grads, upstream = _run(moe_experts, args, kwargs, inputs)
    ref_out, ref_grads, _ = _run(reference.moe_experts, args, kwargs, inputs, upstream)
    # CUDA's grouped GEMM is bf16 only: these fp32 inputs stay on the Triton GEMMs there.
    assert len(calls) == (4 if faster and not HAS_CUDA else 0)
    assert_close(out, ref_out, torch.float32, what=f"{what} forward")
    for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(g, ref, torch.float32, scale=4, what=f"{what} grad {i}")


def test_auto_leaves_the_cpu_on_the_triton_gemms():
    assert not moe._grouped_mm_faster(torch.device("cpu"))


@pytest.mark.parametrize("routing", ["uneven", "ends_unused"])
def test_schedule_covers_every_row_once(routing):
    if routing == "uneven":
        index, _ = uneven_routing(9, 8, 3)
    else:  # the first and the last experts (and others between) get no row
        index = torch.tensor([[2, 5], [5, 2], [3, 2]])
    # The kernel takes the device's tensors (the op routes only those to it); the checks
    # read them back.
    on_device = moe._Schedule(index.to(DEVICE), 8, 4)
    fields = ("start", "end", "block_expert", "block_start", "expert", "order")
    sched = SimpleNamespace(**{name: getattr(on_device, name).cpu() for name in fields})
    counts = torch.bincount(index.reshape(-1), minlength=8)
    assert torch.equal(sched.end - sched.start, counts)
    covered = torch.zeros(index.numel(), dtype=torch.long)
    for expert, start in zip(sched.block_expert.tolist(), sched.block_start.tolist(), strict=True):
        if expert >= 0:
            stop = min(start + 4, int(sched.end[expert]))
            assert start >= int(sched.start[expert])
            covered[start:stop] += 1
            assert (sched.expert[start:stop] == expert).all()
    assert (covered == 1).all()
    assert torch.equal(index.reshape(-1)[sched.order], sched.expert)


def _schedule_in_torch(index: torch.Tensor, experts: int, block_rows: int) -> dict:
    """What :class:`moe._Schedule` must hold, in plain torch (each expert's rows counted with
    ``bincount``, the blocks walked in a Python loop): the reference of its kernel."""
    k = index.shape[1]
    expert, order = torch.sort(index.reshape(-1), stable=True)
    counts = torch.bincount(expert, minlength=experts)
    end = torch.cumsum(counts, 0)
    start = end - counts
    bound = -(-order.numel() // block_rows) + experts
    block_expert, block_start = [], []
    for e in range(experts):
        for row in range(int(start[e]), int(end[e]), block_rows):
            block_expert.append(e)
            block_start.append(row)
    tail = bound - len(block_expert)
    return {
        "expert": expert, "order": order, "token": order // k, "start": start, "end": end,
        "offs": end.to(torch.int32),
        "block_expert": torch.tensor(block_expert + [-1] * tail),
        "block_start": torch.tensor(block_start + [0] * tail),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["drawn", "uneven", "one_expert", "int32"])
def test_schedule_kernel_matches_torch(case):
    """The schedule's kernel against its torch form, over routings that cross its program
    chunks (16 rows each under the interpreter) and the bound's chunk loop."""
    seed, (tokens, experts, top_k, block_rows) = draw((1, 70), (1, 40), (1, 4), (1, 9))
    top_k = min(top_k, experts)
    if case == "uneven":
        experts, top_k = max(experts, top_k + 3), max(top_k, 1)
        index, weights = uneven_routing(max(tokens, 2), experts, top_k)
    elif case == "one_expert":
        experts, top_k = 1, 1
        index = torch.zeros(tokens, 1, dtype=torch.long)
        weights = torch.rand(tokens, 1)
    else:
        index = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, dtype=torch.bfloat16)
        if case == "int32":
            index = index.to(torch.int32)
    sched = moe._Schedule(index.to(DEVICE), experts, block_rows, weights.to(DEVICE))
    want = _schedule_in_torch(index, experts, block_rows)
    for name, value in want.items():
        got = getattr(sched, name).cpu()
        assert torch.equal(got.long(), value.long()), f"seed {seed}: {name} differs"
    assert sched.offs.dtype == torch.int32
    assert torch.equal(sched.w_rows.cpu(), weights.reshape(-1)[want["order"]])
    assert (sched.rows, sched.tokens) == (index.numel(), index.shape[0])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_schedule_never_waits_for_the_device():
    # A sync a call stalls the launches queued behind it (twice a layer a step).
    index, _ = uneven_routing(64, 16, 4)
    index = index.to(DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe._Schedule(index, 16, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextmanager
def _nan_empty():
    """``torch.empty`` gives floating tensors full of NaN: a product reading memory no
    kernel wrote (a skipped expert's dequantized weights) shows in its result."""
    real = torch.empty

    def empty(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", empty)
        yield


def _fp8(layer):
    """``layer`` with its base weight in e4m3 with row scales, stored as the layer's is
    (gpt-oss: ``[E, in, out]``), and the same map with those weights dense in fp32."""
    weight = layer.weight.detach()  # [E, out, in], a view for gpt-oss
    scales = weight.abs().amax(-1).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    values = (weight / scales[..., None]).to(torch.float8_e4m3fn)
    if not layer.weight.is_contiguous():
        values = values.transpose(1, 2).contiguous().transpose(1, 2)
    dense = replace(layer, weight=values.float() * scales[..., None])
    return replace(layer, weight=values, weight_scale=scales), dense


@pytest.mark.parametrize("gemm", ["triton", "grouped_mm"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fp8_expert_weights_train_as_their_dense_values(kind, gemm, monkeypatch):
    """Base weights in e4m3 with row scales (sloth-fp8's experts): the output and every
    gradient are those of the dequantized weights, in fp32 against the reference and in
    bf16 equal to the kernels' own on the dense bf16 stack. The backward holds the
    quantized maps, never a dense stack (that would keep every layer's bf16 weights
    through a checkpointed step)."""
    calls = _grouped_mm_calls(monkeypatch, gemm)
    args, kwargs, inputs, what = _problem(kind, True, align=8)
    x, index, weights, gate_up, down = args
    (q1, d1), (q2, d2) = _fp8(gate_up), _fp8(down)
    probe = moe_experts(x, index, weights, q1, q2, **kwargs).grad_fn
    assert type(probe).__name__.startswith("_MoEExperts"), "took the reference"
    assert [layer.weight.dtype for layer in probe.cfg[:2]] == [torch.float8_e4m3fn] * 2
    assert all(t.dim() < 3 for t in probe.saved_tensors if t is not None)  # no weight stack
    calls.clear()
    with _nan_empty():  # experts without rows (uneven routing) are not dequantized
        out, grads, upstream = _run(moe_experts, (x, index, weights, q1, q2), kwargs, inputs)
    # The dense stack takes torch's grouped GEMM where asked (bf16 only on CUDA).
    assert len(calls) == (4 if gemm == "grouped_mm" and not HAS_CUDA else 0)
    # A recompute's call (no output value): the same gradients, the same GEMMs but down's.
    calls.clear()
    skipped = moe_experts(x, index, weights, q1, q2, **kwargs, output=False)
    got = torch.autograd.grad(skipped, inputs, upstream)
    assert len(calls) == (3 if gemm == "grouped_mm" and not HAS_CUDA else 0)
    for i, (g, want) in enumerate(zip(got, grads, strict=True)):
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-6, msg=f"{what} skipped grad {i}")
    ref_args = (x, index, weights, d1, d2)
    ref_out, ref_grads, _ = _run(reference.moe_experts, ref_args, kwargs, inputs, upstream)
    assert_close(out, ref_out, torch.float32, what=f"{what} fp8 forward")
    for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(g, ref, torch.float32, scale=4, what=f"{what} fp8 grad {i}")
    # The reference on the quantized maps: the same dense values.
    plain, plain_grads, _ = _run(reference.moe_experts, args[:3] + (q1, q2), kwargs, inputs,
                                 upstream)  # fmt: skip
    assert_close(plain, ref_out, torch.float32, what=f"{what} fp8 reference forward")
    for i, (g, ref) in enumerate(zip(plain_grads, ref_grads, strict=True)):
        assert_close(g, ref, torch.float32, what=f"{what} fp8 reference grad {i}")
    # bf16 activations: the dense stack in bf16, exactly as if the weights were stored so.
    (x16, *_), inputs16 = _cast((x, index, weights, gate_up, down), inputs, torch.bfloat16)
    dense16 = [replace(q, weight=q.dense_weight(torch.bfloat16), weight_scale=None)
               for q in (q1, q2)]  # fmt: skip
    quant = [replace(q, bias=None if q.bias is None else q.bias.bfloat16()) for q in (q1, q2)]
    dense16 = [replace(d, bias=q.bias) for d, q in zip(dense16, quant, strict=True)]
    got = moe_experts(x16, index, weights, *quant, **kwargs)
    want = moe_experts(x16, index, weights, *dense16, **kwargs)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{what} bf16 forward")
    up16 = upstream.bfloat16()
    leaves = [x16, weights] + [t for q in quant for t in (q.lora_A, q.lora_B)]
    got_grads = torch.autograd.grad(got, leaves, up16)
    want_grads = torch.autograd.grad(want, leaves, up16)
    for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{what} bf16 grad {i}")


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "gpt_oss"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_the_dequantized_stack_is_the_references_to_the_bit(dtype, transposed):
    """One pass of the dequantizing kernel (two programs an expert: 37 x 113 weights each)
    gives exactly :meth:`ExpertLinear.dense_weight`'s fp32 product rounded to ``dtype``,
    in the layout the stack is stored in, for every expert a row is routed to; the others
    (a decode step's tokens reach a few) are left as they were allocated."""
    weight = torch.randn(4, 37, 113, device=DEVICE) * torch.rand(4, 37, 1, device=DEVICE) * 9
    stored = weight.transpose(1, 2).contiguous().transpose(1, 2) if transposed else weight
    quant, _ = _fp8(ExpertLinear(stored))
    index = torch.tensor([[2], [0], [2]], device=DEVICE)  # experts 1 and 3: no rows
    sched = moe._Schedule(index, 4, moe._blocks()[0])
    with _nan_empty():  # the kernel's output starts as NaN
        dense = moe._dense(quant, dtype, sched)
    assert dense.weight_scale is None and dense.weight.dtype == dtype
    assert dense.weight.is_contiguous() != transposed  # stored as the quantized stack is
    want = quant.dense_weight(dtype)
    for expert in (0, 2):
        torch.testing.assert_close(dense.weight[expert], want[expert], rtol=0, atol=0)
    assert dense.weight[[1, 3]].isnan().all()  # skipped: no row reads them


def test_an_8_bit_expert_parameter_without_its_scales_is_named():
    experts = torch.nn.Module()
    experts.gate_up_proj = torch.nn.Parameter(
        torch.zeros(2, 4, 3, dtype=torch.float8_e4m3fn), requires_grad=False
    )
    with pytest.raises(ValueError, match="gate_up_proj is stored in 8 bits without its"):
        ExpertLinear.from_parameter(experts, "gate_up_proj")
    experts.register_buffer("gate_up_proj" + reference.ROW_SCALES, torch.ones(2, 4))
    layer = ExpertLinear.from_parameter(experts, "gate_up_proj")
    assert layer.weight_scale is experts.gate_up_proj_row_scales


def test_unserved_arguments_take_the_reference():
    args, kwargs, _, _ = _problem("qwen3_moe", False)
    with pytest.raises(ValueError, match="activation"):
        moe_experts(*args, **{**kwargs, "activation": "geglu"})


def test_registered_for_every_dtype():
    (entry,) = moe.REGISTRATIONS
    assert entry["op"] == "moe_experts" and entry["fn"] is moe_experts
    assert set(entry["dtypes"]) == set(TOLERANCES)
