"""``sloth train --demo``: a fine-tune that runs anywhere in a few minutes, nothing downloaded.

The model is a small Llama built from the bundled ``demo_model.json`` with a byte-level BPE
tokenizer trained on the spot (:func:`sloth_core.testing.tokenizer.build_tokenizer`),
written once to the cache; the data is the bundled instruction set (arithmetic, capitals,
antonyms, plurals...). The options are ordinary ``sloth train`` options, so every flag
still applies on top of them.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

DEMO_OPTIONS: dict[str, Any] = {
    "max_seq_length": 128,
    "data_format": "alpaca",
    "eval_fraction": 0.1,
    "r": 32,
    "lora_alpha": 64,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 6,
    "learning_rate": 3e-3,
    "warmup_steps": 10,
    "lr_scheduler_type": "cosine",
    "gradient_checkpointing": "off",
    "output_dir": "sloth-demo",
    "save_method": "merged_16bit",
    "logging_steps": 10,
    "seed": 0,
    # Matrices this small gain nothing from more threads, and on a busy machine several
    # threads contend badly (100x slower measured on 2 shared cores).
    "cpu_threads": 1,
}


def demo_dataset() -> Path:
    """The bundled instruction data set (JSONL, alpaca format)."""
    return Path(str(resources.files("sloth_core.testing") / "data" / "tiny_instructions.jsonl"))


def demo_model(cache: Path | None = None) -> Path:
    """The demo base model, built once into ``$SLOTH_CACHE/demo-model`` (or ``~/.cache/sloth``)."""
    from sloth_core.testing.models import tiny_model

    cache = cache or Path(os.environ.get("SLOTH_CACHE", Path.home() / ".cache" / "sloth"))
    path = cache / "demo-model"
    if (path / "config.json").is_file():
        return path
    config = json.loads((resources.files("sloth_core.train") / "demo_model.json").read_text())
    arch = config.pop("model_type")
    staging = path.with_name(path.name + f".{os.getpid()}.tmp")
    tiny_model(arch, staging, overwrite=True, **config)
    os.replace(staging, path) if not path.exists() else None
    return path


def demo_options() -> dict[str, Any]:
    """The demo's options: :data:`DEMO_OPTIONS` plus the model and data paths."""
    return {**DEMO_OPTIONS, "model_name": str(demo_model()), "dataset": str(demo_dataset())}
