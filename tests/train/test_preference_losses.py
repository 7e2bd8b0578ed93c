"""Each preference loss, on a tiny LoRA model, against the paper's formula written out here.

The trainer's path (``PreferenceMethod``: the chunked ``token_log_probs`` op, the losses
module, the reference as the policy without adapters) is compared with an independent one:
the full logits, ``log_softmax``, and each formula as its paper writes it, in fp32. Loss
and every LoRA gradient agree to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sloth_core.api import FastLanguageModel
from sloth_core.train.config import TrainConfig
from sloth_core.train.preference import PreferenceMethod

B, PROMPT, COMPLETION = 3, (3, 5, 2), ((2, 4), (3, 1), (5, 3))  # pairs; chosen/rejected lengths


@pytest.fixture(scope="module")
def lora_model(tiny_llama):
    model, _ = FastLanguageModel.from_pretrained(
        str(tiny_llama), dtype=torch.float32, max_seq_length=64
    )
    model = FastLanguageModel.get_peft_model(
        model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        use_gradient_checkpointing=False,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters that change the model, so policy and reference differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.train()


def _rows(prompt: int, completion: int, width: int, vocab: int, generator):
    ids = torch.randint(3, vocab, (width,), generator=generator)
    used = prompt + completion
    mask = (torch.arange(width) < used).long()
    labels = torch.where((torch.arange(width) >= prompt) & (mask == 1), ids, -100)
    return ids * mask, mask, labels


def pair_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(p + max(c) for p, c in zip(PROMPT, COMPLETION, strict=True))
    ids, mask, labels = (torch.zeros(B, 2, width, dtype=torch.long) for _ in range(3))
    for i, (prompt, lengths) in enumerate(zip(PROMPT, COMPLETION, strict=True)):
        shared = torch.randint(3, vocab, (prompt,), generator=generator)
        for side, length in enumerate(lengths):
            row = _rows(prompt, length, width, vocab, generator)
            row[0][:prompt] = shared  # the two completions share the prompt
            ids[i, side], mask[i, side], labels[i, side] = row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(B)}


def kto_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    pairs = pair_batch(vocab, seed)
    rows = {k: pairs[k][:, 0] for k in ("input_ids", "attention_mask", "labels")}
    # KL rows: prompt i with another example's completion (any mismatched pairing will do).
    kl = {k: pairs[k][:, 1].roll(1, 0) for k in ("input_ids", "attention_mask", "labels")}
    extra = {"desirable": torch.tensor([True, False, True]), "index": torch.arange(B)}
    return {**rows, **{f"kl_{k}": v for k, v in kl.items()}, **extra}


def full_logps(model, ids, mask, labels):
    """Summed and mean label log-probs from the full logits (the independent path)."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    targets = labels[:, 1:]
    keep = targets != -100
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])
    sums = (logp.squeeze(-1) * keep).sum(-1)
    return sums, sums / keep.sum(-1)


