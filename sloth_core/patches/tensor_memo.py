"""What was computed from a tensor, kept on the tensor itself for the next caller.

Every decoder layer of one forward receives the same ``position_ids``, mask or batch, and
what sloth derives from them (packed rows, a flex block mask, shared-prompt rows) costs a
device sync or a kernel each time: :func:`memo` computes it once per tensor, and again
only after the tensor (or one it names) has been written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(
        x is y if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) else x == y
        for x, y in zip(a, b, strict=True)
    )


def memo(tensor: torch.Tensor, attr: str, key: tuple[Any, ...], compute: Callable[[], T],
         *, watch: tuple[torch.Tensor, ...] = ()) -> T:  # fmt: skip
    """``compute()``, kept on ``tensor`` as the attribute ``attr``: the kept result comes
    back while ``key`` is the same (tensors in it compared by identity) and neither
    ``tensor`` nor a tensor of ``watch`` has been written since (their version counters).
    Inference-mode tensors (no version counter) and tensors that take no attributes
    (under compile) keep nothing: ``compute()`` runs every time."""
    try:
        versions = tuple(t._version for t in (tensor, *watch))
    except RuntimeError:  # an inference-mode tensor has no version counter
        return compute()
    full = (versions, *key)
    cached = getattr(tensor, attr, None)
    if cached is not None and _same(cached[0], full):
        return cached[1]
    result = compute()
    try:
        setattr(tensor, attr, (full, result))
    except (AttributeError, RuntimeError):
        pass
    return result
