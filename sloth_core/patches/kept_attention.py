"""Attention whose recompute runs no forward: the first pass keeps its output and log-sum-exp.

A checkpointed layer runs twice: once without saving anything (its input offloaded), and
again in backward to rebuild what backward reads. For the attention that second forward
is wasted work: backward needs the output and the softmax's log-sum-exp, which the first
pass computed already, and the query, key and value, which the recompute has anyway (the
projections' backward needs them). So in an offloaded layer's first pass the attention
runs the fused kernel SDPA itself would pick (flash or cuDNN on a GPU, flash on the CPU),
and keeps its output (to host memory beside the layer input, 8 KiB a token for an 8B
model) and log-sum-exp (on the device, 4 bytes a token and head) with
:func:`~sloth_core.checkpointing.keep_for_backward`; the recompute returns the kept
output and its backward calls that kernel's backward directly. At 8192 tokens the
attention forward is about 5% of an 8B model's step (docs/benchmarks.md).

Packed rows and shared-prompt segments, which go through the flash varlen kernels on a
GPU, take the same path through those kernels (:func:`attend_kept_varlen`: their forward
with its log-sum-exp, their own backward operator). Otherwise only plain causal or full
attention without a mask or dropout takes this path (a mask, softcap or sinks go the
usual way), only when SDPA's own choice for the
same inputs is a kernel whose backward takes a log-sum-exp, and only while the kept
outputs stay within :func:`~sloth_core.checkpointing.kept_host_limit` (a long sequence's
would not: its recompute computes the attention again). If calling the kernel fails
(a torch whose private operator differs), the path turns itself off with a warning and
SDPA runs as before; a failing backward recomputes the attention instead.

**Off on CUDA by default** (``SLOTH_KEPT_ATTENTION``, :func:`enabled`). On an H100 (torch
2.11, cuDNN's kernel at head size 128, llama's GQA) the path trained on wrong gradients:
a llama-8b-wide model's LoRA gradients had cosine 0.32 with the float32 reference where
the same layers with the attention recomputed had 0.9998, and 40 steps of the bench ended
at loss 1.80 where hf + PEFT and sloth without it reached 0.91 (docs/benchmarks.md,
session 23; ``scripts/gpu_grad_check.sh``). The cause, found with the kernel alone at
that size (``tests/test_kept_attention.py``): given q, k and v laid out otherwise than its
forward had them, cuDNN's backward returned dq and dk 70% off, and the recompute may lay
them out otherwise. The backward now hands them over as the first pass laid them out
(:func:`_laid_out`). On the H100 that made the kernel's own test right (session 24: the
4 relaid cases pass) but not the model's gradients: still cosine 0.32, and 40 steps
ended at loss 1.45 where hf + PEFT and sloth without it reached 0.91. A second cause
found after that run, in torch's source: it caches cuDNN's backward graph by q, k and
v's layouts alone, and SDPA's own backward (a layer that kept nothing) hands it the
output's gradient laid out as the output, where this path made it contiguous; the
later of the two reuses the other's graph and misreads it. The gradient now goes laid
out as the output too (:func:`_laid_out`), held on the CPU by a spy on the strides and
on CUDA by ``test_the_kept_backward_is_right_after_sdpas_own``. On the H100 (session 25)
that made the model's gradients right: the same cosine and relative error (0.0215) as
with the attention recomputed, to every printed digit. But the path buys nothing there
beyond noise (+0.2% for bf16 and +0.5% for FP8 weights at llama-8b 2048x4), so it
stays off on CUDA until a row shows it paying. ``SLOTH_KEPT_ATTENTION=1`` turns it on
everywhere, ``0`` off everywhere; unset, it runs on the CPU only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sloth_core.checkpointing import keep_for_backward, keeping, kept_for_backward

_aten = torch.ops.aten
#: SDPBackend's values, as ``torch._fused_sdp_choice`` returns them.
_FLASH, _CUDNN = 1, 3
_broken: set[str] = set()  # kernels whose call failed once: not tried again
#: ``1``: the kept path everywhere; ``0``: nowhere; unset: on the CPU only (see above).
ENV = "SLOTH_KEPT_ATTENTION"


def enabled(device: torch.device) -> bool:
    """Whether an offloaded layer keeps its attention on ``device`` (:data:`ENV`)."""
    setting = os.environ.get(ENV, "")
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise ValueError(f"{ENV}={setting!r}: 1 (on), 0 (off) or unset (on the CPU only)")
    return device.type == "cpu"


@dataclass(frozen=True)
class _Kernel:
    """One fused attention kernel's forward (returning the output, its log-sum-exp and
    what its backward takes besides) and backward (returning dq, dk, dv)."""

    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _cpu_forward(q, k, v, causal, scale):
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=None, scale=scale
    )
    return out, lse, ()


def _cpu_backward(dout, q, k, v, out, lse, extra, causal, scale):
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=None, scale=scale
    )


def _flash_forward(q, k, v, causal, scale):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
        _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    )
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _flash_backward(dout, q, k, v, out, lse, extra, causal, scale):
    cum_q, cum_k, max_q, max_k, seed, offset = extra
    return _aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset,
        scale=scale,
    )  # fmt: skip


def _cudnn_forward(q, k, v, causal, scale):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
        _aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )  # fmt: skip
    )
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _cudnn_backward(dout, q, k, v, out, lse, extra, causal, scale):
    cum_q, cum_k, max_q, max_k, seed, offset = extra
    return _aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal,
        scale=scale,
    )  # fmt: skip


_CPU = _Kernel("flash (CPU)", _cpu_forward, _cpu_backward)
_CUDA = {
    _FLASH: _Kernel("flash", _flash_forward, _flash_backward),
    _CUDNN: _Kernel("cudnn", _cudnn_forward, _cudnn_backward),
}


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """The fused kernel SDPA would run on these inputs in training, if it keeps a log-sum-exp."""
    if q.shape[-1] != v.shape[-1] or q.shape[-1] % 8:  # SDPA would pad the head: not this
        return None
    try:
        choice = torch._fused_sdp_choice(
            q.detach().requires_grad_(), k, v, None, 0.0, causal, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
    except (RuntimeError, TypeError):
        return None
    if q.device.type == "cpu":
        kernel = _CPU if choice == _FLASH else None
    else:
        kernel = _CUDA.get(choice) if q.device.type == "cuda" else None
    return None if kernel is None or kernel.name in _broken else kernel


class _Replay(torch.autograd.Function):
    """The recompute's attention: the first pass's output, and the kernel's backward
    (``backward(dout, q, k, v, out, lse)``); if that fails, the kernel named ``name`` is
    turned off and the gradients come from ``fallback(q, k, v)`` (the attention again,
    with autograd)."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse, name, backward, fallback, layouts=None):
        ctx.name, ctx.backward, ctx.fallback = name, backward, fallback
        ctx.layouts = layouts
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        try:
            # q, k and v as the first pass laid them out, and dout as the output is: see
            # _laid_out.
            laid = (q, k, v) if ctx.layouts is None else map(_laid_out, (q, k, v), ctx.layouts)
            dq, dk, dv = ctx.backward(_laid_out(dout, out.stride()), *laid, out, lse)
        except (RuntimeError, TypeError, NotImplementedError, AttributeError) as exc:
            _broken.add(ctx.name)
            warnings.warn(f"kept attention: the {ctx.name} backward failed ({exc}); "
                          "recomputing the attention instead", stacklevel=2)  # fmt: skip
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_() for t in (q, k, v)]
                dq, dk, dv = torch.autograd.grad(ctx.fallback(*inputs), inputs, dout)
        return dq, dk, dv, None, None, None, None, None, None


