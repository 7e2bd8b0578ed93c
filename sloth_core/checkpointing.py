"""Activation checkpointing whose saved layer inputs live in CPU memory.

Plain checkpointing keeps every decoder layer's input on the GPU until backward (32 x
seq x hidden in bf16: 2 GiB for an 8B model at 8192 tokens). Here each input is copied
to pinned host memory as the forward goes on, the layer runs without saving anything,
and the backward brings the input back, runs the layer again with gradients and
back-propagates through it.

The copies run on a side stream of their own, so they overlap the compute instead of
queueing between its kernels (on the compute stream they took 10% of an 8B model's step,
docs/benchmarks.md). A layer runs beside its input's copy only once its first call has
shown that it leaves its input unwritten. While a layer's backward runs, the input of the
layer before it is already on its way back (one layer input more on the device, the price
of never waiting for PCIe).

The recompute skips what backward never reads. A gated MLP whose output only feeds
additions (the residual stream of Llama-style layers) need not multiply its output
projection again: the value of that output is never read, only the gradient passes
through it (``lora_mlp(..., output=False)``). Whether that holds is not assumed from the
architecture; it is read from each layer's own autograd graph on its first recompute
(:func:`_value_free_downstream`), and the skip applies from the second on.

A layer's first pass may also keep values its recompute would otherwise compute again
(:func:`keep_for_backward`): the attention keeps its output and log-sum-exp, so that its
recompute runs no attention forward at all (:mod:`sloth_core.patches.kept_attention`).
The large ones go to host memory with the layer input and come back with it; the
recompute finds them by key (:func:`kept_for_backward`).

What a layer derives from its modules alone (a PEFT projection's lifted tensors,
:func:`sloth_core.patches.lift_linear`) goes into the layer's memo
(:func:`layer_memo`) in the first pass, and the recompute takes it from there: the
recompute runs what the first pass ran, without walking the modules again.

A layer may hand a tensor out other than through its return value: transformers records
each MoE router's logits for the load-balancing loss. Made in the first pass, without
gradients, such a tensor would pass no gradient back. The layer names it
(:func:`side_output`): it becomes an output of the checkpoint too, and its gradient goes
back through the recompute's own copy of it.

:class:`Checkpointing` is the one vocabulary of the modes (``sloth train``'s
``gradient_checkpointing`` option, ``FastLanguageModel`` after it maps Unsloth's
spellings) and :func:`apply_checkpointing` the one rule for when to offload.
"""

from __future__ import annotations

import collections
import enum
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: Autograd nodes whose backward reads none of its inputs' values: a tensor that only
#: flows through these to a recomputed layer's outputs has a value nobody reads.
_VALUE_FREE_NODES = frozenset({
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "ViewBackward0",
    "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0", "ToCopyBackward0",
    "NativeDropoutBackward0",
})  # fmt: skip

_state = threading.local()
# Per module (weakly): whether its output's value is unread in a recompute, once probed.
_verdicts: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()
_copy_streams: dict[torch.device, Any] = {}
#: The share of physical memory that values kept for recomputes may pin (kept_host_limit).
KEPT_HOST_FRACTION = 0.25
#: The share the offloaded layer inputs and kept values may take (offload_host_limit).
OFFLOAD_HOST_FRACTION = 0.5
_host_limit: int | None = None
_offload_limit: int | None = None
_warned_host_full = False
_holding: weakref.WeakSet[Any] = weakref.WeakSet()  # offloaded slots: their host_bytes
# Per layer (weakly): whether its forward leaves its input unwritten, once seen.
_keeps_input: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _owner(function: Callable[..., Any]) -> Any:
    """The layer ``function`` runs, or None: transformers passes a ``functools.partial``
    of the layer's bound call (5.17) or of its forward with the layer first (5.25)."""
    owner = getattr(getattr(function, "func", function), "__self__", None)
    if not isinstance(owner, torch.nn.Module):
        args = getattr(function, "args", ())
        owner = args[0] if args else None
    return owner if isinstance(owner, torch.nn.Module) else None


