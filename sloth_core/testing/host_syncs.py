"""Which ops of a piece of code make the host wait for the device, seen on any device.

A host-bound training step (llama-1b's on an H100) keeps its speed only while the host's
launches run ahead of the GPU: an op that reads a value back (``.item()``, ``nonzero``, a
boolean mask's index) after the step's first matrix product waits for every kernel
queued before it, and the backward's launches start from an idle GPU. A
:class:`HostSyncs` dispatch mode records each such op with the Python lines that issued
it and how many matrix products came before it, so a test on the CPU can hold a step to
"no sync after the forward's start" without a GPU.
"""

from __future__ import annotations

import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Ops whose output size or value the host needs: on a GPU each waits for the queue.
SYNCING = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
    "unique_consecutive", "is_nonzero", "equal", "bincount", "masked_scatter_",
})  # fmt: skip
#: Matrix products: after the first, a sync waits for real work.
MATMULS = frozenset({"mm", "addmm", "addmm_", "bmm", "baddbmm", "_scaled_mm", "_grouped_mm"})
_OURS = ("sloth", "transformers", "peft")


@dataclass(frozen=True)
class HostSync:
    """One syncing op: its aten name, the last three of sloth's, transformers' or PEFT's
    frames that issued it (innermost first), and the matrix products before it."""

    op: str
    where: str
    after_matmuls: int


def _is_sync(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if name in SYNCING:
        return True
    if name in ("index", "index_put", "index_put_") and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or [])
    return name == "repeat_interleave" and kwargs.get("output_size") is None


def _on(device: torch.device, args: tuple[Any, ...]) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == device.type for a in args)


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if any(o in f.filename for o in _OURS)]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1][:3])


class HostSyncs(TorchDispatchMode):
    """Records the syncing ops run on ``device`` (their input tensors there) while active;
    a read of a pinned host copy (``CountedLabels``) is not one on a GPU. On the CPU every
    such op counts, as it would on a GPU. On CUDA torch's own sync check
    (``set_sync_debug_mode``) is on too, and what it reports is recorded alike (a
    blocking device-to-host copy, a synchronising op this list lacks)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.matmuls = 0
        self.syncs: list[HostSync] = []
        self._restore: Any = None

    def __enter__(self) -> HostSyncs:
        if self.device.type == "cuda":
            mode, caught = torch.cuda.get_sync_debug_mode(), warnings.catch_warnings()
            caught.__enter__()
            warnings.simplefilter("always")
            shown = warnings.showwarning

            def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
                if "synchronizing" in str(message):
                    self.syncs.append(HostSync(f"cuda: {message}"[:80], _where(), self.matmuls))
                else:
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            self._restore = mode, caught
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if self._restore is not None:
            mode, caught = self._restore
            torch.cuda.set_sync_debug_mode(mode)
            caught.__exit__(*exc)
            self._restore = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in MATMULS and _on(self.device, args):
            self.matmuls += 1
        elif _is_sync(name, args, kwargs) and _on(self.device, args):
            self.syncs.append(HostSync(name, _where(), self.matmuls))
        return func(*args, **kwargs)

    def after_work(self) -> list[HostSync]:
        """The syncs that came after the first matrix product (those that cost a lead)."""
        return [s for s in self.syncs if s.after_matmuls > 0]