def _laid_out(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``t`` with ``stride``: itself where it has them, else a copy so laid out.

    cuDNN's backward reads the layouts it is handed only when it builds its graph. The
    forward's output goes with its inputs' layout: given the same q, k and v laid out
    otherwise, cuDNN's backward (torch 2.11, an H100) returned dq and dk 70% off while
    dv was right (``tests/test_kept_attention.py``), and the recompute may lay them out
    otherwise than the first pass. And torch caches that graph by q, k and v's layouts
    alone (``MHACacheKeyWrapper`` in ATen's ``cudnn/MHA.cpp``), not by the output's or
    the output gradient's: SDPA's own backward hands it ``dout`` laid out as the output
    (``[B, S, H, D]`` in memory), so a ``dout`` made contiguous (``[B, H, S, D]``) reuses
    a graph built for the other and is misread (session 24: with only q, k and v laid
    out, a whole model's LoRA gradients stayed at cosine 0.32). So ``dout`` goes to the
    kernel laid out as the output, as SDPA's own calls have it."""
    if t.stride() == stride:
        return t
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    return out.copy_(t)


def attend_kept(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
    causal: bool, scaling: float | None,
) -> torch.Tensor | None:  # fmt: skip
    """Maskless, dropout-free attention ``[B, Hq, S, D]`` through the kept path, or None
    where it does not apply (the caller then runs SDPA).

    In an offloaded checkpoint's recompute it returns what that layer's first pass kept
    for ``module``, with the fused kernel's backward; in the first pass it runs the kernel
    and keeps its output and log-sum-exp. ``key``/``value`` may have fewer heads (GQA)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    kept = kept_for_backward(module)
    if kept is not None:
        (out,), (kernel, lse, extra, was_causal, layouts) = kept
        if out.shape[:-1] == query.shape[:-1] and was_causal == causal:

            def backward(dout, q, k, v, out, lse):
                return kernel.backward(dout, q, k, v, out, lse, extra, causal, scale)

            def fallback(q, k, v):
                grouped = q.shape[1] != k.shape[1]
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                      enable_gqa=grouped)  # fmt: skip

            return _Replay.apply(query, key, value, out, lse, kernel.name, backward, fallback,
                                 layouts)  # fmt: skip
        return None  # not the call it was kept for: compute it
    if not keeping() or query.shape[2] != key.shape[2] or not enabled(query.device):
        return None
    kernel = _kernel(query, key, value, causal, scale)
    if kernel is None:
        return None
    try:
        out, lse, extra = kernel.forward(query, key, value, causal, scale)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        _broken.add(kernel.name)
        warnings.warn(f"kept attention: the {kernel.name} kernel failed ({exc}); "
                      "recomputing the attention instead", stacklevel=2)  # fmt: skip
        return None
    layouts = tuple(t.stride() for t in (query, key, value))
    keep_for_backward(module, (out,), (kernel, lse, extra, causal, layouts))
    return out


# -- the varlen kernels (packed rows, shared-prompt segments) ---------------------------------
_VARLEN = "varlen"


def attend_kept_varlen(
    module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    signature: tuple[Any, ...],
) -> torch.Tensor | None:  # fmt: skip
    """The varlen kernels' attention of flat ``[T, Hq, D]`` queries through the kept path,
    or None where it does not apply (the caller then runs the kernel as usual).

    As :func:`attend_kept` for SDPA: in an offloaded checkpoint's first pass ``forward(q,
    k, v)`` runs (returning the output and its log-sum-exp) and both are kept for
    ``module``; in its recompute the kept output comes back and its gradient goes through
    ``backward(dout, q, k, v, out, lse)``. ``signature`` (the cuts' lengths and the
    options) must be the same in both passes; ``forward`` with autograd is what a failing
    ``backward`` falls back to."""
    if _VARLEN in _broken:
        return None
    kept = kept_for_backward(module)
    if kept is not None:
        (out,), (lse, was, layouts) = kept
        if out.shape == q.shape and was == signature:
            fallback = lambda *qkv: forward(*qkv)[0]  # noqa: E731
            return _Replay.apply(q, k, v, out, lse, _VARLEN, backward, fallback, layouts)
        return None  # not the call it was kept for: compute it
    if not keeping() or not enabled(q.device):
        return None
    try:
        out, lse = forward(q, k, v)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        _broken.add(_VARLEN)
        warnings.warn(f"kept attention: the varlen kernel with its log-sum-exp failed ({exc}); "
                      "recomputing the attention instead", stacklevel=2)  # fmt: skip
        return None
    keep_for_backward(module, (out,), (lse, signature, tuple(t.stride() for t in (q, k, v))))
    return out
