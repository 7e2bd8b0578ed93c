"""Fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``) through the LoRA ops.

PEFT puts one adapter on a fused projection: a single ``lora_A``/``lora_B`` pair whose
``lora_B`` spans the whole fused output, so q, k and v (or gate and up) share one
``lora_A``. The patched forwards therefore run each fused projection whole through the
single-linear op ``lora_linear`` and split its output where the modeling file does;
that is exactly what PEFT's ``lora.Linear`` computes, with the same adapter gradients.
(Splitting the adapter into per-part bundles for ``lora_qkv``/``lora_mlp`` would compute
the shared ``x A^T`` once per part and hand the kernels slices of parameters.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch

from sloth_core.patching import bind_forward, call_original

from .attention import _model_functions, attend
from .mlp import MLP_ACTIVATIONS, lift_linear, mlp_activation

if TYPE_CHECKING:
    from sloth_core.ops import OpRegistry


def patch_fused_attention(
    module: torch.nn.Module,
    ops: OpRegistry,
    *,
    attention_kwargs: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
) -> bool:
    """Route a self-attention with a fused ``qkv_proj`` through ``lora_linear``, ``rope``
    and ``lora_o``.

    ``qkv_proj`` produces ``[q | k | v]`` concatenated on the last dimension (q:
    ``config.num_attention_heads * head_dim``, k and v: ``num_key_value_heads * head_dim``
    each), as Phi-3's does; its output is split in that order, then rotated by ``ops.rope``,
    which rotates only the first ``R`` dims of each head when the model's ``cos``/``sin``
    cover ``R < head_dim`` (partial rotary). The rest is :func:`patch_attention`'s: the
    cache update and the attention function ``config._attn_implementation`` names, looked
    up per call, then ``o_proj`` through ``lora_o``. When a projection cannot be lifted
    (see :func:`~sloth_core.patches.mlp.lift_linear`) the original forward runs.

    The module needs ``qkv_proj``/``o_proj``, ``head_dim``, ``scaling``, ``layer_idx``,
    ``config`` and ``attention_dropout``. ``False`` if patched already, if the module has
    per-head ``q_norm``/``k_norm`` (not handled here), or if its modeling file has no
    ``eager_attention_forward``.

    Args:
        module: the attention module.
        ops: the op registry.
        attention_kwargs: extra keyword arguments for the attention function, from the
            module, as its modeling file passes them (Phi-3's ``sliding_window``).
    """
    if getattr(module, "q_norm", None) is not None or getattr(module, "k_norm", None) is not None:
        return False
    interface, eager = _model_functions(module)
    if eager is None:
        return False

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kw):
        qkv_proj, o_proj = lift_linear(self.qkv_proj), lift_linear(self.o_proj)
        if args:  # positional past attention_mask: the caller follows the original's order
            original = (hidden_states, position_embeddings, attention_mask, *args)
            return call_original(self, *original, **kw)
        if position_embeddings is None or qkv_proj is None or o_proj is None:
            kw.update(position_embeddings=position_embeddings, attention_mask=attention_mask)
            return call_original(self, hidden_states, **kw)
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q_size = self.config.num_attention_heads * self.head_dim
        kv_heads = getattr(self, "num_key_value_heads", None) or self.config.num_key_value_heads
        kv_size = kv_heads * self.head_dim
        qkv = ops.lora_linear(hidden_states, qkv_proj)
        query = qkv[..., :q_size].view(shape).transpose(1, 2)
        key = qkv[..., q_size : q_size + kv_size].view(shape).transpose(1, 2)
        value = qkv[..., q_size + kv_size :].view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = ops.rope(query, key, cos, sin)
        output, weights = attend(
            self, query, key, value, attention_mask, kw, interface, eager, attention_kwargs
        )
        output = output.reshape(*input_shape, -1).contiguous()
        return ops.lora_o(output, o_proj), weights

    return bind_forward(module, forward)


def _activation_fn_matches(module: torch.nn.Module, activation: str) -> bool:
    # Phi-3 names it activation_fn, Llama-likes act_fn; the module's own is the truth.
    act_fn = getattr(module, "act_fn", None)
    if act_fn is None:
        act_fn = getattr(module, "activation_fn", None)
    if act_fn is None:
        return True  # nothing to contradict the caller
    from transformers.activations import ACT2FN

    names = [name for name, op_name in MLP_ACTIVATIONS.items() if op_name == activation]
    return any(type(act_fn) is type(ACT2FN[name]) for name in names)


def _gated(ops: OpRegistry, activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if activation == "swiglu":
        return ops.swiglu(gate, up)
    return ops.geglu(gate, up, approximate="tanh" if activation == "geglu_tanh" else "none")


def patch_fused_mlp(
    module: torch.nn.Module, ops: OpRegistry, *, activation: str | None = None
) -> bool:
    """Route a gated MLP with a fused ``gate_up_proj`` through ``lora_linear`` and the
    activation op; ``False`` if patched already or unsupported.

    ``down_proj(act(gate) * up)`` where ``gate, up = gate_up_proj(x).chunk(2, dim=-1)``,
    as Phi-3's MLP computes it: ``gate_up_proj`` and ``down_proj`` run through
    ``lora_linear`` (LoRA on the whole fused output, as PEFT puts it), the activation
    through ``swiglu`` or ``geglu``. The projections are lifted at every call, so adapters
    attached after patching, disabled adapters and ``merge_adapter`` are honoured; when
    one cannot be lifted (see :func:`~sloth_core.patches.mlp.lift_linear`) the module's
    original forward runs.

    Args:
        module: a module with ``gate_up_proj`` and ``down_proj``, and ``act_fn`` or
            ``activation_fn``.
        ops: the op registry.
        activation: ``"swiglu"``, ``"geglu"`` or ``"geglu_tanh"``; by default from
            ``module.config`` (see :func:`~sloth_core.patches.mlp.mlp_activation`). A
            module whose ``act_fn``/``activation_fn`` is not that activation is left alone.
    """
    if activation is None:
        activation = mlp_activation(getattr(module, "config", None))
    if activation is None or activation not in MLP_ACTIVATIONS.values():
        return False
    if not _activation_fn_matches(module, activation):
        return False

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        # One input, whatever the modeling file names it (Phi-3: hidden_states; Llama: x).
        inputs = (*args, *kwargs.values())
        # Submodules: torch types a module's attributes as Tensor | Module.
        gate_up = lift_linear(cast(torch.nn.Module, self.gate_up_proj))
        down = lift_linear(cast(torch.nn.Module, self.down_proj))
        if len(inputs) != 1 or gate_up is None or down is None:
            return call_original(self, *args, **kwargs)
        (x,) = inputs
        gate, up = ops.lora_linear(x, gate_up).chunk(2, dim=-1)
        return ops.lora_linear(_gated(ops, activation, gate, up), down)

    return bind_forward(module, forward)
