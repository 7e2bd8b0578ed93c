"""Fused LoRA projections: ``x W^T + b + s * (x A^T) B^T`` with a hand-written backward.

The matrix products run through torch (cuBLAS); what this module adds is what is kept
for backward and how the pieces are grouped:

- The base weight is frozen: it gets no gradient, and it is never saved. A 4-bit (NF4)
  weight is dequantized by :func:`sloth_kernels.nf4.dequantize_nf4` right before its
  product, in forward and again in backward, and freed right after.
- Projections that read the same input (q/k/v; gate/up in the MLP) save that input once
  and run their ``lora_A`` products as one GEMM against the stacked ``A`` matrices, in
  forward (``x A^T``) and in backward (``dA = G^T x``), so ``x`` is read once, not once
  per projection.
- Saved per group: the input and ``x A^T`` (``[N, r]`` per adapter, tiny), plus the
  ``lora_A``/``lora_B`` parameters (so in-place changes to them are caught).
- The LoRA contribution is written first and the base product accumulated onto it, in
  forward and into ``dx`` (``addmm_`` with beta = 1: the GEMM's epilogue reads it, no
  separate pass over ``[N, out]`` and no temporary).

Anything the fast path does not serve calls the reference, so results are always those
of :mod:`sloth_core.ops.reference.lora`: active dropout, LoRA weights of another dtype
than the input (PEFT promotes), a dense base weight or bias of another dtype, a base
weight or bias that requires grad, a 4-bit type other than NF4, autocast, mixed devices.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sloth_core.ops import reference
from sloth_core.ops.reference import LoRALinear
from sloth_core.sdk import keep_for_backward, kept_for_backward
from sloth_kernels.adapter_casts import adapter_copies
from sloth_kernels.nf4 import dequantize_nf4
from sloth_kernels.norms import norm_source, recompute_rms_norm

#: Input dtypes the fused path serves (and the ops are registered for).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- what the fast path serves ---------------------------------------------------------


def _dropout_inactive(dropout) -> bool:
    if dropout is None or isinstance(dropout, nn.Identity):
        return True
    # Dropout(p=0), or any dropout module in eval mode, returns its input unchanged.
    return isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)


def layer_served(
    layer: LoRALinear, in_features: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """Whether the fused path computes exactly what the reference does for ``layer``
    applied to an input of ``in_features`` features, ``dtype`` and ``device``."""
    weight = layer.weight
    if weight.device != device or weight.requires_grad:
        return False
    state = layer.quant_state
    if layer.base is not None:  # a layer that multiplies itself, into x's dtype (sloth-fp8)
        if weight.dim() != 2 or weight.shape[1] != in_features:
            return False
    elif state is not None:
        if getattr(state, "quant_type", None) != "nf4" or len(state.shape) != 2:
            return False
        if int(state.shape[1]) != in_features:
            return False
    elif weight.dtype != dtype or weight.dim() != 2 or weight.shape[1] != in_features:
        return False
    bias = layer.bias
    if bias is not None:
        if bias.requires_grad or bias.device != device:
            return False
        # The reference casts the bias of a 4-bit layer to x's dtype, a dense one it does not
        # (a layer that multiplies itself adds its bias as its forward does).
        if state is None and layer.base is None and bias.dtype != dtype:
            return False
    if layer.has_lora:
        a, b = layer.lora_A, layer.lora_B
        assert a is not None and b is not None  # has_lora
        if a.device != device or b.device != device or a.dtype != b.dtype:
            return False
        if a.dtype not in (dtype, torch.float32):  # fp32 ones are cast (Adapters)
            return False
        if not _dropout_inactive(layer.dropout):
            return False
    return True


def fast_path_ok(x: torch.Tensor, layers: Sequence[LoRALinear]) -> bool:
    """Whether ``x`` and every layer (all applied to ``x``) can take the fused path."""
    if not isinstance(x, torch.Tensor) or x.dtype not in DTYPES or x.dim() < 1 or x.numel() == 0:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return all(layer_served(layer, x.shape[-1], x.dtype, x.device) for layer in layers)


# -- shared pieces ------------------------------------------------------------------------


def dense_weight(layer: LoRALinear, dtype: torch.dtype) -> torch.Tensor:
    """The base weight ``[out, in]`` in ``dtype``; a 4-bit one freshly dequantized.

    As the reference does, a 4-bit weight goes through ``quant_state.dtype`` first: when
    that is fp32 (or already ``dtype``) the kernel writes ``dtype`` directly, which
    rounds the same way.
    """
    if layer.base is not None:
        return layer.base.dense_weight(dtype)
    if layer.quant_state is None:
        return layer.weight
    state = layer.quant_state
    if state.dtype in (dtype, torch.float32):
        return dequantize_nf4(layer.weight, state, dtype=dtype)
    return dequantize_nf4(layer.weight, state).to(dtype)


def _bias(layer: LoRALinear, dtype: torch.dtype) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.to(dtype)


def out_features(layer: LoRALinear) -> int:
    """Rows of the base weight."""
    if layer.quant_state is not None:
        return int(layer.quant_state.shape[0])
    return int(layer.weight.shape[0])


@dataclass(frozen=True, eq=False)
class Group:
    """Projections of one shared input: which carry adapters, and their rank slices."""

    layers: tuple[LoRALinear, ...]
    adapted: tuple[int, ...]  # indices of layers with an adapter, in order
    slices: tuple[tuple[int, int], ...]  # columns of each adapter in the stacked x A^T
    dtype: torch.dtype  # the products' (the input's)

    @classmethod
    def of(cls, layers: Sequence[LoRALinear], dtype: torch.dtype) -> Group:
        adapted, slices, start = [], [], 0
        for i, layer in enumerate(layers):
            if layer.has_lora:
                assert layer.lora_A is not None
                r = int(layer.lora_A.shape[0])
                adapted.append(i)
                slices.append((start, start + r))
                start += r
        return cls(tuple(layers), tuple(adapted), tuple(slices), dtype)

    def lora_tensors(self) -> list[torch.Tensor]:
        """``[A_0, B_0, A_1, B_1, ...]`` of the adapted layers: autograd inputs."""
        tensors: list[torch.Tensor] = []
        for i in self.adapted:
            a, b = self.layers[i].lora_A, self.layers[i].lora_B
            assert a is not None and b is not None  # adapted: has_lora
            tensors += [a, b]
        return tensors


@dataclass(frozen=True, eq=False)
class Adapters:
    """A group's adapters as its products read them.

    PEFT keeps adapters in fp32 on a 16-bit model (``autocast_adapter_dtype``) so that the
    optimizer updates fp32 weights. The fused path multiplies in the input's dtype with
    fp32 accumulation instead of upcasting the input: ``copies`` are the adapters in that
    dtype, without autograd history, made once per weight epoch
    (:mod:`sloth_kernels.adapter_casts`), and :meth:`grad_of` casts their gradients back,
    so the fp32 adapters get fp32 gradients as an autograd cast would give them. Results
    differ from the reference (which upcasts ``x``) by bf16 rounding of the small
    ``[N, r]`` products.
    """

    params: tuple[torch.Tensor, ...]  # [A_0, B_0, ...]: the autograd inputs
    copies: tuple[torch.Tensor, ...]  # the same in the group's dtype
    a: torch.Tensor | None  # the A copies stacked into [sum r, in] (None: no adapter)

    @classmethod
    def of(cls, group: Group, params: Sequence[torch.Tensor]) -> Adapters:
        return cls(tuple(params), *adapter_copies(params, group.dtype))

    def b(self, k: int) -> torch.Tensor:
        """``B`` of the group's ``k``-th adapter, in the group's dtype."""
        return self.copies[2 * k + 1]

    def grad_of(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` (in the group's dtype) in the dtype of ``params[index]``."""
        dtype = self.params[index].dtype
        return grad if grad.dtype == dtype else grad.to(dtype)

    def grad_product(
        self, index: int, mat1: torch.Tensor, mat2: torch.Tensor, alpha: float = 1.0
    ) -> torch.Tensor:
        """``alpha * mat1 @ mat2`` (16-bit matrices) as the gradient of ``params[index]``,
        in its dtype. On CUDA an fp32 adapter's is written in fp32 by the GEMM itself
        (``out_dtype``): no cast launch after it (some 190 in a 16-layer step), and no
        rounding to 16 bits on the way. Elsewhere the product is cast (:meth:`grad_of`)."""
        dtype = self.params[index].dtype
        shape = (mat1.shape[0], mat2.shape[1])
        if dtype == torch.float32 and mat1.dtype != dtype and mat1.is_cuda:
            # beta = 0: the uninitialised input is not read (nor its NaNs propagated).
            unread = mat1.new_empty(shape, dtype=dtype)
            return torch.addmm(unread, mat1, mat2, out_dtype=dtype, beta=0, alpha=alpha)
        out = mat1.new_empty(shape)
        if alpha == 1.0:
            torch.mm(mat1, mat2, out=out)
        else:
            out.addmm_(mat1, mat2, beta=0, alpha=alpha)
        return self.grad_of(index, out)


