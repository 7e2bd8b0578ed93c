"""GRPO's sampling: seeded, masked as TRL masks, and the model back in training mode."""

from __future__ import annotations

import pytest
import torch

from sloth_core.api import FastLanguageModel
from sloth_core.inference.generation import SamplingOptions
from sloth_core.sdk.stop import stop_token_ids
from sloth_core.train.log_probs import token_log_probs
from sloth_core.train.rollouts import rollout_seed, sample


@pytest.fixture(scope="module")
def policy(tiny_llama):
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(tiny_llama), dtype=torch.float32, max_seq_length=64
    )  # fmt: skip
    model = FastLanguageModel.get_peft_model(
        model, r=4, lora_alpha=8, lora_dropout=0.1, use_gradient_checkpointing=True
    )  # fmt: skip
    return model.train(), tokenizer


def _prompts(tokenizer):
    texts = ["What is 2 plus 3?", "Name a colour:"]
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _sample(model, tokenizer, seed, stops=None):
    ids, mask = _prompts(tokenizer)
    options = SamplingOptions(max_new_tokens=6, temperature=1.0, top_p=0.95)
    stops = stops or stop_token_ids(tokenizer, model)
    return sample(model, tokenizer, ids, mask, num_generations=3, options=options,
                  stop_ids=stops, seed=seed)  # fmt: skip


def test_sampling_is_reproducible_under_its_seed_and_leaves_training_rng_alone(policy):
    model, tokenizer = policy
    torch.manual_seed(11)
    before = torch.random.get_rng_state()
    first = _sample(model, tokenizer, rollout_seed(3, 7, 0))
    assert torch.equal(torch.random.get_rng_state(), before)  # dropout's RNG untouched
    again = _sample(model, tokenizer, rollout_seed(3, 7, 0))
    other = _sample(model, tokenizer, rollout_seed(3, 8, 0))
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert first.texts == again.texts
    assert not torch.equal(first.completion_ids, other.completion_ids)
    assert first.prompt_ids.shape[0] == 6  # 2 prompts x 3 generations, in groups
    assert torch.equal(first.prompt_ids[0], first.prompt_ids[2])


def test_completions_are_masked_through_the_first_stop_token(policy):
    model, tokenizer = policy
    # A random tiny model seldom samples EOS: a fifth of the vocabulary stops it here.
    stops = list(range(3, model.config.vocab_size, 5))
    found_stop = found_clipped = False
    for seed in range(12):  # sampled lengths vary: both kinds of row appear
        out = _sample(model, tokenizer, seed, stops)
        for row, mask, clipped in zip(out.completion_ids, out.completion_mask, out.clipped,
                                      strict=True):  # fmt: skip
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            ends = [i for i, t in enumerate(row[:n].tolist()) if t in stops]
            if clipped:
                found_clipped = True
                assert not ends and n == 6
            else:
                found_stop = True
                assert ends == [n - 1]  # the stop token is the last one that counts
        if found_stop and found_clipped:
            break
    assert found_stop and found_clipped


def test_the_model_trains_again_after_sampling(policy):
    """Back in train mode with checkpointing on, and the completions' log-probs line up."""
    model, tokenizer = policy
    out = _sample(model, tokenizer, 5)
    assert model.training
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ids, mask, labels = out.model_rows()
    token = token_log_probs(model, ids, mask, labels)
    values = out.completion_values(token.values)
    kept = out.completion_values(token.mask)
    assert values.shape == out.completion_ids.shape
    assert torch.equal(kept, out.completion_mask.bool())
    values.sum().backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora" in n)
    model.zero_grad(set_to_none=True)
