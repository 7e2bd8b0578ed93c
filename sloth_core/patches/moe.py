"""Sparse mixture-of-experts blocks routed through the ``moe_route`` and ``moe_experts`` ops.

transformers 5 keeps the experts of Qwen3-MoE and Mixtral as two 3-D parameters of one
module (``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``) and
the router as a module of its own (``gate``) returning ``(logits, weights, indices)``. The
patched block calls the router module itself, so that what transformers records from it
(``output_router_logits=True``: the logits behind the load-balancing loss) and a LoRA PEFT
put on it are kept, then hands the logits to ``ops.moe_route`` and the tokens to
``ops.moe_experts`` with the experts' weights lifted into :class:`ExpertLinear` views,
LoRA included when ``LoraConfig(target_parameters=[...])`` wrapped them in PEFT's
``ParamWrapper``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, cast

import torch

from sloth_core.checkpointing import output_unread, side_output
from sloth_core.ops import ExpertLinear
from sloth_core.patching import bind_forward, call_original, is_patched, unwrap_model

if TYPE_CHECKING:
    from sloth_core.ops import OpRegistry

#: The experts' activation function names (``config.hidden_act``) ``moe_experts`` computes.
_SWIGLU = ("silu", "swish")


def _base(module: Any) -> Any:
    """The module inside PEFT's (nested) ``ParamWrapper``s, or ``module`` itself."""
    while hasattr(module, "parameter_name") and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _stored(module: Any, name: str) -> Any:
    # During PEFT's forward a targeted parameter is a parametrization; its stored tensor is
    # ``parametrizations[name].original``. Outside it (patch time), the plain parameter.
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and name in parametrizations:
        return parametrizations[name].original
    return getattr(module, name, None)


def _act_name(experts: Any) -> str | None:
    act_fn = getattr(experts, "act_fn", None)
    if act_fn is None:
        return None
    from transformers.activations import ACT2FN

    return next((name for name in _SWIGLU if type(act_fn) is type(ACT2FN[name])), None)


def _check_experts(experts: Any, num_experts: int, hidden: int, activation: str) -> str | None:
    """Why the experts are not what ``moe_experts`` computes, or ``None``."""
    gate_up, down = _stored(experts, "gate_up_proj"), _stored(experts, "down_proj")
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return f"experts {type(experts).__name__} have no 3-D gate_up_proj and down_proj"
    if gate_up.dim() != 3 or down.dim() != 3:
        return "expert weights are not 3-D"
    if getattr(experts, "is_transposed", False):  # stored [E, in, out] (gpt-oss)
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    inter = down.shape[2]
    shapes = (tuple(gate_up.shape), tuple(down.shape))
    if shapes != ((num_experts, 2 * inter, hidden), (num_experts, hidden, inter)):
        return f"expert shapes {shapes[0]}, {shapes[1]} do not match the router"
    for name, size in (("gate_up_proj", 2 * inter), ("down_proj", hidden)):
        bias = getattr(experts, f"{name}_bias", None)
        if bias is not None and tuple(bias.shape) != (num_experts, size):
            return f"expert bias {name}_bias of shape {tuple(bias.shape)}"
    if activation == "swiglu" and _act_name(experts) is None:
        return f"expert activation {type(getattr(experts, 'act_fn', None)).__name__} is not SiLU"
    if activation == "gpt_oss" and not all(
        isinstance(getattr(experts, name, None), float) for name in ("alpha", "limit")
    ):
        return "gpt-oss experts without float alpha and limit"
    return None