def group_forward(x: torch.Tensor, group: Group, lora: Adapters, defer: Collection[int] = ()):
    """Every projection of ``x`` ``[..., in]``: ``(outputs [..., out_i], x A^T)``.

    ``x A^T`` is ``[N, sum r]`` for all adapters at once (``None`` without adapters).
    The outputs are fresh tensors, not views: a custom Function's view outputs may not be
    modified in place downstream. ``defer``: indices of layers with a multiplying base
    whose output is the base product alone, the caller adding the adapter's thin product
    where it reads the output (:mod:`sloth_kernels.gated_lora`).
    """
    x2 = x.reshape(-1, x.shape[-1])
    xa = x2 @ lora.a.t() if lora.a is not None else None
    outputs = []
    shared: dict = {}  # what a multiplying base derives from x once for the group (FP8 rows)
    for i, layer in enumerate(group.layers):
        adapter = None
        if i in group.adapted:
            k = group.adapted.index(i)
            start, stop = group.slices[k]
            assert xa is not None  # group.adapted
            adapter = (xa[:, start:stop], lora.b(k).t(), float(layer.scaling))
        if layer.base is not None:  # its own product (FP8), its bias added as its forward does
            out = layer.base.sloth_matmul(x, shared)
            if layer.bias is not None:
                out.add_(layer.bias.to(out.dtype))
            if adapter is not None and i not in defer:
                out.view(-1, out.shape[-1]).addmm_(adapter[0], adapter[1], alpha=adapter[2])
            outputs.append(out)
            continue
        weight = dense_weight(layer, x.dtype)
        bias = _bias(layer, x.dtype)
        if adapter is None:
            out = F.linear(x, weight, bias)
        else:
            # The adapter's thin product first (memory-bound: it writes [N, out] once), then
            # the base product accumulates onto it in the GEMM's epilogue (beta = 1): one
            # pass over [N, out] fewer than adding the adapter after the base product.
            xa_k, b_t, scaling = adapter
            out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
            out2 = out.view(-1, weight.shape[0])
            if bias is None:
                out2.addmm_(xa_k, b_t, beta=0, alpha=scaling)  # beta 0: out2 is not read
            else:
                torch.addmm(bias, xa_k, b_t, alpha=scaling, out=out2)
            out2.addmm_(x2, weight.t())
        del weight  # a dequantized weight is freed before the next one is made
        outputs.append(out)
    return outputs, xa


