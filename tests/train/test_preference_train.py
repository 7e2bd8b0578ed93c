"""``sloth train --method dpo|orpo|simpo|kto`` end to end: it learns, resumes, refuses."""

from __future__ import annotations

import json
import os

import pytest
from _killing import first_rows, kill_and_resume, sloth_train

from sloth_core.data import DataError
from sloth_core.testing.datasets import preference_dataset
from sloth_core.train import TrainConfig, train
from sloth_core.train.config import ConfigError
from sloth_core.train.metrics import read_metrics

TRL_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected"}  # fmt: skip


@pytest.mark.parametrize(
    ("method", "beta"), [("dpo", 0.5), ("orpo", 0.5), ("simpo", 2.0), ("kto", 0.5)]
)
def test_the_policy_learns_to_prefer_the_chosen_completions(demo_base, tmp_path, method, beta):
    """32 bundled rows (strings, conversations, an implicit prompt), 20 steps on the demo
    model: the reward accuracy on them goes from chance to above 0.9."""
    kind = "kto" if method == "kto" else "pairs"
    data = first_rows(preference_dataset(kind), 32, tmp_path / "data.jsonl")
    config = TrainConfig(
        model_name=str(demo_base), dataset=str(data), eval_dataset=str(data), method=method,
        beta=beta, max_seq_length=128, r=16, lora_alpha=32, per_device_train_batch_size=8,
        gradient_accumulation_steps=1, max_steps=20, learning_rate=3e-3,
        gradient_checkpointing="off", output_dir=str(tmp_path / "out"), save_method="none",
        report_to="none", logging_steps=5, cpu_threads=1, seed=0,
    ).validate()  # fmt: skip
    result = train(config, show_progress=False)
    before, after = result.eval_before, result.eval_after
    print(f"{method}: reward accuracy {before['eval_rewards/accuracies']:.3f} -> "
          f"{after['eval_rewards/accuracies']:.3f}, eval loss {before['eval_loss']:.4f} -> "
          f"{after['eval_loss']:.4f}")  # fmt: skip
    assert before["eval_rewards/accuracies"] < 0.7
    assert after["eval_rewards/accuracies"] > 0.9, after
    assert after["eval_loss"] < before["eval_loss"]
    steps = [r for r in read_metrics(result.output_dir) if "loss" in r]
    assert steps and TRL_METRICS <= steps[-1].keys()
    assert steps[-1]["rewards/accuracies"] > 0.9
    if method == "kto":
        assert "kl" in steps[-1]
    if method == "orpo":
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= steps[-1].keys()


def _options(tiny_llama, data, out, **extra):
    return {
        "model_name": str(tiny_llama), "dataset": str(data), "output_dir": str(out),
        "method": "dpo", "beta": 0.3, "max_seq_length": 64, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "max_steps": 8, "learning_rate": 5e-3,
        "warmup_steps": 2, "gradient_checkpointing": "off", "save_steps": 2, "seed": 5,
        "lora_dropout": 0.1, "eval_fraction": 0.1, "save_method": "none", "logging_steps": 1,
        "report_to": "none", **extra,
    }  # fmt: skip


def test_dpo_killed_mid_way_resumes_to_the_same_losses(tiny_llama, tmp_path):
    """SIGKILL after step 5 (last checkpoint: step 4), then --resume: every step's DPO
    loss and reward margin equal the uninterrupted run's (LoRA dropout on)."""
    data = first_rows(preference_dataset("pairs"), 40, tmp_path / "pairs.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SLOTH_KERNELS": "torch"}
    expected, got = kill_and_resume(
        lambda out: sloth_train(_options(tiny_llama, data, out)), env,
        tmp_path / "whole", tmp_path / "crashed",
    )  # fmt: skip
    for step, record in expected.items():
        assert got[step]["loss"] == pytest.approx(record["loss"], rel=1e-6, abs=1e-7), step
        margins = got[step]["rewards/margins"]
        assert margins == pytest.approx(record["rewards/margins"], rel=1e-5, abs=1e-7), step


def test_resume_refuses_another_method_or_beta(tiny_llama, tmp_path):
    data = first_rows(preference_dataset("pairs"), 12, tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    train(TrainConfig(**_options(tiny_llama, data, out, max_steps=2, lora_dropout=0.0)),
          show_progress=False)  # fmt: skip
    again = TrainConfig(**_options(tiny_llama, data, out, max_steps=4, beta=0.5), resume=True)
    with pytest.raises(ConfigError, match=r"beta=0\.5"):
        train(again, show_progress=False)


def test_full_finetuning_dpo_keeps_a_frozen_reference(tiny_llama, tmp_path):
    """Without adapters the reference is a frozen copy: it does not move with the policy,
    so the rewards move away from 0 as training goes."""
    data = first_rows(preference_dataset("pairs"), 12, tmp_path / "pairs.jsonl")
    config = TrainConfig(**_options(tiny_llama, data, tmp_path / "out", max_steps=4,
                                    lora_dropout=0.0, save_steps=0, eval_fraction=0.0,
                                    learning_rate=1e-3),
                         full_finetuning=True)  # fmt: skip
    result = train(config.validate(), show_progress=False)
    steps = [r for r in read_metrics(result.output_dir) if "loss" in r]
    assert abs(steps[0]["rewards/margins"]) < 1e-6  # step 1: policy == reference
    assert abs(steps[-1]["rewards/margins"]) > 1e-4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(method="dpo", packing=True), "packing"),
        (dict(method="orpo", precompute_ref_log_probs=True), "orpo has no reference model"),
        (dict(method="kto", loss_type="ipo"), "loss_type"),
        (dict(method="dpo", loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(method="ppo"), "method"),
        (dict(method="dpo", data_format="alpaca"), "data_format"),
    ],
)
def test_preference_options_are_checked_before_loading(tmp_path, options, message):
    data = first_rows(preference_dataset("pairs"), 4, tmp_path / "pairs.jsonl")
    config = TrainConfig(model_name="missing", dataset=str(data), output_dir=str(tmp_path / "o"),
                         **options)  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_a_bad_row_names_the_file_and_row_and_writes_nothing(tiny_llama, tmp_path):
    rows = [{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
            {"prompt": "3+3=", "chosen": " 6"}]  # fmt: skip
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad\.jsonl.*row 2.*rejected"):
        train(TrainConfig(**_options(tiny_llama, data, out)), show_progress=False)
    assert not out.exists()


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_the_demo_takes_a_preference_method(method, tmp_path):
    """`sloth train --demo --method dpo` trains on the bundled preference set (the SFT
    demo's alpaca format is dropped, not refused)."""
    from sloth_core.cli import build_parser
    from sloth_core.cli.train_cmd import build_config

    argv = ["train", "--demo", "--method", method, "--model-name", "named",
            "--output-dir", str(tmp_path / "o")]  # fmt: skip
    config = build_config(build_parser().parse_args(argv))
    kind = "kto" if method == "kto" else "pairs"
    assert config.method == method and config.dataset == str(preference_dataset(kind))
    assert config.data_format == "" and config.model_name == "named"
    assert config.validate() is config  # the demo's options are valid for the method
