"""Reversible, idempotent replacement of module forwards (for ``patch_layers``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

_ORIGINAL = "_sloth_original_forward"


def replace_forward(module: torch.nn.Module, forward: Callable[..., Any]) -> bool:
    """Make ``forward`` the module's forward; ``False`` if it was patched already.

    Patching twice keeps the first patch, so ``patch_layers`` may run again after LoRA
    adapters are attached without stacking wrappers.
    """
    if _ORIGINAL in module.__dict__:
        return False
    # The instance may already carry its own forward (hooks of other libraries): keep it.
    module.__dict__[_ORIGINAL] = module.__dict__.get("forward")
    module.forward = forward
    return True


def restore_forward(module: torch.nn.Module) -> bool:
    """Undo :func:`replace_forward`; ``False`` if the module was not patched."""
    if _ORIGINAL not in module.__dict__:
        return False
    original = module.__dict__.pop(_ORIGINAL)
    if original is None:
        del module.forward  # back to the class's forward
    else:
        module.forward = original
    return True


def is_patched(module: torch.nn.Module) -> bool:
    return _ORIGINAL in module.__dict__


def restorer(modules: Iterable[torch.nn.Module]) -> Callable[[], None]:
    """An ``undo`` for a :class:`~sloth_core.types.PatchReport`: restores ``modules``."""
    patched = list(modules)

    def undo() -> None:
        for module in patched:
            restore_forward(module)

    return undo
