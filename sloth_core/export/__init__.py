"""Helpers of the export pipeline: :mod:`.llama_cpp` (llama.cpp in a child process) and
:mod:`.verify` (reload what was written and compare it with the model in memory).

``sloth_core.export`` is also the public export function (:func:`sloth_core.api.export`).
Importing a submodule makes Python bind this package to that name on ``sloth_core``, so
the package is callable and forwards to the function: both spellings keep working.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from sloth_core.api import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
