"""A training run killed mid-way and resumed, beside the same run uninterrupted; the
command line such runs start from, and data files cut from the bundled sets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sloth_core.train.checkpoint import list_checkpoints
from sloth_core.train.metrics import read_metrics


def sloth_train(options: dict, *flags: str) -> list[str]:
    """``python -m sloth_core train --quiet`` with ``options`` as flags, then ``flags``."""
    args = [sys.executable, "-m", "sloth_core", "train", "--quiet"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + list(flags)


def first_rows(source: Path, rows: int, path: Path) -> Path:
    """The first ``rows`` lines of the JSONL file ``source``, written to ``path``."""
    lines = Path(source).read_text(encoding="utf-8").splitlines()[:rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def step_records(out: Path) -> dict[int, dict]:
    """The logged training steps of a run (not its evaluations), by step."""
    return {r["step"]: r for r in read_metrics(out) if "loss" in r}


def kill_and_resume(
    argv: Callable[[Path], list[str]], env: dict, whole: Path, crashed: Path, *,
    steps: int = 8, kill_after: int = 5,
) -> tuple[dict[int, dict], dict[int, dict]]:  # fmt: skip
    """Run ``argv(out)`` to the end in ``whole``; run it in ``crashed``, SIGKILL it once
    step ``kill_after`` is logged, then run it with ``--resume``. Checks that the kill came
    before the end, that only whole checkpoints are kept (a checkpoint being written when
    the kill came is a hidden staging directory, removed by the resume) and that each step
    is logged once; returns both runs' step records."""
    done = subprocess.run(argv(whole), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = step_records(whole)
    assert sorted(expected) == list(range(1, steps + 1))

    process = subprocess.Popen(argv(crashed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 300
    while max(step_records(crashed), default=0) < kill_after:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(step_records(crashed)) < steps
    checkpoints = [p.name for p in list_checkpoints(crashed)]
    assert checkpoints and f"checkpoint-{steps}" not in checkpoints
    assert all((crashed / name / "trainable.safetensors").is_file() for name in checkpoints)

    resumed = subprocess.run([*argv(crashed), "--resume"], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint-" in resumed.stdout
    assert not list(crashed.glob(".checkpoint-*"))
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]
    assert logged == sorted(expected), logged  # the steps after the checkpoint, once
    return expected, step_records(crashed)
