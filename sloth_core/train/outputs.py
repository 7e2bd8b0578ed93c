"""The output directory of a run: touched late, and left as it was when the run fails.

Nothing is written before the model has loaded with its adapters (everything that can be
refused is refused by then). ``--overwrite`` moves the old run's files aside rather than
deleting them; they are deleted once the new run has written its first checkpoint, and
put back if the new run fails before that. A new run that fails before its first
checkpoint removes what it wrote (and the directory, if it made it), so a failure leaves
the folder as it found it. A resumed run keeps everything: its checkpoints are the run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sloth_core.runs import FINAL_DIR, TRAIN_CONFIG

from .config import TrainConfig
from .metrics import CURVE_FILE, METRICS_FILE

#: Files and folders of ours that ``--overwrite`` replaces (nothing else is touched).
OUR_OUTPUTS = ("checkpoint-*", ".checkpoint-*", METRICS_FILE, CURVE_FILE, FINAL_DIR, "runs",
               "export-*", TRAIN_CONFIG)  # fmt: skip


class RunOutput:
    """``output_dir`` of one run, on the process that writes (rank 0)."""

    def __init__(self, config: TrainConfig) -> None:
        self.path = Path(config.output_dir)
        self.resume = config.resume
        self.overwrite = config.overwrite
        self._made = False
        self._aside: Path | None = None
        self.committed = config.resume

    def open(self) -> Path:
        """Make the directory; with ``overwrite``, move the old run's files aside."""
        self._made = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        if self.resume:
            for leftover in self.path.glob(".checkpoint-*"):  # staging of a checkpoint cut short
                shutil.rmtree(leftover, ignore_errors=True)
        old = _ours(self.path)
        if self.overwrite and old:
            self._aside = self.path / f".sloth-replaced-{os.getpid()}"
            self._aside.mkdir()
            for item in old:
                item.rename(self._aside / item.name)
        return self.path

    def commit(self) -> None:
        """The new run has a checkpoint: the old run's files go for good."""
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None
        self.committed = True

    def rollback(self) -> None:
        """Undo :meth:`open` and everything written since (a run without a checkpoint)."""
        if self.committed or not self.path.is_dir():
            return
        for item in _ours(self.path):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
        if self._aside is not None:
            for item in self._aside.iterdir():
                item.rename(self.path / item.name)
            self._aside.rmdir()
            self._aside = None
        if self._made and not any(self.path.iterdir()):
            self.path.rmdir()


def _ours(directory: Path) -> list[Path]:
    return sorted({path for pattern in OUR_OUTPUTS for path in directory.glob(pattern)})
