"""Checkpoints of a model sharded by FSDP2, written and read shard by shard.

They are the files of any checkpoint (``trainable.safetensors``; ``optimizer.json`` and
``optimizer.safetensors``), whole tensors keyed by name, so they resume on any number of
processes, sharded or not. But no rank gathers the whole model or its AdamW state: every
rank writes its own rows with ``torch.distributed.checkpoint`` and its Hugging Face
safetensors writer, which then joins the parts into whole-tensor files on the
coordinating rank, file to file (:func:`write_parts`); rank 0 moves them into the
checkpoint (:func:`move_parts`). A resume reads each rank's rows of the weights
(``checkpoint.load_tensors``) and of the AdamW moments (:func:`optimizer_shards`).

The scratch folder is in the output directory, which every rank (and node) sees.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

import torch

from sloth_core.runs import TRAINABLE_FILE

from .state_files import decode_tree, encode_tree

#: What :func:`write_parts` joins, and the checkpoint file each becomes.
PARTS = {"trainable": TRAINABLE_FILE, "optimizer": "optimizer.safetensors"}


def scratch_dir(output_dir: Path, step: int) -> Path:
    """Where the ranks write their parts of step ``step``'s checkpoint (hidden: never a
    checkpoint a resume would read)."""
    return Path(output_dir) / f".checkpoint-{step}.parts"


def write_parts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scratch: Path) -> Any:
    """Every rank: write this rank's rows of the trainable weights and of the optimizer
    state under ``scratch``, joined into whole tensors there; the optimizer's tree (as
    ``optimizer.json`` holds it), the same on every rank."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    names = [name for name, param in model.named_parameters() if param.requires_grad]
    weights = get_model_state_dict(model)
    _save({name: cast(torch.Tensor, weights[name]) for name in names}, scratch / "trainable")
    tree, tensors = encode_tree(get_optimizer_state_dict(model, optimizer))
    _save(tensors, scratch / "optimizer")
    return tree


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    writer = HuggingFaceStorageWriter(str(path), save_distributed=True, enable_consolidation=True)
    dcp.save(tensors, storage_writer=writer)


def move_parts(scratch: Path, staging: Path, optimizer_tree: Any) -> None:
    """Rank 0: the joined files into the checkpoint being written (``staging``)."""
    for part, name in PARTS.items():
        joined = sorted((scratch / part).glob("*.safetensors"))
        if len(joined) != 1:
            raise RuntimeError(f"{scratch / part}: expected one joined file, found {joined}")
        shutil.move(str(joined[0]), str(staging / name))
    (staging / "optimizer.json").write_text(json.dumps(optimizer_tree), encoding="utf-8")


def optimizer_shards(checkpoint_dir: Path, model: torch.nn.Module) -> Any:
    """The checkpoint's optimizer state as ``get_optimizer_state_dict`` gives it for the
    sharded ``model``: each state tensor shaped as its parameter holds this rank's rows
    (a DTensor), the others (AdamW's step counts) whole."""
    from .sharded_loading import SliceReader

    tree = json.loads((checkpoint_dir / "optimizer.json").read_text(encoding="utf-8"))
    params = dict(model.named_parameters())
    reader = SliceReader([checkpoint_dir / PARTS["optimizer"]])
    state = decode_tree(tree, _Keys())
    for fqn, values in state["state"].items():
        for name, key in values.items():
            if isinstance(key, _Key):
                values[name] = _rows_like(params.get(fqn), reader, key)
    return state


class _Key(str):
    """A tensor of the optimizer file, by its key, not read yet."""

    scalar = False

    def reshape(self, shape: tuple) -> _Key:
        """``decode_tree``'s 0-d tensors (stored with one element) are made 0-d when read."""
        key = _Key(self)
        key.scalar = shape == ()
        return key


class _Keys:
    def __getitem__(self, key: str) -> _Key:
        return _Key(key)


def _rows_like(param: Any, reader: Any, key: str) -> torch.Tensor:
    """The tensor ``key``: this rank's rows as a DTensor placed as ``param`` when shaped
    as it, else whole."""
    from torch.distributed.tensor import DTensor

    shape = reader.shape(key)
    if not isinstance(param, DTensor) or shape != list(param.shape):
        whole = reader.rows(key, 0, shape[0] if shape else 0)
        return whole.reshape(()) if getattr(key, "scalar", False) else whole
    local = torch.empty_like(param.to_local())
    from .sharded_loading import local_rows

    start, stop = local_rows(param)
    if stop > start:
        local.copy_(reader.rows(key, start, stop))
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False,
        shape=param.shape, stride=param.stride(),
    )  # fmt: skip
