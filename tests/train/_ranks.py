"""Training runs in subprocesses, alone or as several ranks, and the losses they log: what
the tests of several processes (tests/train/test_train_distributed.py,
test_train_qlora_distributed.py) and several machines (test_train_multinode.py) share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sloth_core.train.metrics import read_metrics

# On the CPU the runs agree to float32 rounding. On a GPU the LoRA runs hold bf16 weights
# (dtype auto) and the GEMMs tile batch 2 and batch 4 differently, so they agree to bf16's.
REL = 5e-4 if torch.cuda.is_available() else 1e-5
TWO_RANKS = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason="2 ranks on a GPU machine need 2 GPUs (on the CPU they run on gloo)",
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SLOTH_KERNELS": "torch", "HF_HUB_OFFLINE": "1"}


def options(model, data, out, batch, **extra) -> dict:
    """A short LoRA run of ``model`` on ``data``: 4 steps of 2 micro-batches of ``batch``."""
    return {
        "model_name": str(model), "dataset": str(data), "output_dir": str(out),
        "max_seq_length": 64, "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 2, "max_steps": 4, "learning_rate": 5e-3,
        "warmup_steps": 1, "gradient_checkpointing": "off", "save_steps": 2, "seed": 5,
        "lora_dropout": 0.0, "save_method": "none", "report_to": "none", **extra,
    }  # fmt: skip


def train_argv(options: dict, *flags: str, launcher=(sys.executable,)) -> list[str]:
    """The ``sloth train`` command line of ``options`` and ``flags``."""
    args = [*launcher, "-m", "sloth_core", "train", "--quiet"]
    for key, value in options.items():
        args += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return args + list(flags)


def run_train(options: dict, *flags: str, launcher=(sys.executable,)):
    """``sloth train`` run to the end; it must succeed."""
    done = subprocess.run(train_argv(options, *flags, launcher=launcher), env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def losses(out: Path) -> dict[int, float]:
    """The loss of each logged step; each step logged once (rank 0 alone logs)."""
    records = [r for r in read_metrics(out) if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step logged twice (rank > 0 logging?): {steps}"
    return {r["step"]: r["loss"] for r in records}


def write_data(path: Path, rows: int = 48) -> Path:
    """The first ``rows`` tiny instructions as a JSON-lines file at ``path``."""
    from sloth_core.testing.datasets import load_tiny_instructions

    lines = load_tiny_instructions()[:rows]
    path.write_text("".join(json.dumps(row) + "\n" for row in lines), encoding="utf-8")
    return path
