"""Where training metrics go: a rich progress bar, ``metrics.jsonl``, TensorBoard, a PNG.

``metrics.jsonl`` gets one JSON object per logged step (``{"step", "loss", "lr", ...}``)
and per evaluation (``{"step", "eval_loss", "eval_accuracy"}``), appended and flushed as
they come, so a crashed run keeps its history and a resumed one continues the same file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sloth_core.io import disk_full_error, is_disk_full

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss.png"


class MetricsLog:
    """Appends metrics to ``metrics.jsonl`` and, when installed, TensorBoard."""

    def __init__(
        self, output_dir: Path, *, report_to: str = "auto", purge_step: int | None = None
    ) -> None:
        """``purge_step``: a resumed run's first step; TensorBoard drops what the run
        before logged from there on, as :func:`~.resume.drop_metrics_after` does here."""
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if report_to in ("auto", "tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if report_to == "tensorboard":
                    raise
            else:
                self._tb = SummaryWriter(str(Path(output_dir) / "runs"), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(METRICS_FILE, self.path.parent) from exc
            raise
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key.replace("eval_", "eval/"), value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; for a resumed run, the last record of each step wins."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            evaluation = any(key.startswith("eval_") for key in record)  # GRPO's: no loss
            (evals if evaluation else train)[record["step"]] = record
    return [train[s] for s in sorted(train)] + [evals[s] for s in sorted(evals)]


def plot_losses(output_dir: Path) -> Path | None:
    """``loss.png``: train and eval loss per step; ``None`` without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(output_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        axes.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    path = Path(output_dir) / CURVE_FILE
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


class Progress:
    """The terminal view: a rich progress bar with loss, lr, tokens/s, GPU memory and ETA."""

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self._task = self._bar.add_task("train", total=total, completed=start, stats="")
        self.started = time.perf_counter()

    def __enter__(self) -> Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def update(self, step: int, record: dict[str, Any]) -> None:
        parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
                 f"{record['tokens_per_s']:.0f} tok/s"]  # fmt: skip
        if record.get("rewards/accuracies") is not None:  # preference methods
            parts.insert(1, f"reward acc {record['rewards/accuracies']:.0%}")
        if record.get("reward") is not None:  # GRPO
            parts.insert(1, f"reward {record['reward']:.3f}")
        if record.get("gpu_mem_gib") is not None:
            parts.append(f"{record['gpu_mem_gib']:.1f} GiB")
        self._bar.update(self._task, completed=step, stats=" | ".join(parts))

    def print(self, *args: Any) -> None:
        self._bar.console.print(*args)
