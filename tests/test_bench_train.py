"""``sloth bench train`` on the CPU with a tiny shape: each system in its own process."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors import safe_open

from sloth_core.bench import train
from sloth_core.bench.plot import PlotUnavailable, panels, plot_report, target_marks
from sloth_core.bench.train import (
    SHAPES,
    SystemSkipped,
    check_losses,
    liger_patch,
    markdown,
    resolve_systems,
    run_bench,
)
from sloth_core.cli import main

NOT_INSTALLED = "liger-kernel is not installed (pip install liger-kernel)"


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    # The bench's machinery on the CPU, not the kernels: under CI's TRITON_INTERPRET=1 they
    # would run interpreted (minutes); the kernels are tested against the references.
    monkeypatch.setenv("SLOTH_KERNELS", "torch")


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
    assert report["losses_agree"] and all(r["same_start"] for r in by.values())
    assert by["hf"]["speed_vs_hf"] == 1.0
    # sloth's attention calls of a step by path: one a layer forward, one more for each
    # checkpointed layer's recompute, whichever path ran them; hf's none of sloth's.
    layers = SHAPES["llama-tiny"]["num_hidden_layers"]
    calls = sum(by["sloth"]["attention_paths"].values())
    assert layers <= calls <= 2 * layers and by["hf"]["attention_paths"] is None
    assert report["versions"]["torch"] and by["sloth"]["device_name"] == report["device_name"]
    # Both step with the fused AdamW their trainers default to, and the report says so.
    assert {r["optimizer"] for r in by.values()} == {"fused AdamW"}
    text = markdown(report, "sloth bench train --shape llama-tiny")
    assert "| sloth |" in text and "| hf |" in text and "LoRA, fused AdamW;" in text


def test_an_moe_with_fp8_experts_trains_beside_hf_in_bf16(tmp_path):
    """The MoE row's FP8 run (sloth's experts in e4m3, hf + PEFT in bf16), as
    ``scripts/gpu_moe.sh`` makes it with QUANTIZATION=fp8, on a tiny Qwen3-MoE."""
    report = run_bench("qwen3-moe-tiny", seq=16, batch=2, steps=2, warmup=1,
                       model_dir=tmp_path / "model", device="cpu", quantization="fp8")  # fmt: skip
    by = {r["system"]: r for r in report["results"]}
    assert set(by) == {"sloth", "hf"}
    for r in by.values():
        assert r.get("error") is None, r
        assert r["tokens_per_s"] > 0 and r["n_lora"] > 0
    # LoRA on the experts in both: PEFT maps gate/up/down_proj onto the 3-D experts.
    assert by["sloth"]["n_lora"] == by["hf"]["n_lora"]
    # 1 byte a weight for every linear layer and expert (bf16's 2), the embeddings, norms
    # and routers as they were: about 0.76 of hf's bytes here, 0.95 with bf16 experts.
    assert by["sloth"]["base_gib"] < 0.8 * by["hf"]["base_gib"]
    # e4m3 weights start where bf16's do, within the bench's loss tolerance.
    assert report["losses_agree"] and all(r["same_start"] for r in by.values())


def test_cli_rejects_unknown_shape_and_writes_reports(tmp_path, capsys, monkeypatch):
    _liger_absent(monkeypatch)  # a named baseline that is not installed: skipped, not an error
    try:
        main(["bench", "train", "--shape", "llama-70b"])
    except SystemExit as exc:
        assert "unknown shape" in str(exc) and "llama-8b" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("unknown shape accepted")
    args = ["bench", "train", "--shape", "llama-tiny", "--seq", "8", "--batch", "1",
            "--steps", "1", "--warmup", "0", "--systems", "hf,liger", "--device", "cpu",
            "--model-dir", str(tmp_path / "m"), "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert main(args) == 0
    hf, liger = json.loads((tmp_path / "r.json").read_text())["results"]
    assert hf["system"] == "hf" and hf["tokens_per_s"] > 0
    assert liger == {"system": "liger", "skipped": NOT_INSTALLED}
    assert f"liger: skipped: {NOT_INSTALLED}" in capsys.readouterr().out.replace("\n", " ")
    assert {"llama-1b", "llama-8b"} <= set(SHAPES)


def test_moe_shape_is_qwen3_30b_a3b_and_counts_the_experts_each_token_runs():
    import torch
    from transformers import AutoModelForCausalLM

    config = train.shape_config("qwen3-30b-a3b")
    expected = dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48,
                    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                    vocab_size=151936, norm_topk_prob=True, mlp_only_layers=[])  # fmt: skip
    assert {key: getattr(config, key) for key in expected} == expected
    config.num_hidden_layers = 1
    with torch.device("meta"):  # shapes only: one full-size layer allocates nothing
        model = AutoModelForCausalLM.from_config(config)
    attention = 2048 * 128 * (32 + 4 + 4) + 32 * 128 * 2048
    experts_per_token = 8 * 3 * 768 * 2048  # gate, up and down of 8 experts
    assert train._matmul_params(model) == attention + experts_per_token + 151936 * 2048


def test_the_moe_row_trains_attention_and_every_expert_alike_in_both_systems(tmp_path, monkeypatch):
    """The ``moe`` target's workload at a tiny size, in-process (the workers' body): sloth
    and hf both put LoRA on attention and on every expert (PEFT maps gate/up/down_proj to
    the 3-D expert weights), train the same count of parameters from the same loss."""
    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    tiny = dict(train.SHAPES["qwen3-30b-a3b"], hidden_size=64, intermediate_size=96,
                moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=301)  # fmt: skip
    monkeypatch.setitem(train.SHAPES, "qwen3-moe-tiny", tiny)
    model_dir = train.make_model("qwen3-moe-tiny", tmp_path / "moe", device="cpu")
    # Written in the model's own layout (3-D experts, no per-expert copies on the device).
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        expert_keys = sorted(k for k in f.keys() if ".layers.0.mlp.experts" in k)
    assert expert_keys == ["model.layers.0.mlp.experts.down_proj",
                           "model.layers.0.mlp.experts.gate_up_proj"]  # fmt: skip
    common = dict(seq=16, batch=2, steps=1, warmup=0, device="cpu")
    sloth = train.run_system("sloth", model_dir, **common)
    hf = train.run_system("hf", model_dir, **common)
    r, layers, experts = 16, 2, 4
    attention = r * ((64 + 64) + (64 + 32) * 2 + (64 + 64))  # q, k, v, o: A [r, in], B [out, r]
    # Per expert: the fused gate_up_proj takes rank r for gate_proj and r for up_proj (PEFT
    # maps both names to it), down_proj rank r.
    expert_lora = experts * (2 * r * (64 + 2 * 32) + r * (32 + 64))
    assert sloth.n_lora == hf.n_lora == layers * (attention + expert_lora)
    assert sloth.first_loss == pytest.approx(hf.first_loss, abs=1e-3)


# --- systems, the loss check, liger, the plot -------------------------------------------


def _liger_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # find_spec and import both fail
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)


def test_systems_all_runs_every_installed_one_and_skips_the_rest(monkeypatch):
    _liger_absent(monkeypatch)
    run, skipped = resolve_systems("all")
    assert run == ["sloth", "hf"]
    assert skipped == [{"system": "liger", "skipped": NOT_INSTALLED}]
    assert resolve_systems("sloth:on, hf,sloth:on") == (["sloth:on", "hf"], [])
    # a setting whose value has commas is one name, not split at them
    tiled = "sloth[SLOTH_GATED_LORA_TILE=32,128,4,1]"
    assert resolve_systems(f"{tiled},sloth,hf") == ([tiled, "sloth", "hf"], [])
    assert train.system_env(tiled) == ("sloth", {"SLOTH_GATED_LORA_TILE": "32,128,4,1"})
    monkeypatch.setattr(train, "installed", lambda module: True)
    assert resolve_systems("all") == (["sloth", "hf", "liger"], [])


@pytest.mark.parametrize("spec", ["", "bogus", "sloth,vllm", "all,hf", "sloth[lower=1]",
                                  "vllm[SLOTH_X=1]"])  # fmt: skip
def test_systems_are_validated(spec, capsys):
    with pytest.raises(ValueError, match="choose from"):
        resolve_systems(spec)
    with pytest.raises(SystemExit, match="choose from .*liger, or all"):
        main(["bench", "train", "--shape", "llama-tiny", "--systems", spec, "--device", "cpu"])


def test_a_system_may_carry_one_setting_of_its_environment(monkeypatch, tmp_path):
    # An A/B of a switch in one run: the same system with and without it, each process
    # with its own environment, labelled as named.
    assert train.system_env("sloth[SLOTH_KEEP_PROJECTIONS=1]") == (
        "sloth",
        {"SLOTH_KEEP_PROJECTIONS": "1"},
    )
    assert train.system_env("sloth:on") == ("sloth:on", {})
    run, skipped = resolve_systems("sloth,sloth:on[SLOTH_X=],hf")
    assert run == ["sloth", "sloth:on[SLOTH_X=]", "hf"] and skipped == []
    calls = []

    def worker(module, args, *, timeout, nproc=1, env=None):
        calls.append((args[0], env))
        return {"tokens_per_s": 1.0, "peak_gib": None, "first_loss": 1.0}

    monkeypatch.setattr(train, "run_worker", worker)
    monkeypatch.setattr(train, "make_model", lambda shape, path, device: path)
    report = run_bench("llama-tiny", seq=8, batch=1, systems="hf,sloth,sloth[SLOTH_X=1]",
                       model_dir=tmp_path, device="cpu")  # fmt: skip
    assert calls == [("hf", {}), ("sloth", {}), ("sloth", {"SLOTH_X": "1"})]
    assert [r["system"] for r in report["results"]] == ["hf", "sloth", "sloth[SLOTH_X=1]"]
    assert all(r["speed_vs_hf"] == 1.0 for r in report["results"])


def test_liger_patch_is_chosen_per_model_type(monkeypatch):
    _liger_absent(monkeypatch)
    with pytest.raises(SystemSkipped, match="not importable"):
        liger_patch("llama")
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = lambda **kwargs: "patched llama"
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    sys.modules["liger_kernel"].transformers = fake
    assert liger_patch("llama")() == "patched llama"
    with pytest.raises(SystemSkipped, match="no patch for model type 'gemma2'"):
        liger_patch("gemma2")


def test_first_losses_are_checked_against_hf():
    results = [{"system": "sloth", "first_loss": 6.93, "last_loss": 6.0},
               {"system": "liger", "first_loss": 7.10, "last_loss": 6.0},
               {"system": "hf", "first_loss": 6.92, "last_loss": 6.0},
               {"system": "sloth:off", "error": "boom"},
               {"system": "x", "skipped": "not installed"}]  # fmt: skip
    assert check_losses(results, tolerance=0.05) is False
    by = {r["system"]: r for r in results}
    assert by["sloth"]["same_start"] and by["hf"]["first_loss_delta"] == 0
    assert not by["liger"]["same_start"]
    assert by["liger"]["first_loss_delta"] == pytest.approx(0.18)
    assert "same_start" not in by["sloth:off"] and "same_start" not in by["x"]
    assert check_losses(results[:1] + results[2:], tolerance=0.05) is True


def test_last_losses_are_checked_against_hf_where_the_numerics_match():
    """The same start and a different end is a different training (session 23: a wrong
    attention backward, 1.80 against hf's 0.91 after 40 steps; session 24: 1.45): within
    the tolerance plus 5% of hf's own drop or of its last loss, the smaller, or flagged;
    not judged with ``end_fraction=None`` (FP8 weights against hf in bf16)."""
    results = [{"system": "sloth", "first_loss": 12.607, "last_loss": 1.8048},
               {"system": "sloth:off", "first_loss": 12.607, "last_loss": 0.9120},
               {"system": "hf", "first_loss": 12.6066, "last_loss": 0.9139}]  # fmt: skip
    assert check_losses(results, tolerance=0.05) is False
    by = {r["system"]: r for r in results}
    assert all(r["same_start"] for r in results)
    assert not by["sloth"]["same_end"] and by["sloth:off"]["same_end"] and by["hf"]["same_end"]
    assert by["sloth"]["last_loss_delta"] == pytest.approx(0.8909)
    # session 24's wrong run (the kept attention on CUDA, 40 steps): flagged too, where 5%
    # of hf's drop (0.63) would have let it through
    by["sloth"]["last_loss"] = 1.4540
    assert check_losses(results, tolerance=0.05) is False and not by["sloth"]["same_end"]
    # 0.05 + 5% of hf's last loss (0.9139, below its drop of 11.69): 0.0957 apart at most
    by["sloth"]["last_loss"] = 0.9139 + 0.095
    assert check_losses(results, tolerance=0.05) is True
    by["sloth"]["last_loss"] = 0.9139 + 0.097
    assert check_losses(results, tolerance=0.05) is False
    # 10 steps of llama-8b (hf 12.607 to 10.261): 5% of the drop (2.35) is the smaller;
    # the targets' sloth runs ended 0.0003 to 0.012 from hf
    short = [{"system": "sloth", "first_loss": 12.6073, "last_loss": 10.2616},
             {"system": "hf", "first_loss": 12.6066, "last_loss": 10.2576}]  # fmt: skip
    assert check_losses(short, tolerance=0.05) is True
    short[0]["last_loss"] = 10.2576 + 0.17
    assert check_losses(short, tolerance=0.05) is False
    fp8 = [{"system": "sloth", "first_loss": 12.6057, "last_loss": 3.1187},
           {"system": "hf", "first_loss": 12.6066, "last_loss": 0.9144}]  # fmt: skip
    assert check_losses(fp8, tolerance=0.05, end_fraction=None) is True
    assert "same_end" not in fp8[0] and check_losses(fp8, tolerance=0.05) is False


def _report(**extra):
    row = dict(tokens_per_s=1000.0, median_step_s=0.01, peak_gib=None, mfu=None,
               first_loss=6.9, last_loss=6.1, n_base=1, n_lora=1)  # fmt: skip
    return {"shape": "llama-tiny", "seq": 16, "batch": 2, "steps": 2, "warmup": 1,
            "device": "cpu", "quantization": None, "device_name": "x86_64",
            "versions": {"torch": "2.x"}, "loss_tolerance": 0.05, "losses_agree": False,
            "results": [{"system": "sloth", **row, "same_start": False},
                        {"system": "hf", **row, "tokens_per_s": 500.0, "same_start": True},
                        {"system": "liger", "skipped": "liger-kernel is not installed"}],
            **extra}  # fmt: skip


def test_markdown_flags_loss_mismatch_and_lists_skips():
    text = markdown(_report(), "sloth bench train --systems all")
    assert "| 6.9000 (!) |" in text and "not the same training" in text
    assert "| liger | | skipped: liger-kernel is not installed |" in text
    assert "Device: x86_64; torch 2.x." in text
    assert "CUDA graph" not in text
    report = _report()
    report["results"][0]["graph"] = "eager (the step draws random numbers (dropout))"
    assert "`sloth`: CUDA graph eager (the step draws random numbers" in markdown(report, "x")


def test_plot_needs_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailable, match="pip install matplotlib"):
        plot_report(_report(), tmp_path / "out.png")
    # The CLI says so before it measures anything.
    with pytest.raises(SystemExit, match="needs matplotlib"):
        main(["bench", "train", "--shape", "llama-tiny", "--device", "cpu", "--model-dir",
              str(tmp_path / "never"), "--plot", str(tmp_path / "out.png")])  # fmt: skip
    assert not (tmp_path / "never").exists()


def test_plot_panels_and_png(tmp_path):
    titles = [(title, names, values) for title, names, values in panels(_report())]
    assert titles == [("tokens/s", ["sloth", "hf"], [1000.0, 500.0]),
                      ("peak memory (GiB)", ["sloth", "hf"], [None, None])]  # fmt: skip
    context = {
        "kind": "max_context",
        "shape": "llama-tiny",
        "batch": 1,
        "device": "cpu",
        "results": [{"system": "sloth", "max_seq": 64}, {"system": "hf", "error": "x"}],
    }
    assert panels(context) == [("max context (tokens)", ["sloth"], [64])]
    pytest.importorskip("matplotlib")
    for report, name in ((_report(), "train.png"), (context, "context.png")):
        path = plot_report(report, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _targets_report():
    def row(name, speed, memory, target):
        return {"name": name, "workload": name, "target": target, "speed": speed,
                "memory": memory, "checks": {}, "met": False}  # fmt: skip

    return {"device": "cpu", "device_name": "x86_64", "rows": [
        row("bf16", 1.75, 0.54, {"speed": 2.0, "memory": 0.58}),
        row("bf16-40g", 2.53, 1.29, {"speed": 2.4}),  # a budget row: no memory target
        {"name": "moe", "workload": "moe", "target": {"speed": 3.0}, "error": "no GPU"},
        row("grpo-gen", 4.1, None, {"speed": 3.0}),
    ]}  # fmt: skip


def test_a_targets_report_charts_each_row_against_its_target(tmp_path):
    report = _targets_report()
    names = ["bf16", "bf16-40g", "grpo-gen"]  # the failed row is left out
    assert panels(report) == [("speed vs hf (x)", names, [1.75, 2.53, 4.1]),
                              ("memory vs hf (x)", names, [0.54, 1.29, None])]  # fmt: skip
    assert target_marks(report) == [[2.0, 2.4, 3.0], [0.58, None, None]]
    pytest.importorskip("matplotlib")
    saved = tmp_path / "targets.json"
    saved.write_text(json.dumps(report))
    out = tmp_path / "targets.png"
    assert main(["bench", "plot", str(saved), str(out)]) == 0
    first = out.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    # An existing image is kept without --force; a bad report names the file, writes nothing.
    with pytest.raises(SystemExit, match="exists; pass --force"):
        main(["bench", "plot", str(saved), str(out)])
    assert main(["bench", "plot", str(saved), str(out), "--force"]) == 0
    broken = tmp_path / "broken.json"
    broken.write_text('{"results": [')
    with pytest.raises(SystemExit, match="broken.json"):
        main(["bench", "plot", str(broken), str(tmp_path / "b.png")])
    with pytest.raises(SystemExit, match="not a sloth bench report"):
        saved.write_text(json.dumps({"device": "cpu"}))
        main(["bench", "plot", str(saved), str(tmp_path / "c.png")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "targets.json",
                                                          "targets.png"]  # fmt: skip


def test_bench_models_are_built_on_the_gpu_only_where_they_fit(monkeypatch):
    """A model over 90% of the card's memory is filled on the host (slow, but it fits);
    any other on the card; the CPU always holds it."""
    from types import SimpleNamespace

    card = SimpleNamespace(total_memory=80 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    assert train._fits_on("cuda", 57 << 30)
    assert not train._fits_on("cuda:0", 75 << 30)
    assert train._fits_on("cpu", 1 << 50)


def test_make_model_refuses_a_disk_too_small_and_writes_nothing(tmp_path, monkeypatch):
    """A bench model larger than the free space fails before writing, naming the folder and
    both sizes: no half-written staging folder, no model folder."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 0, 512 << 20))
    with pytest.raises(RuntimeError, match=r"0\.5 GiB free.*SLOTH_CACHE") as error:
        train.make_model("llama-tiny", tmp_path / "models" / "tiny", device="cpu")
    assert str(tmp_path / "models") in str(error.value)
    assert list((tmp_path / "models").iterdir()) == []


def test_every_system_gets_the_fused_adamw_its_trainer_defaults_to():
    """The bench's optimizer is the one sloth train and transformers' Trainer run unasked
    (fused AdamW), and its step is AdamW's: the same parameters as the foreach step's."""
    from sloth_core.train.optim import default_adamw

    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)]
    grads = [torch.randn_like(p) for p in start]
    results = []
    for make in (lambda ps: default_adamw(ps, lr=1e-2),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True)):  # fmt: skip
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(params)
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        results.append((optimizer, params))
    (fused, got), (_, want) = results
    assert fused.defaults["fused"] is True
    for g, w, s in zip(got, want, start, strict=True):
        assert not torch.equal(g, s)  # it stepped
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
