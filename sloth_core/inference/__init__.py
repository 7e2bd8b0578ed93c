"""Inference after training: generation mode, prompts, stop ids, streaming, model paths.

:func:`for_inference` / :func:`for_training` (also ``FastLanguageModel.for_inference``)
switch a model between the two and back exactly; :func:`generate` runs transformers'
``generate`` with sloth's stop ids and a terminal streamer; :func:`open_engine` loads
whatever ``sloth chat`` / ``sloth generate`` are given (a model, an adapter, a ``sloth
train`` output or a GGUF file) behind one interface.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "for_inference": "sloth_core.modes",
    "for_training": "sloth_core.modes",
    "checkpointing_mode": "sloth_core.modes",
    "training_state": "sloth_core.modes",
    "END_OF_TURN_TOKENS": "sloth_core.inference.stop",
    "stop_token_ids": "sloth_core.inference.stop",
    "SamplingOptions": "sloth_core.inference.generation",
    "Completion": "sloth_core.inference.generation",
    "generate": "sloth_core.inference.generation",
    "terminal_streamer": "sloth_core.inference.generation",
    "PromptFormat": "sloth_core.inference.prompt",
    "PromptTooLongError": "sloth_core.inference.prompt",
    "ModelSource": "sloth_core.sources",
    "resolve_source": "sloth_core.sources",
    "Engine": "sloth_core.inference.engines",
    "open_engine": "sloth_core.inference.engines",
    "load_transformers": "sloth_core.inference.engines",
}


def __getattr__(name: str) -> Any:
    # torch and transformers load only when something asks for them (the CLI starts fast).
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sloth_core.inference' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = list(_LAZY)
