"""What happens around the steps of a run: logging, evaluation, checkpoints.

Each callback sees the run's state (:class:`RunState`) at its start, after every
optimizer step (with that step's metrics) and at its end. The loop itself only steps.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sloth_core.errors import DiskFullError

from . import distributed, sharded_checkpoint
from .checkpoint import optimizer_state, save_checkpoint, trainable_state


@dataclass
class RunProgress:
    """Where a run is, for the message when it is interrupted."""

    step: int = 0
    training: bool = False
    checkpoint: Path | None = None
    kept: bool = False


@dataclass
class TrainResult:
    """What a finished run reports."""

    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    final_path: Path | None = None
    export_path: Path | None = None
    data_stats: Any = None


@dataclass
class RunState:
    """A run between its build and its finish: what the loop and the callbacks share."""

    config: Any
    group: Any
    model: Any
    train_model: Any  # ``model`` as the ranks run it (DDP- or FSDP2-wrapped)
    optimizer: Any
    scheduler: Any
    batches: Any
    eval_batches: Any
    autocast: Any
    total_steps: int
    output: Any  # RunOutput
    progress: RunProgress
    result: TrainResult
    log: Any  # MetricsLog, or a no-op on ranks > 0
    console: Any
    data: dict  # the data's fingerprints, kept in checkpoints
    resumed: dict = field(default_factory=dict)  # the checkpoint's training state
    step: int = 0
    consumed: int = 0  # global micro-batches
    bar: Any = None
    started: float = field(default_factory=time.perf_counter)
    tokens_seen: int = 0
    method: Any = None  # methods.Method: evaluates and words the eval line

    @property
    def per_epoch(self) -> int:
        return self.batches.num_batches()


class Callback:
    """Does nothing; subclasses act at the start, after a step or at the end of a run."""

    def on_start(self, run: RunState) -> None:
        pass

    def on_step(self, run: RunState, record: dict[str, Any]) -> None:
        pass

    def on_end(self, run: RunState) -> None:
        pass


class LogMetrics(Callback):
    """Every ``logging_steps`` (and the last step): the metrics log, the progress bar, or a
    line on the console where there is no terminal to draw a bar on."""

    def __init__(self, *, bar_shown: bool) -> None:
        self.bar_shown = bar_shown

    def on_step(self, run: RunState, record: dict[str, Any]) -> None:
        step = run.step
        if step % run.config.logging_steps and step != run.total_steps:
            return
        run.log.write(record)
        run.bar.update(step, record)
        if not self.bar_shown:
            accuracy, reward = record.get("rewards/accuracies"), record.get("reward")
            shown = "" if accuracy is None else f"  reward acc {accuracy:.0%}"
            shown += "" if reward is None else f"  reward {reward:.3f}"
            run.console.print(
                f"step {step}/{run.total_steps}  loss {record['loss']:.4f}{shown}  "
                f"lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
            )


class Evaluate(Callback):
    """Eval loss and accuracy before training, every ``eval_steps``, and after training."""

    def _run(self, run: RunState, when: str, *, at_step: int) -> dict[str, float]:
        metrics = run.method.evaluate(run.model, run.eval_batches, autocast=run.autocast)
        run.log.write({"step": at_step, **metrics})
        line = run.method.eval_line(when, metrics)
        (run.bar.print if run.bar is not None else run.console.print)(line)
        return metrics

    def on_start(self, run: RunState) -> None:
        if run.eval_batches is not None and run.step == 0:
            run.result.eval_before = self._run(run, "before training", at_step=0)
        elif "eval_before" in run.resumed:
            run.result.eval_before = run.resumed["eval_before"]

    def on_step(self, run: RunState, record: dict[str, Any]) -> None:
        every = run.config.eval_steps
        if run.eval_batches is None or not every or run.step % every or run.step >= run.total_steps:
            return
        self._run(run, f"step {run.step}", at_step=run.step)

    def on_end(self, run: RunState) -> None:
        if run.eval_batches is not None:
            run.result.eval_after = self._run(run, "after training", at_step=run.step)


class SaveCheckpoints(Callback):
    """Checkpoints every ``save_steps`` and at the end: rank 0 writes, a sharded model's
    state is gathered by all ranks; the first checkpoint commits the output directory
    (``--overwrite``'s old run goes)."""

    def on_step(self, run: RunState, record: dict[str, Any]) -> None:
        every = run.config.save_steps
        if every and run.step % every == 0 and run.step < run.total_steps:
            self.save(run)

    def on_end(self, run: RunState) -> None:
        self.save(run)

    def save(self, run: RunState) -> None:
        group, model, config = run.group, run.model, run.config
        tensors: Any = None
        optimizer_states: Any = None
        scratch = sharded_checkpoint.scratch_dir(run.output.path, run.step)
        if distributed.is_sharded(model):  # every rank writes its own rows, joined on disk
            optimizer_states = sharded_checkpoint.write_parts(model, run.optimizer, scratch)
            tensors = scratch
        elif group.is_main:
            tensors = trainable_state(model)
            optimizer_states = optimizer_state(model, run.optimizer)
        if group.is_main:
            assert tensors is not None and optimizer_states is not None
            state = {
                "micro_batches": run.consumed, "config": config.to_dict(), "data": run.data,
                "eval_before": run.result.eval_before, "world_size": group.world_size,
            }  # fmt: skip
            try:
                path = save_checkpoint(
                    run.output.path, step=run.step, model=model, tensors=tensors,
                    optimizer_state=optimizer_states, scheduler=run.scheduler, state=state,
                    keep=config.save_total_limit,
                )  # fmt: skip
            except DiskFullError as exc:
                before = run.progress.checkpoint
                kept = f"; {before.name} is intact: resume with --resume" if before else ""
                raise DiskFullError(f"{exc}{kept}") from exc
            finally:
                shutil.rmtree(scratch, ignore_errors=True)  # the sharded parts, moved or not
            run.progress.checkpoint = path
            run.output.commit()
        group.barrier()  # no rank runs on (or ends) before the checkpoint is whole
        group.reseed(config.seed, run.step)  # where a resumed run reseeds ranks > 0
