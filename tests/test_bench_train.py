"""``sloth bench train`` on the CPU with a tiny shape: each system in its own process."""

from __future__ import annotations

import json

from sloth_core.bench.train import SHAPES, markdown, run_bench
from sloth_core.cli import main


def test_both_systems_train_the_same_in_separate_processes(tmp_path):
    report = run_bench("llama-tiny", seq=16, batch=2, steps=2, warmup=1,
                       model_dir=tmp_path / "model", device="cpu")  # fmt: skip
    by = {r["system"]: r for r in report["results"]}
    assert set(by) == {"sloth", "hf"}
    for r in by.values():
        assert r.get("error") is None, r
        assert r["tokens_per_s"] > 0 and r["n_lora"] > 0
        assert r["n_base"] > r["n_lora"]
    # Same weights, same batch, same seed: both start from the same loss.
    assert abs(by["sloth"]["first_loss"] - by["hf"]["first_loss"]) < 1e-2
    assert by["hf"]["speed_vs_hf"] == 1.0
    text = markdown(report, "sloth bench train --shape llama-tiny")
    assert "| sloth |" in text and "| hf |" in text


def test_cli_rejects_unknown_shape_and_writes_reports(tmp_path, capsys):
    try:
        main(["bench", "train", "--shape", "llama-70b"])
    except SystemExit as exc:
        assert "unknown shape" in str(exc) and "llama-8b" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("unknown shape accepted")
    args = ["bench", "train", "--shape", "llama-tiny", "--seq", "8", "--batch", "1", "--steps", "1",
            "--warmup", "0", "--systems", "hf", "--device", "cpu", "--model-dir", str(tmp_path / "m"),
            "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["system"] == "hf"
    assert {"llama-1b", "llama-8b"} <= set(SHAPES)
