"""``sloth bench train --quantization nf4`` (QLoRA) on the CPU with the tiny shape, and the
issue's loading bound on a GPU: the llama-8b shape in nf4 peaks at most 7 GB while it
loads (it never exists in 16-bit on the GPU)."""

from __future__ import annotations

import os
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from sloth_core import FastLanguageModel
from sloth_core.bench.train import make_model, markdown, run_bench

GB = 10**9


def test_bench_train_runs_qlora_for_both_systems(tmp_path, monkeypatch):
    monkeypatch.setenv("SLOTH_KERNELS", "torch")  # not the kernels, interpreted on CI's CPU
    report = run_bench("llama-tiny", seq=16, batch=2, steps=2, warmup=1, quantization="nf4",
                       model_dir=tmp_path / "model", device="cpu")  # fmt: skip
    assert report["quantization"] == "nf4"
    by = {r["system"]: r for r in report["results"]}
    assert set(by) == {"sloth", "hf"}
    for r in by.values():
        assert r.get("error") is None, r
        # n_base counts the 4-bit weights' values, not their bytes: 2 layers of q, o (64x64),
        # k, v (32x64), gate, up, down (128x64), and the 16-bit lm_head (1007x64).
        assert r["n_base"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) + 1007 * 64
    # The same 4-bit weights and batch: both start from about the same loss (bf16).
    assert abs(by["sloth"]["first_loss"] - by["hf"]["first_loss"]) < 5e-2
    assert "QLoRA (nf4 base weights)" in markdown(report, "sloth bench train --quantization nf4")


def _cache() -> Path:
    return Path(os.environ.get("SLOTH_CACHE", Path.home() / ".cache" / "sloth"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_llama_8b_loads_in_nf4_within_7_gb():
    # The bench's random-init checkpoint (bf16 safetensors, about 16 GB), written once.
    path = make_model("llama-8b", _cache() / "bench-models" / "llama-8b", device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model, _ = FastLanguageModel.from_pretrained(str(path), load_in_4bit=True, max_seq_length=None)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    held = torch.cuda.memory_allocated() - start
    print(f"llama-8b nf4: peak while loading {peak / GB:.2f} GB, held after {held / GB:.2f} GB")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 32 * 7 and all(m.weight.is_cuda for m in layers)
    assert peak <= 7 * GB
    with torch.no_grad():
        logits = model(input_ids=torch.arange(16, device="cuda")[None]).logits
    assert torch.isfinite(logits).all()
