"""The DPO bench on the CPU with the tiny shape: sloth and TRL's DPOTrainer, each in its
own process, train the same pairs from the same start."""

from __future__ import annotations

import json
import math
import sys

import pytest

from sloth_core.bench.dpo import make_pairs, markdown, run_dpo_bench


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    # The bench's machinery, not the kernels (interpreted under CI's TRITON_INTERPRET=1).
    monkeypatch.setenv("SLOTH_KERNELS", "torch")


def test_pairs_are_fixed_and_fill_the_sequence():
    pairs = make_pairs(2, 31, vocab=50)
    assert pairs == make_pairs(2, 31, vocab=50)
    assert [len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in pairs] == [31, 31]
    assert [len(p["rejected_ids"]) for p in pairs] == [16, 16]
    assert pairs[0]["chosen_ids"] != pairs[0]["rejected_ids"]


def test_sloth_and_trl_train_the_same_dpo_step(tmp_path):
    pytest.importorskip("trl")
    report = run_dpo_bench("llama-tiny", seq=32, batch=2, steps=2, warmup=1,
                           model_dir=tmp_path / "model", device="cpu")  # fmt: skip
    by = {r["system"]: r for r in report["results"]}
    assert set(by) == {"sloth", "hf"}
    for r in by.values():
        assert r.get("error") is None and not r.get("skipped"), r
        assert r["tokens_per_s"] > 0 and r["peak_gib"] is None
        # The policy is its reference at step 1: every pair's loss is log 2.
        assert r["first_loss"] == pytest.approx(math.log(2), abs=1e-3)
        assert r["last_loss"] < r["first_loss"]  # both trained
    assert abs(by["sloth"]["first_loss"] - by["hf"]["first_loss"]) <= 1e-3
    assert report["kind"] == "dpo" and report["losses_agree"]
    assert by["hf"]["speed_vs_hf"] == 1.0 and by["sloth"]["speed_vs_hf"] > 0
    assert by["sloth"]["n_lora"] == by["hf"]["n_lora"]  # the same adapters
    table = markdown(report, "sloth bench dpo --shape llama-tiny")
    assert "| sloth |" in table and "| hf |" in table and "TRL's DPOTrainer" in table


def test_trl_missing_is_reported_as_skipped(tmp_path, monkeypatch, capsys):
    import sloth_core.bench.dpo as dpo

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50}))
    dpo._worker(["hf", str(tmp_path), "8", "1", "1", "0", "cpu", "2e-4"])
    line = json.loads(capsys.readouterr().out)
    assert line["system"] == "hf" and line["skipped"].startswith("trl and datasets are not")

    calls = []

    def worker(module, args, timeout, env=None):
        calls.append((args[1], env))
        return line

    monkeypatch.setattr(dpo.bench, "run_worker", worker)
    monkeypatch.setattr(dpo.bench, "make_model", lambda shape, path, device: path)
    report = dpo.run_dpo_bench("llama-tiny", model_dir=tmp_path, device="cpu",
                               systems=("sloth", "sloth[SLOTH_X=1]", "hf"))  # fmt: skip
    assert [r["system"] for r in report["results"]] == ["sloth", "sloth[SLOTH_X=1]", "hf"]
    # a system's setting goes to its own process only
    assert calls == [("sloth", {}), ("sloth", {"SLOTH_X": "1"}), ("hf", {})]
    assert "| hf | | skipped: trl and datasets" in markdown(report, "cmd")


def test_unknown_system_is_refused(tmp_path):
    for systems in (("liger",), ("liger[SLOTH_X=1]",), ("sloth[x=1]",)):
        with pytest.raises(ValueError, match="unknown system"):
            run_dpo_bench("llama-tiny", systems=systems, model_dir=tmp_path, device="cpu")


def test_sloth_plans_its_dpo_step_for_a_memory_budget(tmp_path):
    # Planned for the step's largest forward (method.forward_shape), as sloth train plans.
    report = run_dpo_bench("llama-tiny", seq=32, batch=2, steps=1, warmup=0, systems=("sloth",),
                           model_dir=tmp_path / "model", device="cpu", budget_gib=4.0)  # fmt: skip
    assert report["budget_gib"] == 4.0
    (sloth,) = report["results"]
    assert sloth.get("error") is None, sloth
    assert sloth["plan"].startswith("memory plan: ") and "of 4.00 GiB" in sloth["plan"]
    assert sloth["first_loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_the_shared_prompt_step_trains_as_the_rows_apart(tmp_path):
    """``sloth`` (the prompt once) and ``sloth[SLOTH_BENCH_SHARE_PROMPT=0]`` (the rows
    apart) in one run: the same losses step after step, from log 2."""
    report = run_dpo_bench("llama-tiny", seq=32, batch=2, steps=2, warmup=1,
                           systems=("sloth", "sloth[SLOTH_BENCH_SHARE_PROMPT=0]"),
                           model_dir=tmp_path / "model", device="cpu")  # fmt: skip
    shared, apart = report["results"]
    for r in (shared, apart):
        assert r.get("error") is None and not r.get("skipped"), r
        assert r["first_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert apart["system"] == "sloth[SLOTH_BENCH_SHARE_PROMPT=0]"
    assert shared["last_loss"] < shared["first_loss"]
    assert shared["last_loss"] == pytest.approx(apart["last_loss"], rel=1e-3)


@pytest.mark.parametrize("quantization", ["fp8", "nf4"])
def test_quantized_base_weights_for_both_systems(tmp_path, quantization):
    """``--quantization``: sloth's step on the base weights sloth train would quantize
    (its linear layers replaced), TRL's through BitsAndBytesConfig (nf4) or in bf16
    (fp8); both from log 2, and the report says which."""
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    from sloth_core.bench import dpo
    from sloth_core.bench.train import make_model

    model_dir = make_model("llama-tiny", tmp_path / "model", device="cpu")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    pairs = make_pairs(2, 32, vocab=vocab)
    model, *_ = dpo.sloth_dpo_step(model_dir, pairs, seq=32, device="cpu",
                                   quantization=quantization)  # fmt: skip
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Fp8Linear" if quantization == "fp8" else "Linear4bit") in kinds, kinds
    del model
    report = run_dpo_bench("llama-tiny", seq=32, batch=2, steps=1, warmup=0, device="cpu",
                           model_dir=model_dir, quantization=quantization)  # fmt: skip
    assert report["quantization"] == quantization
    for r in report["results"]:
        assert r.get("error") is None and not r.get("skipped"), r
        assert r["first_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert quantization in markdown(report, "cmd").splitlines()[0]