def paper_loss(model, batch, config: TrainConfig) -> torch.Tensor:
    beta = config.kl_beta
    if config.method == "kto":
        rows = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        kl_rows = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
        policy = full_logps(model, *rows)[0]
        with torch.no_grad():
            kl_policy = full_logps(model, *kl_rows)[0]
            with model.disable_adapter():
                ref, kl_ref = full_logps(model, *rows)[0], full_logps(model, *kl_rows)[0]
        z = (kl_policy - kl_ref).mean().clamp(min=0)
        r = policy - ref
        want = batch["desirable"]
        losses = torch.where(
            want,
            config.desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
            config.undesirable_weight * (1 - torch.sigmoid(beta * (z - r))),
        )
        return losses.mean()
    rows = [batch[k].flatten(0, 1) for k in ("input_ids", "attention_mask", "labels")]
    sums, means = full_logps(model, *rows)
    chosen_sum, rejected_sum = sums.view(B, 2).unbind(1)
    chosen_mean, rejected_mean = means.view(B, 2).unbind(1)
    smoothing = config.label_smoothing
    if config.method == "dpo":
        with torch.no_grad(), model.disable_adapter():
            ref_sums, ref_means = full_logps(model, *rows)
        if config.loss_kind == "ipo":  # on length-averaged log-probs, as TRL
            pi, ref = chosen_mean - rejected_mean, ref_means.view(B, 2)
        else:
            pi, ref = chosen_sum - rejected_sum, ref_sums.view(B, 2)
        h = pi - (ref[:, 0] - ref[:, 1])
        if config.loss_kind == "sigmoid":
            losses = -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
        elif config.loss_kind == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        else:
            losses = torch.relu(1 - beta * h)
        return losses.mean()
    if config.method == "orpo":
        tokens = (batch["labels"][:, 0, 1:] != -100).sum()
        nll = -chosen_sum.sum() / tokens

        def odds(a):  # log(p / (1 - p)) with p = exp(a), the paper's odds
            return a - torch.log(1 - torch.exp(a))

        ratio = F.logsigmoid(odds(chosen_mean) - odds(rejected_mean))
        return nll - beta * ratio.mean()
    margin = beta * (chosen_mean - rejected_mean) - config.simpo_gamma  # SimPO
    return (-(1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)).mean()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Of the whole tensor (fp32 sums in another order differ elementwise near zero)."""
    return float((ours - theirs).norm() / theirs.norm().clamp(min=1e-30))


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


CASES = [
    dict(method="dpo", beta=0.3),
    dict(method="dpo", beta=0.2, label_smoothing=0.15),
    dict(method="dpo", beta=0.4, loss_type="ipo"),
    dict(method="dpo", beta=0.7, loss_type="hinge"),
    dict(method="orpo", beta=0.25),
    dict(method="simpo", beta=2.5, simpo_gamma=0.3),
    dict(method="simpo", beta=2.0, simpo_gamma=0.8, label_smoothing=0.1),
    dict(method="kto", beta=0.3),
    dict(method="kto", beta=0.5, desirable_weight=1.3, undesirable_weight=0.6),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_loss_and_gradients_equal_the_papers_formula(lora_model, options):
    config = TrainConfig(**options)
    vocab = lora_model.config.vocab_size
    batch = (kto_batch if config.method == "kto" else pair_batch)(vocab)
    method = PreferenceMethod(config)
    method.attach(lora_model)
    loss, metrics = method.forward_backward(lora_model, [batch])
    ours = _grads(lora_model)
    expected = paper_loss(lora_model, batch, config)
    expected.backward()
    theirs = _grads(lora_model)
    assert loss == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    assert ours.keys() == theirs.keys() and any("lora" in name for name in ours)
    for name, grad in theirs.items():
        assert grad.norm() > 0, name  # the test would see a wrong gradient
        assert relative_error(ours[name], grad) < 1e-5, name
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= metrics.keys()


def test_accumulated_micro_batches_equal_one_batch(lora_model):
    """Two micro-batches give the loss and gradients of one batch holding both."""
    config = TrainConfig(method="dpo", beta=0.3)
    vocab = lora_model.config.vocab_size
    first, second = pair_batch(vocab, seed=1), pair_batch(vocab, seed=2)
    whole = {k: torch.cat([first[k], second[k]]) for k in first}
    method = PreferenceMethod(config)
    method.attach(lora_model)
    split_loss, split_metrics = method.forward_backward(lora_model, [first, second])
    split = _grads(lora_model)
    whole_loss, whole_metrics = method.forward_backward(lora_model, [whole])
    joined = _grads(lora_model)
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    for name, grad in joined.items():
        assert relative_error(split[name], grad) < 1e-5, name
    for key, value in whole_metrics.items():
        assert split_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_precomputed_reference_equals_the_live_one(lora_model):
    config = TrainConfig(method="dpo", beta=0.3, precompute_ref_log_probs=True)
    batch = pair_batch(lora_model.config.vocab_size, seed=3)

    class OneBatch:
        def num_batches(self):
            return 1

        def batch(self, epoch, index):
            return batch

    live = PreferenceMethod(config)
    live.attach(lora_model)
    live_loss, _ = live.forward_backward(lora_model, [batch])
    _grads(lora_model)
    stored = PreferenceMethod(config)
    stored.attach(lora_model)
    stored.precompute(OneBatch(), B, torch.no_grad)
    assert stored.table is not None and stored.table.sums.shape == (B, 2)
    stored_loss, _ = stored.forward_backward(lora_model, [batch])
    _grads(lora_model)
    assert stored_loss == pytest.approx(live_loss, rel=1e-6)


def test_moe_models_add_the_router_loss(tmp_path):
    """On an MoE model (router logits on), DPO's loss is the paper's plus the coefficient
    times the load-balancing loss of the policy's forward, gradients included."""
    from sloth_core.testing.models import tiny_model

    path = tiny_model("qwen3_moe", tmp_path / "moe", output_router_logits=True,
                      router_aux_loss_coef=0.3)  # fmt: skip
    model, _ = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(
        model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_experts=True,
        use_gradient_checkpointing=False,
    )  # fmt: skip
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.train()
    config = TrainConfig(method="dpo", beta=0.3)
    batch = pair_batch(model.config.vocab_size, seed=4)
    method = PreferenceMethod(config)
    method.attach(model)
    loss, _ = method.forward_backward(model, [batch])
    ours = _grads(model)
    rows = [batch[k].flatten(0, 1) for k in ("input_ids", "attention_mask", "labels")]
    aux = model(input_ids=rows[0], attention_mask=rows[1]).aux_loss
    assert aux is not None and float(aux) > 0
    expected = paper_loss(model, batch, config) + 0.3 * aux
    expected.backward()
    theirs = _grads(model)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    for name, grad in theirs.items():
        assert relative_error(ours[name], grad) < 1e-5, name
