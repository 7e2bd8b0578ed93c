"""Deterministic, resumable batches: the eval split, padding, and padding-free packing.

Every batch is a pure function of ``(seed, epoch, index)``, so a run resumed from a
checkpoint at step ``index`` of ``epoch`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from .errors import DataError
from .tokenizing import IGNORE_INDEX, Example

__all__ = ["Batches", "EpochOrder", "pack", "split_eval"]


def _rng(*parts: object) -> random.Random:
    # A string seed is hashed with SHA-512, the same in every process (unlike hash()).
    return random.Random(":".join(["sloth-data", *map(str, parts)]))


def split_eval(
    examples: Sequence[Example], *, eval_fraction: float = 0.0, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into ``(train, eval)``, deterministically from ``seed``.

    ``round(eval_fraction * len(examples))`` examples (at least one when the fraction is
    positive) chosen at random go to eval; both lists keep the input order.

    Raises:
        DataError: ``eval_fraction`` outside ``[0, 1)``, or an eval split that would leave
            no training examples.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return list(examples), []
    count = max(1, round(eval_fraction * len(examples)))
    if count >= len(examples):
        raise DataError(
            f"eval_fraction={eval_fraction} of {len(examples)} examples leaves none to train on"
        )
    chosen = set(_rng("eval", seed).sample(range(len(examples)), count))
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    evaluation = [ex for i, ex in enumerate(examples) if i in chosen]
    return train, evaluation


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` grouped into rows of at most ``capacity``.

    Longest first (ties by index), each into the first row with room, so the result
    depends only on the lengths. A segment tree over the rows' free space finds that row
    in ``O(log n)``: a linear scan would be quadratic on large data sets.
    """
    count = len(lengths)
    if count == 0:
        return []
    size = 1 << max(0, (count - 1).bit_length())
    free = [0] * (2 * size)
    free[size : size + count] = [capacity] * count
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    rows: list[list[int]] = []
    for index in sorted(range(count), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > capacity:
            raise DataError(f"example {index} has {length} tokens, more than {capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


class EpochOrder:
    """Which of ``count`` items each batch of an epoch holds, from ``(seed, epoch, index)``.

    Every epoch is a new permutation of the items (with ``shuffle``; the input order
    otherwise) cut into batches of ``batch_size``; the last, smaller one is left out with
    ``drop_last``. ``what`` names the items in errors.
    """

    def __init__(
        self,
        count: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        what: str = "examples",
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if drop_last and count < batch_size:
            raise DataError(f"{count} {what} make no full batch of {batch_size} with drop_last")
        self.count = count
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._cached: tuple[int, list[int]] | None = None

    def num_batches(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.count, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def batch(self, epoch: int, index: int) -> list[int]:
        """The items of batch ``index`` of ``epoch``, in order."""
        if not 0 <= index < self.num_batches():
            raise IndexError(f"batch {index} of an epoch of {self.num_batches()} batches")
        order = self._epoch(epoch)
        return order[index * self.batch_size : (index + 1) * self.batch_size]

    def _epoch(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            order = list(range(self.count))
            if self.shuffle:
                _rng("epoch", self.seed, epoch).shuffle(order)
            self._cached = (epoch, order)
        return self._cached[1]


class ExampleBatches:
    """Batches of ``examples`` in :class:`EpochOrder`'s order, addressable by ``(epoch,
    index)``: what the preference and prompt batches share; each builds its own tensors
    in ``batch``. ``what`` (a class attribute) names the items in errors."""

    what = "examples"

    def __init__(
        self,
        examples: Sequence[Any],
        *,
        batch_size: int,
        pad_token_id: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        what = self.what
        if not examples:
            raise DataError(f"no {what} to batch")
        self.examples = list(examples)
        self.pad_token_id = pad_token_id
        self._order = EpochOrder(len(self.examples), batch_size, seed=seed, shuffle=shuffle,
                                 drop_last=drop_last, what=what)  # fmt: skip

    def num_batches(self) -> int:
        """Batches per epoch."""
        return self._order.num_batches()

    def __len__(self) -> int:
        return self.num_batches()

    def indices(self, epoch: int, index: int) -> list[int]:
        """The positions in ``examples`` of batch ``index`` of ``epoch``, in order."""
        return self._order.batch(epoch, index)


class Batches:
    """The training batches of ``examples``, addressable by ``(epoch, index)``.

    Unpacked, each batch holds ``batch_size`` examples right-padded to the longest:
    ``input_ids``, ``labels`` (``-100`` on padding) and ``attention_mask``. Packed, the
    examples are first grouped into rows of at most ``max_seq_length`` tokens (see
    :func:`pack`, done once, so every epoch has the same batches in a new order) and each
    batch holds ``batch_size`` rows: ``input_ids``, ``labels`` and ``position_ids`` that
    restart at 0 for every sequence, with no ``attention_mask`` (attention keys the
    sequence boundaries on the restarts). The first label of every sequence is ``-100``,
    so no sequence's last token learns to predict the next one's first. Rows shorter than
    the batch's longest end with pad tokens as one more sequence, labels ``-100``.

    Args:
        examples: tokenised examples, none longer than ``max_seq_length``.
        batch_size: examples (unpacked) or packed rows per batch.
        max_seq_length: the longest example, and the length of a packed row.
        packing: pack several examples into each row.
        pad_token_id: the id padding uses.
        seed: with the epoch, seeds the order of each epoch.
        shuffle: a new order every epoch; otherwise the input order (unpacked) or the
            packing order (packed, longest rows first).
        drop_last: leave out a last, smaller batch.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        batch_size: int,
        max_seq_length: int,
        packing: bool,
        pad_token_id: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if not examples:
            raise DataError("no examples to batch")
        for number, example in enumerate(examples):
            if len(example) > max_seq_length:
                raise DataError(
                    f"example {number} has {len(example)} tokens, more than "
                    f"max_seq_length={max_seq_length}"
                )
        self.examples = list(examples)
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.packing = packing
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        if packing:
            self._rows = pack([len(ex) for ex in self.examples], max_seq_length)
        else:
            self._rows = [[index] for index in range(len(self.examples))]
        self._order = EpochOrder(
            len(self._rows),
            batch_size,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
            what="packed rows" if packing else "examples",
        )

    def num_batches(self) -> int:
        """Batches per epoch."""
        return self._order.num_batches()

    def __len__(self) -> int:
        return self.num_batches()

    def rows(self, epoch: int, index: int) -> list[list[int]]:
        """The example indices in each row of batch ``index`` of ``epoch``, in order."""
        return [list(self._rows[row]) for row in self._order.batch(epoch, index)]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of ``epoch``: int64 tensors ``[rows, longest]`` (see the class)."""
        rows = self.rows(epoch, index)
        if self.packing:
            return self._packed(rows)
        return self._padded([self.examples[row[0]] for row in rows])

    def tokens(self, epoch: int, index: int) -> int:
        """Labels other than ``-100`` in batch ``index`` of ``epoch``: the loss's terms."""
        total = 0
        for row in self.rows(epoch, index):
            for position in row:
                labels = self.examples[position].labels
                # The first label is masked in every batch (see the class).
                total += sum(label != IGNORE_INDEX for label in labels[1:])
        return total

    def _padded(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        longest = max(len(ex) for ex in examples)
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example)
            input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[row, 1:length] = torch.tensor(example.labels[1:], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def _packed(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        lengths = [sum(len(self.examples[i]) for i in row) for row in rows]
        longest = max(lengths)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.empty((len(rows), longest), dtype=torch.long)
        for row, members in enumerate(rows):
            start = 0
            for member in members:
                example = self.examples[member]
                end = start + len(example)
                input_ids[row, start:end] = torch.tensor(example.input_ids, dtype=torch.long)
                labels[row, start + 1 : end] = torch.tensor(example.labels[1:], dtype=torch.long)
                position_ids[row, start:end] = torch.arange(len(example))
                start = end
            # Padding is a sequence of its own: attention never mixes it into a real one.
            position_ids[row, start:] = torch.arange(longest - start)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
