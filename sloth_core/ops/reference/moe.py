"""Reference mixture-of-experts ops: top-k routing and the routed experts, per-expert LoRA.

:class:`ExpertLinear` is a plain bundle of tensors lifted off transformers' 3-D expert
parameters (``Qwen3MoeExperts``, ``MixtralExperts``, ``GptOssExperts``), with the LoRA that
PEFT attaches through ``LoraConfig(target_parameters=[...])`` (its ``ParamWrapper``)
unwrapped into per-expert factors. Nothing here imports PEFT or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .lora import active_adapter

MOE_ACTIVATIONS = ("swiglu", "gpt_oss")
GATE_UP_LAYOUTS = ("halves", "interleaved")
#: The suffix of the buffer holding a quantized expert parameter's row scales
#: (``experts.gate_up_proj_row_scales`` for ``experts.gate_up_proj``).
ROW_SCALES = "_row_scales"


@dataclass
class ExpertLinear:
    """A stack of ``E`` expert linear maps ``y_e = x W_e^T + b_e + s * (x A_e^T) B_e^T``.

    Attributes:
        weight: ``[E, out, in]``; may be a non-contiguous view (gpt-oss stores
            ``[E, in, out]``, seen here through ``.transpose(1, 2)``).
        bias: ``[E, out]`` or ``None``.
        lora_A: ``[E, r, in]`` or ``None`` (no adapter); views of PEFT's weights.
        lora_B: ``[E, out, r]`` or ``None``.
        scaling: the adapter's ``lora_alpha / r`` (or rsLoRA's) factor.
        weight_scale: ``None``, or float32 ``[E, out]``: then ``weight`` holds quantized
            values (FP8 e4m3, frozen) and the map's weight is
            ``weight * weight_scale[..., None]`` (:meth:`dense_weight`). A quantizer
            plugin stores a 3-D expert parameter so, with its scales in the module's
            buffer named ``<parameter>`` + :data:`ROW_SCALES` (sloth-fp8).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    weight_scale: torch.Tensor | None = None

    @property
    def has_lora(self) -> bool:
        """Whether an adapter is attached."""
        return self.lora_A is not None and self.lora_B is not None

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The stack's weights ``[E, out, in]`` in ``dtype``: ``weight`` itself when it is
        not quantized and in ``dtype`` already, else dequantized (a new tensor)."""
        if self.weight_scale is None:
            return self.weight.to(dtype)
        return _dequantized(self.weight, self.weight_scale, dtype)

    def dense(self, dtype: torch.dtype) -> ExpertLinear:
        """This map with :meth:`dense_weight` as its weight: itself if not quantized."""
        if self.weight_scale is None:
            return self
        return replace(self, weight=self.dense_weight(dtype), weight_scale=None)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert``'s map of ``x`` ``[n, in]``: ``[n, out]`` in ``x.dtype``.

        The base product runs in ``x.dtype``; the adapter in the LoRA weights' dtype, then
        the sum is cast back, as PEFT's ``lora.Linear`` orders it.
        """
        bias = None if self.bias is None else self.bias[expert]
        weight = self.weight[expert]
        if self.weight_scale is not None:
            weight = _dequantized(weight, self.weight_scale[expert], x.dtype)
        result = F.linear(x, weight, bias)
        if self.lora_A is None or self.lora_B is None:
            return result
        x_lora = x.to(self.lora_A.dtype)
        delta = F.linear(F.linear(x_lora, self.lora_A[expert]), self.lora_B[expert])
        return (result + delta * self.scaling).to(result.dtype)

    @classmethod
    def from_parameter(
        cls,
        module: nn.Module,
        name: str,
        *,
        bias: str | None = None,
        transposed: bool | None = None,
    ) -> ExpertLinear:
        """Lift expert parameter ``name`` (and its bias and LoRA) off an experts module.

        Args:
            module: a transformers experts module, or PEFT ``ParamWrapper``s around it
                (nested one per targeted parameter: the outer wraps the inner, whose
                ``base_layer`` is finally the experts module); duck-typed.
            name: the 3-D parameter, e.g. ``"gate_up_proj"`` or ``"down_proj"``.
            bias: the name of its ``[E, out]`` bias; ``None`` takes ``f"{name}_bias"``
                when the module has such a tensor (gpt-oss).
            transposed: whether the parameter is stored ``[E, in, out]`` (gpt-oss) rather
                than ``[E, out, in]``; ``None`` reads the module's ``is_transposed``
                (set by transformers' ``use_experts_implementation``), else ``False``.

        Raises:
            ValueError: the wrapper has merged weights, several active adapters, or a
                bias on ``lora_B``; its output is not the map above.
        """
        wrappers, base = _unwrap(module)
        param = _original(base, name)
        if transposed is None:
            transposed = bool(getattr(base, "is_transposed", False))
        bias_tensor = getattr(base, bias or f"{name}_bias", None)
        if bias is not None and not isinstance(bias_tensor, torch.Tensor):
            raise ValueError(f"{type(base).__name__} has no bias tensor {bias!r}")
        layer = cls(
            weight=param.transpose(1, 2) if transposed else param,
            bias=bias_tensor if isinstance(bias_tensor, torch.Tensor) else None,
            weight_scale=_row_scales(base, name, param),
        )
        wrapper = wrappers.get(name)
        if wrapper is None:
            return layer
        factors = _peft_factors(wrapper)
        if factors is None:
            return layer
        lhs, rhs, layer.scaling = factors  # delta(param) = scaling * lhs @ rhs
        if transposed:  # delta(W) = delta(param)^T = rhs^T lhs^T
            layer.lora_A, layer.lora_B = lhs.transpose(1, 2), rhs.transpose(1, 2)
        else:
            layer.lora_A, layer.lora_B = rhs, lhs
        return layer


