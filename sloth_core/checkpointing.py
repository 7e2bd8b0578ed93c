"""Activation checkpointing whose saved layer inputs live in CPU memory.

Plain checkpointing keeps every decoder layer's input on the GPU until backward (32 x
seq x hidden in bf16: 2 GiB for an 8B model at 8192 tokens). Here each input is copied
to pinned host memory as the forward goes on (asynchronously, on the compute stream),
the layer runs without saving anything, and the backward brings the input back, runs the
layer again with gradients and back-propagates through it. The copies overlap the
compute of the neighbouring layers, so the step costs about what plain checkpointing
costs, with the layer inputs off the GPU.

:class:`Checkpointing` is the one vocabulary of the modes (``sloth train``'s
``gradient_checkpointing`` option, ``FastLanguageModel`` after it maps Unsloth's
spellings) and :func:`apply_checkpointing` the one rule for when to offload.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import torch


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t.detach().clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)  # ordered on this stream before t's memory is reused
    return host


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, hidden_states, *args):
        ctx.function, ctx.args = function, args
        ctx.device = hidden_states.device
        ctx.host = _to_host(hidden_states)
        # The recomputation must draw the same random numbers (dropout) as this pass.
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
        with torch.no_grad():
            out = function(hidden_states, *args)
        ctx.is_tuple = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        x = ctx.host.to(ctx.device, non_blocking=True).detach().requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad():
                out = ctx.function(x, *ctx.args)
        outs = out if ctx.is_tuple else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.host = None
        return (None, x.grad, *([None] * len(ctx.args)))


def offloaded_checkpoint(function: Callable[..., Any], hidden_states: torch.Tensor, *args: Any):
    """``gradient_checkpointing_func`` for transformers' checkpointed layers, offloaded.

    ``function`` is the layer with its keyword arguments bound (transformers passes it
    so); ``hidden_states`` is the layer input. Outside training with gradients, or for
    inputs that are not a tensor, it simply calls the layer.
    """
    if not torch.is_grad_enabled() or not isinstance(hidden_states, torch.Tensor):
        return function(hidden_states, *args)
    if not hidden_states.requires_grad:
        # The first layer's input comes from frozen embeddings: make the LoRA weights
        # inside reachable for autograd, as ``enable_input_require_grads`` would.
        hidden_states = hidden_states.detach().requires_grad_(True)
    return _OffloadedCheckpoint.apply(function, hidden_states, *args)


class Checkpointing(str, enum.Enum):
    """Activation checkpointing: ``off`` keeps every activation; ``on`` recomputes them in
    backward, the layer inputs kept on the device; ``offload`` recomputes them with the
    inputs in pinned host memory (where that helps: see :func:`apply_checkpointing`);
    ``auto`` picks one of those per decoder layer to fit a memory budget
    (:func:`sloth_core.memory_plan.plan_for_step`), and is ``offload`` until planned."""

    OFF = "off"
    ON = "on"
    OFFLOAD = "offload"
    AUTO = "auto"


def apply_checkpointing(model: Any, mode: Checkpointing, *, sharded: bool = False) -> bool:
    """Turn ``mode`` on for ``model``; whether the layer inputs are offloaded.

    Offloaded only on a GPU (on the CPU the inputs are in host memory already) and not for
    a model FSDP2 shards over several processes (``sharded``): that pairing keeps the
    inputs on the device, as measured (docs/benchmarks.md)."""
    mode = Checkpointing(mode)
    if mode is Checkpointing.AUTO:  # memory-lean until plan_for_step fits it to a budget
        mode = Checkpointing.OFFLOAD
    if mode is Checkpointing.OFF:
        return False
    offload = (
        mode is Checkpointing.OFFLOAD and not sharded and any(p.is_cuda for p in model.parameters())
    )
    enable_checkpointing(model, offload=offload)
    return offload


def enable_checkpointing(model: Any, *, offload: bool = False) -> None:
    """Non-reentrant activation checkpointing, or with ``offload`` the layer inputs kept in
    pinned host memory (:func:`offloaded_checkpoint`), whatever the device."""
    if offload:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers' own hook for the checkpointing function of its decoder layers.
        base._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=offloaded_checkpoint
        )
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
