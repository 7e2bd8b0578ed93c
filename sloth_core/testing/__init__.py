"""Test helpers for sloth and for plugin authors.

Installed with sloth-core as the pytest plugin ``sloth`` (see :mod:`.pytest_plugin`):
fixtures ``plugin_manager``, ``register_plugin`` and ``make_tiny_model``. Tiny random
models of real architectures with a tokenizer trained on the spot come from
:func:`tiny_model`; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "tiny_model": "sloth_core.testing.models",
    "tiny_config": "sloth_core.testing.models",
    "init_tiny_model": "sloth_core.testing.models",
    "TINY_CONFIGS": "sloth_core.testing.models",
    "build_tokenizer": "sloth_core.testing.tokenizer",
}


def __getattr__(name: str) -> Any:
    # torch and transformers load only when a test asks for a model.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sloth_core.testing' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = list(_LAZY)
