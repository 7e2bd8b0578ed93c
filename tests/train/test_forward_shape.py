"""``method.forward_shape``: the largest forward a method's micro-batches make on the data
at hand, which ``sloth train`` plans its memory for (``gradient_checkpointing = auto``)."""

from __future__ import annotations

import random

import pytest

from sloth_core.data import Example, PairExample, PreferenceBatches
from sloth_core.patches.shared_prompt import pack_pairs
from sloth_core.train import TrainConfig, preference
from sloth_core.train.methods import method_for


def _config(**options) -> TrainConfig:
    base = dict(model_name="unused", dataset="unused", output_dir="unused",
                per_device_train_batch_size=3, max_seq_length=64)  # fmt: skip
    return TrainConfig(**{**base, **options})


def _sft_examples(lengths: list[int]) -> list[Example]:
    return [Example(list(range(n)), [-100] + list(range(1, n))) for n in lengths]


def test_sft_plans_for_its_longest_example_or_full_packed_rows():
    examples = _sft_examples([5, 17, 9])
    assert method_for(_config(packing=False)).forward_shape(examples, None) == (3, 17)
    assert method_for(_config(packing=True)).forward_shape(examples, None) == (3, 64)
    assert method_for(_config(packing=False)).forward_shape([], None) == (3, 64)


def _pairs(seed: int, count: int = 9) -> list[PairExample]:
    """Pairs of random lengths whose prompts never occur in a completion's first token."""
    rng = random.Random(seed)

    def ids(n: int, low: int) -> tuple[int, ...]:
        return tuple(rng.randrange(low, low + 50) for _ in range(n))

    return [PairExample(ids(rng.randint(1, 12), 10), ids(rng.randint(1, 9), 100),
                        ids(rng.randint(1, 9), 200)) for _ in range(count)]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("share", [True, False])
def test_preference_shape_bounds_every_batch_and_is_met_by_the_longest(seed, share,
                                                                       monkeypatch):  # fmt: skip
    """Shared: the width bounds every packed row ``pack_pairs`` makes of a batch (one batch
    holding the widest pair meets it); apart: two rows a pair, as wide as the batch's
    longest side."""
    monkeypatch.setattr(preference, "policy_shares_prompt", lambda model: share)
    method = method_for(_config(method="dpo", share_prompt=share))
    examples = _pairs(seed)
    rows, width = method.forward_shape(examples, None)
    assert rows == (3 if share else 6)
    batches = PreferenceBatches(examples, batch_size=3, pad_token_id=0, seed=seed)
    widths = []
    for index in range(batches.num_batches()):
        batch = batches.batch(0, index)
        if share:
            ids, _, _, _ = pack_pairs(batch["input_ids"], batch["attention_mask"],
                                      batch["labels"])  # fmt: skip
        else:
            ids = batch["input_ids"].flatten(0, 1)
        assert ids.shape[0] <= rows
        widths.append(ids.shape[-1])
    assert max(widths) == width


def test_kto_plans_for_full_rows(monkeypatch):
    monkeypatch.setattr(preference, "policy_shares_prompt", lambda model: True)
    method = method_for(_config(method="kto"))
    assert method.forward_shape([], None) == (6, 64)
