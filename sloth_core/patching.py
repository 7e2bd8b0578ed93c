"""Reversible, idempotent replacement of module forwards (for ``patch_layers``)."""

from __future__ import annotations

import functools
import types
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
    """Whether :func:`replace_forward` patched ``module`` (and it was not restored since)."""
    return _ORIGINAL in module.__dict__


def restorer(modules: Iterable[torch.nn.Module]) -> Callable[[], None]:
    """An ``undo`` for a :class:`~sloth_core.types.PatchReport`: restores ``modules``."""
    patched = list(modules)

    def undo() -> None:
        for module in patched:
            restore_forward(module)

    return undo


def bind_forward(module: torch.nn.Module, impl: Callable[..., Any]) -> bool:
    """Make ``impl(module, *args, **kwargs)`` the module's forward; ``False`` if patched already.

    The forward is bound to ``module`` as a method rather than closing over it, so that
    ``copy.deepcopy`` of a patched model (TRL's reference models, EMA copies) rebinds it to
    the copy instead of silently running the original's weights; ``impl`` must therefore
    not capture the module. The bound function carries the class forward's name and
    signature (``__wrapped__``): transformers inspects ``model.forward`` for ``**kwargs``
    (Trainer's ``num_items_in_batch``) and ``logits_to_keep`` (generation).
    """
    if is_patched(module):
        return False

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return impl(self, *args, **kwargs)

    functools.update_wrapper(forward, type(module).forward)
    return replace_forward(module, types.MethodType(forward, module))


def call_original(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run the forward that :func:`replace_forward` replaced (the fallback of every patch)."""
    original = module.__dict__.get(_ORIGINAL)
    if original is None:
        return type(module).forward(module, *args, **kwargs)
    return original(*args, **kwargs)


def unwrap_model(model: Any) -> Any:
    """The transformers model inside PEFT's wrappers (``PeftModel.get_base_model()``)."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and hasattr(model, "peft_config"):
        return get_base_model()
    return model


def model_type_of(model: Any) -> str | None:
    """``config.model_type`` of ``model`` or of the model PEFT wraps; ``None`` if it has none."""
    return getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
