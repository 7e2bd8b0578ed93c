"""LoRA adapters as the fused products read them, made once per weight epoch.

PEFT keeps adapters in fp32 on a 16-bit model, and the fused ops multiply in the input's
dtype: each adapter was cast at every call, and a checkpointed layer calls twice (its
first pass and its recompute), with ``A`` of q/k/v (and gate/up) stacked into one matrix
at each of forward, recompute and backward. On a small model's host-bound step those
launches cost milliseconds. Here a group's copies are made once per
:func:`sloth_core.sdk.weight_epoch` (a span in which no weight changes: a new one begins
at every model forward and optimizer step) and reused within it, while the adapters are
the same objects, at the same addresses, unwritten (version counters).

The copies are views of one buffer per dtype: at the first call of an epoch every group
the last epoch asked for is copied with one ``cat`` and one cast (three launches where a
16-layer model made some 250 casts and stacks), a group's ``A`` matrices side by side so
that their stack is a view too. A group not known yet, or one written since, is copied on
its own.

The copies hold no autograd history: the ops take the adapters themselves as their
autograd inputs and cast the gradients back. Before the first epoch (no patched model
forward ran) and in inference mode nothing is kept. The cache holds the current epoch's
copies only: the adapters' size over two, for fp32 ones on a 16-bit model (a group of
16-bit adapters, copied in the batch too, costs its own size).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from sloth_core.sdk import weight_epoch

Copies = tuple[tuple[torch.Tensor, ...], torch.Tensor | None]
_Key = tuple
_Refs = list
_cache: dict[_Key, tuple[_Refs, list, Copies]] = {}
_cache_epoch = 0
# The groups asked for in the last epoch that asked for any (an optimizer step's epoch
# asks for none), in order, and those of this one: what the next epoch copies at once.
_last: dict[_Key, _Refs] = {}
_asked: dict[_Key, _Refs] = {}


def _make(params: Sequence[torch.Tensor], dtype: torch.dtype) -> Copies:
    copies = tuple(t.detach() if t.dtype == dtype else t.detach().to(dtype) for t in params)
    a = copies[0::2]
    return copies, (None if not a else a[0] if len(a) == 1 else torch.cat(a, dim=0))


def _state(params: Sequence[torch.Tensor]) -> list:
    return [(t.data_ptr(), t._version) for t in params]


def _batchable(params: Sequence[torch.Tensor]) -> bool:
    """Whether a group's copies can be views of a shared buffer: one dtype and device,
    and ``A`` matrices of one width (they share an input), so their stack is a view."""
    first = params[0]
    return (
        all(t.dtype == first.dtype and t.device == first.device for t in params)
        and len({t.shape[1:] for t in params[0::2]}) == 1
    )


def _make_all(groups: list[tuple[_Key, list[torch.Tensor]]], dtype: torch.dtype) -> None:
    """Copy ``groups`` (all ``_batchable``, of one source dtype and device) as views of one
    buffer in ``dtype``: one ``cat`` and one cast for all of them."""
    parts = [t.detach().reshape(-1) for _, params in groups for t in (*params[0::2], *params[1::2])]
    flat = torch.cat(parts)
    if flat.dtype != dtype:
        flat = flat.to(dtype)
    offset = 0
    for key, params in groups:
        a, b = params[0::2], params[1::2]
        rows = sum(t.shape[0] for t in a)
        stacked = flat[offset : offset + rows * a[0][0].numel()].view(rows, *a[0].shape[1:])
        views_a = stacked.split([t.shape[0] for t in a])
        offset += stacked.numel()
        views_b = []
        for t in b:
            views_b.append(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        copies = tuple(v for pair in zip(views_a, views_b, strict=True) for v in pair)
        _cache[key] = ([weakref.ref(t) for t in params], _state(params), (copies, stacked))


def _begin(epoch: int) -> None:
    """A new epoch: drop what was kept, and copy the last epoch's groups at once."""
    global _cache_epoch, _last, _asked
    _cache.clear()
    _cache_epoch = epoch
    if _asked:
        _last, _asked = _asked, {}
    batches: dict[tuple, list[tuple[_Key, list[torch.Tensor]]]] = {}
    for key, refs in _last.items():
        params = [r() for r in refs]
        if any(t is None for t in params) or not _batchable(params):
            continue
        src = params[0]
        batches.setdefault((key[0], src.dtype, src.device), []).append((key, params))
    with torch.no_grad():
        for (dtype, _, _), groups in batches.items():
            _make_all(groups, dtype)


def adapter_copies(params: Sequence[torch.Tensor], dtype: torch.dtype) -> Copies:
    """``([A_0, B_0, A_1, B_1, ...] in dtype, the A's stacked into [sum r, in])`` of
    ``params`` (the same order; ``None`` for no adapter), without autograd history."""
    if len(params) <= 2 and all(t.dtype == dtype for t in params):
        return _make(params, dtype)  # nothing to launch: nothing to keep
    epoch = weight_epoch()
    if epoch == 0 or torch.is_inference_mode_enabled():
        return _make(params, dtype)
    if epoch != _cache_epoch:  # a new epoch: nothing kept before holds
        _begin(epoch)
    key = (dtype, *map(id, params))
    state = _state(params)
    entry = _cache.get(key)
    if entry is not None:
        refs, kept_state, copies = entry
        # The same objects (an id is reused once its tensor is gone), unwritten.
        if kept_state == state and all(r() is t for r, t in zip(refs, params, strict=True)):
            _asked.setdefault(key, refs)
            return copies
    with torch.no_grad():
        copies = _make(params, dtype)
    refs = [weakref.ref(t) for t in params]
    _cache[key] = (refs, state, copies)
    _asked[key] = refs
    return copies


def clear() -> None:
    """Drop everything kept (tests, and a caller that wants the memory back)."""
    _cache.clear()
    _last.clear()
    _asked.clear()