def _capturing(device: torch.device) -> bool:
    """Whether the work queued now is being captured into a CUDA graph (a replayed step,
    :mod:`sloth_core.train.step_graph`): nothing may read the device or its generator."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@contextmanager
def captured_host_buffers(
    reuse: list[torch.Tensor] | None = None,
) -> Iterator[list[torch.Tensor]]:
    """The pinned host buffers the offloaded checkpoints take inside the block, kept in
    the list it yields: a captured graph's copies address them at every replay, so they
    must live as long as the graph, not just the step that made them. ``reuse``: buffers
    an eager run of the same step took (in the same order), handed out again instead of
    pinning memory while capturing."""
    buffers: list[torch.Tensor] = []
    outer = getattr(_state, "host_buffers", None), getattr(_state, "host_reuse", None)
    _state.host_buffers, _state.host_reuse = buffers, collections.deque(reuse or ())
    try:
        yield buffers
    finally:
        _state.host_buffers, _state.host_reuse = outer


def _pinned(shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A pinned host buffer: the next of :func:`captured_host_buffers`' ``reuse`` where it
    fits, else a new one; kept in its list inside that block."""
    reuse = getattr(_state, "host_reuse", None)
    if reuse and (reuse[0].shape, reuse[0].stride(), reuse[0].dtype) == (shape, strides, dtype):
        host = reuse.popleft()
    else:
        host = torch.empty_strided(shape, strides, dtype=dtype, pin_memory=True)
    kept = getattr(_state, "host_buffers", None)
    if kept is not None:
        kept.append(host)
    return host


