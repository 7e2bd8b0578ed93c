"""The gated MLP with LoRA on gate, up and down: ``down(act(gate(x)) * up(x))``.

Saved for backward: ``x``, the two pre-activation projections ``e = gate(x)`` and
``u = up(x)``, and the tiny ``x A^T`` / ``h A_down^T`` products, where PEFT's modules
keep ``x``, ``e``, ``u``, ``act(e)`` and ``h = act(e) * u``. The backward recomputes the
activation from ``e`` and ``u`` (``h`` only in row chunks, for ``dA`` of down, and for
``h A_down^T`` after a forward called with ``output=False``, which computes no ``h``) and
writes ``d_gate``/``d_up`` over the saved ``e``/``u`` buffers. Base weights are never
saved; NF4 ones are dequantized again in backward, one at a time. With a base that
multiplies itself (FP8), ``e`` and ``u`` are its products alone, and every kernel that
reads them adds the adapters' thin products (:mod:`sloth_kernels.gated_lora`).

Because the backward reuses its saved buffers, it may run once per forward: a second
backward through the same graph (``retain_graph=True``) raises.
"""

from __future__ import annotations

import os

import torch

from sloth_core.ops import reference
from sloth_core.ops.reference import LoRALinear
from sloth_kernels.activations import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward
from sloth_kernels.gated_lora import (
    Addend,
    Addends,
    gated_lora_backward_inplace,
    gated_lora_forward,
    serves,
)
from sloth_kernels.lora import (
    DTYPES,
    Adapters,
    Group,
    fast_path_ok,
    group_backward,
    group_forward,
    group_g,
    layer_served,
    load_input,
    out_features,
    save_input,
)

_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")

#: Elements of ``h`` recomputed at once for ``dA`` of down (~64 MiB in bf16): bounds the
#: backward's extra memory whatever the token count.
_H_CHUNK_ELEMENTS = 1 << 25


#: ``0``: a base that multiplies itself (FP8) gets its gate/up adapters added onto its
#: products by ``addmm_`` again, instead of in the gated kernels (:func:`_deferred`).
GATED_LORA_ENV = "SLOTH_GATED_LORA"


def _deferred(gate_up: Group) -> tuple[int, ...]:
    """Which of gate (0) and up (1) leave their adapter's thin product to the gated kernels
    (:mod:`sloth_kernels.gated_lora`): those with a base that multiplies itself and cannot
    accumulate onto it in its GEMM (FP8), where the ``addmm_`` after it is a read and a
    write of the whole ``[N, I]`` output; a dense base's GEMM adds it for free."""
    if os.environ.get(GATED_LORA_ENV, "1") == "0":
        return ()
    return tuple(
        i
        for i, (start, stop) in zip(gate_up.adapted, gate_up.slices, strict=True)
        if gate_up.layers[i].base is not None and serves(stop - start)
    )


def _addends(gate_up: Group, deferred, lora_gu: Adapters, xa) -> Addends | None:
    """The deferred adapters (:func:`_deferred`) as the gated kernels take them."""
    if not deferred:
        return None
    parts: list[Addend | None] = [None, None]
    for k, (i, (start, stop)) in enumerate(zip(gate_up.adapted, gate_up.slices, strict=True)):
        if i in deferred:
            scaling = float(gate_up.layers[i].scaling)
            parts[i] = Addend(start, stop - start, lora_gu.b(k), scaling)
    return Addends(xa, *parts)


def _act_forward(
    gate: torch.Tensor, up: torch.Tensor, activation: str, addends: Addends | None = None
) -> torch.Tensor:
    if addends is not None:
        flat = gated_lora_forward(
            gate.view(-1, gate.shape[-1]), up.view(-1, up.shape[-1]), addends, activation
        )
        return flat.view(gate.shape)
    if activation == "swiglu":
        return swiglu_forward(gate, up)
    return geglu_forward(gate, up, "tanh" if activation == "geglu_tanh" else "none")


