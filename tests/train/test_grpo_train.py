"""``sloth train --method grpo`` end to end: it learns, resumes, stops on a bad reward."""

from __future__ import annotations

import json
import os

import pytest
from _killing import first_rows, kill_and_resume, sloth_train

from sloth_core.testing.datasets import prompt_dataset
from sloth_core.train import TrainConfig, train
from sloth_core.train.checkpoint import list_checkpoints
from sloth_core.train.config import ConfigError
from sloth_core.train.metrics import read_metrics
from sloth_core.train.rewards import RewardError

SHORT = "sloth_core.train.rewards:length_penalty"
GRPO_METRICS = {"reward", "reward_std", "rewards/length_penalty/mean",
                "rewards/length_penalty/std", "completions/mean_length",
                "completions/clipped_ratio", "clip_ratio/region_mean",
                "frac_reward_zero_std"}  # fmt: skip


def test_the_policy_learns_to_answer_short(demo_base, tmp_path):
    """The bundled prompts, a reward for short answers, 30 steps on the demo model: the
    mean reward rises from about -0.19 (completions of ~11 tokens) to near 0."""
    config = TrainConfig(
        model_name=str(demo_base), dataset=str(prompt_dataset()), method="grpo", reward=[SHORT],
        max_seq_length=128, r=16, lora_alpha=32, per_device_train_batch_size=16,
        num_generations=8, max_completion_length=16, gradient_accumulation_steps=1,
        max_steps=30, learning_rate=1e-2, gradient_checkpointing="off",
        output_dir=str(tmp_path / "out"), save_method="none", report_to="none",
        logging_steps=5, eval_fraction=0.05, cpu_threads=1, seed=0,
    ).validate()  # fmt: skip
    result = train(config, show_progress=False)
    before, after = result.eval_before["eval_reward"], result.eval_after["eval_reward"]
    print(f"grpo: eval reward {before:.4f} -> {after:.4f}, completion length "
          f"{result.eval_before['eval_completions/mean_length']:.1f} -> "
          f"{result.eval_after['eval_completions/mean_length']:.1f}")  # fmt: skip
    assert before < -0.1 and after > -0.03, (before, after)
    steps = [r for r in read_metrics(result.output_dir) if "loss" in r]
    assert GRPO_METRICS <= steps[-1].keys()
    lines = (result.output_dir / "completions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["step"] == 5 and {"prompt", "completion", "reward", "advantage"} <= first.keys()
    assert len(lines) == 6 * 16  # every 5th step's 16 completions


def _options(tiny_llama, data, out, **extra):
    return {
        "model_name": str(tiny_llama), "dataset": str(data), "output_dir": str(out),
        "method": "grpo", "reward": SHORT, "max_seq_length": 64,
        "per_device_train_batch_size": 4, "num_generations": 2,
        "max_completion_length": 6, "gradient_accumulation_steps": 2, "max_steps": 8,
        "learning_rate": 5e-3, "gradient_checkpointing": "off", "save_steps": 2, "seed": 5,
        "lora_dropout": 0.1, "eval_fraction": 0.0, "save_method": "none", "logging_steps": 1,
        "report_to": "none", **extra,
    }  # fmt: skip


def _completions(out) -> dict[int, list[str]]:
    by_step: dict[int, list[str]] = {}
    for line in (out / "completions.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record["step"], []).append(record["completion"])
    return by_step


def test_grpo_killed_mid_way_resumes_to_the_same_completions_and_losses(tiny_llama, tmp_path):
    """SIGKILL after step 5, then --resume: every step samples the completions and gives
    the loss of the uninterrupted run (LoRA dropout on, sampling seeded per step)."""
    data = first_rows(prompt_dataset(), 24, tmp_path / "prompts.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SLOTH_KERNELS": "torch"}
    expected, got = kill_and_resume(
        lambda out: sloth_train(_options(tiny_llama, data, out)), env,
        tmp_path / "whole", tmp_path / "crashed",
    )  # fmt: skip
    for step, record in expected.items():
        assert got[step]["loss"] == pytest.approx(record["loss"], rel=1e-6, abs=1e-7), step
        assert got[step]["reward"] == pytest.approx(record["reward"], abs=1e-7), step
    assert _completions(tmp_path / "crashed") == _completions(tmp_path / "whole")


REWARDS = """
import os
calls = 0

def flaky(prompts, completions, **kwargs):
    global calls
    calls += 1
    if calls > int(os.environ["FAIL_AFTER"]):
        raise ZeroDivisionError("bad reward")
    return [0.0] * len(completions)

def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)
"""


@pytest.mark.parametrize(("function", "fail_after", "message"), [
    ("flaky", "3", r"flaky.*raised.*Reverse|flaky.*prompt"),
    ("nan", "0", r"nan"),
])  # fmt: skip
def test_a_failing_reward_stops_the_run_naming_it_and_keeps_the_checkpoint(
    tiny_llama, tmp_path, monkeypatch, function, fail_after, message
):
    (tmp_path / "my_rewards.py").write_text(REWARDS, encoding="utf-8")
    monkeypatch.setenv("FAIL_AFTER", fail_after)
    data = first_rows(prompt_dataset(), 24, tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    options = _options(tiny_llama, data, out, reward=f"{tmp_path / 'my_rewards.py'}:{function}",
                       save_steps=1, lora_dropout=0.0)  # fmt: skip
    with pytest.raises(RewardError, match=message):
        train(TrainConfig.from_mapping(options).validate(), show_progress=False)
    if function == "flaky":  # two micro-batches a step: the 4th call is step 2's second
        assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    else:
        assert not out.exists()  # failed before its first checkpoint: nothing written


@pytest.mark.parametrize(("options", "message"), [
    (dict(reward=""), "reward"),
    (dict(num_generations=3), "multiple of num_generations"),
    (dict(num_iterations=3), "multiple of num_iterations"),
    (dict(loss_type="sigmoid"), "loss_type"),
    (dict(reward_weights="1,2"), "reward_weights"),
    (dict(packing=True), "packing"),
    (dict(full_finetuning=True, nproc=2), "sharded sampling"),
])  # fmt: skip
def test_grpo_options_are_checked_before_loading(tmp_path, options, message):
    data = first_rows(prompt_dataset(), 4, tmp_path / "prompts.jsonl")
    values = _options("missing", data, tmp_path / "o", **options)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_mapping(values).validate()


def test_the_demo_takes_grpo(tmp_path):
    from sloth_core.cli import build_parser
    from sloth_core.cli.train_cmd import build_config

    argv = ["train", "--demo", "--method", "grpo", "--model-name", "named",
            "--output-dir", str(tmp_path / "o")]  # fmt: skip
    config = build_config(build_parser().parse_args(argv))
    assert config.dataset == str(prompt_dataset()) and config.reward == [SHORT]
    assert config.validate() is config


def test_a_kl_coefficient_compares_with_the_adapters_off_reference(tiny_llama, tmp_path):
    """beta > 0: the KL to the reference is logged, 0 at step 1 (a fresh adapter is the
    reference) and above 0 once the policy has moved."""
    data = first_rows(prompt_dataset(), 8, tmp_path / "prompts.jsonl")
    options = _options(tiny_llama, data, tmp_path / "out", beta=0.05, max_steps=3, save_steps=0,
                       lora_dropout=0.0, learning_rate=5e-2)  # fmt: skip
    result = train(TrainConfig.from_mapping(options).validate(), show_progress=False)
    steps = [r for r in read_metrics(result.output_dir) if "loss" in r]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert steps[-1]["kl"] > 1e-6


def test_num_iterations_reuse_a_batch_of_completions_against_their_old_log_probs(
    tiny_llama, tmp_path
):
    """num_iterations=2: steps 1 and 2 train on the same completions (logged once, at
    step 1), and at step 2 the ratio to the log-probs they were sampled with has moved
    away from 1, so a tight epsilon clips."""
    data = first_rows(prompt_dataset(), 16, tmp_path / "prompts.jsonl")
    options = _options(tiny_llama, data, tmp_path / "out", num_iterations=2, max_steps=4,
                       save_steps=0, lora_dropout=0.0, learning_rate=5e-2,
                       epsilon=0.001)  # fmt: skip
    result = train(TrainConfig.from_mapping(options).validate(), show_progress=False)
    steps = {r["step"]: r for r in read_metrics(result.output_dir) if "loss" in r}
    assert steps[1]["reward"] == steps[2]["reward"] and steps[3]["reward"] == steps[4]["reward"]
    assert steps[1]["clip_ratio/region_mean"] == 0.0  # sampled by the policy it trains
    assert steps[2]["clip_ratio/region_mean"] > 0.0
    assert sorted(_completions(result.output_dir)) == [1, 3]
