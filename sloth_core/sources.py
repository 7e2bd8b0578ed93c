"""The model-source service: what a path holds, and the model and tokenizer loaded from it.

One resolver and one loader for ``sloth export``, ``sloth chat`` and ``sloth generate``.
Accepted: a model directory (``config.json``), a PEFT adapter directory
(``adapter_config.json``: base model + adapter), a ``sloth train`` output directory (its
``final/``, else its newest checkpoint), one ``checkpoint-N`` of it (its ``adapter/``, or
for a full fine-tune the base model plus ``trainable.safetensors``), a ``.gguf`` file or
a directory holding exactly one, and a hub id (``owner/name``). The run layout is
:mod:`sloth_core.runs`'. A model trained with a chat template gets that template back.
An adapter is always patched again once loaded, by the plugins that patched its base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sloth_core.errors import ModelNotFoundError, SlothError
from sloth_core.quiet import peft_calls
from sloth_core.runs import (
    ADAPTER_DIR,
    FINAL_DIR,
    STATE_FILE,
    TRAINABLE_FILE,
    list_checkpoints,
    trained_chat_template,
)

__all__ = ["DTYPES", "ModelSource", "load_source", "resolve_source"]

#: What ``dtype=`` takes; ``auto`` is the dtype the model's ``config.json`` names.
DTYPES = ("auto", "float32", "float16", "bfloat16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_KINDS = {
    "model": "model",
    "adapter": "LoRA adapter",
    "full": "full fine-tune checkpoint",
    "gguf": "GGUF file",
}


@dataclass
class ModelSource:
    """Where to load from; ``kind`` is ``"model"``, ``"adapter"``, ``"full"`` (a full
    fine-tune's checkpoint: base model plus ``trainable.safetensors``) or ``"gguf"``."""

    kind: str
    path: Path | str
    #: The base model of an adapter or checkpoint (a directory or a hub id).
    base: str | None = None
    #: Where the tokenizer is: the model, the adapter if it has one, else the base.
    tokenizer: str | None = None
    #: The ``chat_template`` option of the ``sloth train`` run that wrote it ("" if none).
    trained_chat_template: str = ""
    #: How the path was understood, for messages (``final/ of a sloth train run``...).
    note: str = ""

    def describe(self) -> str:
        base = f" on {self.base}" if self.base else ""
        note = f" ({self.note})" if self.note else ""
        return f"{_KINDS[self.kind]} {self.path}{base}{note}"

    def inputs(self) -> list[Path]:
        """The paths on this disk that loading reads (an export must never replace them)."""
        paths = [self.path, self.base] if self.base else [self.path]
        return [Path(p).expanduser() for p in paths if Path(str(p)).expanduser().exists()]


# -- resolving ----------------------------------------------------------------------------
def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{path} is not a JSON object")
    return data


def _check_base(base: str, what: Path, config_file: Path, field: str) -> None:
    if not Path(base).expanduser().exists() and not _looks_like_hub_id(base):
        raise ModelNotFoundError(
            f"{what} was trained on {base!r}, which is no longer there; restore the base "
            f"model at that path or edit {field} in {config_file}"
        )


def _adapter(directory: Path, note: str) -> ModelSource:
    config_file = directory / "adapter_config.json"
    base = _read_json(config_file).get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(f"{config_file} names no base_model_name_or_path")
    _check_base(str(base), directory, config_file, "base_model_name_or_path")
    tokenizer = str(directory) if _has_tokenizer(directory) else str(base)
    return ModelSource(
        "adapter", directory, base=str(base), tokenizer=tokenizer,
        trained_chat_template=trained_chat_template(directory), note=note,
    )  # fmt: skip


def _checkpoint(directory: Path, note: str) -> ModelSource:
    """One ``checkpoint-N``: its adapter, or the full fine-tune's trainable tensors."""
    if (directory / ADAPTER_DIR / "adapter_config.json").is_file():
        return _adapter(directory / ADAPTER_DIR, note or f"checkpoint {directory.name}")
    if not (directory / TRAINABLE_FILE).is_file():
        raise ModelNotFoundError(
            f"{directory} is a checkpoint without {ADAPTER_DIR}/ or {TRAINABLE_FILE}"
        )
    state_file = directory / STATE_FILE
    base = _read_json(state_file).get("config", {}).get("model_name")
    if not base:
        raise ModelNotFoundError(f"{state_file} names no model_name")
    _check_base(str(base), directory, state_file, "config.model_name")
    return ModelSource(
        "full", directory, base=str(base), tokenizer=str(base),
        trained_chat_template=trained_chat_template(directory),
        note=note or f"full fine-tune checkpoint {directory.name}",
    )  # fmt: skip


def _gguf_in(directory: Path) -> ModelSource | None:
    files = sorted(directory.glob("*.gguf"))
    if len(files) == 1:
        return ModelSource("gguf", files[0], note=f"the one .gguf in {directory}")
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ModelNotFoundError(f"{directory} holds several GGUF files ({names}): name one")
    return None


def _train_output(directory: Path) -> ModelSource | None:
    final = directory / FINAL_DIR
    if final.is_dir() and (
        (final / "config.json").is_file() or (final / "adapter_config.json").is_file()
    ):
        return _resolve_dir(final, f"{FINAL_DIR}/ of the sloth train run in {directory}")
    checkpoints = list_checkpoints(directory)
    if checkpoints:
        return _checkpoint(
            checkpoints[-1], f"newest checkpoint of the sloth train run in {directory}"
        )
    return None


def _resolve_dir(directory: Path, note: str = "") -> ModelSource:
    if (directory / "adapter_config.json").is_file():
        return _adapter(directory, note)
    if (directory / "config.json").is_file():
        return ModelSource(
            "model", directory, tokenizer=str(directory),
            trained_chat_template=trained_chat_template(directory), note=note,
        )  # fmt: skip
    if (directory / STATE_FILE).is_file():  # one checkpoint-N
        return _checkpoint(directory, note)
    found = _train_output(directory) or _gguf_in(directory)
    if found is not None:
        return found
    raise ModelNotFoundError(
        f"{directory} holds no model: expected config.json (a model), adapter_config.json "
        f"(a LoRA adapter), {STATE_FILE} (a checkpoint), a sloth train output ({FINAL_DIR}/ "
        "or checkpoint-N/) or a .gguf file"
    )


def resolve_source(name: str | Path) -> ModelSource:
    """What ``name`` is and where to load it from.

    Raises:
        ModelNotFoundError: a path that does not exist (and is no hub id), a directory
            with no model in it, an unreadable config or a missing base model.
    """
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", path, trained_chat_template=trained_chat_template(path))
        raise ModelNotFoundError(
            f"{path} is a file but not a .gguf file; give a model directory, an adapter "
            "directory, a sloth train output directory or a .gguf file"
        )
    if path.is_dir():
        return _resolve_dir(path)
    if _looks_like_hub_id(str(name)):
        return ModelSource("model", str(name), tokenizer=str(name), note="hub id")
    raise ModelNotFoundError(f"{name}: no such file or directory")


# -- loading ------------------------------------------------------------------------------
def _dtype(choice: str, model_dir: Path | str) -> Any:
    import torch

    if choice not in DTYPES:
        raise SlothError(f"dtype {choice!r}: choose one of {', '.join(DTYPES)}")
    if choice != "auto":
        return getattr(torch, choice)
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "")
    value = getattr(torch, name.removeprefix("torch."), None) if name else None
    return value if isinstance(value, torch.dtype) else None


