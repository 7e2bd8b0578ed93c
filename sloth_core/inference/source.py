"""What a path given to ``sloth chat`` / ``sloth generate`` holds, and where its parts are.

Accepted: a model directory (``config.json``), a PEFT adapter directory
(``adapter_config.json``: base model + adapter), a ``sloth train`` output directory
(``final/``, else the newest ``checkpoint-N/adapter``), one ``checkpoint-N`` of it, a
``.gguf`` file or a directory holding exactly one, and a hub id (``owner/name``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sloth_core.errors import ModelNotFoundError

TRAIN_CONFIG = "train_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class ModelSource:
    """Where to load from; ``kind`` is ``"model"``, ``"adapter"`` or ``"gguf"``."""

    kind: str
    path: Path | str
    #: The base model of an adapter (a directory or a hub id).
    base: str | None = None
    #: Where the tokenizer is: the model, the adapter if it has one, else the base.
    tokenizer: str | None = None
    #: The ``chat_template`` option of the ``sloth train`` run that wrote it ("" if none).
    trained_chat_template: str = ""
    #: How the path was understood, for messages (``final/ of a sloth train run``...).
    note: str = ""

    def describe(self) -> str:
        what = {"model": "model", "adapter": "LoRA adapter", "gguf": "GGUF file"}[self.kind]
        base = f" on {self.base}" if self.base else ""
        note = f" ({self.note})" if self.note else ""
        return f"{what} {self.path}{base}{note}"


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _trained_chat_template(directory: Path) -> str:
    """The chat template a ``sloth train`` run used, from its ``train_config.json`` found in
    ``directory`` or up to two levels above (``final/``, ``checkpoint-N/adapter``)."""
    for candidate in (directory, *list(directory.parents)[:2]):
        config = candidate / TRAIN_CONFIG
        if config.is_file():
            try:
                value = json.loads(config.read_text()).get("chat_template") or ""
            except (OSError, ValueError):
                return ""
            return "" if str(value).strip().lower() == "auto" else str(value)
    return ""


def _adapter(directory: Path, note: str) -> ModelSource:
    config_file = directory / "adapter_config.json"
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{config_file} is not valid JSON: {exc}") from None
    if not base:
        raise ModelNotFoundError(f"{config_file} names no base_model_name_or_path")
    if not Path(base).expanduser().exists() and not _looks_like_hub_id(base):
        raise ModelNotFoundError(
            f"the adapter {directory} was trained on {base!r}, which is no longer there; "
            "restore the base model at that path or edit base_model_name_or_path in "
            f"{config_file}"
        )
    tokenizer = str(directory) if _has_tokenizer(directory) else str(base)
    return ModelSource(
        "adapter", directory, base=str(base), tokenizer=tokenizer,
        trained_chat_template=_trained_chat_template(directory), note=note,
    )  # fmt: skip


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _gguf_in(directory: Path) -> ModelSource | None:
    files = sorted(directory.glob("*.gguf"))
    if len(files) == 1:
        return ModelSource("gguf", files[0], note=f"the one .gguf in {directory}")
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ModelNotFoundError(f"{directory} holds several GGUF files ({names}): name one")
    return None


def _train_output(directory: Path) -> ModelSource | None:
    from sloth_core.train.checkpoint import list_checkpoints

    final = directory / "final"
    if final.is_dir() and (
        (final / "config.json").is_file() or (final / "adapter_config.json").is_file()
    ):
        return _resolve_dir(final, note=f"final/ of the sloth train run in {directory}")
    for checkpoint in reversed(list_checkpoints(directory)):
        if (checkpoint / "adapter" / "adapter_config.json").is_file():
            note = f"newest checkpoint of the sloth train run in {directory}"
            return _adapter(checkpoint / "adapter", note)
    return None


def _resolve_dir(directory: Path, note: str = "") -> ModelSource:
    if (directory / "adapter_config.json").is_file():
        return _adapter(directory, note)
    if (directory / "config.json").is_file():
        return ModelSource(
            "model", directory, tokenizer=str(directory),
            trained_chat_template=_trained_chat_template(directory), note=note,
        )  # fmt: skip
    if (directory / "adapter" / "adapter_config.json").is_file():  # one checkpoint-N
        return _adapter(directory / "adapter", f"checkpoint {directory.name}")
    found = _train_output(directory) or _gguf_in(directory)
    if found is not None:
        return found
    raise ModelNotFoundError(
        f"{directory} holds no model: expected config.json (a model), adapter_config.json "
        "(a LoRA adapter), a sloth train output (final/ or checkpoint-N/adapter) or a "
        ".gguf file"
    )


def resolve_source(name: str | Path) -> ModelSource:
    """What ``name`` is and where to load it from.

    Raises:
        ModelNotFoundError: a path that does not exist (and is no hub id), a directory
            with no model in it, an unreadable adapter config or a missing base model.
    """
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", path)
        raise ModelNotFoundError(
            f"{path} is a file but not a .gguf file; give a model directory, an adapter "
            "directory, a sloth train output directory or a .gguf file"
        )
    if path.is_dir():
        return _resolve_dir(path)
    if _looks_like_hub_id(str(name)):
        return ModelSource("model", str(name), tokenizer=str(name), note="hub id")
    raise ModelNotFoundError(f"{name}: no such file or directory")
