"""Checkpoints of ``sloth train``: written atomically, resumed exactly.

A checkpoint is a directory ``checkpoint-<step>`` in the output directory, filled under a
temporary name and renamed into place (:func:`sloth_core.io.atomic_directory`), so a run
killed at any moment leaves either the whole checkpoint or none. It holds every trainable
tensor by parameter name (``trainable.safetensors``: LoRA adapters, and whatever else
trains), the PEFT adapter as PEFT writes it (for users), the optimizer and scheduler
states, every random generator's state, and the data position (micro-batches consumed),
so a resumed run takes exactly the steps the uninterrupted one would have taken.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from sloth_core.io import atomic_directory

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        state["numpy"] = np.random.get_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by parameter name, whole and on the CPU.

    A model sharded by FSDP2 is gathered (every rank must call this; rank 0 gets the
    tensors, the others an empty dict). Tied weights appear once, under the name
    ``named_parameters`` gives them.
    """
    from .distributed import full_state, is_sharded

    names = [name for name, param in model.named_parameters() if param.requires_grad]
    if is_sharded(model):
        whole = full_state(model)
        return {name: whole[name].contiguous() for name in names if name in whole}
    params = dict(model.named_parameters())
    return {name: params[name].detach().to("cpu", copy=True).contiguous() for name in names}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, whole and on the CPU.

    Names instead of torch's positions keep a checkpoint loadable whatever wraps or shards
    the model: a run of FSDP2 on N ranks resumes on M, or in one process. Sharded, every
    rank must call it (rank 0 gets the state).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def save_checkpoint(
    output_dir: Path,
    *,
    step: int,
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically; keep the ``keep`` newest.

    ``tensors`` and ``optimizer_state`` come from :func:`trainable_state` and
    :func:`optimizer_state` (gathered on every rank first when the model is sharded).
    """
    from safetensors.torch import save_file

    path = Path(output_dir) / f"checkpoint-{step}"
    with atomic_directory(path, force=True) as staging:
        save_file(tensors, str(staging / TRAINABLE_FILE))
        if hasattr(model, "peft_config"):
            model.save_pretrained(str(staging / "adapter"))
        torch.save(optimizer_state, staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(rng_state(), staging / "rng.pt")
        (staging / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def load_tensors(path: Path, model: torch.nn.Module) -> None:
    """Copy the checkpoint's trainable tensors into ``model`` (not sharded yet)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    unknown = [name for name in tensors if name not in params]
    if missing or unknown:
        raise ValueError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
            f"unexpected {unknown[:3]}); was it written with other LoRA options?"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def load_training_state(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore optimizer (onto the model as wrapped now), scheduler and random generators;
    return the trainer state. The tensors came first, through :func:`load_tensors`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # On the CPU: sharded, each rank keeps its slice; whole, load_state_dict moves it.
    saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    if isinstance(saved["param_groups"][0]["params"][0], int):  # by position: older builds
        optimizer.load_state_dict(saved)
    else:
        set_optimizer_state_dict(
            model, optimizer, saved, options=StateDictOptions(full_state_dict=True)
        )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
