"""Packed and padded batches give a tiny model the same per-sequence losses.

The packed rows carry ``position_ids`` restarting per sequence and no ``attention_mask``:
transformers' ``sdpa`` masks derive the block-diagonal mask from the restarts, and so does
sloth's own ``sloth_attention``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sloth_core.data import Batches, tokenize
from sloth_core.testing import init_tiny_model, tiny_config
from sloth_core.testing.datasets import load_tiny_instructions
from sloth_core.testing.tokenizer import build_tokenizer

MAX_LEN = 128


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tokenizer()
    rows = load_tiny_instructions()[::24]  # 11 rows of several kinds
    examples, _ = tokenize(rows, tokenizer, max_seq_length=MAX_LEN)
    model = init_tiny_model(tiny_config("llama", tokenizer=tokenizer, attn_implementation="sdpa"))
    return tokenizer, examples, model


def sequence_losses(model, batches, *, restart_positions=True):
    """{example index: mean cross-entropy over its trained labels}, over one epoch."""
    losses = {}
    for index in range(batches.num_batches()):
        batch = batches.batch(0, index)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if not restart_positions:  # one long sequence per row: the leak this must catch
            inputs["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(
                batch["input_ids"]
            )
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits.float()
        for row, members in enumerate(batches.rows(0, index)):
            start = 0
            for member in members:
                end = start + len(batches.examples[member])
                targets = batch["labels"][row, start + 1 : end]
                losses[member] = F.cross_entropy(logits[row, start : end - 1], targets).item()
                start = end
    return losses


@pytest.mark.parametrize("attention", ["sdpa", "sloth_attention"])
def test_packed_and_padded_losses_are_equal(setup, attention):
    tokenizer, examples, model = setup
    if attention != "sdpa":
        from sloth_core.patches.attention import register_sloth_attention

        attention = register_sloth_attention()
    model.set_attn_implementation(attention)
    try:
        common = dict(max_seq_length=MAX_LEN, pad_token_id=tokenizer.pad_token_id, seed=0)
        padded = Batches(examples, batch_size=4, packing=False, **common)
        packed = Batches(examples, batch_size=2, packing=True, **common)
        packed_rows = [row for i in range(packed.num_batches()) for row in packed.rows(0, i)]
        assert len(packed_rows) <= len(examples) // 2  # several sequences per row
        # Rows shorter than the longest in their batch, so the padding path is exercised too.
        reference = sequence_losses(model, padded)
        losses = sequence_losses(model, packed)
        assert losses.keys() == reference.keys() == set(range(len(examples)))
        for member, loss in reference.items():
            assert losses[member] == pytest.approx(loss, rel=1e-4, abs=1e-5), member
        leaked = sequence_losses(model, packed, restart_positions=False)
        assert any(abs(leaked[m] - reference[m]) > 1e-3 for m in reference)
    finally:
        model.set_attn_implementation("sdpa")