def _act_backward_inplace(grad, gate, up, activation: str, addends: Addends | None = None):
    if addends is not None:
        return gated_lora_backward_inplace(grad, gate, up, addends, activation)
    if activation == "swiglu":
        return swiglu_backward(grad, gate, up, inplace=True)
    return geglu_backward(
        grad, gate, up, "tanh" if activation == "geglu_tanh" else "none", inplace=True
    )


def _mlp_forward(x, gate_up: Group, down: Group, activation: str, output: bool, lora):
    """``(out, e, u, x A^T, h A_down^T, deferred)`` of the MLP; ``lora``: the gate/up
    group's ``[A, B, ...]`` then down's ``[A, B]`` (when it has an adapter)."""
    n_gu = 2 * len(gate_up.adapted)
    lora_gu, lora_down = Adapters.of(gate_up, lora[:n_gu]), Adapters.of(down, lora[n_gu:])
    deferred = _deferred(gate_up)
    (e, u), xa = group_forward(x, gate_up, lora_gu, defer=deferred)
    if output:
        hidden = _act_forward(e, u, activation, _addends(gate_up, deferred, lora_gu, xa))
        # down's adapter: ha = h A^T, kept for dB of down (tiny).
        (out,), ha = group_forward(hidden, down, lora_down)
        del hidden
    else:  # the caller reads no value of out: down's product is skipped, and h too
        # (dB of down's h A^T is made in backward, from the h chunks dA recomputes)
        shape = (*x.shape[:-1], out_features(down.layers[0]))
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
        ha = None
    return out, e, u, xa, ha, deferred


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up, down, activation, output, *lora):
        n_gu = 2 * len(gate_up.adapted)
        out, e, u, xa, ha, deferred = _mlp_forward(x, gate_up, down, activation, output, lora)
        ctx.gate_up, ctx.down, ctx.activation, ctx.n_gu = gate_up, down, activation, n_gu
        ctx.deferred = deferred  # e and u are then base products: the kernels add x A^T B^T
        ctx.backward_done = False
        needs_gu_a = any(ctx.needs_input_grad[5 : 5 + n_gu : 2])
        needs_gu_b = any(ctx.needs_input_grad[6 : 5 + n_gu : 2])
        needs_down_b = any(ctx.needs_input_grad[6 + n_gu :: 2])
        # No adapter on gate/up (attention-only LoRA): x is not saved, and backward's
        # load_input must find that said (save_input sets it otherwise).
        ctx.norm = None
        ctx.save_for_backward(
            *(save_input(ctx, x) if needs_gu_a else (None, None, None)),
            e,
            u,
            xa if needs_gu_b or deferred else None,
            ha if needs_down_b else None,
            *lora,
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.backward_done:
            raise RuntimeError(
                "lora_mlp's backward reuses its saved buffers and runs once per forward; "
                "retain_graph=True with a second backward is not supported"
            )
        ctx.backward_done = True
        x, source_x, source_w, e, u, xa, ha, *lora = ctx.saved_tensors
        gate_up, down, activation, n_gu = ctx.gate_up, ctx.down, ctx.activation, ctx.n_gu
        lora_gu, lora_down = Adapters.of(gate_up, lora[:n_gu]), Adapters.of(down, lora[n_gu:])
        needs = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        e2, u2 = e.view(-1, e.shape[-1]), u.view(-1, u.shape[-1])
        addends = _addends(gate_up, ctx.deferred, lora_gu, xa)

        # down: dh = g W_d + G_d A_d, and dB_d; dA_d = G_d^T h needs h, recomputed in chunks.
        down_needs = [False, *needs[6 + n_gu :]]
        needs_down_a = bool(down.adapted) and needs[5 + n_gu]
        g_down = grad_a = None
        if down.adapted and ha is None and needs[6 + n_gu]:  # output=False: h A^T made here
            g_down = group_g([g2], down, lora_down)
            ha, grad_a = _down_chunks(
                g_down if needs_down_a else None, e2, u2, activation, lora_down.a, addends
            )
        dh, down_grads, g_down = group_backward(
            None, ha, [g2], down, lora_down, True, down_needs, g_down
        )
        if needs_down_a:
            if grad_a is None:
                grad_a = _down_chunks(g_down, e2, u2, activation, addends=addends)[1]
            assert grad_a is not None  # g_down: down is adapted
            down_grads[0] = lora_down.grad_of(0, grad_a)

        # Activation backward over the saved e/u buffers (they are not needed afterwards).
        d_gate, d_up = _act_backward_inplace(dh, e2, u2, activation, addends)
        del dh
        x = load_input(ctx, x, source_x, source_w)  # after e/u are freed: a lower peak
        x2 = None if x is None else x.reshape(-1, x.shape[-1])
        gu_needs = needs[5 : 5 + n_gu]
        dx, gu_grads, _ = group_backward(
            x2, xa, [d_gate, d_up], gate_up, lora_gu, needs[0], gu_needs
        )
        if dx is not None:
            dx = dx.view(*grad.shape[:-1], dx.shape[-1])
        return (dx, None, None, None, None, *gu_grads, *down_grads)


def _down_chunks(
    g_down: torch.Tensor | None,
    e2: torch.Tensor,
    u2: torch.Tensor,
    activation: str,
    a_down: torch.Tensor | None = None,
    addends: Addends | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(h A^T, dA_down = G^T h)`` (``G = s g B``, ``[N, r]``), each only where asked
    (``a_down``, ``g_down``), with ``h = act(e) * u`` recomputed in row chunks, bitwise as
    in forward, so that no ``[N, I]`` buffer is added (``addends``: the adapters the
    gated kernels add to ``e`` and ``u``, as in forward)."""
    rows = e2.shape[0]
    step = max(1, _H_CHUNK_ELEMENTS // max(1, e2.shape[1]))
    ha = None
    if a_down is not None:
        ha = torch.empty(rows, a_down.shape[0], dtype=e2.dtype, device=e2.device)
    grad_a = None
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = None if addends is None else addends.rows(start, stop)
        hidden = _act_forward(e2[start:stop], u2[start:stop], activation, chunk)
        if ha is not None:
            assert a_down is not None  # ha is made only with it
            torch.mm(hidden, a_down.t(), out=ha[start:stop])
        if g_down is not None:
            part = g_down[start:stop].t()
            grad_a = part.mm(hidden) if grad_a is None else grad_a.addmm_(part, hidden)
    return ha, grad_a


def lora_mlp(
    x: torch.Tensor,
    gate: LoRALinear,
    up: LoRALinear,
    down: LoRALinear,
    *,
    activation: str = "swiglu",
    output: bool = True,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with LoRA on all three projections, fused backward.

    Same signature and result as :func:`sloth_core.ops.reference.lora_mlp`
    (``activation`` ``"swiglu"``, ``"geglu"`` or ``"geglu_tanh"``). Saves ``x``, the gate
    and up outputs and the ``[N, r]`` LoRA products; see the module docstring. Settings
    the fast path does not serve (dropout, mixed dtypes, FP4, ...) use the reference.
    ``output=False`` (the caller reads no value of the result: a checkpoint's recompute)
    skips ``down``'s product, base and adapter; the gradients are the same.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    inter = out_features(gate)
    served = (
        fast_path_ok(x, (gate, up))
        and out_features(up) == inter
        and layer_served(down, inter, x.dtype, x.device)
    )
    if not served:
        return reference.lora_mlp(x, gate, up, down, activation=activation, output=output)
    gate_up, down_group = Group.of((gate, up), x.dtype), Group.of((down,), x.dtype)
    lora = [*gate_up.lora_tensors(), *down_group.lora_tensors()]
    if not torch.is_grad_enabled():  # a checkpoint's first pass or inference: no Function
        return _mlp_forward(x, gate_up, down_group, activation, bool(output), lora)[0]
    return _LoRAMLP.apply(x, gate_up, down_group, activation, bool(output), *lora)


REGISTRATIONS = [
    {"op": "lora_mlp", "fn": lora_mlp, "dtypes": DTYPES},
]
