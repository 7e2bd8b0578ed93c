"""A sloth model inside TRL's own ``DPOTrainer`` (skipped where trl is not installed).

TRL wraps the model's forward with its fused LM head (``fused_lm_head=True``: the decoder,
then chunked log-probs) and falls through to the forward it found, sloth's patched one,
otherwise. The run must train (finite losses, every adapter moves, TRL's reward metrics
logged); on TRL's own first batch TRL's DPO loss, gradient norm, log-probs and reward
margin must equal sloth's ``--method dpo`` step on the same tokens, and so must TRL's eval
loss; the logits sloth's forward gives TRL's ``prediction_step`` must give TRL's log-probs.

TRL's reference for a model already wrapped by PEFT is a frozen copy of its adapter as
passed in (a "ref" adapter); sloth's is the model with adapters disabled. The two agree
for a fresh adapter (LoRA B = 0), as ``get_peft_model`` makes it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from sloth_core.api import FastLanguageModel
from sloth_core.testing.datasets import preference_dataset
from sloth_core.train.config import TrainConfig
from sloth_core.train.log_probs import IGNORE_INDEX
from sloth_core.train.preference import PreferenceMethod

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

BETA = 0.25  # not TRL's default 0.1, so that a beta ignored on either side shows


def _string_pairs(count: int) -> list[dict[str, str]]:
    """The bundled set's first ``count`` rows with plain-string prompt, chosen, rejected."""
    with preference_dataset("pairs").open(encoding="utf-8") as file:
        rows = [json.loads(line) for line in file]
    pairs = [row for row in rows if all(isinstance(row.get(k), str) for k in ("prompt", "chosen"))]
    return pairs[:count]


def _sloth_batch(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TRL's collated batch (chosen rows, then rejected rows; ``completion_mask``) as
    sloth's pairs ``[B, 2, L]`` with SFT-style unshifted labels."""
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    batch["labels"] = labels
    pairs = {key: torch.stack(value.chunk(2), dim=1) for key, value in batch.items()}
    return {**pairs, "index": torch.arange(pairs["input_ids"].shape[0])}


def _sloth_dpo(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """sloth's ``--method dpo`` step on TRL's batch: its loss, metrics and gradient norm."""
    model.zero_grad(set_to_none=True)
    method = PreferenceMethod(TrainConfig(method="dpo", beta=BETA))
    method.attach(model)
    loss, metrics = method.forward_backward(model, [_sloth_batch(inputs)])
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return loss, {**metrics, "grad_norm": float(torch.linalg.vector_norm(torch.stack(norms)))}


def _lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained adapter's weights (not TRL's frozen "ref" copy)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}


def test_dpo_trainer_trains_a_sloth_model_as_sloth_does(tiny_llama, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(tiny_llama), dtype=torch.float32, max_seq_length=64
    )
    model = FastLanguageModel.get_peft_model(
        model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )

    class Recording(trl.DPOTrainer):
        """TRL's trainer, keeping every batch it computes a loss on."""

        seen: list[dict[str, torch.Tensor]] = []

        def compute_loss(self, model, inputs, *args, **kwargs):
            self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
        per_device_eval_batch_size=2, learning_rate=1e-2, beta=BETA, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
        disable_tqdm=True,
    )  # fmt: skip
    rows = _string_pairs(8)
    trainer = Recording(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(rows[:6]),
    )  # fmt: skip
    # TRL's reference for a PeftModel is a frozen "ref" copy of its adapter as passed in,
    # here fresh (B = 0), so the base model: sloth's reference (adapters disabled). Moving
    # the trained adapter now makes policy != reference from the first step (loss != log 2).
    assert "ref" in model.peft_config
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    before = _lora(model)
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen"} <= logs[0].keys()
    after = _lora(model)
    moved = [n for n in before if "lora_A" in n and not torch.equal(before[n], after[n])]
    assert len(moved) == sum("lora_A" in n for n in before) > 0  # every adapter trained

    # TRL's eval after training. With compute_metrics, its prediction_step also asks the
    # plain forward (sloth's patched one, no labels) for the logits: the chosen rows'
    # log-probs from them must equal TRL's fused ones.
    def chosen_logps(prediction) -> dict[str, float]:
        inputs = trainer.seen[-1]
        logits = torch.as_tensor(prediction.predictions)[:, :-1].float()
        targets = inputs["input_ids"][:, 1:]
        picked = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        sums = (picked * inputs["completion_mask"][:, 1:]).sum(-1)
        return {"logps_from_logits": float(sums.chunk(2)[0].mean())}

    trainer.compute_metrics = chosen_logps
    with pytest.warns(FutureWarning, match="return_outputs"):  # TRL's logits path
        scores = trainer.evaluate(eval_dataset=datasets.Dataset.from_list(rows[6:]))
    assert scores["eval_logps_from_logits"] == pytest.approx(scores["eval_logps/chosen"], rel=1e-5)
    loss, metrics = _sloth_dpo(model.eval(), trainer.seen[-1])
    assert scores["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert scores["eval_logps/chosen"] == pytest.approx(metrics["logps/chosen"], rel=1e-5)

    # sloth's --method dpo on TRL's first batch, from the weights TRL started with.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in before:
                param.copy_(before[name])
    loss, metrics = _sloth_dpo(model.train(), trainer.seen[0])
    first = logs[0]
    assert abs(loss - math.log(2)) > 0.1  # the moved adapter makes the step informative
    assert loss == pytest.approx(first["loss"], rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-4)
    for key in ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] == pytest.approx(first[key], rel=1e-5, abs=1e-6), key
