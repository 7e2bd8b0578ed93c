"""Gated MLP activations: SwiGLU (Llama, Qwen, Mistral) and GeGLU (Gemma).

One elementwise kernel per direction: the forward reads ``gate`` and ``up`` and writes
``act(gate) * up``; the backward re-reads them and recomputes the activation instead of
storing it, so an MLP saves only its two projections.

Besides the autograd ops :func:`swiglu` and :func:`geglu`, the plain launchers
:func:`swiglu_forward`, :func:`swiglu_backward`, :func:`geglu_forward` and
:func:`geglu_backward` serve fused MLP backwards (e.g. the LoRA MLP) that manage their
own buffers: with ``inplace=True`` the gradients overwrite ``gate`` and ``up``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sloth_core.ops import reference

#: Elements per program: 8 per thread at 4 warps, i.e. 16-byte vector accesses in 16 bit.
_BLOCK = 1024
_NUM_WARPS = 4
_GELU_APPROXIMATIONS = ("none", "tanh")

# Activation codes (constexpr) shared by the two kernels.
_SILU, _GELU_ERF, _GELU_TANH = 0, 1, 2


@triton.jit
def _tanh(x):
    # No tl.tanh in every Triton version; this form is exact in fp32 to ~1 ulp of 1.
    # tanh is 1.0 in fp32 beyond |x| = 9: clamping keeps exp() from overflowing to inf.
    x = tl.minimum(tl.maximum(x, -10.0), 10.0)
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, WITH_GRAD: tl.constexpr):
    """``(act(g), act'(g))`` in fp32; the derivative only when ``WITH_GRAD``."""
    if ACT == 0:  # silu
        sig = tl.sigmoid(g)
        a = g * sig
        if WITH_GRAD:
            d = sig * (1.0 + g * (1.0 - sig))
        else:
            d = a
    elif ACT == 1:  # exact gelu
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        if WITH_GRAD:
            d = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
        else:
            d = a
    else:  # tanh gelu
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = _tanh(inner)
        a = 0.5 * g * (1.0 + t)
        if WITH_GRAD:
            d = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (
                1.0 + 3.0 * 0.044715 * g * g
            )
        else:
            d = a
    return a, d


@triton.jit
def _gated_forward_kernel(
    gate_ptr, up_ptr, out_ptr, n_elements, ACT: tl.constexpr, BLOCK: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT, False)
    # torch rounds the activation to the input dtype before multiplying by ``up``: so do we.
    a = a.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offsets, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_backward_kernel(
    grad_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    n_elements,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # dgate/dup may alias gate/up (inplace): every element is loaded before it is stored,
    # and no two programs touch the same element.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT, True)
    tl.store(dgate_ptr + offsets, (dy * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, (dy * a).to(dup_ptr.dtype.element_ty), mask=mask)


# -- launchers ------------------------------------------------------------------------


def _act_code(approximate: str) -> int:
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_GELU_APPROXIMATIONS}, got {approximate!r}")
    return _GELU_ERF if approximate == "none" else _GELU_TANH


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            "gate and up must share shape, dtype and device, got "
            f"{tuple(gate.shape)}/{gate.dtype}/{gate.device} and "
            f"{tuple(up.shape)}/{up.dtype}/{up.device}"
        )


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, _BLOCK),)


def _forward(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    _check_pair(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        _gated_forward_kernel[_grid(n)](
            gate, up, out, n, ACT=act, BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
    return out


def _backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: int, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pair(gate, up)
    if grad.shape != gate.shape:
        raise ValueError(f"grad {tuple(grad.shape)} does not match gate {tuple(gate.shape)}")
    grad = grad.contiguous()
    if inplace:
        if not (gate.is_contiguous() and up.is_contiguous()):
            raise ValueError("inplace backward needs contiguous gate and up buffers")
        dgate, dup = gate, up
    else:
        gate, up = gate.contiguous(), up.contiguous()
        dgate = torch.empty_like(gate, memory_format=torch.contiguous_format)
        dup = torch.empty_like(up, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        _gated_backward_kernel[_grid(n)](
            grad, gate, up, dgate, dup, n, ACT=act, BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
    return dgate, dup


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (no autograd): a new tensor shaped and typed like ``gate``.

    ``gate`` and ``up`` share shape and dtype (e.g. ``[N, I]``); math is fp32, and the
    activation is rounded to the input dtype before the product, as torch does.
    """
    return _forward(gate, up, _SILU)


def swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dgate, dup)`` of ``silu(gate) * up`` given the output gradient ``grad``.

    The activation is recomputed from ``gate``. With ``inplace=True`` (contiguous
    ``gate``/``up`` required) ``dgate`` is written into ``gate``'s storage and ``dup`` into
    ``up``'s, and those tensors are returned: the caller's buffers are reused.
    """
    return _backward(grad, gate, up, _SILU, inplace)


def geglu_forward(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` (no autograd); see :func:`swiglu_forward`."""
    return _forward(gate, up, _act_code(approximate))


def geglu_backward(
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    approximate: str = "none",
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dgate, dup)`` of ``gelu(gate, approximate) * up``.

    See :func:`swiglu_backward`, ``inplace`` included.
    """
    return _backward(grad, gate, up, _act_code(approximate), inplace)


# -- autograd ops -----------------------------------------------------------------------


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.act = act
        # The inputs, not their contiguous copies: a copy would double the saved memory.
        ctx.save_for_backward(gate, up)
        return _forward(gate, up, act)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        dgate, dup = _backward(grad, gate, up, ctx.act, inplace=False)
        return dgate.view_as(gate), dup.view_as(up), None


def _kernel_serves(gate: torch.Tensor, up: torch.Tensor) -> bool:
    # Broadcasting or mixed dtypes (rare in an MLP) go to the reference, which promotes.
    return gate.shape == up.shape and gate.dtype == up.dtype and gate.device == up.device


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as ``LlamaMLP`` computes it, forward and backward in Triton.

    Same signature and result as :func:`sloth_core.ops.reference.swiglu`; the backward
    recomputes the activation. Broadcast shapes or mixed dtypes use the reference.
    """
    if not _kernel_serves(gate, up):
        return reference.swiglu(gate, up)
    return _GatedActivation.apply(gate, up, _SILU)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate) * up`` (``approximate`` ``"none"`` or ``"tanh"``) as ``GemmaMLP`` computes it.

    Same signature and result as :func:`sloth_core.ops.reference.geglu`; broadcast shapes
    or mixed dtypes use the reference.
    """
    act = _act_code(approximate)
    if not _kernel_serves(gate, up):
        return reference.geglu(gate, up, approximate)
    return _GatedActivation.apply(gate, up, act)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

REGISTRATIONS = [
    {"op": "swiglu", "fn": swiglu, "dtypes": _DTYPES},
    {"op": "geglu", "fn": geglu, "dtypes": _DTYPES},
]
