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
    return {
        name: param.detach().to("cpu", copy=True).contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def save_checkpoint(
    output_dir: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically; keep the ``keep`` newest."""
    from safetensors.torch import save_file

    path = Path(output_dir) / f"checkpoint-{step}"
    with atomic_directory(path, force=True) as staging:
        save_file(trainable_state(model), str(staging / TRAINABLE_FILE))
        if hasattr(model, "peft_config"):
            model.save_pretrained(str(staging / "adapter"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
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


def load_checkpoint(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore model tensors, optimizer, scheduler and random generators; return the state."""
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
    device = next(iter(params.values())).device
    optimizer.load_state_dict(
        torch.load(path / "optimizer.pt", map_location=device, weights_only=False)
    )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
