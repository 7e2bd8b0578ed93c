"""The generic Hugging Face loader: any causal LM, just without fast paths (trylast)."""

from __future__ import annotations

from typing import Any

from sloth_core import hookimpl
from sloth_core.sdk.loading import load_hf_model
from sloth_core.types import ModelSpec


@hookimpl(trylast=True)
def load_model(spec: ModelSpec) -> tuple[Any, Any]:
    """Load any causal LM through transformers' auto classes."""
    return load_hf_model(spec)
