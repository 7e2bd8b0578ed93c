"""A linear layer whose frozen weight is stored in FP8 (e4m3), one float32 scale per
output row, multiplied with FP8 matmuls.

The weight takes 1 byte per element instead of bf16's 2. The forward quantizes each row
of the input (token) to e4m3 with its own scale and multiplies with ``torch._scaled_mm``
(row-wise scales: the GPU's FP8 tensor cores, twice the bf16 rate on Hopper), in float32
accumulation, out in the input's dtype. The backward needs only the input's gradient (the
weight is frozen: LoRA trains beside it), an FP8 matmul too: the weight's row scales are
folded into the gradient's columns, each gradient row is quantized to e4m3 with its own
scale and multiplied with the e4m3 values (:func:`fp8_matmul_grad`). Shapes ``_scaled_mm``
refuses (inner or output size not a multiple of 16) take the dequantized weight instead,
both ways; ``Fp8Linear.fp8_backward = False`` (or ``SLOTH_FP8_BACKWARD=0`` in the
environment before this module is imported: a bench's A/B) does for the backward.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sloth_core.ops.reference import ROW_SCALES
from sloth_core.sdk import SlothError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_TINY = 1e-12  # an all-zero row keeps scale > 0


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[out, in]`` as e4m3 values and float32 scales ``[out]``: row ``i`` is
    ``values[i] * scales[i]``, its largest magnitude mapped to e4m3's largest (448)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=_TINY) / FP8_MAX
    return (w / scales[:, None]).to(FP8), scales


def dequantize_rows(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in]`` weight, computed in float32 and cast to ``dtype``."""
    return (values.float() * scales[:, None]).to(dtype)


def _takes(values: torch.Tensor, rows: int, dtype: torch.dtype) -> bool:
    """Whether ``_scaled_mm`` takes a product with ``values``: both sizes multiples of 16,
    and row-wise scales with an output in ``dtype`` on that device (:func:`_rowwise`)."""
    if rows <= 0 or values.shape[0] % 16 or values.shape[1] % 16:
        return False
    return _rowwise(values.device.type, dtype)


_ROWWISE: dict[tuple[str, torch.dtype], bool] = {}


