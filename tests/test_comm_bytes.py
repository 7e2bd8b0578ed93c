"""scripts/comm_bytes.py, the model behind docs/scaling.md: its parameter counts match the
llama-3 shapes and the adapters the 2-GPU benchmark measured, its ring formulas reduce to
the plain cases, and it prints the tables the page quotes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("comm_bytes", ROOT / "scripts" / "comm_bytes.py")
assert _spec is not None and _spec.loader is not None
comm_bytes = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("comm_bytes", comm_bytes)  # dataclasses look their module up
_spec.loader.exec_module(comm_bytes)
L8B, L70B = comm_bytes.SHAPES["8B"], comm_bytes.SHAPES["70B"]


def test_parameter_counts_are_llama_3s():
    assert abs(L8B.params() - 8.03e9) / 8.03e9 < 0.01
    assert abs(L70B.params() - 70.6e9) / 70.6e9 < 0.01


def test_lora_count_is_the_measured_adapters():
    assert L8B.lora_params(16) == 41_943_040
    bench = json.loads((ROOT / "docs" / "bench-train-llama-8b-2gpu-h200.json").read_text())
    assert {r["n_lora"] for r in bench["results"]} == {L8B.lora_params(16)}
    # The benchmark's n_base: the linear weights and lm_head (no embeddings, no norms).
    assert {r["n_base"] for r in bench["results"]} == {L8B.base_params()}


def test_ring_bytes_and_sharded_memory():
    p = L8B.lora_params(16)
    assert comm_bytes.comm(L8B, "lora", 2) == {"all-reduce": 4 * p}  # 2(N-1)/N = 1
    full = comm_bytes.comm(L8B, "full", 4)
    assert full["reduce-scatter"] == 3 / 4 * 4 * L8B.params()
    assert full["all-gather"] < 3 / 4 * 2 * 2 * L8B.params()  # the root is gathered once
    # Doubling the GPUs halves the 16 B/weight state, the rest stays.
    m8, m16 = (comm_bytes.memory(L70B, "full", n) for n in (8, 16))
    assert m8 - m16 == 16 * L70B.params() / 16
    assert comm_bytes.memory(L70B, "qlora", 8) < comm_bytes.memory(L70B, "lora", 8) / 3


def test_it_prints_the_tables(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["comm_bytes.py", "--gpus", "2,16"])
    comm_bytes.main()
    out = capsys.readouterr().out
    assert "| shape | mode | N=2 | N=16 |" in out
    assert "| 8B | 8,030,261,248 |" in out
    # Within a node NVLink bounds the ring; across nodes the node's 8 NICs (8 x 46 GB/s).
    assert "| bus GB/s |  | 370 | 368 |" in out
