"""Hook implementations of sloth-gguf; the entry point names this module."""

from __future__ import annotations

from sloth_core import hookimpl

from .architectures import ARCHITECTURES
from .quantization import DEFAULT_QUANTIZATION, QUANTIZATIONS

PLUGIN = "sloth-gguf"
FORMAT = "gguf"


@hookimpl
def register_exporters(register):
    """Declare the ``gguf`` format (alias ``llama.cpp``)."""
    register(
        FORMAT,
        description=(
            f"one GGUF file for llama.cpp ({', '.join(sorted(ARCHITECTURES))}); option "
            f"quantization: {', '.join(QUANTIZATIONS)} (default {DEFAULT_QUANTIZATION})"
        ),
        aliases=("llama.cpp",),
        quantizations=tuple(QUANTIZATIONS),
    )


@hookimpl
def export(model, tokenizer, format, path, options):
    """Write ``model`` as GGUF when ``format`` is ``gguf`` (or ``llama.cpp``)."""
    if format not in (FORMAT, "llama.cpp"):
        return None
    from .writer import export_gguf  # torch, gguf and numpy only when exporting

    return export_gguf(model, tokenizer, path, options)
