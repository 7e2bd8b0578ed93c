"""``sloth bench kernels`` on the CPU at toy shapes: the harness, not the figures."""

from __future__ import annotations

import json

import pytest
import torch

from sloth_core.bench.kernel_cases import Shapes, lora_mlp_case, saved_activation_bytes
from sloth_core.bench.kernels import markdown, run_kernel_bench
from sloth_core.cli import main
from sloth_core.ops import default_registry

TOY = dict(tokens=16, hidden=8, intermediate=12, heads=2, kv_heads=1, head_dim=4, vocab=37,
           rank=2, moe_hidden=8, experts=5, top_k=2, moe_intermediate=6, dtype=torch.float32,
           device="cpu")  # fmt: skip


def test_every_case_runs_for_every_system():
    registry = default_registry()
    report = run_kernel_bench(registry, Shapes(**TOY), runs=2, warmup=1, compile=False)
    names = [c["name"] for c in report["cases"]]
    assert {"rms_norm", "rope", "swiglu", "lora_mlp", "fused_linear_cross_entropy",
            "token_log_probs", "moe_experts"} <= set(names)  # fmt: skip
    for case in report["cases"]:
        systems = {r["system"]: r for r in case["results"]}
        expected = {"sloth", "eager"} | (
            {"torch_unfused"}
            if case["op"] in ("fused_linear_cross_entropy", "token_log_probs")
            else set()
        )
        assert set(systems) == expected, case["name"]
        for r in systems.values():
            assert r["error"] is None and r["median_ms"] > 0, (case["name"], r)
        assert systems["sloth"]["provider"] == "torch"  # no kernels in a bare registry
    text = markdown(report, "sloth bench kernels --tokens 16")
    assert "| rms_norm |" in text and "sloth bench kernels --tokens 16" in text


def test_saved_bytes_count_activations_not_weights():
    s = Shapes(**TOY)
    case = lora_mlp_case(s)
    saved = saved_activation_bytes(case, default_registry().reference("lora_mlp"))
    activation = s.tokens * 4  # bytes of one fp32 value per token
    # PEFT-style eager saves x, both projections, the activation and LoRA intermediates.
    assert saved >= activation * (s.hidden + 2 * s.intermediate)
    weights = sum(p.numel() * p.element_size() for p in case.params)
    assert saved < weights + activation * 10 * s.intermediate


def test_saved_after_a_norm_counts_what_the_op_adds():
    """Fed by a norm, the reference ops save the norm's output on top of what the norm
    keeps; sloth's kernels keep nothing of the input beyond the norm's (its input)."""
    import pytest

    from sloth_core.bench.kernel_cases import lora_qkv_case, saved_bytes_after_norm
    from sloth_core.plugins import SlothPluginManager

    s = Shapes(**{**TOY, "hidden": 32, "intermediate": 48})
    registry = default_registry()
    manager = SlothPluginManager(entry_points=True)
    kernels = manager.ops.resolve("lora_mlp", torch.device("cpu"), s.dtype)
    if kernels.provider == "torch":
        pytest.skip("sloth-kernels serves the CPU only under TRITON_INTERPRET=1")
    norm = registry.reference("rms_norm")
    fast_norm = manager.ops.resolve("rms_norm", torch.device("cpu"), s.dtype).fn
    x_bytes = s.tokens * s.hidden * 4
    for build, op in ((lora_mlp_case, "lora_mlp"), (lora_qkv_case, "lora_qkv")):
        case = build(s)
        eager = saved_bytes_after_norm(case, registry.reference(op), norm)
        fast = manager.ops.resolve(op, torch.device("cpu"), s.dtype).fn
        mine = saved_bytes_after_norm(case, fast, fast_norm)
        assert eager >= x_bytes  # the norm's output, saved by the projections
        assert mine <= eager - x_bytes, (op, mine, eager)


def test_cli_writes_json_and_markdown(tmp_path, plugin_manager):
    args = ["bench", "kernels", "--device", "cpu", "--dtype", "fp32", "--no-compile", "--runs", "1",
            "--warmup", "0", "--ops", "swiglu,rms_norm", "--json", str(tmp_path / "r.json"),
            "--markdown", str(tmp_path / "r.md")]  # fmt: skip
    args += ["--tokens", "8", "--hidden", "8", "--intermediate", "8"]
    assert main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [c["name"] for c in report["cases"]] == ["rms_norm", "swiglu"]
    assert "| swiglu |" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize(("what", "option"), [("dpo", "--seq"), ("generate", "--new-tokens")])
def test_sloth_bench_dpo_and_generate_take_their_modules_options(what, option, capsys):
    with pytest.raises(SystemExit) as done:
        main(["bench", what, "--help"])
    assert done.value.code == 0 and option in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["bench", what, "--shape", "nope"])
    assert done.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
