"""A per-layer activation memory plan: keep, recompute or offload each decoder layer.

Training memory is the weights, gradients and optimizer state (fixed for a model and a
method) plus the activations autograd saves for backward, which grow with the tokens of a
step. Per decoder layer there are three choices (:class:`LayerMode`):

``keep``
    no checkpointing: the layer's saved tensors stay on the device until its backward.
``recompute``
    non-reentrant checkpointing: only the layer input stays (hidden x element size bytes
    per token); the layer runs again in backward, one extra forward of its FLOPs.
``offload``
    :func:`~sloth_core.checkpointing.offloaded_checkpoint`: the input too goes to pinned
    host memory (copies overlapped with compute), nothing of the layer stays on the device.

:func:`measure_layer_costs` measures, with one forward and loss on the CPU or the device,
what each layer saves (every storage autograd saves is counted once, attributed to the
decoder layer running; storages saved by several layers, such as the rotary tables, and
those saved outside layers go to ``rest``), its input bytes and its recompute FLOPs.
:func:`plan_memory` picks the modes for a budget; :func:`apply_plan` sets them on a
model. The model of memory (all figures scale with the tokens of a step):

* after the forward the device holds ``rest`` plus, per layer, its saved bytes (keep),
  its input bytes (recompute) or what its first pass keeps on the device (offload: the
  attention's log-sum-exp, :func:`~sloth_core.checkpointing.keep_for_backward`);
* backward goes from the last layer to the first, freeing each layer's holdings after its
  backward; a non-kept layer ``j`` is run again first, so while its backward runs the
  device holds ``rest`` + what layers ``0..j`` hold + the saved bytes of layer ``j``, and
  the input of layer ``j - 1`` and what it kept in host memory if that one is offloaded
  (they are fetched back meanwhile);
* when backward starts, the loss's gradient comes on top of everything held (on a GPU
  :func:`measure_layer_costs` measures it: an unfused loss's is twice its fp32 logits);
* the predicted peak is ``fixed_bytes`` (the caller's: weights, gradients, optimizer
  state) plus the largest of those moments. The gradients of activations inside the
  layers and allocator fragmentation are not modelled.

Recompute cost: a layer's forward is ``2 x params`` FLOPs per token for its matmuls (an
MoE layer's experts at ``top_k / E``: :func:`~sloth_core.flops.matmul_params_per_token`) plus
``4 x seq x hidden`` for attention (scores and weighted sum), the price of recomputing it.
The greedy plan moves to ``recompute`` first the layers that free the most bytes per
recompute FLOP (on ties the first layers: their recompute runs when the later layers'
activations are already freed), then, while still over the budget, to ``offload`` from the
first layer on (their inputs come back last, with the most compute to hide the copy
behind). Offloading adds host copies, no FLOPs; on the CPU the "host" copy lands in the
same memory (:attr:`MemoryPlan.host_bytes`).

Measured against what the model holds (tests/test_memory_plan.py, tiny llama on the CPU),
the predicted change of held bytes between plans is within 10% of the measured one; the
GPU check of the peak against ``torch.cuda.max_memory_allocated`` is still to do (see
docs/memory-plan.md).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from rich.table import Table

from sloth_core.flops import matmul_params_per_token

__all__ = [
    "LayerCost",
    "LayerMode",
    "MemoryPlan",
    "apply_plan",
    "held_bytes_after_forward",
    "device_budget_bytes",
    "fixed_bytes",
    "measure_layer_costs",
    "plan_for_step",
    "plan_memory",
]

_GIB = 1024**3


class LayerMode(str, enum.Enum):
    KEEP = "keep"
    RECOMPUTE = "recompute"
    OFFLOAD = "offload"


@dataclass(frozen=True)
class LayerCost:
    """What one decoder layer costs, per token of a step."""

    index: int
    saved_bytes_per_token: float  # saved for backward with the layer kept
    input_bytes_per_token: float  # the layer input: hidden x element size
    recompute_flops_per_token: float  # 2 x matmul params (flops.py) + 4 x seq x hidden
    # What an offloaded first pass keeps for the recompute (keep_for_backward): sent to
    # host memory with the input (the attention's output), and left on the device (its
    # log-sum-exp).
    kept_host_bytes_per_token: float = 0.0
    kept_device_bytes_per_token: float = 0.0

    @property
    def freed_by_recompute(self) -> float:
        return max(self.saved_bytes_per_token - self.input_bytes_per_token, 0.0)


@dataclass(frozen=True)
class LayerCosts(Sequence[LayerCost]):
    """:func:`measure_layer_costs`'s result: the layers, ``rest_bytes_per_token`` saved
    outside them (embeddings, final norm, lm_head and loss, shared tables), and
    ``transient_bytes_per_token``: how far the backward's start rises above what the
    forward holds (the loss's gradient: an unfused loss's fp32 logits' size, twice),
    measured on a GPU, 0 where it cannot be (the CPU)."""

    layers: tuple[LayerCost, ...]
    rest_bytes_per_token: float
    transient_bytes_per_token: float = 0.0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks a plan sets: transformers' ``GradientCheckpointingLayer``s (its decoder
    layers), in the model's order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers: list[torch.nn.Module] = [
        m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
    ]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers (GradientCheckpointingLayer)")
    return layers


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None
    return (s.data_ptr(), s.nbytes()) if s.nbytes() else None


def _weight_storages(model: torch.nn.Module) -> set[int]:
    """The addresses of the parameters' and buffers' storages (not activations)."""
    return {
        found[0]
        for t in [*model.parameters(), *model.buffers()]
        if (found := _storage(t)) is not None
    }


def _layer_flops_per_token(layer: torch.nn.Module, seq: int, hidden: int,
                           top_k: int | None) -> float:  # fmt: skip
    # An MoE layer's experts count top_k of E (matmul_params_per_token): counted whole, a
    # sparse layer looked E / top_k times dearer to recompute than it is.
    params = matmul_params_per_token(layer, top_k)
    attention = 4 * seq * hidden if any("attn" in n for n, _ in layer.named_children()) else 0
    return float(2 * params + attention)


def measure_layer_costs(model: Any, input_ids: torch.Tensor) -> LayerCosts:
    """One forward and loss of the causal LM ``model`` on ``input_ids`` with every layer
    kept (checkpointing must be off), counting the bytes autograd saves per decoder layer.

    Each saved storage is counted once, by its address; parameters and buffers are not
    activations and are left out. A storage saved inside exactly one layer belongs to it
    (its input included: the first op of a layer saves it), any other to ``rest``. What an
    offloaded first pass would keep for the recompute is counted per layer too
    (:func:`~sloth_core.checkpointing.counting_kept`)."""
    from sloth_core.checkpointing import counting_kept

    layers = _layers(model)
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise ValueError("measure_layer_costs needs checkpointing off (every layer kept)")
    weights = _weight_storages(model)
    tokens = input_ids.numel()
    running: list[int] = []
    inputs: dict[int, int] = {}
    owners: dict[int, set[int | None]] = {}
    sizes: dict[int, int] = {}
    kept = [[0, 0] for _ in layers]  # per layer: bytes kept for host, for the device

    def pre(i, _module, args, kwargs):
        running.append(i)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            inputs[i] = hidden.numel() * hidden.element_size()

    def post(_i, *_):
        running.pop()

    def count(host: int, device: int) -> None:
        if running:
            kept[running[-1]][0] += host
            kept[running[-1]][1] += device

    def pack(t: torch.Tensor) -> torch.Tensor:
        found = _storage(t)
        if found is not None and found[0] not in weights:
            owners.setdefault(found[0], set()).add(running[-1] if running else None)
            sizes[found[0]] = found[1]
        return t

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(functools.partial(pre, i), with_kwargs=True))
        handles.append(layer.register_forward_hook(functools.partial(post, i)))
    try:
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with torch.enable_grad(), hooks, counting_kept(count):
            out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
        cuda = input_ids.is_cuda and out.loss.requires_grad
        transient = _backward_transient(model, out.loss) if cuda else 0
        del out
    finally:
        for h in handles:
            h.remove()
    saved = [0] * len(layers)
    rest = 0
    for ptr, who in owners.items():
        if len(who) == 1 and (owner := next(iter(who))) is not None:
            saved[owner] += sizes[ptr]
        else:
            rest += sizes[ptr]
    config = model.config.get_text_config()
    seq = input_ids.shape[-1]
    top_k = getattr(config, "num_experts_per_tok", None)
    costs = tuple(
        LayerCost(
            index=i,
            saved_bytes_per_token=saved[i] / tokens,
            input_bytes_per_token=inputs.get(i, 0) / tokens,
            recompute_flops_per_token=_layer_flops_per_token(layer, seq, config.hidden_size, top_k),
            kept_host_bytes_per_token=kept[i][0] / tokens,
            kept_device_bytes_per_token=kept[i][1] / tokens,
        )
        for i, layer in enumerate(layers)
    )
    return LayerCosts(costs, rest / tokens, transient / tokens)


def _backward_transient(model: Any, loss: torch.Tensor) -> int:
    """CUDA bytes the backward of ``loss`` allocates at its peak beyond what its forward
    left and the trainable parameters' gradients (allocated first, so that they are not
    counted: they are ``fixed_bytes``'); the gradients are dropped after."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    for p in trainable:
        p.grad = None
    return max(peak - start, 0)


@dataclass(frozen=True)
class MemoryPlan:
    """Per layer a :class:`LayerMode`, and what the model of memory predicts for it."""

    modes: tuple[LayerMode, ...]
    costs: LayerCosts
    tokens: int
    fixed_bytes: int
    budget_bytes: int

    def _held(self, cost: LayerCost, mode: LayerMode) -> float:
        if mode is LayerMode.KEEP:
            return cost.saved_bytes_per_token * self.tokens
        if mode is LayerMode.RECOMPUTE:
            return cost.input_bytes_per_token * self.tokens
        return cost.kept_device_bytes_per_token * self.tokens

    def layer_bytes(self) -> list[float]:
        """What each layer holds on the device after the forward."""
        return [self._held(c, m) for c, m in zip(self.costs, self.modes, strict=True)]

    @property
    def held_after_forward_bytes(self) -> float:
        """Activations on the device after the forward: ``rest`` and every layer's."""
        return self.costs.rest_bytes_per_token * self.tokens + sum(self.layer_bytes())

    @property
    def host_bytes(self) -> float:
        """Layer inputs and what their first passes kept, in host memory (the offloaded
        layers')."""
        return sum(
            (c.input_bytes_per_token + c.kept_host_bytes_per_token) * self.tokens
            for c, m in zip(self.costs, self.modes, strict=True)
            if m is LayerMode.OFFLOAD
        )

    @property
    def predicted_peak_bytes(self) -> float:
        held = self.layer_bytes()
        rest = self.costs.rest_bytes_per_token * self.tokens
        # the backward's start: everything held, and the loss's gradient on top
        peak = sum(held) + self.costs.transient_bytes_per_token * self.tokens
        prefix = 0.0
        for j, (cost, mode, h) in enumerate(zip(self.costs, self.modes, held, strict=True)):
            prefix += h
            if mode is not LayerMode.KEEP:  # run again in backward, all of it saved
                # and an offloaded layer before it already has its input back (prefetched)
                ahead = 0.0
                if j and self.modes[j - 1] is LayerMode.OFFLOAD:
                    before = self.costs[j - 1]
                    ahead = before.input_bytes_per_token + before.kept_host_bytes_per_token
                    ahead *= self.tokens
                peak = max(peak, prefix + cost.saved_bytes_per_token * self.tokens + ahead)
        return self.fixed_bytes + rest + peak

    @property
    def recompute_flops(self) -> float:
        """Extra FLOPs a step spends on recomputing (recompute and offload layers)."""
        return sum(
            c.recompute_flops_per_token * self.tokens
            for c, m in zip(self.costs, self.modes, strict=True)
            if m is not LayerMode.KEEP
        )

    def describe(self) -> str:
        counts = {m: self.modes.count(m) for m in LayerMode}
        return (
            f"memory plan: {counts[LayerMode.KEEP]} kept, {counts[LayerMode.RECOMPUTE]} "
            f"recomputed, {counts[LayerMode.OFFLOAD]} offloaded of {len(self.modes)} layers; "
            f"predicted peak {self.predicted_peak_bytes / _GIB:.2f} GiB of "
            f"{self.budget_bytes / _GIB:.2f} GiB ({self.fixed_bytes / _GIB:.2f} GiB fixed), "
            f"{self.host_bytes / _GIB:.2f} GiB in host memory, "
            f"{self.recompute_flops:.3g} recompute FLOPs a step"
        )

    def table(self) -> Table:
        """Per layer its mode and device MiB (print :meth:`describe` above it)."""
        table = Table()
        table.add_column("layer", justify="right")
        table.add_column("mode")
        table.add_column("device MiB", justify="right")
        for cost, mode, held in zip(self.costs, self.modes, self.layer_bytes(), strict=True):
            table.add_row(str(cost.index), mode.value, f"{held / 2**20:.1f}")
        return table


def plan_memory(
    costs: LayerCosts, tokens: int, budget_bytes: int, fixed_bytes: int = 0
) -> MemoryPlan:
    """The modes that fit ``budget_bytes``, keeping as many layers as the greedy order
    allows (see the module docstring); ``tokens`` is a step's tokens per device.

    Raises:
        ValueError: when not even every layer offloaded fits: the message names the budget,
            the least it needs and what to lower.
    """
    n = len(costs)
    # The order moves happen in is fixed (not the budget's): a smaller budget goes further
    # along it, so it never keeps more layers.
    by_value = sorted(
        range(n),
        key=lambda i: (
            -costs[i].freed_by_recompute / max(costs[i].recompute_flops_per_token, 1),
            i,
        ),
    )
    modes = [LayerMode.KEEP] * n
    steps = [tuple(modes)]
    for i in by_value:
        modes[i] = LayerMode.RECOMPUTE
        steps.append(tuple(modes))
    for i in range(n):
        modes[i] = LayerMode.OFFLOAD
        steps.append(tuple(modes))
    plans = [MemoryPlan(s, costs, tokens, fixed_bytes, budget_bytes) for s in steps]
    for plan in plans:
        if plan.predicted_peak_bytes <= budget_bytes:
            return plan
    least = min(p.predicted_peak_bytes for p in plans)
    raise ValueError(
        f"memory budget {budget_bytes / _GIB:.2f} GiB is below the least this step needs, "
        f"{least / _GIB:.2f} GiB ({fixed_bytes / _GIB:.2f} GiB of weights, gradients and "
        f"optimizer state, the rest activations of {tokens} tokens with every layer "
        "offloaded): lower the batch size or the sequence length, or raise the budget"
    )


def apply_plan(model: Any, plan: MemoryPlan) -> None:
    """Set each decoder layer of ``model`` to its mode: checkpointing on model-wide
    (non-reentrant), then per layer off (keep), on with
    :func:`~sloth_core.checkpointing.device_checkpoint` (recompute) or with
    :func:`~sloth_core.checkpointing.offloaded_checkpoint` (offload)."""
    from sloth_core.checkpointing import (
        device_checkpoint,
        enable_checkpointing,
        offloaded_checkpoint,
    )

    layers: list[Any] = _layers(model)  # transformers' GradientCheckpointingLayers
    if len(layers) != len(plan.modes):
        raise ValueError(f"plan for {len(plan.modes)} layers, model has {len(layers)}")
    enable_checkpointing(model)
    for layer, mode in zip(layers, plan.modes, strict=True):
        # transformers' GradientCheckpointingLayer reads both attributes on each call.
        layer.gradient_checkpointing = mode is not LayerMode.KEEP
        if mode is LayerMode.OFFLOAD:
            layer._gradient_checkpointing_func = offloaded_checkpoint
        elif mode is LayerMode.RECOMPUTE:  # sloth's own: its recompute skips what it may
            layer._gradient_checkpointing_func = device_checkpoint


@contextmanager
def _new_storages() -> Iterator[dict[int, Any]]:
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    made: dict[int, tuple[Any, int]] = {}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and (found := _storage(t)) is not None:
                    made[found[0]] = (StorageWeakRef(t.untyped_storage()), found[1])
            return out

    with Track():
        yield made


def held_bytes_after_forward(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the storages a forward and loss of ``model`` allocates that are still alive
    when it returns (what the step holds into backward: saved activations, checkpointed
    layer inputs, offloaded copies, the logits and loss), measured on any device."""
    with torch.enable_grad(), _new_storages() as made:
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    weights = _weight_storages(model)
    held = sum(
        size for ptr, (ref, size) in made.items() if ptr not in weights and not ref.expired()
    )
    del out
    return held


#: AdamW's two moments per trainable element, in float32 whatever the parameter's dtype.
_OPTIMIZER_BYTES = 8


def fixed_bytes(model: torch.nn.Module) -> int:
    """What a step holds whatever the plan: on a GPU what is allocated now (the weights
    and anything loaded beside them, a frozen reference model say), elsewhere every
    parameter and buffer storage once; plus each trainable parameter's gradient and
    AdamW's two float32 moments."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = sum(p.numel() * (p.element_size() + _OPTIMIZER_BYTES) for p in trainable)
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) + state
    sizes = {
        found[0]: found[1]
        for t in [*model.parameters(), *model.buffers()]
        if (found := _storage(t)) is not None
    }
    return sum(sizes.values()) + state


def device_budget_bytes(device: torch.device) -> int:
    """The default budget: 90% of the GPU's memory, or of the host's on the CPU (the rest
    is left to the allocator's fragmentation and what the model does not count)."""
    import os

    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(total * 0.9)


def plan_for_step(
    model: Any, *, sequences: int, seq: int, budget_bytes: int, sample_seq: int = 256,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> MemoryPlan:  # fmt: skip
    """Measure ``model``'s layers on one random row of ``min(seq, sample_seq)`` tokens,
    plan a step of ``sequences`` rows of ``seq`` tokens for ``budget_bytes`` and apply
    the plan (:func:`apply_plan`); the plan is returned, to print.

    Whatever checkpointing the model had is off while it is measured: the plan replaces
    it. The measure is per token, so a short row does (activations of SDPA and flash
    attention grow linearly with the tokens); it runs under ``autocast``, as the steps
    will (bf16 autocast saves bf16 activations of float32 weights).

    Raises:
        ValueError: the budget is below the least the step needs (see :func:`plan_memory`).
    """
    layers = _layers(model)
    for layer in layers:  # what apply_plan sets again
        layer.gradient_checkpointing = False  # type: ignore[assignment]  # a plain attribute
    parameter = next(model.parameters())
    config = model.config.get_text_config()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, min(seq, sample_seq)), generator=generator)
    with autocast():
        costs = measure_layer_costs(model, ids.to(parameter.device))
    plan = plan_memory(costs, sequences * seq, budget_bytes, fixed_bytes(model))
    apply_plan(model, plan)
    return plan
