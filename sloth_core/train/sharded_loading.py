"""Sharded loading for FSDP2: no process ever holds the whole model.

Full fine-tuning over several processes used to load the whole model on every rank and
convert it to float32 before ``fully_shard``: a model bigger than one process's memory
never got as far as sharding. Here every rank builds the patched model with its
parameters on the meta device (no memory; :attr:`sloth_core.types.ModelSpec.empty`),
shards it as :func:`~.distributed.shard` always did, allocates only its own shards, and
reads only its own rows of each weight from the safetensors files, memory-mapped and cast
to the float32 master dtype one slice at a time.

FSDP2 shards every parameter on dimension 0 as ``torch.chunk`` does: rank ``r`` of ``N``
holds rows ``[r * c, min((r + 1) * c, n))`` with ``c = ceil(n / N)`` (the last ranks may
hold fewer, or none). The offsets come from DTensor itself
(``compute_local_shape_and_global_offset``), so another placement reads right as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sloth_core.errors import SlothError

from .distributed import Group, shard

#: The index transformers writes beside weights split over several files.
INDEX_FILE = "model.safetensors.index.json"


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: those its index names, else every
    ``*.safetensors`` file in it."""
    index = directory / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [directory / name for name in names]
    return sorted(directory.glob("*.safetensors"))


class SliceReader:
    """The tensors of several safetensors files by name, each read only in the rows asked
    for. A file is memory-mapped for one read at a time and unmapped after it, so a rank's
    resident memory holds the pages of one slice, not of every slice read so far."""

    def __init__(self, files: Iterable[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self._shapes: dict[str, list[int]] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = file
                    self._shapes[key] = list(handle.get_slice(key).get_shape())

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> list[int]:
        return self._shapes[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (dimension 0) of ``name``; a 0-d tensor whole."""
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as handle:
            if not self._shapes[name]:  # a 0-d tensor (a step count): no rows to slice
                return handle.get_tensor(name)
            return handle.get_slice(name)[start:stop]


def load_sharded(model: torch.nn.Module, group: Group, files: list[Path], *,
                 compute_dtype: torch.dtype) -> torch.nn.Module:  # fmt: skip
    """Shard the empty (meta) ``model`` over ``group``, allocate this rank's shards on its
    device and fill them from ``files``; the model, sharded (as :func:`shard` returns it).

    Raises:
        NamesDiffer: a parameter the files lack or hold in another shape (naming both),
            found before anything is sharded or allocated.
    """
    reader = SliceReader(files)
    check_names(model, reader)
    buffers = {name: buffer for name, buffer in model.named_buffers()}
    shard(model, group, compute_dtype=compute_dtype)
    model.to_empty(device=group.device)
    _restore_buffers(model, buffers, reader, group.device)
    read_local_shards(model, reader)
    return model


class NamesDiffer(SlothError):
    """The weight files do not hold the model's parameters by name and shape (a checkpoint
    transformers converts while loading, such as per-expert MoE weights)."""


def check_names(model: torch.nn.Module, reader: SliceReader) -> None:
    """Every parameter of ``model`` is in the files, in its shape: checked before anything
    is allocated, so a mismatch costs nothing."""
    missing, wrong = [], []
    for name, param in model.named_parameters():
        if name not in reader:
            missing.append(name)
        elif reader.shape(name) != list(param.shape):
            wrong.append(f"{name} {reader.shape(name)} in {reader.file_of(name).name}, "
                         f"the model's {list(param.shape)}")  # fmt: skip
    if missing or wrong:
        raise NamesDiffer(
            "sharded loading reads every parameter by its name: "
            + "; ".join(
                [f"missing from the weight files: {', '.join(missing[:4])}"] * bool(missing)
                + [f"shape differs: {', '.join(wrong[:3])}"] * bool(wrong)
            )
        )


def read_local_shards(model: torch.nn.Module, reader: SliceReader) -> None:
    """Copy into each parameter's local shard its rows of the same name in ``reader``,
    cast to the shard's dtype (the float32 master) in the copy, one parameter at a time."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, param in model.named_parameters():
            if isinstance(param, DTensor):
                local = param.to_local()
                start, stop = local_rows(param, name)
                if stop == start:
                    continue
            else:
                local, start, stop = param.data, 0, param.shape[0] if param.dim() else 0
            local.copy_(reader.rows(name, start, stop))  # cast in the copy: no temporary


def local_rows(param: Any, name: str = "") -> tuple[int, int]:
    """The rows ``[start, stop)`` of dimension 0 that this rank holds of the DTensor
    ``param`` (the offsets DTensor computes; only dimension 0 may be split, as a slice
    of rows is what the files are read in)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )  # fmt: skip
    if not shape:
        return 0, 0
    if list(shape[1:]) != list(param.shape[1:]) or any(offset[1:]):
        raise SlothError(f"{name}: sharded on a dimension other than 0 ({param.placements})")
    return offset[0], offset[0] + shape[0]


def _restore_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor],
                     reader: SliceReader, device: torch.device) -> None:  # fmt: skip
    """``to_empty`` left the buffers uninitialised: put back the values the modules
    computed (rotary tables), or those the files hold (persistent buffers saved whole)."""
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        dtype = value.dtype
        if name in reader:
            value = reader.rows(name, 0, value.shape[0] if value.dim() else 0)
        elif value.is_meta:
            raise SlothError(f"buffer {name} is neither computed by its module nor in the "
                             "weight files: this model cannot be loaded sharded")  # fmt: skip
        module._buffers[leaf] = value.to(device=device, dtype=dtype)
