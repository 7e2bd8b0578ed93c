"""The frozen input embedding kept in pinned host memory, read by the GPU in place.

Under LoRA the input embedding (``vocab x hidden``: 0.98 GiB for Llama 3 8B in bf16, a
seventh of an NF4 model's GPU memory) is frozen and a step reads only the rows of its
tokens (8192 rows of 8 KiB at 2048x4). Here the weight moves to pinned host memory and
the parameter becomes a CUDA tensor that *aliases* it: with unified virtual addressing
(every 64-bit CUDA platform) a page-locked host buffer has one address for host and
device, so the embedding's gather kernel reads its rows over the host link, in place. No
copy per step, no host synchronisation, nothing for the caller to change: the parameter
still says ``cuda`` (code that takes the model's device from its first parameter keeps
working), CUDA graphs capture the gather like any other kernel, and ``.cpu()``,
``state_dict`` and saving copy from it as from device memory. It takes no GPU memory.

Only a frozen, untied, floating-point ``nn.Embedding`` on a CUDA device of a model that
is not trained by several processes moves (a collective would hand NCCL a host buffer).
Its host cost: torch's pinned allocator rounds a buffer up to a power of two, so Llama
3's 1.05 GB embedding holds 2 GiB of page-locked host memory.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from sloth_core.patching import unwrap_model

#: Set on an embedding module whose weight was moved.
_HOST = "_sloth_weight_on_host"


class _HostArray:
    """A pinned host tensor described as device memory (``__cuda_array_interface__``).

    The interface has no bfloat16 type string: the bytes are described as integers of the
    element's width and viewed back as the weight's dtype."""

    _INTS = {1: "|i1", 2: "<i2", 4: "<i4", 8: "<i8"}

    def __init__(self, host: torch.Tensor) -> None:
        # torch.as_tensor keeps this object, so the pinned memory, alive with the alias.
        self.host = host
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape),
            "typestr": self._INTS[host.element_size()],
            "data": (host.data_ptr(), False),
            "strides": None,
            "version": 3,
        }


def _several_processes() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def host_resident(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor on ``device`` (CUDA) whose memory is a pinned host copy of ``weight``."""
    host = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
    host.copy_(weight)
    with torch.cuda.device(device):
        alias = torch.as_tensor(_HostArray(host), device=device)
    alias = alias.view(weight.dtype)
    # The same bytes read through the device's address: the alias is not a copy.
    rows = torch.arange(0, weight.shape[0], max(weight.shape[0] // 7, 1), device=device)
    if not torch.equal(alias.index_select(0, rows), weight.index_select(0, rows)):
        raise RuntimeError("the device reads other bytes than the host buffer holds")
    return alias


def _embeddings(model: Any) -> tuple[Any, Any]:
    """``model``'s input and output embedding modules (``None`` where it has none)."""
    inner = unwrap_model(model)
    get_in = getattr(inner, "get_input_embeddings", None)
    get_out = getattr(inner, "get_output_embeddings", None)
    return (get_in() if get_in is not None else None,
            get_out() if get_out is not None else None)  # fmt: skip


def movable_embedding(model: Any, *, on_cuda: bool = True) -> torch.nn.Embedding | None:
    """``model``'s input embedding if it may move to host memory (frozen, untied, floating
    point, a plain ``nn.Embedding`` (or subclass) not yet moved, on CUDA unless
    ``on_cuda=False``), else ``None``."""
    embedding, output = _embeddings(model)
    if not isinstance(embedding, torch.nn.Embedding):
        return None  # PEFT's wrappers (LoRA on it, modules_to_save) are not: it trains
    weight = embedding.weight
    if weight.requires_grad or (on_cuda and not weight.is_cuda) or not weight.is_floating_point():
        return None
    if embedding.__dict__.get(_HOST) or type(weight) not in (
        torch.Tensor,
        torch.nn.Parameter,
    ):  # already moved, or a DTensor / quantized subclass
        return None
    out_weight = getattr(output, "weight", None)
    if isinstance(out_weight, torch.Tensor) and out_weight.data_ptr() == weight.data_ptr():
        return None  # tied to the lm_head, which reads all of it every step
    return embedding


def keep_input_embedding_on_host(model: Any) -> bool:
    """Move ``model``'s frozen input embedding to pinned host memory, read in place by the
    GPU; whether it moved. A model where it cannot (see the module docstring) is left as
    it is; so is one where the platform refuses the alias (with a warning)."""
    embedding = movable_embedding(model)
    if embedding is None or _several_processes():
        return False
    weight = embedding.weight
    try:
        alias = host_resident(weight.detach(), weight.device)
    except Exception as exc:  # noqa: BLE001 - any refusal leaves the weight on the device
        warnings.warn(
            f"the input embedding stays in GPU memory: reading it from host memory failed "
            f"({type(exc).__name__}: {exc})",
            stacklevel=2,
        )
        return False
    embedding.weight = torch.nn.Parameter(alias, requires_grad=False)
    embedding.__dict__[_HOST] = True
    return True


def input_embedding_on_host(model: Any) -> bool:
    """Whether :func:`keep_input_embedding_on_host` moved ``model``'s input embedding."""
    embedding, _ = _embeddings(model)
    return embedding is not None and bool(embedding.__dict__.get(_HOST))
