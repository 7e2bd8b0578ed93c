"""Bad inputs and faults as a demanding user meets them: each gets a clear message that
names the culprit, and leaves the disk as it was (or, for a resumable run, its checkpoints
intact). One row of :data:`CASES` per finding of the reliability review (its points 1-13);
the Ctrl-C and crash cases run ``sloth`` in a child process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sloth_core.cli import main
from sloth_core.testing.datasets import load_tiny_instructions


# -- the workspace every case starts from ----------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its bytes: what "nothing
    written" compares."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


class Evil:
    """A pickle that writes ``PWNED`` next to itself when loaded: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state": Evil(marker)}))


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> Path:
    """A finished run (checkpoints 2 and 4, ``final/`` the LoRA adapter) on its own copy of
    the tiny model, with its data: each case copies it."""
    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(tiny_llama, root / "base")
    _rows(root / "data.jsonl", load_tiny_instructions()[:32])
    # The folder's autouse SLOTH_KERNELS=torch is function-scoped: not set yet here, and
    # under CI's TRITON_INTERPRET=1 the kernels would run interpreted (minutes).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLOTH_KERNELS", "torch")
        assert main(["train", *_args(root, root / "run"), "--quiet"]) == 0
    return root


def _args(root: Path, out: Path, **extra) -> list[str]:
    options = {
        "model-name": root / "base", "dataset": root / "data.jsonl", "output-dir": out,
        "max-seq-length": 64, "batch-size": 2, "gradient-accumulation-steps": 1,
        "max-steps": 4, "save-steps": 2, "gradient-checkpointing": "off", "report-to": "none",
        **extra,
    }  # fmt: skip
    return [a for k, v in options.items() for a in (f"--{k}", str(v))]


@pytest.fixture
def work(trained, tmp_path, monkeypatch) -> Path:
    """A copy of the trained workspace, the working directory of the case."""
    root = tmp_path / "w"
    shutil.copytree(trained, root)
    # The adapter names its base by absolute path: point it at this copy.
    for config in root.rglob("adapter_config.json"):
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = str(root / "base")
        config.write_text(json.dumps(data))
    monkeypatch.chdir(root)
    return root


# -- the table -------------------------------------------------------------------------------
@dataclass
class Case:
    """``setup(root)`` returns the ``sloth`` argv; the run must exit ``code`` with ``message``
    (a substring, or each of a tuple) on standard error, and leave the workspace as it was
    unless ``writes``."""

    setup: Callable[[Path], list[str]]
    message: str | tuple[str, ...]
    code: int = 1
    writes: bool = False
    after: Callable[[Path], None] = field(default=lambda root: None)


def _custom_code_model(root: Path) -> Path:
    """A copy of the base whose config asks for a module of its own that leaves a mark."""
    model = root / "custom"
    shutil.copytree(root / "base", model)
    # transformers imports a copy of the module from its cache: the mark goes by full path.
    marker = model / "PWNED"
    (model / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    )
    for name in ("config.json", "tokenizer_config.json"):
        data = json.loads((model / name).read_text())
        data["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.Evil"}  # fmt: skip
        (model / name).write_text(json.dumps(data))
    return model


def _pickle_only_model(root: Path) -> Path:
    model = root / "pickled"
    shutil.copytree(root / "base", model)
    (model / "model.safetensors").unlink()
    plant_pickle(model / "pytorch_model.bin", model / "PWNED")
    return model


