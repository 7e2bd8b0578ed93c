"""``--resume``: which checkpoint, and whether this run may continue it.

A resumed run must take exactly the steps the uninterrupted run would have taken, so it
must see the same data (compared by content: a fingerprint of each file's bytes, not its
path) and every option that shapes the model, the data order or the schedule. The
checkpoint is chosen before the model loads: the newest one whose files all read back
(:func:`~sloth_core.train.checkpoint.read_checkpoint`), falling back past damaged ones
and saying so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sloth_core.io import write_text_atomically

from .checkpoint import Checkpoint, DamagedCheckpointError, list_checkpoints, read_checkpoint
from .config import ConfigError, TrainConfig
from .metrics import METRICS_FILE

#: Options a resumed run must share with the run that wrote the checkpoint: the trained
#: tensors, the data order and the step arithmetic depend on them. The data files are
#: compared by content (``data`` in the checkpoint), the batch as the global batch.
RESUME_KEYS = (
    "data_format", "chat_template", "max_seq_length", "packing", "train_on_responses_only",
    "eval_fraction", "seed", "dtype", "load_in_4bit", "quantization", "full_finetuning",
    "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "modules_to_save",
    "target_parameters", "target_experts",
    "gradient_accumulation_steps", "max_steps", "num_train_epochs", "learning_rate",
    "embedding_learning_rate", "warmup_steps", "warmup_ratio", "lr_scheduler_type", "optim",
    "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm",
    "method", "beta", "loss_type", "label_smoothing", "simpo_gamma", "desirable_weight",
    "undesirable_weight", "max_prompt_length", "max_completion_length", "truncation_mode",
    "reward", "reward_weights", "num_generations", "temperature", "top_p", "top_k", "epsilon",
    "epsilon_high", "num_iterations", "scale_rewards",
)  # fmt: skip


def fingerprint(path: str | Path) -> dict[str, Any]:
    """Size and SHA-256 of a data file: what a checkpoint records of its data."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def model_fingerprint(model_name: str) -> dict[str, Any] | str:
    """A local model by content (its config.json's hash and its weight files' sizes: hashing
    gigabytes of weights would cost more than the check is worth), a hub id by name."""
    directory = Path(model_name).expanduser()
    if not (directory / "config.json").is_file():
        return model_name
    weights = {p.name: p.stat().st_size for p in sorted(directory.glob("*.safetensors"))}
    config = hashlib.sha256((directory / "config.json").read_bytes()).hexdigest()
    return {"config_sha256": config, "weights": weights}


def data_fingerprints(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint records of its inputs: the model and the data files, by content."""
    found: dict[str, Any] = {"model_name": model_fingerprint(config.model_name)}
    for name in ("dataset", "eval_dataset"):
        found[name] = fingerprint(getattr(config, name)) if getattr(config, name) else None
    return found


def choose_checkpoint(output_dir: str | Path, say: Any) -> Checkpoint | None:
    """The newest checkpoint of ``output_dir`` that reads back whole, or ``None`` if there
    is none; damaged ones are named through ``say`` and skipped.

    Raises:
        ConfigError: checkpoints exist but every one is damaged.
    """
    damaged = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            checkpoint = read_checkpoint(path)
        except DamagedCheckpointError as exc:
            damaged.append(str(exc))
            say(f"[yellow]{path.name} is damaged ({exc.file}: {exc.why}); trying the one before[/]")
            continue
        if damaged:
            say(f"resuming from {path.name}, the newest intact checkpoint")
        return checkpoint
    if damaged:
        raise ConfigError(
            "--resume: every checkpoint is damaged: "
            + "; ".join(damaged)
            + "; start a new run with --overwrite"
        )
    return None


def check_resume(
    config: TrainConfig, checkpoint: Checkpoint, data: dict[str, Any], world_size: int = 1
) -> None:
    """Raise :class:`ConfigError` listing every difference that makes ``checkpoint``
    unfit to continue with ``config`` on ``data`` (from :func:`data_fingerprints`)."""
    state, name = checkpoint.state, checkpoint.path.name
    saved = state.get("config", {})
    problems = []
    batch = "per_device_train_batch_size"
    if batch in saved:  # the data position counts global batches: they must stay the same
        saved_world = state.get("world_size", 1)
        theirs, ours = saved[batch] * saved_world, getattr(config, batch) * world_size
        if theirs != ours:
            problems.append(
                f"the global batch ({batch} x processes) is {getattr(config, batch)} x "
                f"{world_size} = {ours}, {name} was trained with {saved[batch]} x "
                f"{saved_world} = {theirs}"
            )
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(config, key):
            problems.append(f"{key}={getattr(config, key)!r}, {name} has {saved[key]!r}")
    recorded = state.get("data", {})
    if "model_name" not in recorded and "model_name" in saved:  # older checkpoints
        if not _same_model(saved["model_name"], config.model_name):
            problems.append(f"model_name={config.model_name!r}, {name} has {saved['model_name']!r}")
    for key, now in data.items():
        then = recorded.get(key, now)  # older checkpoints recorded no fingerprints
        if then == now:
            continue
        if key == "model_name":
            problems.append(
                f"model_name {config.model_name} is not the model {name} was trained on "
                f"({saved.get('model_name')}: another config.json or other weight files)"
            )
        else:
            problems.append(_data_change(key, getattr(config, key), then, now, name))
    if problems:
        raise ConfigError(
            f"--resume: this run differs from {name}: "
            + "; ".join(problems)
            + ". Resume with the same options and data, or start a new run with --overwrite"
        )


def _same_model(saved: str, now: str) -> bool:
    a, b = Path(saved).expanduser(), Path(now).expanduser()
    if a.exists() or b.exists():
        return a.resolve() == b.resolve()
    return saved == now


def _data_change(key: str, path: str, then: dict | None, now: dict | None, name: str) -> str:
    if then is None or now is None:
        used = "no file" if then is None else "a file"
        return f"{key}: {name} was trained with {used}, this run has {path or 'none'}"
    return (
        f"{key} {path} is not the data {name} was trained on ({then['bytes']} bytes, sha256 "
        f"{then['sha256'][:12]}... then; {now['bytes']} bytes, {now['sha256'][:12]}... now)"
    )


#: Logs of the run's steps beside metrics.jsonl (GRPO's sampled completions).
STEP_LOGS = (METRICS_FILE, "completions.jsonl")


def drop_metrics_after(output_dir: Path, step: int) -> None:
    """Keep the metrics (and other step logs) of steps up to ``step`` only: the resumed
    run logs the rest again."""
    for name in STEP_LOGS:
        _drop_after(Path(output_dir) / name, step)


def _drop_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when the run died
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line + "\n")
    write_text_atomically(path, "".join(kept))
