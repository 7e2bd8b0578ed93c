"""The SFT loop: token-count normalised accumulation, schedules, a crash and an exact resume,
the demo, and a sloth model under ``transformers.Trainer``."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from _killing import kill_and_resume, sloth_train

from sloth_core.data import Batches, load_records, tokenize
from sloth_core.train import TrainConfig, accumulate, train
from sloth_core.train.optim import lr_lambda


def _lora_model(path):
    from sloth_core import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16,
                                             use_gradient_checkpointing=False)  # fmt: skip
    with torch.no_grad():  # B = 0 at init would make every LoRA A gradient zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model, tokenizer


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_micro_batches_equal_one_big_batch(tiny_llama, alpaca_file):
    """4 rows of different lengths: 4 micro-batches of 1 == 1 batch of 4 (padded), though
    the rows hold different numbers of label tokens (so a mean of means would differ)."""
    model, tokenizer = _lora_model(tiny_llama)
    examples, _ = tokenize(load_records(alpaca_file), tokenizer, max_seq_length=64)
    by_count = {sum(label != -100 for label in e.labels): e for e in examples}
    assert len(by_count) >= 4, sorted(by_count)
    examples = [by_count[count] for count in sorted(by_count)[:4]]
    options = dict(max_seq_length=64, packing=False, pad_token_id=tokenizer.pad_token_id,
                   seed=0, shuffle=False)  # fmt: skip
    big = Batches(examples, batch_size=4, **options).batch(0, 0)
    small = [Batches(examples, batch_size=1, **options).batch(0, i) for i in range(4)]
    loss_big = accumulate(model, [big], autocast=contextlib.nullcontext)
    grads_big = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_small = accumulate(model, small, autocast=contextlib.nullcontext)
    grads_small = _grads(model)
    assert loss_small == pytest.approx(loss_big, rel=1e-5)
    assert grads_big.keys() == grads_small.keys() and grads_big
    for name, grad in grads_big.items():
        torch.testing.assert_close(grads_small[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The naive mean of per-micro-batch means is a different number here.
    model.zero_grad(set_to_none=True)
    naive = sum(float(model(**b).loss) for b in small) / 4
    assert abs(naive - loss_big) > 1e-3


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules_warm_up_then_follow_their_shape(kind):
    factor = lr_lambda(TrainConfig(lr_scheduler_type=kind, warmup_steps=4), total_steps=20)
    values = [factor(step) for step in range(20)]
    assert values[:4] == sorted(values[:4]) and values[0] > 0 and values[4] == 1.0
    if kind == "constant":
        assert values[4:] == [1.0] * 16
    else:
        assert values[4:] == sorted(values[4:], reverse=True) and values[-1] < 0.1


def _options(tiny_llama, data, out, **extra):
    return {
        "model_name": str(tiny_llama), "dataset": str(data), "output_dir": str(out),
        "max_seq_length": 64, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "max_steps": 8, "learning_rate": 5e-3,
        "warmup_steps": 2, "gradient_checkpointing": "off", "save_steps": 2, "seed": 5,
        "lora_dropout": 0.1, "eval_fraction": 0.1, "save_method": "none", "logging_steps": 1,
        **extra,
    }  # fmt: skip


def test_a_run_killed_mid_way_resumes_to_the_same_losses(tiny_llama, alpaca_file, tmp_path):
    """SIGKILL after step 5 (last checkpoint: step 4), then --resume: every step's loss
    equals the uninterrupted run's (LoRA dropout on, so the RNG state matters too)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    expected, got = kill_and_resume(
        lambda out: sloth_train(_options(tiny_llama, alpaca_file, out)), env,
        tmp_path / "whole", tmp_path / "crashed",
    )  # fmt: skip
    for step, record in expected.items():
        assert got[step]["loss"] == pytest.approx(record["loss"], rel=1e-6, abs=1e-7), step


def test_resume_refuses_other_options(tiny_llama, alpaca_file, tmp_path):
    out = tmp_path / "out"
    options = _options(tiny_llama, alpaca_file, out, max_steps=2, eval_fraction=0.0)
    train(TrainConfig.from_mapping(options), show_progress=False)
    changed = TrainConfig.from_mapping({**options, "r": 4, "resume": True})
    with pytest.raises(ValueError, match="r=4, checkpoint-2 has 16"):
        train(changed, show_progress=False)


