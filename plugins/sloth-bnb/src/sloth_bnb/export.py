"""The ``merged_4bit`` export: LoRA merged, then the model re-quantized to NF4 (or FP4).

The merged model is written in 16-bit by the core (:func:`write_merged`) into a scratch
folder inside the staging directory, reloaded by transformers with this plugin's
``BitsAndBytesConfig`` (each weight is quantized as it streams in), and saved again:
transformers writes the packed weights with their quantization state and puts the
``quantization_config`` into ``config.json``, so ``AutoModelForCausalLM.from_pretrained``
reloads it 4-bit with no further arguments.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sloth_core.sdk import (
    DEFAULT_SHARD_SIZE,
    ExportResult,
    SlothError,
    atomic_directory,
    write_merged,
)

FORMAT = "merged_4bit"
#: Methods ``merged_4bit`` takes as its ``quantization``; nf4 by default.
METHODS = ("nf4", "fp4")
_SCRATCH = ".merged-16bit"


def _compute_dtype(model: Any, options: dict[str, Any]) -> Any:
    import torch

    wanted = options.get("dtype")
    if isinstance(wanted, str):
        wanted = getattr(torch, wanted.removeprefix("torch."))
    if wanted is not None:
        return wanted
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if torch.float16 in dtypes and torch.bfloat16 not in dtypes:
        return torch.float16
    return torch.bfloat16


def export_merged_4bit(
    model: Any, tokenizer: Any, path: Path, options: dict[str, Any]
) -> ExportResult:
    """Write ``model`` (LoRA merged) to ``path`` as a bitsandbytes 4-bit checkpoint.

    Options: ``quantization`` (``"nf4"`` or ``"fp4"``), ``dtype`` (the 16-bit dtype the
    merge is written in and the 4-bit compute dtype; bf16 by default, fp16 for an fp16
    model), ``max_shard_size``, ``force``.

    Raises:
        SlothError: an unknown method, or bitsandbytes missing.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .config import bnb_config

    method = str(options.get("quantization") or "nf4").lower()
    if method not in METHODS:
        raise SlothError(
            f"{FORMAT}: quantization {method!r} is not a 4-bit bitsandbytes type; "
            f"use one of {', '.join(METHODS)}"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise SlothError(
            f"{FORMAT} needs bitsandbytes: `pip install bitsandbytes` ({exc})"
        ) from None
    dtype = _compute_dtype(model, options)
    shard = options.get("max_shard_size") or DEFAULT_SHARD_SIZE
    with atomic_directory(path, force=options.get("force", False)) as staging:
        scratch = staging / _SCRATCH
        scratch.mkdir()
        write_merged(model, tokenizer, scratch, dtype=dtype, max_shard_size=shard)
        quantized = AutoModelForCausalLM.from_pretrained(
            scratch,
            quantization_config=bnb_config(method, compute_dtype=dtype),
            dtype=dtype,
            device_map="cuda" if torch.cuda.is_available() else "cpu",
        )
        quantized.save_pretrained(staging, max_shard_size=shard, safe_serialization=True)
        del quantized
        # The tokenizer files and the generation config (every EOS id) come as written.
        for item in scratch.iterdir():
            if item.suffix != ".safetensors" and item.name not in (
                "config.json", "model.safetensors.index.json",
            ):  # fmt: skip
                shutil.move(str(item), staging / item.name)
        shutil.rmtree(scratch)
    return ExportResult(FORMAT, Path(path), sorted(Path(path).iterdir()))
