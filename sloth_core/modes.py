"""Switch a model between training and generation, and back, without losing anything.

:func:`for_inference` remembers what it changes (per-module checkpointing flags and
functions, ``config.use_cache``, the tokenizer's padding side, which parameters train) on
the model, and :func:`for_training` puts exactly that back, so a train / generate / train
loop takes the same gradients as a loop that never generated. Patched forwards are left
alone: the patched attention updates the KV cache like transformers' own.

4-bit weights that bitsandbytes repacked for CPU inference during generation are put back
by sloth-bnb's guard before the first training forward (:mod:`sloth_bnb.cpu_layout`);
the core cannot reach the plugin, and the guard already restores on every path into
training, including a plain ``model.train()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sloth_core.patching import unwrap_model

#: Where :func:`for_inference` keeps what :func:`for_training` restores.
_STATE = "_sloth_training_state"
_MISSING = object()


@dataclass
class TrainingState:
    """What :func:`for_inference` changed, to be put back by :func:`for_training`."""

    #: ``(module, gradient_checkpointing, _gradient_checkpointing_func or _MISSING)``.
    checkpointing: list[tuple[torch.nn.Module, bool, Any]] = field(default_factory=list)
    use_cache: Any = _MISSING
    tokenizer: Any = None
    padding_side: str | None = None
    trainable: list[str] = field(default_factory=list)

    @property
    def checkpointing_mode(self) -> str:
        """``"off"``, ``"on"`` or ``"offload"`` (sloth's CPU-offloaded checkpointing)."""
        from sloth_core.checkpointing import offloaded_checkpoint

        active = [func for _, enabled, func in self.checkpointing if enabled]
        if not active:
            return "off"
        return "offload" if any(func is offloaded_checkpoint for func in active) else "on"


def checkpointing_mode(model: torch.nn.Module) -> str:
    """How activation checkpointing is set on ``model``: ``"off"``, ``"on"`` or ``"offload"``."""
    return TrainingState(checkpointing=_checkpointing(model)).checkpointing_mode


def _checkpointing(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool, Any]]:
    funcs = "_gradient_checkpointing_func"
    return [
        (m, bool(m.gradient_checkpointing), m.__dict__.get(funcs, _MISSING))
        for m in model.modules()
        if isinstance(getattr(m, "gradient_checkpointing", None), bool)
    ]


def training_state(model: torch.nn.Module) -> TrainingState | None:
    """What :func:`for_inference` saved on ``model``; ``None`` if it is not in inference mode."""
    return model.__dict__.get(_STATE)


def for_inference(model: torch.nn.Module, tokenizer: Any = None) -> torch.nn.Module:
    """Put ``model`` (and ``tokenizer``) in generation mode; idempotent.

    Eval mode (no dropout), activation checkpointing off, ``config.use_cache = True``,
    left padding on ``tokenizer`` (batched prompts must end where generation starts).
    Which parameters train, and patched forwards, are left as they are.

    Returns:
        ``model``.
    """
    state = training_state(model)
    if state is None:
        config = getattr(unwrap_model(model), "config", None)
        state = TrainingState(
            checkpointing=_checkpointing(model),
            use_cache=getattr(config, "use_cache", _MISSING),
            trainable=[n for n, p in model.named_parameters() if p.requires_grad],
        )
        model.__dict__[_STATE] = state
    if tokenizer is not None and state.tokenizer is None:
        state.tokenizer, state.padding_side = tokenizer, getattr(tokenizer, "padding_side", None)
    # Flags off, functions kept: for_training turns them on again exactly as they were.
    for module, _, _ in state.checkpointing:
        # torch types Module.__setattr__'s value as Tensor | Module; it takes any object.
        module.gradient_checkpointing = False  # type: ignore[assignment]
    config = getattr(unwrap_model(model), "config", None)
    if config is not None:
        config.use_cache = True
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    model.eval()
    return model


def for_training(model: torch.nn.Module, tokenizer: Any = None) -> torch.nn.Module:
    """Undo :func:`for_inference`: train mode and everything it changed, as it was.

    Checkpointing comes back as it was enabled (plain or offloaded, same function), as
    does ``config.use_cache`` and the padding side of the tokenizer given to
    :func:`for_inference` (or to this call). The parameters that trained before train
    again. On a model that was never put in inference mode it only calls ``model.train()``
    (and pads ``tokenizer``, if given, on the right).

    Returns:
        ``model``.
    """
    state = model.__dict__.pop(_STATE, None)
    if state is not None:
        for module, enabled, func in state.checkpointing:
            module.gradient_checkpointing = enabled
            if func is not _MISSING:
                module._gradient_checkpointing_func = func
        config = getattr(unwrap_model(model), "config", None)
        if config is not None and state.use_cache is not _MISSING:
            config.use_cache = state.use_cache
        if state.trainable:
            params = dict(model.named_parameters())
            for name in state.trainable:
                if name in params:
                    params[name].requires_grad_(True)
        if state.tokenizer is not None and state.padding_side is not None:
            state.tokenizer.padding_side = state.padding_side
    if tokenizer is not None and (state is None or tokenizer is not state.tokenizer):
        tokenizer.padding_side = "right"
    model.train()
    return model
