"""GRPO's generation benchmark on the CPU with a tiny shape: each system in its own process."""

from __future__ import annotations

import pytest

from sloth_core.bench.generate import markdown, run_generate_bench


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    # The bench's machinery on the CPU, not the kernels (interpreted under TRITON_INTERPRET).
    monkeypatch.setenv("SLOTH_KERNELS", "torch")


def test_both_systems_sample_full_length_completions_in_separate_processes(tmp_path):
    report = run_generate_bench("llama-tiny", prompts=2, generations=2, prompt_len=8,
                                new_tokens=8, repeats=1, model_dir=tmp_path / "model",
                                device="cpu")  # fmt: skip
    by = {r["system"]: r for r in report["results"]}
    assert set(by) == {"sloth", "hf"}
    for r in by.values():
        assert r.get("error") is None, r
        assert r["tokens_per_s"] > 0 and len(r["times_s"]) == 1
        # min_new_tokens = max_new_tokens: no completion ends early at a stop token.
        assert r["min_new_tokens"] == r["max_new_tokens"] == 8
    assert by["sloth"]["path"] == "plain" and by["hf"]["path"] == "generate"  # no CUDA
    assert by["hf"]["speed_vs_hf"] == 1.0 and by["sloth"]["speed_vs_hf"] > 0
    assert report["kind"] == "generate" and report["new_tokens"] == 8
    assert report["versions"]["torch"] and by["sloth"]["device_name"] == report["device_name"]
    text = markdown(report, "sloth bench generate --shape llama-tiny")
    assert "| sloth |" in text and "| hf |" in text


def test_unknown_systems_are_refused(tmp_path):
    with pytest.raises(ValueError, match="vllm"):
        run_generate_bench("llama-tiny", systems=("vllm",), model_dir=tmp_path, device="cpu")
