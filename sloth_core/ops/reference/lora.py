"""Reference linear layers with an optional LoRA adapter, as PEFT's ``lora.Linear`` runs them.

A :class:`LoRALinear` is a plain bundle of tensors lifted off a module (``nn.Linear``, a
bitsandbytes ``Linear4bit``, or a PEFT LoRA layer around either), so ops and kernels see
tensors, never PEFT or bitsandbytes objects. Nothing here imports either library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .activations import geglu, swiglu
from .nf4 import dequantize_nf4

_MLP_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")


@dataclass
class LoRALinear:
    """One linear layer ``y = x W^T + b`` with an optional LoRA adapter ``s * B A x``.

    Attributes:
        weight: the dense base weight ``[out, in]``, or a bitsandbytes packed 4-bit weight
            when ``quant_state`` is set.
        bias: ``[out]`` or ``None``.
        lora_A: ``[r, in]`` or ``None`` (no adapter).
        lora_B: ``[out, r]`` or ``None``.
        scaling: the adapter's ``lora_alpha / r`` (or rsLoRA's) factor.
        dropout: applied to ``x`` before ``lora_A``, as PEFT does; ``None`` or
            ``nn.Identity`` means none.
        quant_state: the bitsandbytes ``QuantState`` of a 4-bit ``weight`` (duck-typed).
        base: a quantizer plugin's layer that multiplies by its own weight (``weight`` is
            then its stored form, e.g. sloth-fp8's e4m3 values), duck-typed: calling it is
            its forward (``x W^T + b``, with autograd), ``sloth_matmul(x, shared)`` is
            ``x W^T`` and ``sloth_input_grad(g)`` is ``g W``, both without autograd and
            fresh tensors, and ``dense_weight(dtype)`` the dequantized ``W``. ``shared``
            is ``None`` or a dict the fused ops pass to every product of the same ``x`` in
            one call, where a layer may keep what it derives from ``x`` alone for the next
            (sloth-fp8: the input's e4m3 rows), under keys its own. Optionally the class
            offers ``sloth_input_grads(layers, grads)``: ``sum_i grads_i W_i`` over layers
            of one input, all of that class (the fused ops' q/k/v, gate/up), a fresh
            tensor; the fused ops call it instead of summing ``sloth_input_grad``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None
    quant_state: Any = None
    base: Any = None

    @property
    def has_lora(self) -> bool:
        """Whether an adapter is attached."""
        return self.lora_A is not None and self.lora_B is not None

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight as a dense ``[out, in]`` tensor, dequantized when 4-bit.

        Args:
            dtype: cast to this dtype; ``None`` keeps the weight's own (for a 4-bit weight,
                ``quant_state.dtype``). A 4-bit weight is dequantized to
                ``quant_state.dtype`` first, then cast, as ``bnb.matmul_4bit`` does.
        """
        if self.base is not None:
            return self.base.dense_weight(dtype)
        weight = self.weight
        if self.quant_state is not None:
            weight = dequantize_nf4(weight, self.quant_state)
        return weight if dtype is None else weight.to(dtype)

    @classmethod
    def from_module(cls, module: nn.Module) -> LoRALinear:
        """Lift the tensors off ``module``, duck-typed, without importing PEFT or bitsandbytes.

        Args:
            module: an ``nn.Linear``; a bitsandbytes ``Linear4bit`` (its weight carries a
                ``quant_state``); or a PEFT LoRA layer (``peft.tuners.lora.Linear`` or its
                bitsandbytes counterpart) around either, of which the one active adapter
                is taken.

        Raises:
            ValueError: the PEFT layer has merged weights, several active adapters, DoRA or
                another LoRA variant, a bias on ``lora_B``, or a ``Conv1D`` base
                (``fan_in_fan_out``); its output is not ``x W^T + b + s * B A x`` and it
                must not take this path.
        """
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            return cls._from_peft(module)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"{type(module).__name__} has no weight tensor to lift")
        # A class that defines sloth_matmul offers the whole protocol (``base``); read off
        # the class, not the module: this runs for every projection at every forward.
        multiplies = callable(getattr(type(module), "sloth_matmul", None))
        return cls(
            weight=weight,
            bias=getattr(module, "bias", None),
            quant_state=getattr(weight, "quant_state", None),
            base=module if multiplies else None,
        )

    @classmethod
    def _from_peft(cls, module: Any) -> LoRALinear:  # a PEFT LoRA layer, duck-typed
        kind = type(module).__name__
        base = cls.from_module(module.get_base_layer())
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"{kind} wraps a Conv1D (fan_in_fan_out, [in, out] weight)")
        name = active_adapter(module)
        if name is None:
            return base  # PEFT then runs the base layer alone
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name):
            raise ValueError(f"{kind} adapter {name!r} uses DoRA or another LoRA variant")
        if getattr(module, "lora_bias", {}).get(name) or module.lora_B[name].bias is not None:
            raise ValueError(f"{kind} adapter {name!r} has a bias on lora_B; not supported")
        dropout = module.lora_dropout[name]
        return cls(  # not dataclasses.replace: this runs for every projection at every forward
            weight=base.weight,
            bias=base.bias,
            quant_state=base.quant_state,
            base=base.base,
            lora_A=module.lora_A[name].weight,
            lora_B=module.lora_B[name].weight,
            scaling=module.scaling[name],
            dropout=None if isinstance(dropout, nn.Identity) else dropout,
        )


def active_adapter(module: Any) -> str | None:
    """The one active adapter of a PEFT LoRA layer (duck-typed), or ``None`` if none runs.

    Raises:
        ValueError: merged weights, or several active adapters.
    """
    kind = type(module).__name__
    if getattr(module, "merged", False):
        raise ValueError(f"{kind} has merged LoRA weights; unmerge them before patching")
    if getattr(module, "disable_adapters", False):
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) > 1:
        raise ValueError(f"{kind} has several active LoRA adapters {active}; one is supported")
    return active[0] if active else None


def lora_linear(x: torch.Tensor, layer: LoRALinear) -> torch.Tensor:
    """``x W^T + b + (B A dropout(x)) * scaling``, in PEFT's ``lora.Linear`` order and dtypes.

    The base product runs in ``x.dtype`` (a 4-bit weight is dequantized to it); ``x`` is
    cast to the LoRA weights' dtype for the adapter, the two are added, and the sum is
    cast back to the base result's dtype.

    Args:
        x: ``[..., in]``.
        layer: the weights.

    Returns:
        ``[..., out]``.
    """
    if layer.base is not None:  # a quantizer plugin's layer: its own forward, as PEFT runs it
        result = layer.base(x)
    elif layer.quant_state is not None:
        bias = layer.bias if layer.bias is None else layer.bias.to(x.dtype)
        result = F.linear(x, layer.dense_weight(x.dtype), bias)
    else:
        result = F.linear(x, layer.weight, layer.bias)
    lora_A, lora_B = layer.lora_A, layer.lora_B
    if lora_A is None or lora_B is None:  # not layer.has_lora
        return result
    result_dtype = result.dtype
    x_lora = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
    if layer.dropout is not None:
        x_lora = layer.dropout(x_lora)
    result = result + F.linear(F.linear(x_lora, lora_A), lora_B) * layer.scaling
    return result.to(result_dtype)


def lora_mlp(
    x: torch.Tensor,
    gate: LoRALinear,
    up: LoRALinear,
    down: LoRALinear,
    *,
    activation: str = "swiglu",
    output: bool = True,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``: a gated MLP with LoRA on all three projections.

    Equals ``LlamaMLP`` (``"swiglu"``) or ``GemmaMLP`` (``"geglu_tanh"``) with PEFT LoRA on
    ``gate_proj``/``up_proj``/``down_proj``; the projections run in the same order, so
    dropout draws the same random masks.

    Args:
        x: ``[..., hidden]``.
        gate: ``[inter, hidden]`` projection.
        up: ``[inter, hidden]`` projection.
        down: ``[hidden, inter]`` projection.
        activation: ``"swiglu"`` (silu), ``"geglu"`` (exact gelu) or ``"geglu_tanh"``
            (tanh-approximated gelu).
        output: ``False`` when the caller reads no value of the result and only
            back-propagates through it (a checkpoint's recompute whose MLP output only
            feeds additions): an implementation may then skip ``down``'s product and
            return a tensor whose values are unspecified. Gradients must be the same
            either way. The reference computes the output regardless.

    Returns:
        ``[..., hidden]``.
    """
    del output  # a hint for faster implementations
    if activation not in _MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {_MLP_ACTIVATIONS}, got {activation!r}")
    gate_out = lora_linear(x, gate)
    up_out = lora_linear(x, up)
    if activation == "swiglu":
        hidden = swiglu(gate_out, up_out)
    else:
        hidden = geglu(gate_out, up_out, "tanh" if activation == "geglu_tanh" else "none")
    return lora_linear(hidden, down)


def lora_qkv(
    x: torch.Tensor, q: LoRALinear, k: LoRALinear, v: LoRALinear
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value projections of one input, each with its own adapter.

    Args:
        x: ``[..., hidden]``.
        q: ``[Hq * D, hidden]`` projection.
        k: ``[Hk * D, hidden]`` projection.
        v: ``[Hk * D, hidden]`` projection.

    Returns:
        ``(q(x), k(x), v(x))``, each ``[..., out]`` of its projection.
    """
    return lora_linear(x, q), lora_linear(x, k), lora_linear(x, v)


def lora_o(x: torch.Tensor, o: LoRALinear) -> torch.Tensor:
    """The attention output projection with its adapter.

    Args:
        x: ``[..., Hq * D]``, the attention output with heads flattened.
        o: ``[hidden, Hq * D]`` projection.

    Returns:
        ``[..., hidden]``.
    """
    return lora_linear(x, o)
