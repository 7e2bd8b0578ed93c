"""Checkpoints of ``sloth train``: written atomically, resumed exactly.

A checkpoint is a directory ``checkpoint-<step>`` in the output directory, filled under a
temporary name and renamed into place (:func:`sloth_core.io.atomic_directory`), so a run
killed at any moment leaves either the whole checkpoint or none. It holds every trainable
tensor by parameter name (``trainable.safetensors``: LoRA adapters, and whatever else
trains), the PEFT adapter as PEFT writes it (for users), the optimizer and scheduler
states, every random generator's state, and the data position (micro-batches consumed),
so a resumed run takes exactly the steps the uninterrupted one would have taken.

Nothing in a checkpoint is pickled (:mod:`.state_files`): resuming reads JSON and
safetensors only. ``trainer_state.json``, written last, lists the other files a resume
reads with their sizes, so a file cut short by a full disk or a copy that stopped is found
before any of it is used; :func:`read_checkpoint` names the damaged file and the trainer
falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sloth_core.errors import SlothError
from sloth_core.io import atomic_directory
from sloth_core.runs import (  # noqa: F401  (the layout's names, re-exported for train/)
    ADAPTER_DIR,
    STATE_FILE,
    TRAINABLE_FILE,
    checkpoint_path,
    list_checkpoints,
)

from . import sharded_checkpoint
from .state_files import StateFormatError, read_state, write_state


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

    Tied weights appear once, under the name ``named_parameters`` gives them. (A model
    sharded by FSDP2 is written rank by rank instead: :mod:`.sharded_checkpoint`.)
    """
    names = [name for name, param in model.named_parameters() if param.requires_grad]
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


class DamagedCheckpointError(SlothError):
    """A checkpoint's file is missing, cut short or unreadable (the message names it)."""

    def __init__(self, path: Path, file: str, why: str) -> None:
        super().__init__(f"{path / file}: {why}")
        self.path, self.file, self.why = path, file, why


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, read and checked (:func:`read_checkpoint`)."""

    path: Path
    state: dict[str, Any]
    scheduler: dict
    rng: dict[str, Any]
    legacy_optimizer: dict | None = None  # an older sloth's optimizer.pt, read already

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @functools.cached_property
    def optimizer(self) -> dict:
        """The optimizer state, whole, read on first use (checked by :func:`read_checkpoint`;
        a sharded model reads its own rows instead: :func:`load_training_state`)."""
        if self.legacy_optimizer is not None:
            return self.legacy_optimizer
        return _read_state(self.path, "optimizer")

    @functools.cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, whole, read on first use (a model loaded sharded reads
        only its own slices of the file instead: :func:`load_tensors`)."""
        from safetensors.torch import load_file

        return load_file(str(self.path / TRAINABLE_FILE))


def save_checkpoint(
    output_dir: Path,
    *,
    step: int,
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor] | Path,
    optimizer_state: Any,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically; keep the ``keep`` newest.

    ``tensors`` and ``optimizer_state`` come from :func:`trainable_state` and
    :func:`optimizer_state`. A sharded model's ranks wrote their parts already
    (:func:`.sharded_checkpoint.write_parts`): ``tensors`` is then the folder they were
    joined in and ``optimizer_state`` the optimizer's tree, moved in here.
    """
    from safetensors.torch import save_file

    path = checkpoint_path(output_dir, step)
    with atomic_directory(path, force=True) as staging:
        if isinstance(tensors, Path):
            sharded_checkpoint.move_parts(tensors, staging, optimizer_state)
        else:
            save_file(tensors, str(staging / TRAINABLE_FILE))
            write_state(staging, "optimizer", optimizer_state)
        if hasattr(model, "peft_config"):
            model.save_pretrained(str(staging / ADAPTER_DIR))  # type: ignore[operator]
        write_state(staging, "scheduler", scheduler.state_dict())
        write_state(staging, "rng", rng_state())
        # What a resume reads (adapter/ is for people and PEFT, who may edit it).
        sizes = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
        record = {**state, "step": step, "files": sizes}
        (staging / STATE_FILE).write_text(json.dumps(record, indent=2))
    for old in list_checkpoints(output_dir)[:-keep]:
        # Renamed first: a deletion cut short leaves a hidden leftover, not a checkpoint.
        retired = old.with_name(f".{old.name}{RETIRED_SUFFIX}")
        old.rename(retired)
        shutil.rmtree(retired, ignore_errors=True)
    sweep_retired(output_dir)
    return path


#: The suffix of a checkpoint renamed aside to be deleted (``.checkpoint-4.old``).
RETIRED_SUFFIX = ".old"


def sweep_retired(output_dir: Path) -> None:
    """Delete what a cut-short deletion left (a Ctrl-C between rename and delete): only
    checkpoints already renamed aside, never one a resume could read."""
    for leftover in Path(output_dir).glob(f".checkpoint-*{RETIRED_SUFFIX}"):
        shutil.rmtree(leftover, ignore_errors=True)
    for parts in Path(output_dir).glob(".checkpoint-*.parts"):  # a sharded save cut short
        shutil.rmtree(parts, ignore_errors=True)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and check every file of the checkpoint at ``path``.

    Raises:
        DamagedCheckpointError: naming the file that is missing, of the wrong size or
            unreadable. Nothing of the checkpoint has been applied to anything yet.
    """
    path = Path(path)
    state = _read_json(path, STATE_FILE)
    if not isinstance(state, dict) or "step" not in state:
        raise DamagedCheckpointError(path, STATE_FILE, "has no step: not a sloth checkpoint")
    for name, size in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpointError(path, name, "is missing")
        if file.stat().st_size != size:
            raise DamagedCheckpointError(
                path, name, f"is {file.stat().st_size} bytes, {size} were written (cut short?)"
            )
    _check_header(path, TRAINABLE_FILE, required=True)
    if (path / "optimizer.pt").is_file():  # written by sloth before pickle-free checkpoints
        optimizer, scheduler, rng = (
            _read_legacy(path, f"{name}.pt") for name in ("optimizer", "scheduler", "rng")
        )  # fmt: skip
        return Checkpoint(path, state, scheduler, rng, legacy_optimizer=optimizer)
    # The optimizer state is as big as the weights (twice, for AdamW): checked here, read
    # when used. The tensors likewise.
    _read_json(path, "optimizer.json")
    _check_header(path, "optimizer.safetensors", required=False)
    return Checkpoint(path, state, _read_state(path, "scheduler"), _read_state(path, "rng"))


