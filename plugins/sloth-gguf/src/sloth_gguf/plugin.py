"""Hook implementations of sloth-gguf; the entry point names this module."""

from __future__ import annotations

from sloth_core import hookimpl
from sloth_core.sdk import ExportFormat

from .architectures import ARCHITECTURES
from .quantization import DEFAULT_QUANTIZATION, QUANTIZATIONS
from .verify import NEEDS, verify_gguf

PLUGIN = "sloth-gguf"
FORMAT = "gguf"


@hookimpl
def register_exporters(register):
    """Declare the ``gguf`` format (alias ``llama.cpp``): its types, their sizes and verify
    tolerances, and its verifier (the file reloaded in pure Python, then by llama.cpp where
    it is installed)."""
    register(
        ExportFormat(
            FORMAT,
            description=f"one GGUF file for llama.cpp ({', '.join(sorted(ARCHITECTURES))})",
            aliases=("llama.cpp",),
            quantizations=tuple(q.weight_type for q in QUANTIZATIONS.values()),
            default_quantization=DEFAULT_QUANTIZATION,
            verify=verify_gguf,
            verify_needs=NEEDS,
        )
    )


@hookimpl
def export(model, tokenizer, format, path, options):
    """Write ``model`` as GGUF when ``format`` is ``gguf`` (or ``llama.cpp``)."""
    if format not in (FORMAT, "llama.cpp"):
        return None
    from .writer import export_gguf  # torch, gguf and numpy only when exporting

    return export_gguf(model, tokenizer, path, options)