def expert_linears(
    module: nn.Module, names: tuple[str, str] = ("gate_up_proj", "down_proj")
) -> tuple[ExpertLinear, ExpertLinear]:
    """``(gate_up, down)`` of a transformers experts module, PEFT-wrapped or not.

    Args:
        module: as :meth:`ExpertLinear.from_parameter` takes it.
        names: the gate/up and the down parameters' names.
    """
    return ExpertLinear.from_parameter(module, names[0]), ExpertLinear.from_parameter(
        module, names[1]
    )


def _unwrap(module: Any) -> tuple[dict[str, Any], nn.Module]:
    """PEFT's nested ``ParamWrapper``s by the parameter each adapts, and the experts module."""
    wrappers: dict[str, Any] = {}
    while hasattr(module, "parameter_name") and hasattr(module, "base_layer"):
        wrappers.setdefault(module.parameter_name, module)
        module = module.base_layer
    return wrappers, module


def _row_scales(module: nn.Module, name: str, param: torch.Tensor) -> torch.Tensor | None:
    """The row scales ``[E, out]`` of ``module``'s expert parameter ``name`` (its stored
    tensor ``param``) stored quantized (the buffer ``name + ROW_SCALES``), or ``None`` for a
    parameter in a float dtype of 16 bits or more.

    Raises:
        ValueError: the parameter is in an 8-bit float dtype without its scales.
    """
    scales = getattr(module, name + ROW_SCALES, None)
    if isinstance(scales, torch.Tensor):
        return scales
    if param.element_size() == 1:
        kind = type(module).__name__
        raise ValueError(f"{kind}.{name} is stored in 8 bits without its {name}{ROW_SCALES}")
    return None


