"""A checkpoint deleted by rotation is renamed aside first; what a cut-short deletion
leaves (Ctrl-C between the rename and the delete) is swept, and nothing else."""

from __future__ import annotations

from sloth_core.train.checkpoint import sweep_retired


def test_sweep_removes_only_retired_checkpoints(tmp_path):
    for name in (".checkpoint-2.old", "checkpoint-3", ".checkpoint-4.abc.tmp", "final"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainable.safetensors").write_bytes(b"x")
    sweep_retired(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".checkpoint-4.abc.tmp", "checkpoint-3", "final",
    ]  # fmt: skip
    sweep_retired(tmp_path / "missing")  # a run interrupted before its folder existed
