"""sloth-ollama: the ``ollama`` export format (a GGUF and a Modelfile)."""

from __future__ import annotations

__version__ = "0.1.0"