def _dequantized(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values * scales[..., None]`` (``values`` ``[..., out, in]``) in float32, then ``dtype``."""
    return (values.float() * scales[..., None]).to(dtype)


def _original(module: nn.Module, name: str) -> torch.Tensor:
    """The stored parameter, not PEFT's ``W + delta`` (a parametrization during its forward)."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and name in parametrizations:
        return parametrizations[name].original
    param = getattr(module, name)
    if not isinstance(param, torch.Tensor) or param.dim() != 3:
        raise ValueError(f"{type(module).__name__}.{name} is not a 3-D expert parameter")
    return param


def _peft_factors(wrapper: Any) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(lhs, rhs, scaling)`` with ``delta(param)[e] = scaling * lhs[e] @ rhs[e]``, or ``None``.

    PEFT stores ``lora_A.weight`` ``[r*E, in_features]`` (expert-major rows) and
    ``lora_B.weight`` ``[out_features, r*E]`` (expert-minor columns). Its
    ``in_features``/``out_features`` are the parameter's dims 1 and 2, swapped (then
    ``_did_swap_in_out_features``) for an ``[E, out, in]`` parameter; the views follow
    ``ParamWrapper.get_delta_factors``.
    """
    adapter = active_adapter(wrapper)
    if adapter is None:
        return None
    if wrapper.lora_B[adapter].bias is not None:
        kind = type(wrapper).__name__
        raise ValueError(f"{kind} adapter {adapter!r} has a bias on lora_B; not supported")
    experts = wrapper.num_experts
    weight_A = wrapper.lora_A[adapter].weight
    weight_B = wrapper.lora_B[adapter].weight
    weight_A = weight_A.reshape(experts, -1, weight_A.shape[-1])  # [E, r, in_features]
    weight_B = weight_B.reshape(weight_B.shape[0], -1, experts).permute(2, 0, 1)  # [E, out_f, r]
    scaling = float(wrapper.scaling[adapter])
    if getattr(wrapper, "_did_swap_in_out_features", False):  # in_features is param dim 2
        return weight_B, weight_A, scaling
    return weight_A.transpose(1, 2), weight_B.transpose(1, 2), scaling


def moe_route(
    router_logits: torch.Tensor, top_k: int, *, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: softmax over all experts in fp32, the ``top_k`` largest, renormalised.

    Args:
        router_logits: ``[T, E]``.
        top_k: experts per token.
        normalize: renormalise the ``top_k`` probabilities to sum to 1 (Qwen3-MoE's
            ``norm_topk_prob``; Mixtral and gpt-oss always do, which equals their
            softmax over the top-k logits).

    Returns:
        ``(weights [T, top_k] fp32, indices [T, top_k])``, largest first.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def moe_activation(
    gate_up: torch.Tensor,
    *,
    activation: str = "swiglu",
    gate_up_layout: str = "halves",
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """Gated activation of ``gate_up`` ``[n, 2I]``: ``[n, I]``, as :func:`moe_experts` takes it."""
    if gate_up_layout == "halves":
        gate, up = gate_up.chunk(2, dim=-1)
    elif gate_up_layout == "interleaved":
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    else:
        raise ValueError(f"gate_up_layout must be one of {GATE_UP_LAYOUTS}, not {gate_up_layout!r}")
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "gpt_oss":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"activation must be one of {MOE_ACTIVATIONS}, not {activation!r}")


def moe_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: ExpertLinear,
    down: ExpertLinear,
    *,
    activation: str = "swiglu",
    gate_up_layout: str = "halves",
    alpha: float = 1.702,
    limit: float = 7.0,
    output: bool = True,
) -> torch.Tensor:
    """The routed experts: ``sum_k weight_k * down_e(act(gate_up_e(x)))`` for ``e = index_k``.

    Each expert runs on the tokens routed to it (a loop over the experts hit, as
    transformers' eager experts do); the weighted outputs are summed in fp32.

    Args:
        x: ``[T, H]``.
        top_k_index: ``[T, k]`` expert of each choice.
        top_k_weights: ``[T, k]`` routing weight of each choice.
        gate_up: ``out = 2 * I``.
        down: ``out = H``.
        activation: ``"swiglu"`` (``silu(gate) * up``) or ``"gpt_oss"`` (gate clamped to
            ``max=limit``, up to ``[-limit, limit]``, then
            ``(up + 1) * gate * sigmoid(alpha * gate)``).
        gate_up_layout: ``"halves"`` (gate = the first ``I`` outputs, up = the next ``I``:
            Qwen3-MoE, Mixtral) or ``"interleaved"`` (gate = even, up = odd: gpt-oss).
        alpha: gpt-oss's sigmoid scale.
        limit: gpt-oss's clamp.
        output: ``False`` when the caller reads no value of the result and only
            back-propagates through it (a checkpoint's recompute whose block output only
            feeds the residual add): an implementation may then skip the ``down``
            products and return a tensor whose values are unspecified. The gradients must
            be the same either way. The reference computes the output regardless.

    Returns:
        ``[T, H]`` in ``x.dtype``.
    """
    del output  # a hint for faster implementations
    rows, tokens = [x.new_zeros(0, down.weight.shape[1])], [top_k_index.new_zeros(0)]
    for expert in torch.unique(top_k_index.reshape(-1)).tolist():
        token, choice = torch.where(top_k_index == expert)
        hidden = moe_activation(
            gate_up.forward(x[token], expert),
            activation=activation,
            gate_up_layout=gate_up_layout,
            alpha=alpha,
            limit=limit,
        )
        rows.append(down.forward(hidden, expert) * top_k_weights[token, choice, None])
        tokens.append(token)
    return sum_rows(torch.cat(rows), torch.cat(tokens), x.shape[0]).to(x.dtype)


def sum_rows(rows: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """The weighted combine: ``rows`` ``[N, C]`` summed into ``[size, C]`` by ``index``
    ``[N]`` (each row into ``index[n]``, in row order), in fp32."""
    out = torch.zeros(size, rows.shape[1], dtype=torch.float32, device=rows.device)
    return out.index_add_(0, index, rows.to(torch.float32))
