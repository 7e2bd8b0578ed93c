"""Training state on disk without pickle: tensors in safetensors, the rest in JSON.

``torch.save``/``torch.load`` pickle, and a pickle can run any code when it is read, so a
checkpoint someone else handed over (or a file replaced on a shared disk) could run a
command on ``--resume``. The optimizer, scheduler and random-generator states are nested
dicts, lists and tuples of numbers, strings, tensors and NumPy arrays: :func:`write_state`
keeps the tree in ``NAME.json`` with every array replaced by a reference to a tensor of
``NAME.safetensors``. Reading it back parses JSON and tensors, nothing else.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

#: Markers of the JSON tree for what JSON has no type for.
_TENSOR, _ARRAY, _TUPLE, _ITEMS, _FLOAT, _SCALAR = (
    "__tensor__",
    "__ndarray__",
    "__tuple__",
    "__items__",
    "__float__",
    "__scalar__",  # a 0-d tensor stored with one element (a sharded save's step counts)
)


class StateFormatError(ValueError):
    """A state file is not what :func:`write_state` writes (damaged or foreign)."""


def write_state(directory: Path, name: str, value: Any) -> list[Path]:
    """Write ``value`` as ``directory/NAME.json`` (+ ``NAME.safetensors`` when it holds
    tensors); return the files written."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(value, tensors)
    json_path = Path(directory) / f"{name}.json"
    json_path.write_text(json.dumps(tree), encoding="utf-8")
    written = [json_path]
    if tensors:
        path = Path(directory) / f"{name}.safetensors"
        save_file(tensors, str(path))
        written.append(path)
    return written


def read_state(directory: Path, name: str) -> Any:
    """What :func:`write_state` wrote under ``name``; :class:`StateFormatError` naming the
    file when it is damaged."""
    from safetensors.torch import load_file

    json_path = Path(directory) / f"{name}.json"
    try:
        tree = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFormatError(f"{json_path.name}: not valid JSON ({exc})") from None
    tensors: dict[str, torch.Tensor] = {}
    tensor_path = Path(directory) / f"{name}.safetensors"
    if tensor_path.exists():
        try:
            tensors = load_file(str(tensor_path))
        except Exception as exc:  # safetensors raises its own error type for bad headers
            raise StateFormatError(
                f"{tensor_path.name}: not a readable safetensors file ({exc})"
            ) from None
    try:
        return _decode(tree, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFormatError(f"{json_path.name}: unexpected content ({exc!r})") from None


def encode_tree(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``value`` as the JSON tree :func:`write_state` writes, and its tensors by the keys
    the tree names, as they are (a sharded model's DTensors stay sharded: each rank then
    writes its own part, ``sharded_checkpoint``)."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(value, tensors, copy=False), tensors


def decode_tree(tree: Any, tensors: Any) -> Any:
    """The value :func:`encode_tree` encoded; ``tensors[key]`` gives each tensor (any
    mapping: a sharded resume's gives each rank its own rows)."""
    return _decode(tree, tensors)


def _encode(value: Any, tensors: dict[str, torch.Tensor], copy: bool = True) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        if not copy and value.dim() == 0:
            # torch.distributed.checkpoint's safetensors writer joins 0-d tensors as zeros.
            tensors[key] = value.reshape(1)
            return {_SCALAR: key}
        # safetensors refuses views that share storage: each tensor gets its own copy.
        tensors[key] = value.detach().to("cpu").clone().contiguous() if copy else value
        return {_TENSOR: key}
    if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        if getattr(value, "ndim", 0) == 0:  # a NumPy scalar: a plain number
            return _encode(value.item(), tensors, copy)
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(value.copy())
        return {_ARRAY: key}
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT: repr(value)}  # JSON has no inf or nan
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, copy) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, copy) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, copy) for k, v in value.items()}
        # Integer keys (torch's optimizer state by position), or keys that look like ours.
        return {
            _ITEMS: [
                [_encode(k, tensors, copy), _encode(v, tensors, copy)] for k, v in value.items()
            ]
        }
    raise TypeError(f"cannot store a {type(value).__name__} in a training state file")


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if _TENSOR in tree:
        return tensors[tree[_TENSOR]]
    if _SCALAR in tree:
        return tensors[tree[_SCALAR]].reshape(())
    if _ARRAY in tree:
        return tensors[tree[_ARRAY]].numpy()
    if _FLOAT in tree:
        return float(tree[_FLOAT])
    if _TUPLE in tree:
        return tuple(_decode(v, tensors) for v in tree[_TUPLE])
    if _ITEMS in tree:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in tree[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in tree.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key