def _copy_stream(device: torch.device) -> Any:
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` fills its memory without gaps or overlaps, in any dimension order
    (a copy of it with the same strides is then one block)."""
    step = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) != 1 and t.stride(d) != step:
            return False
        step *= t.size(d)
    return True


class _Slot:
    """One checkpointed layer input: in host memory, and once fetched on the device."""

    def __init__(self, hidden_states: torch.Tensor, offload: bool) -> None:
        self.device = hidden_states.device
        self.prev: weakref.ref[_Slot] | None = None  # the layer before, in forward order
        self.fetched: tuple[torch.Tensor, Any] | None = None
        self.copied: Any = None  # the event after the copy to host, on a GPU
        self.last_copy: Any = None  # the event after this slot's last copy (input or kept)
        # What the first pass keeps for the recompute (keep_for_backward): per key, in
        # call order, the tensors bound for host memory and the values kept as they are.
        self.values: list[tuple[Any, list[torch.Tensor], tuple[Any, ...]]] = []
        self.sent: list[tuple[torch.Tensor, int]] = []  # those tensors, at their versions
        self.fetched_values: dict[Any, collections.deque] | None = None
        self.host_bytes = 0  # what this slot holds in host memory: input and kept values
        self.host: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None  # the input, where it stays on the device
        if offload:
            self.host = self._offload(hidden_states)
        if self.host is None:
            self.kept = hidden_states.detach()
            self.version = hidden_states._version  # a later in-place write is caught
        else:
            self.host_bytes = self.host.numel() * self.host.element_size()
            _holding.add(self)

    def _offload(self, t: torch.Tensor) -> torch.Tensor | None:
        """``t``'s copy in host memory; None (it stays on the device) where the offloaded
        checkpoints would hold more than :func:`offload_host_limit` or pinning fails: a
        long sequence's inputs (an 8B model at 262,144 tokens: 64 GiB) must not take the
        machine's memory, and the device may still hold them."""
        held = _host_held() + t.numel() * t.element_size()
        limit = offload_host_limit()
        if held > limit:
            reason = f"the layer inputs would take {held / 2**30:.1f} GiB of host memory, past "
            reason += f"its limit of {limit / 2**30:.1f} GiB (half the machine's)"
        else:
            try:
                host, self.copied = self._to_host(t)
                self.last_copy = self.copied
                return host
            except RuntimeError as exc:  # pinned memory exhausted
                reason = f"pinning failed ({exc})"
        if not _warned_host_full:
            _warn_host_full(reason)
        return None

    def _to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``t``'s copy in pinned host memory, made on the copy stream, and the event after
        it (None off CUDA, where the copy is a plain clone)."""
        if self.device.type != "cuda":  # nothing to offload to: a copy, as a GPU's would be
            return t.detach().clone(), None
        stream = _copy_stream(self.device)
        # The same layout as t (the attention's output is a transposed view): one memcpy.
        strides = t.stride() if _dense(t) else None
        host = _pinned(tuple(t.shape), strides or _contiguous_strides(t.shape), t.dtype)
        stream.wait_stream(torch.cuda.current_stream(self.device))  # t is computed
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        t.record_stream(stream)  # t's memory is not reused before the copy has read it
        return host, copied

    def keep(self, key: Any, to_host: tuple[torch.Tensor, ...], values: tuple[Any, ...]) -> bool:
        """Keep ``to_host`` (copied beside the compute, as the input is) and ``values`` (as
        they are) for the recompute's :func:`kept_for_backward` under ``key``; False, and
        nothing kept, where that would take the host memory past :func:`kept_host_limit`
        or the input itself stayed on the device."""
        if self.host is None or self.link_behind():
            return False
        size = sum(t.numel() * t.element_size() for t in to_host)
        if _host_held() + size > kept_host_limit():
            return False
        copies = [self._to_host(t) for t in to_host]  # nobody waits on these copies
        hosts = [host for host, _ in copies]
        if copies and copies[-1][1] is not None:
            self.last_copy = copies[-1][1]
        self.sent.extend((t, t._version) for t in to_host)
        self.values.append((key, hosts, values))
        self.host_bytes += size
        return True

    def link_behind(self) -> bool:
        """Whether the copies to host lag the compute by more than a layer: those of the
        layer two before this one are still running. What a layer keeps saves recompute
        only while its copies hide behind the compute; past that, the copy stream would
        hold the backward's first prefetches back and the kept tensors' device memory
        longer, so nothing more is kept until it catches up (the recompute computes it)."""
        if _capturing(self.device):  # an event cannot be asked while capturing: keep nothing
            return True
        before = self.prev() if self.prev is not None else None
        older = before.prev() if before is not None and before.prev is not None else None
        event = older.last_copy if older is not None else None
        return event is not None and not event.query()

    def check_sent(self, owner: Any) -> None:
        """After the layer ran: none of the tensors it kept was written in place after
        (their copies to host may have raced the write)."""
        for t, version in self.sent:
            if t._version != version:
                raise RuntimeError(
                    f"{type(owner).__name__} wrote a tensor it kept for backward in place "
                    "after keeping it: its recompute would read stale values"
                )
        self.sent = []

    def wait_copied(self) -> None:
        """Make the compute stream wait until the input is in host memory (for a layer
        that may write its input in place before the side stream has read it)."""
        if self.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)

    def prefetch(self) -> None:
        """Start bringing the input back (on the copy stream); :meth:`take` waits for it."""
        if self.fetched is not None or self.host is None:
            return
        fetched: dict[Any, collections.deque] = collections.defaultdict(collections.deque)
        self.host_bytes = 0  # on their way back: the host blocks go once copied
        if self.device.type != "cuda":
            self.fetched = (self.host, None)
            for key, hosts, values in self.values:
                fetched[key].append((hosts, values))
            self.fetched_values, self.values = fetched, []
            return

        # The device blocks are allocated on the compute stream, which uses them (the
        # allocator reuses a block only once that stream has passed its last use).
        def block(h: torch.Tensor) -> torch.Tensor:
            return torch.empty_strided(h.shape, h.stride(), dtype=h.dtype, device=self.device)

        pairs = [(block(self.host), self.host)]
        for key, hosts, values in self.values:
            back = [block(h) for h in hosts]
            pairs.extend(zip(back, hosts, strict=True))
            fetched[key].append((back, values))
        compute = torch.cuda.current_stream(self.device)
        stream = _copy_stream(self.device)
        stream.wait_stream(compute)  # the new blocks may still be read by queued compute
        with torch.cuda.stream(stream):
            for t, host in pairs:
                t.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self.fetched, self.fetched_values, self.values = (pairs[0][0], done), fetched, []

    def take(self) -> tuple[torch.Tensor, dict[Any, collections.deque]]:
        """The input on its device, ready for the compute stream, and what the first pass
        kept (per key, in call order); the slot is emptied."""
        if self.kept is not None:
            x, self.kept = self.kept, None
            if x._version != self.version:
                raise RuntimeError(
                    "a checkpointed layer's input was modified in place after the layer ran: "
                    "its recompute would read the new values (offload the layer instead)"
                )
            return x, {}
        self.prefetch()
        assert self.fetched is not None and self.fetched_values is not None  # prefetch ran
        (x, done), values = self.fetched, self.fetched_values
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        self.host = self.fetched = self.fetched_values = None
        return x, values


class _Recompute:
    """What one layer's recompute collects: the modules whose output's value may be
    unread (:func:`output_unread`), each with its output, to probe once the layer ran."""

    def __init__(self, kept: dict[Any, collections.deque] | None = None) -> None:
        self.probes: list[tuple[torch.nn.Module, torch.Tensor]] = []
        self.kept = kept or {}  # what the first pass kept, per key (kept_for_backward)
        self.sides: list[torch.Tensor] = []  # the recompute's side outputs, in call order

    def settle(self, outputs: list[torch.Tensor]) -> None:
        verdicts: dict[torch.nn.Module, bool] = {}
        for module, tensor in self.probes:  # a module called twice: both outputs unread
            free = _value_free_downstream(tensor, outputs)
            verdicts[module] = verdicts.get(module, True) and free
        _verdicts.update(verdicts)


def _value_free_downstream(tensor: torch.Tensor, outputs: list[torch.Tensor]) -> bool:
    """Whether every autograd node between ``tensor`` and ``outputs`` reads no value
    (:data:`_VALUE_FREE_NODES`): then ``tensor``'s value only passes gradients through.
    False where ``tensor`` has no node of its own to tell its consumers by."""
    target = tensor.grad_fn
    if target is None:
        return False
    reaches: dict[Any, bool] = {target: True}
    stack = [(o.grad_fn, False) for o in outputs if o.grad_fn is not None]
    while stack:  # iterative post-order: a node reaches target if one of its inputs does
        node, expanded = stack.pop()
        if node in reaches and not expanded:
            continue
        nexts = [n for n, _ in node.next_functions if n is not None]
        if not expanded:
            reaches[node] = False
            stack.append((node, True))
            stack.extend((n, False) for n in nexts if n not in reaches)
        else:
            reaches[node] = any(reaches.get(n, False) for n in nexts)
    return all(
        type(node).__name__ in _VALUE_FREE_NODES
        for node, reached in reaches.items()
        if reached and node is not target
    )


def in_recompute() -> bool:
    """Whether a checkpointed layer is being run again in backward (with gradients)."""
    return getattr(_state, "recompute", None) is not None


def layer_memo() -> dict[Any, Any] | None:
    """Inside a checkpointed layer, its memo: a dict the first pass fills and the
    recompute finds as the first pass left it (the same object), for what the layer
    derives from its modules alone; ``None`` elsewhere. Nothing in it is copied or
    moved: it holds references, dropped once the layer's backward is done."""
    return getattr(_state, "memo", None)


def output_unread(module: torch.nn.Module, output: torch.Tensor | None = None) -> bool:
    """Inside a checkpoint's recompute, whether ``module``'s output value goes unread.

    A patched module calls it twice per recompute: before running (``output`` None), to
    know whether it may skip computing its output's value (True only once probed), and
    after, with the output it made, so that the first recompute probes it. Outside a
    recompute it is False and records nothing."""
    recompute: _Recompute | None = getattr(_state, "recompute", None)
    if recompute is None:
        return False
    verdict = _verdicts.get(module)
    if verdict is None and output is not None:
        recompute.probes.append((module, output))
    return bool(verdict)


def keeping() -> bool:
    """Whether :func:`keep_for_backward` would take values now: inside an offloaded
    checkpoint's first pass, or while :func:`counting_kept` counts them."""
    return getattr(_state, "first_pass", None) is not None or hasattr(_state, "counting")


def _host_held() -> int:
    """Host bytes the offloaded checkpoints hold now: their inputs and kept values."""
    return sum(slot.host_bytes for slot in list(_holding))


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: a conservative 16 GiB
        return 16 * 2**30


def offload_host_limit() -> int:
    """The most host memory the offloaded layer inputs and kept values may take:
    :data:`OFFLOAD_HOST_FRACTION` of the machine's physical memory. Past it, further layer
    inputs stay on the device (one warning), as plain checkpointing keeps them."""
    global _offload_limit
    if _offload_limit is None:
        _offload_limit = int(_physical_memory() * OFFLOAD_HOST_FRACTION)
    return _offload_limit


def _warn_host_full(reason: str) -> None:
    global _warned_host_full
    _warned_host_full = True
    warnings.warn(
        f"offloaded checkpointing: {reason}; the layer inputs past it stay on the device "
        "(a shorter sequence or a smaller batch keeps them in host memory)",
        stacklevel=4,
    )


def kept_host_limit() -> int:
    """The most host memory the offloaded checkpoints may hold, layer inputs included,
    for :func:`keep_for_backward` to keep more: :data:`KEPT_HOST_FRACTION` of the machine's
    physical memory. The inputs have their own, higher limit (:func:`offload_host_limit`);
    kept values are an optimization, and past this one the recompute computes them again. A
    long sequence would otherwise pin them by the tens of GiB (an 8B model at 262,144
    tokens: 2 GiB a layer for the attention's output, as much as its input)."""
    global _host_limit
    if _host_limit is None:
        _host_limit = int(_physical_memory() * KEPT_HOST_FRACTION)
    return _host_limit


def keep_for_backward(
    key: Any, to_host: tuple[torch.Tensor, ...], values: tuple[Any, ...] = ()
) -> bool:
    """In an offloaded checkpoint's first pass, keep what the layer's recompute needs again.

    ``to_host`` goes to pinned host memory beside the compute, as the layer input does,
    and comes back with it; ``values`` (small tensors, numbers) stay as they are. The
    recompute gets ``(to_host, values)`` from :func:`kept_for_backward` with the same
    ``key``, in call order. A kept tensor must not be written in place afterwards (the
    layer's end checks). Elsewhere nothing is kept; under :func:`counting_kept` the bytes
    are counted instead. Whether it kept them (False also past :func:`kept_host_limit`)."""
    counting = getattr(_state, "counting", None)
    if counting is not None:
        small = [v for v in values if isinstance(v, torch.Tensor)]
        counting(sum(t.numel() * t.element_size() for t in to_host),
                 sum(v.numel() * v.element_size() for v in small))  # fmt: skip
        return False
    slot: _Slot | None = getattr(_state, "first_pass", None)
    return slot is not None and slot.keep(key, to_host, values)


def kept_for_backward(key: Any) -> tuple[list[torch.Tensor], tuple[Any, ...]] | None:
    """Inside a checkpoint's recompute, the next ``(to_host, values)`` the first pass kept
    under ``key`` (the host tensors back on the device), or None."""
    recompute: _Recompute | None = getattr(_state, "recompute", None)
    queue = recompute.kept.get(key) if recompute is not None else None
    return queue.popleft() if queue else None


def side_output(t: torch.Tensor) -> None:
    """Name ``t`` as an output of the checkpointed layer running, beside its return value.

    For a tensor the layer hands out some other way (a router's logits, which transformers
    records for the load-balancing loss): in the first pass, which runs without gradients,
    ``t`` becomes an output of the checkpoint, so a gradient reaching it goes back through
    the layer; in the recompute the same call names the recomputed ``t``, which takes that
    gradient. Every pass must name the same tensors in the same order. Outside a
    checkpoint it does nothing."""
    recompute: _Recompute | None = getattr(_state, "recompute", None)
    if recompute is not None:
        recompute.sides.append(t)
        return
    sides: list[torch.Tensor] | None = getattr(_state, "sides", None)
    if sides is not None:
        sides.append(t)


@contextmanager
def counting_kept(count: Callable[[int, int], None]) -> Iterator[None]:
    """Within it :func:`keep_for_backward` keeps nothing and calls ``count(host_bytes,
    device_bytes)`` instead: how the memory plan measures what each layer keeps."""
    _state.counting = count
    try:
        yield
    finally:
        del _state.counting


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, offload, shape, hidden_states, *args):
        # shape: filled in here for _checkpoint, which returns the layer's own outputs.
        ctx.function, ctx.args = function, args
        # An output nobody used gets None, not zeros: a side output whose tensor nothing
        # read (no load-balancing loss) costs its layer no backward through it.
        ctx.set_materialize_grads(False)
        slot = _Slot(hidden_states, offload)
        last = getattr(_state, "last_slot", None)
        slot.prev = last
        _state.last_slot = weakref.ref(slot)
        ctx.slot = slot
        # The recomputation must draw the same random numbers (dropout) as this pass.
        device = hidden_states.device
        ctx.cpu_rng = torch.get_rng_state()
        # A captured step draws no random numbers (step_graph refuses one that does), and
        # its capture may not read the generator: no snapshot then.
        cuda = device.type == "cuda" and not _capturing(device)
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if cuda else None
        # The copy to host runs beside the layer: safe while the layer does not write its
        # input in place. Each layer's first call waits for the copy and shows whether it
        # does; the layers that do wait every time.
        owner = _owner(function)
        overlap = owner is not None and _keeps_input.get(owner) is True
        if not overlap:
            slot.wait_copied()
        version = hidden_states._version
        outer = (getattr(_state, "first_pass", None), getattr(_state, "sides", None),
                 getattr(_state, "memo", None))  # fmt: skip
        _state.first_pass = slot if offload else None  # keep_for_backward: offloaded only
        _state.sides = sides = []
        _state.memo = ctx.memo = {}
        try:
            with torch.no_grad():
                out = function(hidden_states, *args)
        finally:
            _state.first_pass, _state.sides, _state.memo = outer
        slot.check_sent(owner)
        if owner is not None:
            kept = hidden_states._version == version
            _keeps_input[owner] = kept  # from now on it waits, if it wrote
            if overlap and not kept:
                raise RuntimeError(
                    f"{type(owner).__name__} wrote its input in place after earlier calls "
                    "did not: its offloaded copy may have raced the write; rerun the step"
                )
        ctx.is_tuple = isinstance(out, tuple)
        outs = out if ctx.is_tuple else (out,)
        shape.update(is_tuple=ctx.is_tuple, outputs=len(outs))
        # The side outputs (side_output) too: each becomes an output of this function in
        # place (the same tensor, where transformers recorded it), with a gradient path.
        return (*outs, *sides) if sides else out

    @staticmethod
    def backward(ctx, *grads):
        slot: _Slot = ctx.slot
        x, kept = slot.take()
        x = x.detach().requires_grad_(True)
        before = slot.prev() if slot.prev is not None else None
        if before is not None:  # its input comes back while this layer computes
            before.prefetch()
        devices = [slot.device] if ctx.cuda_rng is not None else []
        recompute = _Recompute(kept)
        outer = getattr(_state, "recompute", None), getattr(_state, "memo", None)
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, slot.device)
            _state.recompute, _state.memo = recompute, ctx.memo
            try:
                with torch.enable_grad():
                    out = ctx.function(x, *ctx.args)
            finally:
                _state.recompute, _state.memo = outer
        ctx.memo = None
        outs = (*(out if ctx.is_tuple else (out,)), *recompute.sides)
        if len(outs) != len(grads):
            raise RuntimeError(
                f"a checkpointed layer's recompute made {len(outs)} outputs and side outputs "
                f"where its first pass made {len(grads)}: both must name the same side_output"
            )
        pairs = [
            (o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad
        ]
        if recompute.probes:
            recompute.settle([o for o, _ in pairs])
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.slot = None
        return (None, None, None, x.grad, *([None] * len(ctx.args)))


def _checkpoint(function: Callable[..., Any], hidden_states: Any, args: tuple, offload: bool):
    if not torch.is_grad_enabled() or not isinstance(hidden_states, torch.Tensor):
        return function(hidden_states, *args)
    if not hidden_states.requires_grad:
        # The first layer's input comes from frozen embeddings: make the LoRA weights
        # inside reachable for autograd, as ``enable_input_require_grads`` would.
        hidden_states = hidden_states.detach().requires_grad_(True)
    shape: dict[str, Any] = {}
    result = _Checkpoint.apply(function, offload, shape, hidden_states, *args)
    if not shape["is_tuple"]:
        return result if isinstance(result, torch.Tensor) else result[0]
    return result[: shape["outputs"]]  # without the side outputs


def offloaded_checkpoint(function: Callable[..., Any], hidden_states: torch.Tensor, *args: Any):
    """``gradient_checkpointing_func`` for transformers' checkpointed layers, offloaded.

    ``function`` is the layer with its keyword arguments bound (transformers passes it
    so); ``hidden_states`` is the layer input. Outside training with gradients, or for
    inputs that are not a tensor, it simply calls the layer.
    """
    return _checkpoint(function, hidden_states, args, offload=True)


def device_checkpoint(function: Callable[..., Any], hidden_states: torch.Tensor, *args: Any):
    """As :func:`offloaded_checkpoint` with the layer input kept on its device: plain
    checkpointing, with the recompute's skips (the memory plan's ``recompute`` layers)."""
    return _checkpoint(function, hidden_states, args, offload=False)


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