def moe_block_mismatch(
    module: torch.nn.Module,
    *,
    normalize: bool | None = None,
    router: str = "gate",
    activation: str = "swiglu",
    **_: Any,
) -> str | None:
    """Why :func:`patch_moe_block` would leave ``module`` alone, or ``None`` if it fits.

    What the ops compute: a router module (attribute ``router``) with a ``[E, H]`` ``weight``
    and a ``top_k`` returning the logits first; an experts module ``experts`` with
    ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (or both stored
    ``[E, in, out]`` where the module says ``is_transposed``), biases ``[E, out]`` if any,
    and a SiLU ``act_fn`` (``activation="swiglu"``) or float ``alpha`` and ``limit``
    (``"gpt_oss"``); a known renormalisation of the top-k weights (``normalize``, or the
    router's ``norm_topk_prob``); no router jitter (random noise no patch can reproduce).
    The other keywords of :func:`patch_moe_block` are accepted and ignored.
    """
    gate, experts = getattr(module, router, None), getattr(module, "experts", None)
    if gate is None or experts is None:
        return f"no {router} (router) and experts modules"
    gate, experts = _base(gate), _base(experts)
    weight = _stored(gate, "weight")
    top_k = getattr(gate, "top_k", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not isinstance(top_k, int):
        return f"router {type(gate).__name__} has no [E, H] weight and top_k"
    num_experts, hidden = weight.shape
    reason = _check_experts(experts, num_experts, hidden, activation)
    if reason is not None:
        return reason
    if not 0 < top_k <= num_experts:
        return f"top_k {top_k} of {num_experts} experts"
    if normalize is None and not isinstance(getattr(gate, "norm_topk_prob", None), bool):
        return "the router's top-k renormalisation is unknown (no norm_topk_prob)"
    if getattr(module, "jitter_noise", 0) or getattr(gate, "jitter_noise", 0):
        return "router jitter noise (random)"
    return None


def patch_moe_block(
    module: torch.nn.Module,
    ops: OpRegistry,
    *,
    normalize: bool | None = None,
    router: str = "gate",
    activation: str = "swiglu",
    gate_up_layout: str = "halves",
    returns_scores: bool = False,
) -> bool:
    """Route a sparse MoE block through ``ops.moe_route`` and ``ops.moe_experts``.

    ``False`` if patched already or if :func:`moe_block_mismatch` gives a reason (then the
    block keeps transformers' forward). The patched forward:

    1. calls the block's router module on the tokens ``[T, H]`` and keeps its logits: what
       transformers' ``OutputRecorder`` captures for ``output_router_logits=True`` (the
       load-balancing loss, weighted by ``router_aux_loss_coef``) is therefore the same
       tensor, and a LoRA on the router (PEFT's ``ParamWrapper`` on its ``weight``) is
       applied by PEFT itself;
    2. ``weights, indices = ops.moe_route(logits, top_k, normalize=...)``;
    3. ``ops.moe_experts(x, indices, weights, gate_up, down, ...)`` with both expert stacks
       (and their biases) lifted by :meth:`ExpertLinear.from_parameter` at every call, so
       adapters attached after patching, disabled adapters and PEFT's
       ``target_parameters`` LoRA are honoured; a wrapper the op cannot express (merged
       weights, several active adapters) runs the block's original forward;
    4. in a checkpoint's recompute where the block's output value is unread
       (:func:`~sloth_core.checkpointing.output_unread`, probed on the first recompute),
       ``moe_experts(..., output=False)``: the down products are skipped.

    Args:
        module: a block with a router and ``experts`` (Qwen3-MoE's
            ``Qwen3MoeSparseMoeBlock``, Mixtral's ``MixtralSparseMoeBlock``; gpt-oss's
            ``GptOssMLP`` with ``router="router"``, ``activation="gpt_oss"``,
            ``gate_up_layout="interleaved"``, ``normalize=True``, ``returns_scores=True``).
        ops: the op registry.
        normalize: renormalise the top-k weights to sum to 1; ``None`` reads the
            router's ``norm_topk_prob`` (Qwen3-MoE). Mixtral always renormalises: ``True``
            (as gpt-oss's softmax over the top-k logits does).
        router: the attribute holding the router module.
        activation: ``moe_experts``'s ``"swiglu"`` or ``"gpt_oss"`` (with the experts'
            ``alpha`` and ``limit``).
        gate_up_layout: ``"halves"`` (gate, then up) or ``"interleaved"`` (gpt-oss).
        returns_scores: the block returns ``(hidden_states, routing_weights)`` (gpt-oss).
    """
    if is_patched(module):
        return False
    if moe_block_mismatch(module, normalize=normalize, router=router, activation=activation):
        return False

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if args or kwargs:  # the blocks take the hidden states alone
            return call_original(self, hidden_states, *args, **kwargs)
        experts = cast(torch.nn.Module, self.experts)  # torch types it Tensor | Module
        try:
            gate_up = ExpertLinear.from_parameter(experts, "gate_up_proj")
            down = ExpertLinear.from_parameter(experts, "down_proj")
        except ValueError:  # merged adapters, several active ones: PEFT's own forward
            return call_original(self, hidden_states)
        gate = cast(torch.nn.Module, getattr(self, router))
        top_k, base = _base(gate).top_k, _base(experts)
        renormalise = _base(gate).norm_topk_prob if normalize is None else normalize
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = gate(x)[0]
        # What transformers records for the load-balancing loss: inside sloth's checkpoint
        # an output of it too, or the loss would pass no gradient back (side_output).
        side_output(logits)
        weights, indices = ops.moe_route(logits, top_k, normalize=renormalise)
        extra = {"alpha": base.alpha, "limit": base.limit} if activation == "gpt_oss" else {}

        def run(output: bool) -> torch.Tensor:
            return ops.moe_experts(
                x, indices, weights, gate_up, down,
                activation=activation, gate_up_layout=gate_up_layout, output=output, **extra,
            ).reshape(shape)  # fmt: skip

        # In a checkpoint's recompute the block's output value is often never read (it only
        # feeds the residual add): then the op may skip the down products.
        if output_unread(self):
            out = run(False)
        else:
            out = run(True)
            output_unread(self, out)  # probed on the first recompute
        return (out, weights.to(logits.dtype)) if returns_scores else out

    return bind_forward(module, forward)


def router_aux_loss(
    model: torch.nn.Module, outputs: Any, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """The load-balancing loss of an MoE causal LM's decoder ``outputs``, unweighted.

    ``None`` when the decoder returned no router logits (``output_router_logits`` off).
    The modeling file's own ``load_balancing_loss_func`` computes it (Qwen3-MoE's and
    Mixtral's), with the model's ``num_experts`` and ``num_experts_per_tok``, exactly as
    its ``ForCausalLM.forward`` does; the caller adds ``router_aux_loss_coef`` times it.
    """
    router_logits = getattr(outputs, "router_logits", None)
    if router_logits is None:
        return None
    loss_func = sys.modules[type(model).__module__].load_balancing_loss_func
    return loss_func(router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)


def unpatched_quantized_experts(model: torch.nn.Module) -> list[str]:
    """The MoE blocks of ``model`` (names in the unwrapped model) whose experts a quantizer
    plugin stores quantized (row-scale buffers, ``ops.reference.ROW_SCALES``: sloth-fp8's)
    and that no plugin patched: only sloth's ``moe_experts`` op computes such experts;
    transformers' own forward would multiply the quantized values unscaled."""
    from sloth_core.ops.reference import ROW_SCALES

    names = []
    for name, module in unwrap_model(model).named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, torch.nn.Module) or is_patched(module):
            continue
        buffers = _base(experts).named_buffers(recurse=False)
        if any(buffer.endswith(ROW_SCALES) for buffer, _ in buffers):
            names.append(name)
    return names


def expert_parameter_names(model: torch.nn.Module) -> list[str]:
    """PEFT ``target_parameters`` naming every 3-D expert weight of ``model``.

    Each 3-D parameter's name with everything up to the layer index dropped
    (``model.layers.1.mlp.experts.gate_up_proj`` -> ``mlp.experts.gate_up_proj``), which
    PEFT matches as a suffix in every layer; sorted, each once. Empty for a dense model.
    A model PEFT wraps already names its parameters through ``base_layer``: those parts
    are dropped too.
    """
    names = set()
    for name, param in unwrap_model(model).named_parameters():
        if param.dim() != 3:
            continue
        parts = [p for p in name.split(".") if p != "base_layer"]
        index = max((i for i, part in enumerate(parts) if part.isdigit()), default=-1)
        names.add(".".join(parts[index + 1 :]))
    return sorted(names)