def _check_header(path: Path, name: str, *, required: bool) -> None:
    """A safetensors file of the checkpoint opens (its header is whole and sane)."""
    from safetensors import safe_open

    if not required and not (path / name).exists():
        return
    try:
        with safe_open(str(path / name), framework="pt") as handle:
            handle.keys()
    except FileNotFoundError:
        raise DamagedCheckpointError(path, name, "is missing") from None
    except Exception as exc:  # safetensors' own error type for a bad header or size
        raise DamagedCheckpointError(path, name, f"unreadable ({exc})") from None


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpointError(path, name, "is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpointError(path, name, f"is not valid JSON (cut short?): {exc}") from None


def _read_state(path: Path, name: str) -> Any:
    if not (path / f"{name}.json").is_file():
        raise DamagedCheckpointError(path, f"{name}.json", "is missing")
    try:
        return read_state(path, name)
    except StateFormatError as exc:
        file, _, why = str(exc).partition(": ")
        raise DamagedCheckpointError(path, file, why) from None


def _read_legacy(path: Path, name: str) -> Any:
    """A ``.pt`` state of an older sloth, read with ``weights_only=True``: tensors and
    plain containers only, so a planted pickle is refused instead of run."""
    import pickle

    file = path / name
    if not file.is_file():
        raise DamagedCheckpointError(path, name, "is missing")
    try:
        import numpy as np

        # The random state of NumPy is an array: allowed by type, still no code runs.
        core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed it
        allowed = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    except (ImportError, AttributeError):
        allowed = []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DamagedCheckpointError(
            path,
            name,
            "holds more than tensors and numbers, so it is not loaded (a pickle "
            f"can run code when read): {str(exc).splitlines()[0]}",
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise DamagedCheckpointError(path, name, f"unreadable (cut short?): {exc}") from None


def load_tensors(checkpoint: Checkpoint, model: torch.nn.Module) -> None:
    """Copy the checkpoint's trainable tensors into ``model``: whole, or into each shard
    its own rows when the model was loaded sharded (no rank reads the whole file)."""
    from .distributed import is_sharded

    if is_sharded(model):
        from .sharded_loading import SliceReader, check_names, read_local_shards

        try:
            reader = SliceReader([checkpoint.path / TRAINABLE_FILE])
            check_names(model, reader)
            read_local_shards(model, reader)
        except SlothError as exc:
            raise SlothError(
                f"{checkpoint.path}: checkpoint does not match the model: {exc}"
            ) from None
        return
    tensors = checkpoint.tensors
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    unknown = [name for name in tensors if name not in params]
    if missing or unknown:
        raise SlothError(
            f"{checkpoint.path}: checkpoint does not match the model (missing {missing[:3]}, "
            f"unexpected {unknown[:3]}); was it written with other LoRA options?"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def load_training_state(
    checkpoint: Checkpoint, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:  # fmt: skip
    """Restore optimizer (onto the model as wrapped now), scheduler and random generators;
    return the trainer state. The tensors came first, through :func:`load_tensors`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from .distributed import is_sharded

    if is_sharded(model):  # each rank reads its own rows of the AdamW moments
        set_optimizer_state_dict(
            model, optimizer, sharded_checkpoint.optimizer_shards(checkpoint.path, model),
            options=StateDictOptions(full_state_dict=False),
        )  # fmt: skip
        scheduler.load_state_dict(checkpoint.scheduler)
        set_rng_state(checkpoint.rng)
        return checkpoint.state
    saved = checkpoint.optimizer
    if isinstance(saved["param_groups"][0]["params"][0], int):  # by position: older builds
        optimizer.load_state_dict(saved)
    else:
        set_optimizer_state_dict(
            model, optimizer, saved, options=StateDictOptions(full_state_dict=True)
        )
    scheduler.load_state_dict(checkpoint.scheduler)
    set_rng_state(checkpoint.rng)
    return checkpoint.state
