"""sloth: fast, memory-lean fine-tuning of large language models.

The core defines the hook specifications (:mod:`sloth_core.hookspecs`), the plugin
manager (:mod:`sloth_core.plugins`), the op registry (:mod:`sloth_core.ops`) and the
public API; everything model-, kernel-, quantizer- or format-specific lives in plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "sloth"
#: Marker for plugin implementations: ``@hookimpl def load_model(spec): ...``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

if TYPE_CHECKING:  # for type checkers: at run time _LAZY resolves them (in __all__)
    from sloth_core.api import FastLanguageModel  # noqa: F401
    from sloth_core.plugins import SlothPluginManager, get_plugin_manager  # noqa: F401

# The public API pulls in torch and transformers; keep ``import sloth_core`` (and so the
# CLI's start and plugin discovery) cheap by resolving those names on first use.
_LAZY = {
    "FastLanguageModel": "sloth_core.api",
    "load_model": "sloth_core.api",
    "export": "sloth_core.api",
    "get_plugin_manager": "sloth_core.plugins",
    "SlothPluginManager": "sloth_core.plugins",
    "ModelSpec": "sloth_core.types",
    "SlothError": "sloth_core.errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sloth_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["__version__", "hookimpl", *_LAZY]