def group_g(grads: Sequence[torch.Tensor], group: Group, lora: Adapters) -> torch.Tensor:
    """``G = [s_i g_i B_i]`` (``[N, sum r]``) of an adapted group, from 2D output grads:
    each product scaled in its GEMM and written into its columns (no scaling pass, no
    concatenation: launches a host-bound step would wait on)."""
    g0 = grads[group.adapted[0]]
    big_g = g0.new_empty(g0.shape[0], group.slices[-1][1])
    for k, i in enumerate(group.adapted):
        start, stop = group.slices[k]
        part = big_g if len(group.adapted) == 1 else big_g[:, start:stop]
        part.addmm_(grads[i], lora.b(k), beta=0, alpha=float(group.layers[i].scaling))
    return big_g


def group_backward(
    x2: torch.Tensor | None,
    xa: torch.Tensor | None,
    grads: Sequence[torch.Tensor],
    group: Group,
    lora: Adapters,
    needs_x: bool,
    needs_lora: Sequence[bool],
    big_g: torch.Tensor | None = None,
):
    """``(dx or None, [dA_0, dB_0, ...], G)`` of :func:`group_forward` given 2D output grads.

    ``dx = G A + sum_i g_i W_i`` with ``G = [s_i g_i B_i]`` (``[N, sum r]``; ``big_g``
    where the caller made it with :func:`group_g`): the thin ``G A`` first, the dense base
    products accumulated onto it in their GEMMs' epilogues (a multiplying base's product,
    which cannot accumulate, comes first and the rest onto it); ``dA = G^T x`` as one GEMM
    for every adapter; ``dB_i = s_i g_i^T (x A_i^T)``. The adapters' gradients come in
    their parameters' dtypes.
    """
    dtype = grads[0].dtype
    lora_grads: list[torch.Tensor | None] = [None] * len(lora.params)
    if big_g is None and group.adapted:
        big_g = group_g(grads, group, lora)
    dx = None
    bases = [layer.base for layer in group.layers]
    together = getattr(type(bases[0]), "sloth_input_grads", None)
    alike = len(bases) > 1 and all(type(b) is type(bases[0]) for b in bases)
    if needs_x and alike and callable(together):
        # A multiplying base that sums its group's products itself (sloth-fp8: one FP8
        # GEMM over the gradients side by side); the thin G A accumulates onto that.
        dx = together(bases, list(grads))
        if big_g is not None:
            assert lora.a is not None  # big_g: adapted
            dx.view(-1, dx.shape[-1]).addmm_(big_g, lora.a)
    elif needs_x:
        pairs = list(zip(group.layers, grads, strict=True))
        # A multiplying base's product is a fresh tensor that cannot accumulate onto
        # anything (FP8's _scaled_mm): those first, then the thin G A and the dense bases
        # accumulate onto them in their GEMMs' epilogues (beta = 1), instead of a separate
        # [N, in] sum of the two (o's and down's backward: 7 ms of an FP8 llama-8b step).
        for layer, g in pairs:
            if layer.base is not None:
                part = layer.base.sloth_input_grad(g)
                dx = part if dx is None else dx.add_(part)
        if big_g is not None:
            a = lora.a
            assert a is not None  # big_g: adapted
            dx = big_g.mm(a) if dx is None else dx.view(-1, dx.shape[-1]).addmm_(big_g, a)
        for layer, g in pairs:
            if layer.base is not None:
                continue
            weight = dense_weight(layer, dtype)
            dx = g.mm(weight) if dx is None else dx.view(-1, dx.shape[-1]).addmm_(g, weight)
            del weight
    if big_g is None:
        return dx, lora_grads, None
    if any(needs_lora[0::2]):
        assert x2 is not None  # saved whenever an A needs its gradient
        if len({t.dtype for t in lora.params[0::2]}) == 1:
            d_a = lora.grad_product(0, big_g.t(), x2)  # one GEMM (and cast) for every A
        else:
            d_a = big_g.t().mm(x2)
        for k, (start, stop) in enumerate(group.slices):
            lora_grads[2 * k] = lora.grad_of(2 * k, d_a[start:stop])
    for k, i in enumerate(group.adapted):
        if needs_lora[2 * k + 1]:
            start, stop = group.slices[k]
            scaling = float(group.layers[i].scaling)
            assert xa is not None  # group.adapted
            # Scaled in the GEMM.
            lora_grads[2 * k + 1] = lora.grad_product(
                2 * k + 1, grads[i].t(), xa[:, start:stop], scaling
            )
    return dx, lora_grads, big_g


