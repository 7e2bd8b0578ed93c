"""Gated MLPs (``gate_proj``/``up_proj``/``down_proj``) routed through the ``lora_mlp`` op."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from sloth_core.checkpointing import layer_memo, output_unread
from sloth_core.ops import LoRALinear
from sloth_core.patching import bind_forward, call_original

from .tiled_mlp import tiled_mlp

if TYPE_CHECKING:
    from sloth_core.ops import OpRegistry

#: transformers' activation names (``hidden_act``/``hidden_activation``) -> ``lora_mlp``'s.
MLP_ACTIVATIONS = {
    "silu": "swiglu",
    "swish": "swiglu",
    "gelu": "geglu",
    "gelu_pytorch_tanh": "geglu_tanh",
}

# Base weights the LoRA ops can multiply: dense floats, 4-bit packed with a quant_state, or
# a quantizer plugin's layer that multiplies itself (LoRALinear.base: sloth-fp8's). Any
# other int8 (LLM.int8) or fp8 weight would be fed to F.linear as if it were dense: wrong.
_DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def lift_linear(module: torch.nn.Module) -> LoRALinear | None:
    """``LoRALinear.from_module(module)``, or ``None`` where the LoRA ops would not equal it.

    ``None`` for what ``from_module`` refuses (merged adapters, several active adapters,
    DoRA and other variants, ``lora_B`` biases, ``Conv1D`` bases) and for base weights
    that are neither dense floats, 4-bit packed nor a layer that multiplies itself
    (``LoRALinear.base``; bitsandbytes' int8, say): the caller then runs the
    module's original forward, so its output is always exactly PEFT's.
    """
    # In a checkpointed layer's recompute, what its first pass lifted: the same tensors,
    # without walking PEFT's modules again (some 220 lifts of a 16-layer step).
    memo = layer_memo()
    if memo is not None:
        lifted = memo.get(("lift_linear", id(module)))
        if lifted is not None and lifted[0] is module:
            return lifted[1]
    try:
        layer = LoRALinear.from_module(module)
    except ValueError:
        layer = None
    if layer is not None and layer.quant_state is None and layer.base is None:
        if layer.weight.dtype not in _DENSE_DTYPES:
            layer = None
    if memo is not None:
        memo[("lift_linear", id(module))] = (module, layer)
    return layer


def mlp_activation(config: Any) -> str | None:
    """The ``lora_mlp`` activation for ``config``'s ``hidden_activation`` or ``hidden_act``.

    ``None`` for an activation the op does not implement (the MLP is then left alone).
    """
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return MLP_ACTIVATIONS.get(name) if isinstance(name, str) else None


def _act_matches(module: torch.nn.Module, activation: str) -> bool:
    # The config field a model reads can differ between architectures and releases
    # (Gemma: hidden_act vs hidden_activation); the module's own act_fn is the truth.
    act_fn = getattr(module, "act_fn", None)
    if act_fn is None:
        return True  # no act_fn attribute to contradict the caller
    from transformers.activations import ACT2FN

    names = [name for name, op_name in MLP_ACTIVATIONS.items() if op_name == activation]
    return any(type(act_fn) is type(ACT2FN[name]) for name in names)


def _features(linear: Any, side: str) -> int | None:
    """``in_features``/``out_features`` of a linear layer, PEFT's and bitsandbytes' too."""
    value = getattr(linear, f"{side}_features", None)
    return value if isinstance(value, int) else None


def patch_gated_mlp(
    module: torch.nn.Module, ops: OpRegistry, *, activation: str | None = None
) -> bool:
    """Route a gated MLP through ``ops.lora_mlp``; ``False`` if patched already or unsupported.

    ``down_proj(act(gate_proj(x)) * up_proj(x))`` with LoRA on any of the projections. The
    three projections are lifted into :class:`LoRALinear` bundles at every call (a few
    attribute reads), so adapters attached after patching, disabled adapters and
    ``merge_adapter`` are honoured; when one projection cannot be lifted (see
    :func:`lift_linear`) the module's original forward runs.

    Args:
        module: a module with ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn``.
        ops: the op registry.
        activation: ``"swiglu"``, ``"geglu"`` or ``"geglu_tanh"``; by default from
            ``module.config`` (see :func:`mlp_activation`). A module whose ``act_fn``
            is not that activation is left alone.

    A module without all three projections (a plain MLP) is left alone (``False``).
    """
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return False  # not a gated MLP (a plain c_fc/c_proj or up/down one): left alone
    if activation is None:
        activation = mlp_activation(getattr(module, "config", None))
    if activation is None or not _act_matches(module, activation):
        return False

    def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        projections = (self.gate_proj, self.up_proj, self.down_proj)  # typed Tensor | Module
        gate, up, down = (lift_linear(cast(torch.nn.Module, p)) for p in projections)
        if gate is None or up is None or down is None:
            return call_original(self, x)

        def run(rows: torch.Tensor, output: bool) -> torch.Tensor:
            return ops.lora_mlp(rows, gate, up, down, activation=activation, output=output)

        # A long sequence: a tile of rows at a time, so [tokens, intermediate] never exists.
        size = (_features(self.gate_proj, "out"), _features(self.down_proj, "out"))
        if size[0] and size[1]:
            tiled = tiled_mlp(self, run, x, (gate, up, down), size[0], size[1])
            if tiled is not None:
                return tiled
        # In a checkpoint's recompute the output's value is often never read (it only
        # feeds the residual add): then the op may skip the down projection.
        if output_unread(self):
            return run(x, False)
        out = run(x, True)
        output_unread(self, out)  # probed on the first recompute
        return out

    return bind_forward(module, forward)
