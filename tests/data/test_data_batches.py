"""split_eval, Batches (padding, packing, determinism, resume) and the packer."""

from __future__ import annotations

import random

import pytest
import torch

from sloth_core.data import Batches, DataError, Example, pack, split_eval

PAD = 2


def make_examples(count=11, seed=0, longest=12):
    rng = random.Random(seed)
    examples = []
    for number in range(count):
        length = rng.randint(2, longest)
        ids = [10 + number] * length  # the id says which example a token came from
        prompt = rng.randint(1, length - 1)
        examples.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return examples


def test_split_eval_is_deterministic_and_disjoint():
    examples = make_examples(20)
    train, evaluation = split_eval(examples, eval_fraction=0.25, seed=3)
    assert len(evaluation) == 5 and len(train) == 15
    assert sorted(map(id, train + evaluation)) == sorted(map(id, examples))
    again = split_eval(examples, eval_fraction=0.25, seed=3)
    assert again == (train, evaluation)
    assert split_eval(examples, eval_fraction=0.25, seed=4)[1] != evaluation
    # Input order kept in both parts.
    assert [examples.index(e) for e in train] == sorted(examples.index(e) for e in train)
    assert split_eval(examples) == (examples, [])
    assert len(split_eval(examples[:3], eval_fraction=0.01)[1]) == 1
    with pytest.raises(DataError, match="eval_fraction"):
        split_eval(examples, eval_fraction=1.0)
    with pytest.raises(DataError, match="leaves none"):
        split_eval(examples[:1], eval_fraction=0.5)


def batches(examples, **kw):
    options = dict(batch_size=3, max_seq_length=16, packing=False, pad_token_id=PAD, seed=7)
    return Batches(examples, **{**options, **kw})


@pytest.mark.parametrize("packing", [False, True])
def test_batches_are_a_function_of_seed_epoch_and_index(packing):
    examples = make_examples(30)
    first, second = batches(examples, packing=packing), batches(examples, packing=packing)
    count = first.num_batches()
    # A resumed run: a fresh instance asked for a later batch first gives the same tensors.
    for epoch in (1, 0):
        for index in reversed(range(count)):
            a, b = first.batch(epoch, index), second.batch(epoch, index)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Each epoch covers every example exactly once, in a new order.
    orders = []
    for epoch in range(2):
        seen = [i for index in range(count) for row in first.rows(epoch, index) for i in row]
        assert sorted(seen) == list(range(len(examples)))
        orders.append(seen)
    assert orders[0] != orders[1]
    assert batches(examples, packing=packing, seed=8).rows(0, 0) != first.rows(0, 0)
    with pytest.raises(IndexError):
        first.batch(0, count)


def test_unshuffled_and_drop_last():
    examples = make_examples(10)
    plain = batches(examples, shuffle=False)
    assert plain.num_batches() == len(plain) == 4
    assert [row for i in range(4) for row in plain.rows(0, i)] == [[i] for i in range(10)]
    assert plain.rows(0, 3) == plain.rows(5, 3)
    assert batches(examples, drop_last=True).num_batches() == 3
    with pytest.raises(DataError, match="no full batch"):
        batches(examples[:2], drop_last=True)


def test_padded_batch():
    examples = make_examples(10)
    b = batches(examples, shuffle=False)
    batch = b.batch(0, 0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    longest = max(len(e) for e in examples[:3])
    for key in batch:
        assert batch[key].shape == (3, longest) and batch[key].dtype == torch.long
    for row, example in enumerate(examples[:3]):
        n = len(example)
        assert batch["input_ids"][row, :n].tolist() == example.input_ids
        assert batch["input_ids"][row, n:].eq(PAD).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        assert batch["labels"][row].tolist() == [-100, *example.labels[1:]] + [-100] * (longest - n)
    assert b.tokens(0, 0) == int((batch["labels"] != -100).sum())


def test_packed_batch_layout():
    examples = make_examples(25)
    b = batches(examples, packing=True, batch_size=2)
    for index in range(b.num_batches()):
        batch = b.batch(0, index)
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        assert batch["input_ids"].shape[1] <= 16
        for row, members in enumerate(b.rows(0, index)):
            start = 0
            for member in members:
                example = examples[member]
                end = start + len(example)
                assert batch["input_ids"][row, start:end].tolist() == example.input_ids
                assert batch["position_ids"][row, start:end].tolist() == list(range(len(example)))
                # Each sequence's first label is masked: nothing predicts across a boundary.
                assert batch["labels"][row, start:end].tolist() == [-100, *example.labels[1:]]
                start = end
            # Trailing padding is one more sequence, positions from 0, never trained.
            tail = batch["input_ids"].shape[1] - start
            assert batch["input_ids"][row, start:].eq(PAD).all()
            assert batch["position_ids"][row, start:].tolist() == list(range(tail))
            assert batch["labels"][row, start:].eq(-100).all()
        assert b.tokens(0, index) == int((batch["labels"] != -100).sum())
    # Packing needs fewer rows than examples, every row within the limit.
    assert b.num_batches() < batches(examples, batch_size=2).num_batches()


def test_pack_is_first_fit_decreasing():
    assert pack([5, 9, 3, 7, 1], 10) == [[1, 4], [3, 2], [0]]
    assert pack([], 10) == []
    # Fresh lengths every run; the seed in each message replays a failure.
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    rows = pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(500)), f"seed={seed}"
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows), f"seed={seed}"
    # First-fit decreasing wastes little: within a quarter of the ideal, plus one row.
    assert len(rows) <= sum(lengths) / 64 * 1.25 + 1, f"seed={seed}"


def test_examples_longer_than_max_seq_length_are_refused():
    with pytest.raises(DataError, match="example 0 has 20 tokens.*max_seq_length=16"):
        batches([Example([1] * 20, [1] * 20)])
    with pytest.raises(DataError, match="no examples"):
        batches([])
    with pytest.raises(ValueError, match="differ in length"):
        Example([1, 2], [1])