def test_a_memory_budget_plans_checkpointing_and_a_short_one_writes_nothing(
    tiny_llama, alpaca_file, tmp_path
):
    """``memory_budget_gib``: the plan is printed and training runs as with every layer
    kept when the budget holds them all; a budget below what a step needs is refused,
    naming the option, before the output directory exists."""
    from rich.console import Console

    options = _options(tiny_llama, alpaca_file, tmp_path / "kept", max_steps=2,
                       eval_fraction=0.0, lora_dropout=0.0)  # fmt: skip
    kept = train(TrainConfig.from_mapping(options), show_progress=False)
    console = Console(width=200, record=True)
    budget = {**options, "gradient_checkpointing": "offload", "memory_budget_gib": 64.0,
              "output_dir": str(tmp_path / "planned")}  # fmt: skip
    planned = train(TrainConfig.from_mapping(budget), show_progress=False, console=console)
    assert "memory plan: 2 kept, 0 recomputed, 0 offloaded of 2 layers" in console.export_text()
    assert planned.losses == pytest.approx(kept.losses, rel=1e-6)
    short = {**budget, "memory_budget_gib": 1e-6, "output_dir": str(tmp_path / "short")}
    with pytest.raises(ValueError, match=r"memory_budget_gib=1e-06: memory budget 0.00 GiB is "
                                         r"below the least this step needs"):  # fmt: skip
        train(TrainConfig.from_mapping(short), show_progress=False)
    assert not (tmp_path / "short").exists()


def _first_step_loss(config) -> float:
    """Summed loss of every packed sequence of step 1's micro-batches, each through the
    plain Hugging Face model alone, over their label tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sloth_core.train.loop import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(config.model_name)
    model = AutoModelForCausalLM.from_pretrained(config.model_name, dtype=torch.float32)
    prepared = prepare_data(config, tokenizer)
    batches = Batches(prepared.train, batch_size=config.per_device_train_batch_size,
                      max_seq_length=config.max_seq_length, packing=True,
                      pad_token_id=tokenizer.pad_token_id, seed=config.seed)  # fmt: skip
    total, count = 0.0, 0
    for index in range(config.gradient_accumulation_steps):
        batch = batches.batch(0, index)
        for row in range(batch["input_ids"].shape[0]):
            positions = batch["position_ids"][row].tolist()
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            for a, b in zip(starts, starts[1:], strict=False):
                labels = batch["labels"][row, a:b]
                if (labels[1:] == -100).all():
                    continue  # padding, or a sequence with nothing to learn
                with torch.no_grad():
                    out = model(input_ids=batch["input_ids"][row : row + 1, a:b])
                logits = out.logits[0, :-1]
                total += float(torch.nn.functional.cross_entropy(
                    logits, labels[1:], ignore_index=-100, reduction="sum"))  # fmt: skip
                count += int((labels[1:] != -100).sum())
    return total / count


def test_packed_training_runs_and_logs_everything(tiny_llama, alpaca_file, tmp_path):
    out = tmp_path / "out"
    config = TrainConfig.from_mapping(
        _options(tiny_llama, alpaca_file, out, packing=True, max_steps=6, save_method="lora",
                 eval_steps=3, lr_scheduler_type="cosine")
    )  # fmt: skip
    result = train(config, show_progress=False)
    assert len(result.losses) == 6
    # The first step's loss is known: adapters start at B = 0, so it is the base model's
    # token-mean loss over the step's packed rows, each packed sequence scored alone.
    assert result.losses[0] == pytest.approx(_first_step_loss(config), rel=1e-5)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 7))
    assert {"lr", "grad_norm", "tokens_per_s", "epoch"} <= train_records[0].keys()
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6]
    assert (out / "final" / "adapter_config.json").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_the_demo_learns_its_task(tmp_path, monkeypatch):
    """`sloth train --demo`, shortened: the eval accuracy rises and the export reloads."""
    from transformers import AutoModelForCausalLM

    from sloth_core.cli import build_parser
    from sloth_core.cli.train_cmd import build_config

    monkeypatch.setenv("SLOTH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = build_parser().parse_args(["train", "--demo", "--output-dir", str(out),
                                      "--num-train-epochs", "2"])  # fmt: skip
    result = train(build_config(args), show_progress=False)
    before, after = result.eval_before, result.eval_after
    assert after["eval_loss"] < before["eval_loss"] - 2.0
    assert after["eval_accuracy"] > before["eval_accuracy"] + 0.2
    merged = AutoModelForCausalLM.from_pretrained(result.final_path)
    assert merged.config.model_type == "llama"


def test_a_sloth_model_trains_under_transformers_trainer(tiny_llama, alpaca_file, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, tokenizer = _lora_model(tiny_llama)
    examples, _ = tokenize(load_records(alpaca_file), tokenizer, max_seq_length=64)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        pad = tokenizer.pad_token_id
        ids = [f["input_ids"] + [pad] * (width - len(f["input_ids"])) for f in features]
        labels = [f["labels"] + [-100] * (width - len(f["labels"])) for f in features]
        mask = [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(mask)}  # fmt: skip

    arguments = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=12,
        learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no",
        gradient_accumulation_steps=2, use_cpu=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=arguments, train_dataset=rows, data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
