"""A training step's forward and backward replayed as one CUDA graph (opt-in:
``SLOTH_CUDA_GRAPH=1``).

A small model's LoRA step is bound by the host: its launches and Python take about as
long as the GPU's work (llama-1b, docs/benchmarks.md). A graph replays the step's kernels
with no host work at all. What a replay needs to be the step it stands for:

- the batch as captured: the same keys (``input_ids`` and ``labels`` only: packed
  positions and masks are read on the host), shapes, dtypes and counted label tokens
  (the loss sizes its work by them), the same trainable parameters, the model in the
  same mode. A batch that differs runs eagerly; one graph is kept per model.
- one micro-batch a step, no process group (a collective is not captured here), and no
  gradients held when the step starts: the graph writes its own gradient tensors, which
  are handed to the parameters after each replay for the optimizer (outside the graph).
- no random numbers: a warm-up step that moved the device's generator is not captured
  (a checkpoint's recompute would need the generator's state, which a capture cannot
  read). The checkpoints then skip their snapshot of it while capturing.

Eager warm-up steps come first (Triton's compiles, cuDNN's plans, one-time probes), then
the capture (after one more step on the capture's own stream, as torch's whole-network
example does). A capture that fails warns once with the reason and the model's steps
run eagerly from then on. The graph keeps its memory (the step's peak, in its own pool)
for as long as the model lives.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

#: Eager steps of a batch signature before it is captured.
WARMUP = 2
#: The batch keys a captured step may take (see the module docstring).
_KEYS = frozenset({"input_ids", "labels"})


def enabled() -> bool:
    return os.environ.get("SLOTH_CUDA_GRAPH", "0") == "1"


class Backend(Protocol):
    """How a step is captured and replayed (CUDA graphs; the tests re-run the step)."""

    def capture(
        self, run: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
    ) -> tuple[Any, torch.Tensor]:
        """Capture ``run`` (forward and backward, gradients None before it): the graph
        and the loss tensor a replay rewrites, ``params``' gradients left as the replays
        rewrite them."""
        ...

    def replay(self, graph: Any) -> None: ...

    def available(self, device: torch.device) -> bool: ...


class CudaGraphs:
    def available(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def capture(
        self, run: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
    ) -> tuple[Any, torch.Tensor]:
        from sloth_core import checkpointing

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # A run on the capture's stream first (lazily made state belongs to it), whose
        # pinned host buffers the capture takes again: it pins no memory itself.
        with torch.cuda.stream(stream), checkpointing.captured_host_buffers() as warm:
            run()
            for p in params:
                p.grad = None
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.graph(graph, stream=stream)  # the stream the warm-up ran on
        with checkpointing.captured_host_buffers(warm) as buffers, capture:
            loss = run()
        # The host memory its copies address lives as long as the graph: kept with it.
        return (graph, buffers), loss

    def replay(self, graph: Any) -> None:
        graph[0].replay()


@dataclass
class _Graph:
    key: tuple
    params: list[torch.Tensor]
    warm: int = 0
    failed: str | None = None
    graph: Any = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    items: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    grads: list[torch.Tensor | None] = field(default_factory=list)
    replayed: bool = False  # the last step


_graphs: weakref.WeakKeyDictionary[Any, _Graph] = weakref.WeakKeyDictionary()
_BACKEND: Backend = CudaGraphs()


def _generator_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _key(model: Any, batch: dict[str, torch.Tensor], counted: int, weights: list) -> tuple:
    shapes = tuple(sorted((k, tuple(v.shape), v.dtype, v.device) for k, v in batch.items()))
    # Every weight where the graph reads it (one moved or repacked since, a 4-bit weight
    # switched back from eval's layout say, would leave the graph reading stale memory),
    # and which of them train.
    where = tuple((id(p), p.data_ptr(), p.requires_grad) for p in weights)
    return shapes, counted, bool(model.training), where


def _eligible(batch: dict[str, torch.Tensor], params: list[torch.Tensor], group: Any) -> bool:
    """Only batch keys a replay takes, one process, no gradients held at the step's start."""
    return (
        not set(batch) - _KEYS
        and not (group is not None and getattr(group, "active", False))
        and all(p.grad is None for p in params)
    )


def forward_backward(
    model: Any,
    batch: dict[str, torch.Tensor],
    items: torch.Tensor,
    counted: int,
    eager: Callable[[], torch.Tensor],
    *,
    group: Any = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    backend: Backend | None = None,
) -> torch.Tensor:
    """One micro-batch's forward and backward, as a replay of its graph where it may be
    (see the module docstring), else ``eager()``; the loss. ``items`` is the loss's
    divisor (a device tensor), ``counted`` the batch's counted label tokens."""
    backend = backend or _BACKEND
    weights = list(model.parameters())
    params = [p for p in weights if p.requires_grad]
    device = next(iter(batch.values())).device
    if not backend.available(device) or not _eligible(batch, params, group):
        return eager()
    key = _key(model, batch, counted, weights)
    entry = _graphs.get(model)
    if entry is None or (entry.key != key and entry.graph is None and entry.failed is None):
        entry = _graphs[model] = _Graph(key, params)  # a new signature before any capture
    entry.replayed = False
    if entry.key != key or entry.failed is not None:
        return eager()
    if entry.graph is None and entry.warm < WARMUP:
        before = _generator_state(device)
        loss = eager()
        entry.warm += 1
        if not torch.equal(before, _generator_state(device)):
            entry.failed = "the step draws random numbers (the generator moved: dropout?)"
        return loss
    if entry.graph is None:
        _capture(entry, model, items, counted, autocast, backend, batch)
        if entry.failed is not None:
            for p in params:
                p.grad = None
            return eager()
    for name, value in batch.items():
        entry.inputs[name].copy_(value, non_blocking=True)
    assert entry.items is not None and entry.loss is not None  # captured
    entry.items.copy_(items, non_blocking=True)
    backend.replay(entry.graph)
    entry.replayed = True
    for p, grad in zip(entry.params, entry.grads, strict=True):
        p.grad = grad
    return entry.loss


def _capture(entry: _Graph, model: Any, items: torch.Tensor, counted: int,
             autocast: Callable[[], Any], backend: Backend,
             batch: dict[str, torch.Tensor]) -> None:  # fmt: skip
    from sloth_core.patches.attention import plain_rows_captured
    from sloth_core.patches.lm_head import preset_counted_labels

    entry.inputs = {name: value.clone() for name, value in batch.items()}
    entry.items = items.clone()
    inputs, static_items = entry.inputs, entry.items

    def run() -> torch.Tensor:
        if "labels" in inputs:  # counted on the host already: nothing to read back
            preset_counted_labels(inputs["labels"], counted)
        with autocast(), plain_rows_captured():  # rows without masks or packed positions
            loss = model(**inputs, num_items_in_batch=static_items).loss
        loss.backward()
        return loss.detach()

    try:
        entry.graph, entry.loss = backend.capture(run, entry.params)
    except Exception as exc:  # what a graph path would have to change: said once
        entry.failed = f"{type(exc).__name__}: {exc}"
        entry.graph = None
        warnings.warn(
            f"SLOTH_CUDA_GRAPH: the training step could not be captured, it runs eagerly "
            f"({entry.failed})",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    entry.grads = [p.grad for p in entry.params]


def reason(model: Any) -> str | None:
    """Why ``model``'s steps run eagerly after all, if a capture failed or was refused."""
    entry = _graphs.get(model)
    return None if entry is None else entry.failed


def replayed(model: Any) -> bool:
    """Whether ``model``'s last step replayed its captured graph."""
    entry = _graphs.get(model)
    return entry is not None and entry.replayed