def _load_gguf(
    source: ModelSource, dtype: Any, device: str | None, manager: Any, trust_remote_code: bool
) -> tuple[Any, Any]:
    """A GGUF file through transformers' GGUF reader: its weights dequantized, then patched
    like any loaded model (what ``sloth export`` re-exports from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sloth_core.plugins import get_plugin_manager
    from sloth_core.trust import check_remote_code

    path = Path(source.path)
    # The GGUF holds no code, but the folder beside it may ask for some (auto_map).
    check_remote_code(path.parent, trust_remote_code)
    trust = {"trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **trust)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype or "auto", device_map=device, **trust
        )
    except (ValueError, KeyError, OSError, ImportError) as exc:
        raise ModelNotFoundError(
            f"{path}: transformers cannot read this GGUF file ({exc})"
        ) from exc
    reports = (manager or get_plugin_manager()).patch_layers(model=model)
    # nn.Module types its attributes as tensors or modules: not what sloth keeps on it.
    model.sloth_patches = reports  # type: ignore[assignment]
    return model, tokenizer


def load_source(
    source: ModelSource,
    *,
    dtype: str = "auto",
    device: str | None = None,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    apply_trained_template: bool = True,
    manager: Any = None,
) -> tuple[Any, Any]:
    """The model and tokenizer ``source`` holds, patched: a base model with its adapter
    attached (and patched again), or with a full fine-tune's tensors copied in; the
    tokenizer from the adapter when it has one; the trained chat template put back on the
    tokenizer (unless ``apply_trained_template`` is off: ``sloth chat`` weighs it against
    ``--chat-template`` itself).

    The model's own code runs only with ``trust_remote_code``, pickled weights load only
    with ``allow_pickle``. A GGUF file is read through transformers (dequantized).
    """
    if source.kind == "gguf":
        dtype_ = None if dtype == "auto" else _dtype(dtype, source.path)
        model, tokenizer = _load_gguf(source, dtype_, device, manager, trust_remote_code)
    else:
        model, tokenizer = _load_transformers(
            source, dtype, device, load_in_4bit, trust_remote_code, allow_pickle, manager
        )
    return model, _with_template(tokenizer, source) if apply_trained_template else tokenizer


def _load_transformers(
    source: ModelSource, dtype: str, device: str | None, load_in_4bit: bool,
    trust_remote_code: bool, allow_pickle: bool, manager: Any,
) -> tuple[Any, Any]:  # fmt: skip
    from sloth_core.api import load_model
    from sloth_core.types import ModelSpec

    model_dir = source.path if source.kind == "model" else source.base
    assert model_dir is not None  # resolve_source gives adapters and checkpoints a base
    spec = ModelSpec(
        model_name=str(model_dir), dtype=_dtype(dtype, model_dir), device_map=device,
        max_seq_length=None, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        quantization="nf4" if load_in_4bit else None,
    )  # fmt: skip
    try:
        model, tokenizer, _ = load_model(spec, manager)
    except ModelNotFoundError as exc:
        if source.kind == "model":
            raise
        raise ModelNotFoundError(f"the base model of {source.path}: {exc}") from None
    if source.kind == "adapter":
        model = _attach_adapter(model, Path(source.path))
    elif source.kind == "full":
        _load_trainable(model, Path(source.path))
    if source.tokenizer and source.tokenizer != str(model_dir):
        tokenizer = _tokenizer(source.tokenizer, trust_remote_code)
    return model, tokenizer


def _attach_adapter(model: Any, adapter: Path) -> Any:
    from peft import PeftModel

    spec, host = getattr(model, "sloth_spec", None), model.sloth_host
    with peft_calls():
        model = PeftModel.from_pretrained(model, str(adapter))
    model.sloth_spec = spec
    # The adapter's layers are new modules: the plugins that patched the base patch them.
    model.sloth_patches = host.patch_layers(model=model)
    return model


def _tokenizer(where: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    from sloth_core.trust import check_remote_code

    check_remote_code(where, trust_remote_code)
    return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)


def _with_template(tokenizer: Any, source: ModelSource) -> Any:
    if source.trained_chat_template:
        from sloth_core.data import resolve_chat_template

        tokenizer.chat_template = resolve_chat_template(tokenizer, source.trained_chat_template)
    return tokenizer


def _load_trainable(model: Any, checkpoint: Path) -> None:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise SlothError(f"{checkpoint}: tensors the model does not have: {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