def _rowwise(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch's ``_scaled_mm`` takes row-wise scales with a ``dtype`` output on
    ``device_type``, tried once on 16 x 16 (torch 2.11 takes only per-tensor scales on the
    CPU; CUDA's row-wise kernels write bf16 only). Where not, the dequantized product runs."""
    key = (device_type, dtype)
    if key not in _ROWWISE:
        a = torch.ones((16, 16), device=device_type).to(FP8)
        scale = torch.ones((16, 1), dtype=torch.float32, device=device_type)
        try:
            torch._scaled_mm(a, a.t(), scale_a=scale, scale_b=scale.t(), out_dtype=dtype)
            _ROWWISE[key] = True
        except (RuntimeError, NotImplementedError):
            _ROWWISE[key] = False
    return _ROWWISE[key]


def _quantize_rows_eager(
    flat: torch.Tensor, column_scales: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    flat = flat.float()
    if column_scales is not None:
        flat = flat * column_scales
    row_scales = flat.abs().amax(dim=1, keepdim=True).clamp(min=_TINY) / FP8_MAX
    return (flat / row_scales).to(FP8), row_scales


#: The key of an input's e4m3 rows in the ``shared`` dict of the fused LoRA ops.
_SHARED_ROWS = "sloth_fp8.rows"
_COMPILED: dict[Any, Any] = {}


def _on_cuda(fn: Any, tensor: torch.Tensor) -> Any:
    """``fn`` through ``torch.compile`` for a CUDA ``tensor`` (unless ``SLOTH_FP8_COMPILE=0``),
    compiled once; ``fn`` itself elsewhere.

    Only the first dimension of ``fn``'s first argument (of each, for a list) is dynamic
    (the rows: a step's tokens), the width static: each width, a handful a model, gets a
    kernel of its own size (a transpose in tiles, a row reduction of that length).
    Compiled dynamic in both, the transposed copy was no faster than torch's strided one
    and the llama-8b FP8 step 3.6% slower (docs/benchmarks.md, session 21)."""
    if not tensor.is_cuda or os.environ.get("SLOTH_FP8_COMPILE", "1") == "0":
        return fn
    if fn not in _COMPILED:
        compiled = torch.compile(fn)

        def rows_dynamic(t: Any, *args: Any) -> Any:
            for each in t if isinstance(t, (list, tuple)) else (t,):
                torch._dynamo.maybe_mark_dynamic(each, 0)
                torch._dynamo.mark_static(each, 1)  # else a second width makes it dynamic
            return compiled(t, *args)

        _COMPILED[fn] = rows_dynamic
    return _COMPILED[fn]


def _quantize_activation_rows(
    flat: torch.Tensor, column_scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``flat`` ``[M, K]`` (any float dtype; times ``column_scales`` ``[1, K]`` if given) as
    e4m3 rows and their float32 scales ``[M, 1]``.

    On CUDA compiled (:func:`_on_cuda`): eager, the cast, the scaling, ``abs``, the row
    max, the division and the cast to e4m3 are each a pass over a float32 copy of
    ``flat``, which made an FP8 projection slower than bf16's (docs/benchmarks.md);
    compiled they are a reduction and one pointwise pass.
    """
    return _on_cuda(_quantize_rows_eager, flat)(flat, column_scales)


def _transpose_eager(values: torch.Tensor) -> torch.Tensor:
    # As bytes: the copy moves them, whatever the float8 type.
    return values.view(torch.uint8).t().contiguous().view(values.dtype)


def transposed(values: torch.Tensor) -> torch.Tensor:
    """``values.t().contiguous()`` of a 2-D e4m3 weight: what the input's gradient
    multiplies (``_scaled_mm`` takes FP8 operands with the inner dimension contiguous
    only), made once a step. On CUDA compiled (:func:`_on_cuda`): torch's strided copy
    took 214 us for an average projection of llama-8b on an H100, 48 ms of a 619 ms FP8
    step; the compiled one, in tiles, 29 us (docs/benchmarks.md, session 21)."""
    return _on_cuda(_transpose_eager, values)(values)


def _fresh(like: torch.Tensor, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty ``[..., features]`` result for ``like`` ``[..., k]`` and its 2-D view: the
    products write into the view, the caller gets the tensor itself, not a view (sloth's
    fused LoRA ops update their outputs in place, which autograd forbids on a view made
    inside a custom Function)."""
    out = torch.empty(*like.shape[:-1], features, dtype=like.dtype, device=like.device)
    return out, out.view(-1, features)


def fp8_matmul(
    x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, shared: dict | None = None
) -> torch.Tensor:
    """``x @ W^T`` for ``W = values * scales`` (rows), ``x`` ``[..., in]`` in its dtype,
    through ``_scaled_mm`` with ``x`` quantized per row; the dequantized product where
    ``_scaled_mm`` does not take the shapes. A fresh tensor, not a view. ``shared``: a
    dict passed to every product of this same ``x`` (q/k/v, gate/up): its quantized rows
    are kept there and made once."""
    flat = x.reshape(-1, x.shape[-1])
    out, out2 = _fresh(x, values.shape[0])
    if not _takes(values, flat.shape[0], x.dtype):
        torch.mm(flat, dequantize_rows(values, scales, x.dtype).t(), out=out2)
    else:
        rows = None if shared is None else shared.get(_SHARED_ROWS)
        if rows is None:
            rows = _quantize_activation_rows(flat)
            if shared is not None:
                shared[_SHARED_ROWS] = rows
        x_fp8, x_scales = rows
        torch._scaled_mm(
            x_fp8, values.t(), scale_a=x_scales, scale_b=scales[None, :].float(),
            out_dtype=x.dtype, out=out2,
        )  # fmt: skip
    return out


def fp8_matmul_grad(grad: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``grad @ W`` for ``W = values * scales`` (rows), ``grad`` ``[..., out]``: the input's
    gradient. ``W``'s row scales run along this product's inner dimension, where
    ``_scaled_mm`` takes none, so they multiply ``grad``'s columns first; each row of that
    is quantized to e4m3 with its own scale and multiplied with ``values``, which
    ``_scaled_mm`` wants column-major (a transposed copy, 1 byte an element, freed after).
    The dequantized product where ``_scaled_mm`` does not take the shapes. A fresh
    tensor, not a view."""
    flat = grad.reshape(-1, grad.shape[-1])
    out, out2 = _fresh(grad, values.shape[1])
    if not _takes(values, flat.shape[0], grad.dtype):
        torch.mm(flat, dequantize_rows(values, scales, grad.dtype), out=out2)
    else:
        g_fp8, g_scales = _quantize_activation_rows(flat, scales[None, :])
        ones = torch.ones((1, values.shape[1]), dtype=torch.float32, device=grad.device)
        torch._scaled_mm(
            g_fp8, transposed(values).t(), scale_a=g_scales, scale_b=ones,
            out_dtype=grad.dtype, out=out2,
        )  # fmt: skip
    return out


def _quantize_side_by_side_eager(
    flats: list[torch.Tensor], column_scales: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    joined = torch.cat([f.float() * s for f, s in zip(flats, column_scales, strict=True)], dim=1)
    return _quantize_rows_eager(joined, None)


def _transpose_stacked_eager(values: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.cat([v.view(torch.uint8) for v in values], dim=0)
    return stacked.t().contiguous().view(values[0].dtype)


def _summed(parts: Iterator[torch.Tensor]) -> torch.Tensor:
    """The sum of fresh tensors, into the first (each is made only as the sum needs it)."""
    out = next(parts)
    for part in parts:
        out.add_(part)
    return out


def fp8_group_matmul_grad(
    grads: list[torch.Tensor], values: list[torch.Tensor], scales: list[torch.Tensor]
) -> torch.Tensor:
    """``sum_i grads_i @ W_i`` for the layers of one input (q/k/v, gate/up), ``grads_i``
    ``[..., out_i]``, as one FP8 product: ``[g_0 | g_1 | ...] @ [W_0; W_1; ...]``, the
    gradients side by side (each times its weight's row scales), quantized per row of
    the whole, against the weights stacked and transposed in one copy. Against a product
    each (:func:`fp8_matmul_grad`) and their sum: one quantization, one transposed copy
    and one GEMM of the summed depth instead of several, and no sums of ``[N, in]``
    partial results. Where ``_scaled_mm`` does not take a shape, that sum instead. A
    fresh tensor, not a view."""
    flats = [g.reshape(-1, g.shape[-1]) for g in grads]
    rows, dtype = flats[0].shape[0], grads[0].dtype
    if len(grads) == 1 or not all(_takes(v, rows, dtype) for v in values):
        return _summed(map(fp8_matmul_grad, grads, values, scales))
    out, out2 = _fresh(grads[0], values[0].shape[1])
    g_fp8, g_scales = _on_cuda(_quantize_side_by_side_eager, flats[0])(
        flats, [sc[None, :] for sc in scales]
    )
    stacked_t = _on_cuda(_transpose_stacked_eager, values[0])(values)
    ones = torch.ones((1, values[0].shape[1]), dtype=torch.float32, device=grads[0].device)
    torch._scaled_mm(
        g_fp8, stacked_t.t(), scale_a=g_scales, scale_b=ones, out_dtype=dtype, out=out2
    )
    return out


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                fp8_backward: bool):  # fmt: skip
        ctx.save_for_backward(values, scales)
        ctx.fp8_backward = fp8_backward
        return fp8_matmul(x, values, scales)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        values, scales = ctx.saved_tensors
        return _input_grad(grad, values, scales, ctx.fp8_backward), None, None, None


def _input_grad(grad: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                fp8_backward: bool) -> torch.Tensor:  # fmt: skip
    if fp8_backward:
        return fp8_matmul_grad(grad, values, scales)
    return grad @ dequantize_rows(values, scales, grad.dtype)


class Fp8Linear(nn.Linear):
    """``nn.Linear`` with its weight in e4m3 (``weight``, frozen) and ``weight_scale``
    (float32, one per output row); ``bias`` as it was. PEFT wraps it as any linear layer;
    :meth:`dense_weight` is what sloth's merge and export read. ``fp8_backward``: the
    input's gradient through an FP8 matmul too (:func:`fp8_matmul_grad`), or, off, through
    the weight dequantized to the gradient's dtype.

    :meth:`sloth_matmul` and :meth:`sloth_input_grad` are the base-layer protocol of
    sloth's fused LoRA ops (``sloth_core.ops.LoRALinear.base``): the two products without
    autograd, so that those ops, which save and recompute what they choose, run the FP8
    products instead of leaving FP8 layers to PEFT's unfused LoRA."""

    #: The input's gradient through an FP8 matmul; ``SLOTH_FP8_BACKWARD=0``: through the
    #: weight dequantized (whether the e4m3 rounding of the gradient costs training).
    fp8_backward = os.environ.get("SLOTH_FP8_BACKWARD", "1") != "0"
    weight_scale: torch.Tensor  # a buffer: float32, one per output row

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        values, scales = quantize_rows(linear.weight)
        self.weight = nn.Parameter(values, requires_grad=False)
        self.register_buffer("weight_scale", scales)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.compute_dtype = linear.weight.dtype

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight dequantized: ``[out, in]`` in ``dtype`` (default: the dtype it was
        loaded in)."""
        return dequantize_rows(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Fp8Linear.apply(x, self.weight, self.weight_scale, self.fp8_backward)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def sloth_matmul(self, x: torch.Tensor, shared: dict | None = None) -> torch.Tensor:
        """``x W^T`` (no bias, no autograd): what :meth:`forward` multiplies, a fresh tensor;
        ``shared``: see :func:`fp8_matmul` (the input's rows are quantized once a group)."""
        return fp8_matmul(x, self.weight, self.weight_scale, shared)

    def sloth_input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad W``: the input's gradient as :meth:`forward`'s backward computes it."""
        return _input_grad(grad, self.weight, self.weight_scale, self.fp8_backward)

    @staticmethod
    def sloth_input_grads(layers: list[Fp8Linear], grads: list[torch.Tensor]) -> torch.Tensor:
        """``sum_i grads_i W_i`` over the layers of one input (the fused ops' q/k/v or
        gate/up): as the sum of :meth:`sloth_input_grad`, in one FP8 product
        (:func:`fp8_group_matmul_grad`) where every layer takes its backward in FP8."""
        if not all(layer.fp8_backward for layer in layers):
            pairs = zip(layers, grads, strict=True)
            return _summed(layer.sloth_input_grad(g) for layer, g in pairs)
        return fp8_group_matmul_grad(
            grads, [layer.weight for layer in layers], [layer.weight_scale for layer in layers]
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


def convert_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` but its output layer (``lm_head``) by an
    :class:`Fp8Linear`; the number replaced."""
    getter = getattr(model, "get_output_embeddings", None)  # a transformers model's
    output = getter() if callable(getter) else None
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not output:
                setattr(parent, name, Fp8Linear(child))
                count += 1
    return count


#: The 3-D expert parameters sloth's ``moe_experts`` op reads (transformers' experts
#: modules: Qwen3-MoE's, Mixtral's, gpt-oss's): what :func:`convert_experts` stores in FP8.
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def _experts_refused(name: str) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        raise SlothError(
            f"{name}: its expert weights are stored in FP8 (quantization='fp8'), which only "
            "sloth's MoE block computes; this call is transformers' own experts forward "
            "(which sloth's block hands a call to where its adapters are merged or several "
            "are active: unmerge them, or keep one active)"
        )

    return forward


def convert_experts(model: nn.Module) -> int:
    """Store every 3-D expert parameter (:data:`EXPERT_PARAMETERS`) of ``model`` in e4m3,
    its row scales (``[E, out]``, float32) in the buffer ``<name>_row_scales``
    (``sloth_core.ops.reference.ROW_SCALES``) where sloth's ``ExpertLinear`` reads them;
    the number of experts modules converted.

    The rows are the output rows of each expert's ``[out, in]`` map, also where the module
    stores ``[E, in, out]`` (``is_transposed``: gpt-oss). The module's own forward (never
    called by sloth's patched MoE block, which lifts the weights) is replaced by one that
    raises, naming the module: transformers' would multiply the e4m3 values unscaled.
    """
    count = 0
    for name, module in model.named_modules():
        params = [getattr(module, p, None) for p in EXPERT_PARAMETERS]
        stacks = [p for p in params if isinstance(p, nn.Parameter) and p.dim() == 3]
        if len(stacks) != len(EXPERT_PARAMETERS):
            continue
        transposed = bool(getattr(module, "is_transposed", False))
        for pname, param in zip(EXPERT_PARAMETERS, stacks, strict=True):
            weight = param.detach().transpose(1, 2) if transposed else param.detach()
            flat = weight.reshape(-1, weight.shape[-1])  # rows of every expert
            values, scales = quantize_rows(flat)
            values = values.view(weight.shape)
            if transposed:  # stored as the module stores it
                values = values.transpose(1, 2).contiguous()
            setattr(module, pname, nn.Parameter(values, requires_grad=False))
            module.register_buffer(pname + ROW_SCALES, scales.view(weight.shape[:2]))
        module.forward = _experts_refused(name)
        count += 1
    return count
