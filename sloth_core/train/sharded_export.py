"""The final merged model of a sharded run, written shard by shard.

``merged_16bit`` (and its aliases) is safetensors files of whole tensors plus an index,
exactly what ``torch.distributed.checkpoint``'s Hugging Face writer produces: every rank
casts its own rows to the export dtype and writes them, the coordinating rank joins them
into files of at most :data:`~sloth_core.sdk.merge.DEFAULT_SHARD_SIZE` (file to file), and
rank 0 adds the config, generation config and tokenizer and moves the folder into place
atomically. No process holds the whole model. Other formats (GGUF, ...) need the whole
model in one process: the loop gathers it on rank 0 for them (``loop._gathered``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import torch

from sloth_core.io import atomic_directory
from sloth_core.sdk.merge import DEFAULT_SHARD_SIZE, write_model_files

from .distributed import Group

#: The formats written this way: the merged safetensors layout and its aliases.
FORMATS = ("merged_16bit", "merged", "vllm")


def write_final(model: torch.nn.Module, tokenizer: Any, path: Path, *, dtype: torch.dtype,
                group: Group) -> None:  # fmt: skip
    """Every rank: the sharded ``model`` as a merged model in ``path`` (replaced whole)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    parts = path.with_name(f".{path.name}.parts")  # the same on every rank (and node)
    if group.is_main:
        shutil.rmtree(parts, ignore_errors=True)
    group.barrier()
    names = [name for name, _ in model.named_parameters()]  # tied weights once
    state = get_model_state_dict(model)
    # Every value of a model's state dict is a tensor (the union type covers optimizers').
    tensors = {name: cast(torch.Tensor, state[name]).to(dtype) for name in names}
    writer = HuggingFaceStorageWriter(
        str(parts), fqn_to_index_mapping=file_index(tensors), save_distributed=True,
        enable_consolidation=True,
    )  # fmt: skip
    try:
        dcp.save(tensors, storage_writer=writer)
        if group.is_main:
            with atomic_directory(path, force=True) as staging:
                for file in parts.iterdir():
                    if file.is_file():
                        shutil.move(str(file), str(staging / file.name))
                write_model_files(model, tokenizer, staging, dtype)
    finally:
        group.barrier()
        if group.is_main:
            shutil.rmtree(parts, ignore_errors=True)


def file_index(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each tensor's file, numbered from 1, in order, a file closed before it would pass
    the default shard size (as ``save_pretrained`` splits)."""
    from transformers.utils.hub import convert_file_size_to_int

    limit = convert_file_size_to_int(DEFAULT_SHARD_SIZE)
    index, used, mapping = 1, 0, {}
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if used and used + size > limit:
            index, used = index + 1, 0
        mapping[name] = index
        used += size
    return mapping