def _broken_weights_model(root: Path) -> Path:
    """A model folder whose weights file was cut short (its config and tokenizer fine)."""
    model = root / "broken"
    shutil.copytree(root / "base", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return model


def _legacy_pickled_checkpoint(root: Path) -> list[str]:
    """Point 1: a checkpoint of the older layout whose optimizer.pt was replaced by a
    crafted pickle (checkpoint-2 removed, so nothing else could be resumed)."""
    run = root / "run"
    shutil.rmtree(run / "checkpoint-2")
    checkpoint = run / "checkpoint-4"
    for name in ("optimizer.json", "optimizer.safetensors"):
        (checkpoint / name).unlink()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["files"]  # older checkpoints list no sizes
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    plant_pickle(checkpoint / "optimizer.pt", root / "PWNED")
    return ["train", *_args(root, run), "--resume"]


def _no_marker(root: Path) -> None:
    assert not list(root.rglob("PWNED")), "code from a file ran"


def _truncate(root: Path, name: str, keep: int = 2) -> list[str]:
    """Point 7: a file of the newest checkpoint cut short, checkpoint-2 intact."""
    path = root / "run" / "checkpoint-4" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // keep])
    return ["train", *_args(root, root / "run"), "--resume", "--quiet"]


def _old_run(root: Path) -> Path:
    return root / "run"


def _edited_data(root: Path) -> list[str]:
    rows = load_tiny_instructions()[:32]
    rows[3]["output"] = rows[3]["output"] + " (edited)"
    _rows(root / "data.jsonl", rows)
    return ["train", *_args(root, root / "run"), "--resume"]


def _exported_base(root: Path) -> list[str]:
    return ["export", str(root / "run" / "final"), "--format", "merged_16bit",
            "--output", str(root / "base"), "--force"]  # fmt: skip


CASES: dict[str, Case] = {
    # 1. Security: checkpoints and weights are never unpickled.
    "resume-planted-pickle": Case(
        _legacy_pickled_checkpoint,
        ("optimizer.pt", "not loaded (a pickle can run code", "every checkpoint is damaged"),
        after=_no_marker,
    ),
    "pickled-weights": Case(
        lambda root: [
            "train",
            *_args(root, root / "new", **{"model-name": _pickle_only_model(root)}),
        ],
        ("only pickled weights", "--allow-pickle"),
        after=_no_marker,
    ),
    # 2. Remote code never runs unless trusted, and never asks.
    "train-custom-code": Case(
        lambda root: [
            "train",
            *_args(root, root / "new", **{"model-name": _custom_code_model(root)}),
        ],
        ("asks to run Python code of its own", "modeling_evil", "--trust-remote-code"),
        after=_no_marker,
    ),
    "export-custom-code": Case(
        lambda root: [
            "export",
            str(_custom_code_model(root)),
            "--format",
            "merged_16bit",
            "--output",
            str(root / "exported"),
        ],  # fmt: skip
        ("asks to run Python code of its own", "--trust-remote-code"),
        after=_no_marker,
    ),
    "generate-custom-code": Case(
        lambda root: [
            "generate",
            str(_custom_code_model(root)),
            "--prompt",
            "hi",
            "--device",
            "cpu",
        ],  # fmt: skip
        ("asks to run Python code of its own", "--trust-remote-code"),
        after=_no_marker,
    ),
    # 3. --overwrite keeps the old run when the new one cannot start.
    "overwrite-broken-model": Case(
        lambda root: [
            "train",
            *_args(root, root / "run", **{"model-name": root / "data.jsonl"}),
            "--overwrite",
        ],  # fmt: skip
        "model_name",
    ),
    "overwrite-broken-weights": Case(
        lambda root: [
            "train",
            *_args(root, root / "run", **{"model-name": _broken_weights_model(root)}),
            "--overwrite",
        ],  # fmt: skip
        "broken",
    ),
    "overwrite-unknown-target": Case(
        lambda root: [
            "train",
            *_args(root, root / "run", **{"target-modules": "q_proj,qq_proj"}),
            "--overwrite",
        ],  # fmt: skip
        ("target_modules", "its linear layers: ", "q_proj"),
    ),
    # 4. Failures leave no empty output folder behind.
    "no-config-json": Case(
        lambda root: ["train", *_args(root, root / "new", **{"model-name": root / "run"})],
        "no config.json",
    ),
    "unknown-target": Case(
        lambda root: ["train", *_args(root, root / "new", **{"target-modules": "nope_proj"})],
        ("target_modules=['nope_proj']", "its linear layers"),
    ),
    # 5. Export settings are checked before training.
    "export-quantization": Case(
        lambda root: [
            "train",
            *_args(root, root / "new", **{"export-format": "gguf", "export-quantization": "q9_9"}),
        ],  # fmt: skip
        ("export_quantization='q9_9'", "q8_0", "q4_k_m"),
    ),
    "export-quantization-unquantized-format": Case(
        lambda root: [
            "train",
            *_args(
                root,
                root / "new",
                **{"export-format": "merged_16bit", "export-quantization": "q8_0"},
            ),
        ],  # fmt: skip
        "takes no quantization",
    ),
    # 6. --resume into a folder that does not exist.
    "resume-missing-folder": Case(
        lambda root: ["train", *_args(root, root / "nowhere"), "--resume"],
        "does not exist, so there is nothing to resume",
    ),
    # 7. Damaged checkpoint files are named; the newest intact checkpoint is used.
    "truncated-optimizer": Case(
        lambda root: _truncate(root, "optimizer.safetensors"),
        ("checkpoint-4 is damaged", "optimizer.safetensors", "resuming from checkpoint-2"),
        code=0,
        writes=True,
    ),
    "truncated-trainable": Case(
        lambda root: _truncate(root, "trainable.safetensors"),
        ("checkpoint-4 is damaged", "trainable.safetensors", "resuming from checkpoint-2"),
        code=0,
        writes=True,
    ),
    "truncated-trainer-state": Case(
        lambda root: _truncate(root, "trainer_state.json"),
        ("checkpoint-4 is damaged", "trainer_state.json", "resuming from checkpoint-2"),
        code=0,
        writes=True,
    ),
    # 8. Resume compares the data's content and the schedule, not path strings.
    "resume-edited-data": Case(
        _edited_data,
        ("data.jsonl is not the data checkpoint-4 was trained on", "sha256"),
    ),
    "resume-other-max-steps": Case(
        lambda root: ["train", *_args(root, root / "run", **{"max-steps": 6}), "--resume"],
        "max_steps=6, checkpoint-4 has 4",
    ),
    "resume-same-data-relative-path": Case(
        lambda root: ["train", *_args(root, root / "run", dataset="data.jsonl"), "--resume"],
        "resumed from checkpoint-4",
        code=0,
        writes=True,
    ),
    # 11. A role the chat template does not know.
    "unknown-role": Case(
        lambda root: [
            "train",
            *_args(
                root,
                root / "new",
                dataset=_rows(
                    root / "roles.jsonl",
                    [
                        {
                            "messages": [
                                {"role": "user", "content": "hi"},
                                {"role": "narrator", "content": "they waved"},
                                {"role": "assistant", "content": "hello"},
                            ]
                        }
                    ],
                ),
            ),
        ],  # fmt: skip
        ("narrator", "roles.jsonl"),
    ),
    # 12. Messages: did you mean, the subcommand's usage, the right words, real flags.
    "flag-typo": Case(
        lambda root: ["train", "--learnig-rate", "1e-4"],
        ("usage: sloth train", "--learnig-rate (did you mean --learning-rate?)"),
        code=2,
    ),
    "dataset-is-a-folder": Case(
        lambda root: ["train", *_args(root, root / "new", dataset=root / "run")],
        "is a directory",
    ),
    "epochs-inf": Case(
        lambda root: [
            "train",
            *_args(root, root / "new", **{"max-steps": -1, "num-train-epochs": "inf"}),
        ],  # fmt: skip
        "num_train_epochs=inf: must be a finite number",
    ),
    # 13. An export never replaces the base model of the adapter it merges.
    "export-onto-base": Case(_exported_base, ("would replace the base model", "base")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, work, capsys):
    case = CASES[name]
    argv = case.setup(work)
    before = snapshot(work)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    captured = capsys.readouterr()
    output = captured.err + captured.out
    assert code == case.code, output[-3000:]
    for part in (case.message,) if isinstance(case.message, str) else case.message:
        assert part in output, f"{part!r} not in:\n{output[-3000:]}"
    assert "Traceback" not in output
    if not case.writes:
        assert snapshot(work) == before, "the failed command changed the disk"
    case.after(work)


# -- what a table row cannot show ------------------------------------------------------------
def test_overwrite_replaces_the_old_run_once_the_new_one_checkpoints(work, capsys):
    """The old run survives a failed --overwrite (above) and goes once the new run has a
    checkpoint: no mix of old and new files."""
    old_final = snapshot(work / "run" / "final")
    assert main(["train", *_args(work, work / "run", **{"max-steps": 2, "r": 8}),
                 "--overwrite", "--quiet"]) == 0  # fmt: skip
    assert sorted(p.name for p in (work / "run").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-2"
    ]
    assert snapshot(work / "run" / "final") != old_final
    assert not list((work / "run").glob(".sloth-replaced-*"))


def test_disk_full_while_checkpointing_says_so_and_keeps_nothing_partial(work, capsys, monkeypatch):
    """Point 10: the disk fills while the first checkpoint is written: a message that says
    so with the folder and the free space in MB or GiB, and the new run leaves nothing."""
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    before = snapshot(work)
    code = main(["train", *_args(work, work / "new"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "disk full while writing checkpoint-2 in" in err and str(work / "new") in err, err
    assert " MB free" in err or " GiB free" in err, err
    assert "Traceback" not in err
    assert snapshot(work) == before


def test_disk_full_during_a_resumed_run_keeps_the_last_checkpoint(work, capsys, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full_after_first(tensors, path, *args, **kwargs):
        if "checkpoint-4" in str(path) or ".checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, *args, **kwargs)

    shutil.rmtree(work / "run" / "checkpoint-4")
    monkeypatch.setattr(safetensors.torch, "save_file", full_after_first)
    code = main(["train", *_args(work, work / "run"), "--resume", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "disk full while writing checkpoint-4" in err, err
    assert "checkpoint-2 is intact: resume with --resume" in err
    assert sorted(p.name for p in (work / "run").iterdir() if "checkpoint" in p.name) == [
        "checkpoint-2"
    ]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 kB file system (tmpfs): room for a run's small files, not for a checkpoint."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_while_checkpointing(work, tiny_disk, capsys):
    """The same on a file system that really fills up (not a patched writer)."""
    code = main(["train", *_args(work, tiny_disk / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "disk full while writing checkpoint-2 in" in err and " MB free" in err, err
    assert "Traceback" not in err
    assert list(tiny_disk.iterdir()) == []


def test_export_past_the_free_space_says_how_much_in_mb(work, capsys, monkeypatch):
    import sloth_core.io

    monkeypatch.setattr(sloth_core.io, "free_bytes", lambda path: 2**17)
    before = snapshot(work)
    code = main(["export", str(work / "run"), "--format", "merged_16bit",
                 "--output", str(work / "merged")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "not enough free disk space for the merged_16bit export" in err, err
    assert "0.1 MB free" in err and "0.00 GiB" not in err
    assert snapshot(work) == before


def test_export_that_fills_the_disk_leaves_nothing(work, capsys, monkeypatch):
    import transformers.modeling_utils

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # What transformers' save_pretrained writes each shard with.
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    before = snapshot(work)
    code = main(["export", str(work / "run"), "--format", "merged_16bit",
                 "--output", str(work / "merged")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "disk full while writing merged" in err and " free)" in err, err
    assert "Traceback" not in err
    assert snapshot(work) == before


def test_trusted_flags_exist_where_messages_point():
    """The flags the refusals name are real flags of every command that loads a model."""
    from sloth_core.cli import build_parser

    parser = build_parser()
    for command in ("train", "export", "generate", "chat"):
        argv = {
            "train": ["train"],
            "export": ["export", "m", "-f", "lora", "-o", "x"],
            "generate": ["generate", "m", "--prompt", "p"],
            "chat": ["chat", "m"],
        }[command]
        args = parser.parse_args([*argv, "--trust-remote-code", "--allow-pickle"])
        assert args.trust_remote_code and args.allow_pickle, command


def test_trust_remote_code_lets_the_folder_code_run(work):
    """The flag is not decoration: with it, transformers is allowed to import the folder's
    module (which here leaves its mark and then fails, being no model)."""
    from sloth_core import FastLanguageModel

    model = _custom_code_model(work)
    with pytest.raises(Exception):  # noqa: B017 - the module defines no classes
        FastLanguageModel.from_pretrained(str(model), trust_remote_code=True)
    assert (model / "PWNED").is_file()


def _sloth(*args: str) -> list[str]:
    return [sys.executable, "-m", "sloth_core", *args]


def test_ctrl_c_prints_one_line_exits_130_and_keeps_the_checkpoint(work):
    """Point 9: SIGINT mid-run: one line naming the step and the intact checkpoint, exit
    130. (A resume after a crash logging each step once: test_train_loop's kill test.)"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SLOTH_KERNELS": "torch"}
    out = work / "ctrl-c"
    args = _args(work, out, **{"max-steps": 400, "save-steps": 1, "save-total-limit": 1})
    process = subprocess.Popen(
        _sloth("train", *args, "--quiet"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("checkpoint-*")):
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("sloth:")]
    assert len(lines) == 1 and "interrupted at step" in lines[0], err[-2000:]
    assert "intact: resume with --resume" in lines[0] and "Traceback" not in err
    kept = [p.name for p in out.glob("checkpoint-*")]
    assert len(kept) == 1 and not list(out.glob(".checkpoint-*"))
    assert (out / kept[0] / "trainer_state.json").is_file()
    assert int(kept[0].split("-")[1]) < 400
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]  # fmt: skip
    assert logged == sorted(set(logged)), "a step logged twice"
