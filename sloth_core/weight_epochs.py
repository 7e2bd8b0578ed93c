"""Spans in which no trainable weight changes, numbered: what was derived from a weight in
one span (a fused op's cast of an fp32 adapter to bf16) may be reused within it.

A new span begins at every patched causal LM forward and after every optimizer step
(a global post-step hook on ``torch.optim.Optimizer``, which bitsandbytes' optimizers
subclass: they write the weights through raw pointers, which no version counter sees).
So a layer's first pass under a checkpoint and its recompute in backward share a span,
and two training steps never do.
"""

from __future__ import annotations

import threading
from typing import Any

from torch.optim.optimizer import register_optimizer_step_post_hook

_epoch = 0
_lock = threading.Lock()
_hooked = False


def _advance(*_: Any) -> None:
    global _epoch
    with _lock:  # the optimizer and the backward's threads may both advance it
        _epoch += 1


def new_weight_epoch() -> None:
    """Begin a new span: the weights may have changed (a model forward is starting)."""
    _advance()


def weight_epoch() -> int:
    """The number of the current span; 0 until one has begun, where nothing may be reused
    (no patched model forward ran yet, so nothing marks where the weights change)."""
    global _hooked
    if not _hooked:
        with _lock:
            if not _hooked:  # once per process: torch keeps every hook it is given
                register_optimizer_step_post_hook(_advance)
                _hooked = True
    return _epoch
