"""The project's own plugin distributions, for the hint when a name no installed plugin serves.

Installed plugins describe themselves (:mod:`sloth_core.formats`); what is *not* installed
cannot, so this index names which of our distributions to ``pip install`` for a format or
a quantization method. It holds names only: nothing here is read when the plugin is
installed, and a third party's format needs no entry.
"""

from __future__ import annotations

#: Distribution -> the export formats and quantization methods it provides.
FIRST_PARTY: dict[str, dict[str, tuple[str, ...]]] = {
    "sloth-bnb": {"formats": ("merged_4bit",), "quantizers": ("nf4", "fp4", "int8")},
    "sloth-gguf": {"formats": ("gguf", "llama.cpp")},
    "sloth-ollama": {"formats": ("ollama",)},
}


def distribution_for(kind: str, name: str) -> str | None:
    """Which of our distributions provides ``name`` (``kind``: "formats" or "quantizers")."""
    return next((d for d, p in FIRST_PARTY.items() if name in p.get(kind, ())), None)


def not_installed(kind: str, installed: dict[str, str]) -> dict[str, str]:
    """Name -> distribution for each of ``kind`` that no installed plugin serves."""
    return {
        name: dist
        for dist, provides in FIRST_PARTY.items()
        for name in provides.get(kind, ())
        if name not in installed
    }
