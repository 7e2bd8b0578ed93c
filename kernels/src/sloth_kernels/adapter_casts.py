"""LoRA adapters as the fused products read them, made once per weight epoch.

PEFT keeps adapters in fp32 on a 16-bit model, and the fused ops multiply in the input's
dtype: each adapter was cast at every call, and a checkpointed layer calls twice (its
first pass and its recompute), with ``A`` of q/k/v (and gate/up) stacked into one matrix
at each of forward, recompute and backward. On a small model's host-bound step those
launches cost milliseconds. Here a group's copies are made once per
:func:`sloth_core.sdk.weight_epoch` (a span in which no weight changes: a new one begins
at every model forward and optimizer step) and reused within it, while the adapters are
the same objects, at the same addresses, unwritten (version counters).

The copies hold no autograd history: the ops take the adapters themselves as their
autograd inputs and cast the gradients back. Before the first epoch (no patched model
forward ran) and in inference mode nothing is kept. The cache holds the current epoch's
copies only: the adapters' size over two, for fp32 ones on a 16-bit model.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from sloth_core.sdk import weight_epoch

Copies = tuple[tuple[torch.Tensor, ...], torch.Tensor | None]
_cache: dict[tuple, tuple[list, list, Copies]] = {}
_cache_epoch = 0


def _make(params: Sequence[torch.Tensor], dtype: torch.dtype) -> Copies:
    copies = tuple(t.detach() if t.dtype == dtype else t.detach().to(dtype) for t in params)
    a = copies[0::2]
    return copies, (None if not a else a[0] if len(a) == 1 else torch.cat(a, dim=0))


def adapter_copies(params: Sequence[torch.Tensor], dtype: torch.dtype) -> Copies:
    """``([A_0, B_0, A_1, B_1, ...] in dtype, the A's stacked into [sum r, in])`` of
    ``params`` (the same order; ``None`` for no adapter), without autograd history."""
    global _cache_epoch
    if len(params) <= 2 and all(t.dtype == dtype for t in params):
        return _make(params, dtype)  # nothing to launch: nothing to keep
    epoch = weight_epoch()
    if epoch == 0 or torch.is_inference_mode_enabled():
        return _make(params, dtype)
    if epoch != _cache_epoch:  # a new epoch: nothing kept before holds
        _cache.clear()
        _cache_epoch = epoch
    key = (dtype, *map(id, params))
    state = [(t.data_ptr(), t._version) for t in params]
    entry = _cache.get(key)
    if entry is not None:
        refs, kept_state, copies = entry
        # The same objects (an id is reused once its tensor is gone), unwritten.
        if kept_state == state and all(r() is t for r, t in zip(refs, params, strict=True)):
            return copies
    with torch.no_grad():
        copies = _make(params, dtype)
    _cache[key] = ([weakref.ref(t) for t in params], state, copies)
    return copies


def clear() -> None:
    """Drop everything kept (tests, and a caller that wants the memory back)."""
    _cache.clear()
