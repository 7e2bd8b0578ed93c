"""The on-disk layout of a ``sloth train`` run, in one place.

::

    output_dir/
      train_config.json        the options of the run (its chat template among them)
      checkpoint-<step>/       written whole (renamed into place), oldest pruned
        trainable.safetensors  every trainable tensor by parameter name
        adapter/               the PEFT adapter, as PEFT writes it (LoRA runs)
        optimizer.*, scheduler.*, rng.*   pickle-free states (:mod:`.train.state_files`)
        trainer_state.json     written last: step, options, file sizes
      final/                   the final model in the run's save_method format

The trainer writes it (:mod:`sloth_core.train`), resume reads it, and the model-source
service (:mod:`sloth_core.sources`) finds models in it for ``sloth export``, ``sloth
chat`` and ``sloth generate``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = [
    "ADAPTER_DIR",
    "FINAL_DIR",
    "STATE_FILE",
    "TRAINABLE_FILE",
    "TRAIN_CONFIG",
    "checkpoint_path",
    "list_checkpoints",
    "trained_chat_template",
]

TRAIN_CONFIG = "train_config.json"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
ADAPTER_DIR = "adapter"
FINAL_DIR = "final"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints in ``output_dir`` (renamed into place, so written whole), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def _options(path: Path) -> dict:
    """The run's options in ``path``: ``train_config.json`` itself, or a checkpoint's
    ``trainer_state.json`` (which holds them under ``config``); ``{}`` if unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return data.get("config", {}) if path.name == STATE_FILE else data


def trained_chat_template(directory: str | Path) -> str:
    """The ``chat_template`` option of the run that wrote ``directory`` ("" if none or
    ``auto``): from the run's ``train_config.json`` in ``directory`` or up to two levels
    above (``final/``, ``checkpoint-N/adapter``), else from the nearest checkpoint state, else
    from the newest checkpoint of the run."""
    directory = Path(directory)
    candidates = [directory, *list(directory.parents)[:2]]
    files = [c / TRAIN_CONFIG for c in candidates] + [c / STATE_FILE for c in candidates]
    # A run without its train_config.json: the options its newest checkpoint kept.
    files += [
        checkpoints[-1] / STATE_FILE for c in candidates if (checkpoints := list_checkpoints(c))
    ]
    for path in files:
        if path.is_file():
            value = str(_options(path).get("chat_template") or "")
            return "" if value.strip().lower() == "auto" else value
    return ""