def save_input(ctx, x: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """What to save for ``x``: ``(x, None, None)``, or ``(None, norm input, norm weight)``
    for an untouched ``rms_norm`` output (then ``ctx.norm`` holds eps and gemma)."""
    source = norm_source(x)
    if source is None:
        ctx.norm = None
        return x, None, None
    ctx.norm = (source.eps, source.gemma)
    return None, source.x, source.weight


def load_input(ctx, x, source_x, source_w) -> torch.Tensor | None:
    """``x`` as :func:`save_input` left it: saved, or recomputed from the norm's input."""
    if ctx.norm is None:
        return x
    return recompute_rms_norm(source_x, source_w, *ctx.norm)


#: ``1`` keeps the attention projections' outputs for an offloaded layer's recompute. Off
#: by default: measured on an H100 (docs/benchmarks.md, session 14) it gained nothing at 8B
#: (bf16 +0.0%, fp8 +0.4%) and lost 4.4% at 1B, the extra copies to the host not hidden
#: behind the compute, while the layer prefetched ahead in backward holds them too (about
#: 160 MiB a layer for an 8B model at 8192 tokens, 80 MiB for a 1B).
KEEP_ENV = "SLOTH_KEEP_PROJECTIONS"


def _kept_outputs(key: Any, x: torch.Tensor, group: Group) -> list[torch.Tensor] | None:
    """In an offloaded layer's recompute, what its first pass kept for these projections
    (see :func:`_project`), if it is what they would compute now."""
    kept = None if key is None else kept_for_backward(key)  # None outside a recompute
    if kept is None:
        return None
    outputs, _ = kept
    shapes = [(*x.shape[:-1], out_features(layer)) for layer in group.layers]
    if [tuple(o.shape) for o in outputs] != shapes or any(o.dtype != x.dtype for o in outputs):
        return None
    return list(outputs)


def _first_pass(x: torch.Tensor, group: Group, key: Any, lora: Adapters):
    """:func:`group_forward` of ``x``, its outputs kept under ``key`` in an offloaded
    checkpoint's first pass (elsewhere, or without a key, nothing is kept)."""
    outputs, xa = group_forward(x, group, lora)
    if key is not None:
        keep_for_backward(key, tuple(outputs))
    return outputs, xa


class _LoRAProjections(torch.autograd.Function):
    """Base + LoRA projections of one input; one output per layer."""

    @staticmethod
    def forward(ctx, x, group, key, *params):
        lora = Adapters.of(group, params)
        kept = _kept_outputs(key, x, group)
        if kept is None:
            outputs, xa = _first_pass(x, group, key, lora)
        else:  # the recompute: the first pass's outputs; backward as always
            outputs, xa = kept, None
        ctx.group = group
        ctx.norm = None  # x unsaved (no adapter's A trains): nothing to recompute it from
        needs_a = any(ctx.needs_input_grad[3::2])
        needs_b = any(ctx.needs_input_grad[4::2])
        if kept is not None and needs_b and not needs_a:  # dB's x A^T, kept below
            assert lora.a is not None  # needs_b: adapted
            xa = x.reshape(-1, x.shape[-1]) @ lora.a.t()
        # x only for dA, x A^T only for dB; the frozen base weights are re-read from group.
        # An x fresh from rms_norm is not kept: its input and weight are (the norm's own
        # backward keeps them anyway), and x is recomputed from them in backward.
        x_saved = save_input(ctx, x) if needs_a else (None, None, None)
        # x A^T is kept for dB ([N, sum r]: 1/64 of x's bytes at r 16 of q/k/v on a 2048
        # wide model), not made again from x in backward: that thin GEMM read all of x
        # and was one launch more on a host-bound step.
        ctx.save_for_backward(*x_saved, xa if needs_b else None, *params)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x, source_x, source_w, xa, *params = ctx.saved_tensors
        x = load_input(ctx, x, source_x, source_w)
        group = ctx.group
        lora = Adapters.of(group, params)
        grads2 = [g.reshape(-1, g.shape[-1]) for g in grads]
        x2 = None if x is None else x.reshape(-1, x.shape[-1])
        if xa is None and x2 is not None and lora.a is not None and any(ctx.needs_input_grad[4::2]):
            xa = x2 @ lora.a.t()  # the forward's GEMM again
        needs_x = ctx.needs_input_grad[0]
        dx, lora_grads, _ = group_backward(
            x2, xa, grads2, group, lora, needs_x, ctx.needs_input_grad[3:]
        )
        if dx is not None:
            dx = dx.view(*grads[0].shape[:-1], dx.shape[-1])
        return (dx, None, None, *lora_grads)


def _project(x: torch.Tensor, layers: Sequence[LoRALinear], *,
             keep: bool = False) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The projections of ``x``. ``keep``: in an offloaded checkpoint's first pass their
    outputs go to host memory with the layer input
    (:func:`~sloth_core.checkpointing.keep_for_backward`), and the recompute takes them
    back instead of multiplying again: its backward needs only ``x`` (and ``x A^T``),
    never the outputs' values' making. That takes the attention's q/k/v and o products
    (and their NF4 dequantization) out of every recompute, for 2 bytes an output element
    over PCIe each way, overlapped with the compute; the MLP's outputs are larger per
    product and stay recomputed. On with ``SLOTH_KEEP_PROJECTIONS=1`` (:data:`KEEP_ENV`)."""
    group = Group.of(layers, x.dtype)
    key = None
    if keep and os.environ.get(KEEP_ENV, "0") == "1":
        weight = group.layers[0].weight  # the frozen base weight: one per projection group
        key = ("lora projections", id(weight), len(group.layers))
    params = group.lora_tensors()
    if not torch.is_grad_enabled():
        # A checkpoint's first pass (or inference): no graph to record, so no Function,
        # whose context and saved tensors cost a host-bound step's launches their lead.
        return tuple(_first_pass(x, group, key, Adapters.of(group, params))[0])
    return _LoRAProjections.apply(x, group, key, *params)


# -- the ops --------------------------------------------------------------------------------


def lora_linear(x: torch.Tensor, layer: LoRALinear) -> torch.Tensor:
    """``x W^T + b + s * B A x``: one (possibly NF4) linear layer with its adapter.

    Same signature and result as :func:`sloth_core.ops.reference.lora_linear`; saves only
    ``x`` and ``x A^T`` for backward. Settings the fast path does not serve (module
    docstring) use the reference.
    """
    if not fast_path_ok(x, (layer,)):
        return reference.lora_linear(x, layer)
    return _project(x, (layer,))[0]


def lora_qkv(
    x: torch.Tensor, q: LoRALinear, k: LoRALinear, v: LoRALinear
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q(x), k(x), v(x))``, each base + adapter, sharing one saved ``x``.

    Same signature and result as :func:`sloth_core.ops.reference.lora_qkv` (GQA shapes
    and base biases included); the three ``x A^T`` and the three ``dA`` each run as one
    GEMM. Settings the fast path does not serve use the reference.
    """
    if not fast_path_ok(x, (q, k, v)):
        return reference.lora_qkv(x, q, k, v)
    out_q, out_k, out_v = _project(x, (q, k, v), keep=True)
    return out_q, out_k, out_v


def lora_o(x: torch.Tensor, o: LoRALinear) -> torch.Tensor:
    """The attention output projection with its adapter; see :func:`lora_linear`.

    Same signature and result as :func:`sloth_core.ops.reference.lora_o`.
    """
    if not fast_path_ok(x, (o,)):
        return reference.lora_o(x, o)
    return _project(x, (o,), keep=True)[0]


REGISTRATIONS = [
    {"op": "lora_linear", "fn": lora_linear, "dtypes": DTYPES},
    {"op": "lora_qkv", "fn": lora_qkv, "dtypes": DTYPES},
    {"op": "lora_o", "fn": lora_o, "dtypes": DTYPES},
]
