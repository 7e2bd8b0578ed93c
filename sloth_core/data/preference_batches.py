"""Deterministic, resumable batches of preference examples (pairs or KTO).

Every batch is a pure function of ``(seed, epoch, index)``, in the same order as the SFT
:class:`~sloth_core.data.batching.Batches` (they share :class:`EpochOrder`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batching import ExampleBatches
from .errors import DataError
from .masking import IGNORE_INDEX
from .preference import KTOExample, PairExample

__all__ = ["PreferenceBatches"]


class PreferenceBatches(ExampleBatches):
    """The training batches of preference ``examples``, addressable by ``(epoch, index)``.

    Every tensor's dim 0 is the example (a rank takes its rows by slicing it), int64 and
    right-padded to the batch's longest sequence. ``labels`` are ``input_ids`` on the
    completion tokens and ``-100`` on the prompt and the padding, not shifted (the model
    shifts; the first position is always ``-100``, as in SFT). ``index`` holds each
    example's position in ``examples`` (for precomputed reference log-probabilities).

    Pairs: ``input_ids``, ``attention_mask``, ``labels`` of shape ``[B, 2, L]``, dim 1
    being prompt + chosen (0) and prompt + rejected (1); ``index`` ``[B]``.

    KTO: ``input_ids``, ``attention_mask``, ``labels`` ``[B, L]``, ``desirable`` ``[B]``
    (bool), ``index`` ``[B]``, and the rows of the KL estimate ``kl_input_ids``,
    ``kl_attention_mask``, ``kl_labels`` ``[B, L']``: row ``i`` is the prompt of example
    ``i`` followed by the completion of the example before it in the batch (the last one
    for the first), as TRL's KTOTrainer pairs them (its ``KL_completion_ids`` are the
    batch's completions shifted by one). A KL row longer than ``max_length`` keeps its first
    ``max_length`` tokens (as trl 1.9.0's collator does).

    Args:
        examples: :class:`PairExample` or :class:`KTOExample` items, all of one kind.
        batch_size: examples per batch.
        pad_token_id: the id padding uses.
        seed: with the epoch, seeds the order of each epoch.
        shuffle: a new order every epoch; otherwise the input order.
        drop_last: leave out a last, smaller batch.
        max_length: the longest KL row (KTO); ``None``: not cut.
    """

    def __init__(
        self,
        examples: Sequence[PairExample] | Sequence[KTOExample],
        *,
        batch_size: int,
        pad_token_id: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        max_length: int | None = None,
    ) -> None:
        kinds = {type(example) for example in examples}
        if len(kinds) > 1 or not kinds <= {PairExample, KTOExample}:
            names = ", ".join(sorted(kind.__name__ for kind in kinds))
            raise DataError(f"examples must be all PairExample or all KTOExample, got {names}")
        super().__init__(examples, batch_size=batch_size, pad_token_id=pad_token_id, seed=seed,
                         shuffle=shuffle, drop_last=drop_last)  # fmt: skip
        self.max_length = max_length

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of ``epoch`` (see the class for the tensors)."""
        chosen = self.indices(epoch, index)
        examples = [self.examples[i] for i in chosen]
        batch = {"index": torch.tensor(chosen, dtype=torch.long)}
        pairs = [ex for ex in examples if isinstance(ex, PairExample)]
        if pairs:
            rows = [
                (ex.prompt, completion) for ex in pairs for completion in (ex.chosen, ex.rejected)
            ]
            padded = self._pad(rows)
            batch.update({key: value.view(len(pairs), 2, -1) for key, value in padded.items()})
            return batch
        kto = [ex for ex in examples if isinstance(ex, KTOExample)]
        batch.update(self._pad([(ex.prompt, ex.completion) for ex in kto]))
        batch["desirable"] = torch.tensor([ex.desirable for ex in kto], dtype=torch.bool)
        # TRL's KTO: the batch's completions shifted by one, the last first.
        shifted = kto[-1:] + kto[:-1]
        kl_rows = [(ex.prompt, other.completion) for ex, other in zip(kto, shifted, strict=True)]
        kl = self._pad(kl_rows, self.max_length)
        batch.update({f"kl_{key}": value for key, value in kl.items()})
        return batch

    def tokens(self, epoch: int, index: int) -> int:
        """Labels other than ``-100`` in batch ``index`` of ``epoch`` (the KL rows aside)."""
        total = 0
        for position in self.indices(epoch, index):
            example = self.examples[position]
            completions: tuple[tuple[int, ...], ...]
            if isinstance(example, PairExample):
                completions = (example.chosen, example.rejected)
            else:
                completions = (example.completion,)
            for completion in completions:
                # The first position is never trained (see the class).
                total += len(completion) - (not example.prompt)
        return total

    def _pad(
        self, rows: list[tuple[tuple[int, ...], tuple[int, ...]]], limit: int | None = None
    ) -> dict[str, torch.Tensor]:
        sequences = [(prompt + completion)[:limit] for prompt, completion in rows]
        longest = max(map(len, sequences))
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for row, ((prompt, _), sequence) in enumerate(zip(rows, sequences, strict=True)):
            ids = torch.tensor(sequence, dtype=torch.long)
            input_ids[row, : len(sequence)] = ids
            attention_mask[row, : len(sequence)] = 1
            start = max(len(prompt), 1)  # no position predicts the first token
            labels[row, start : len(sequence)] = ids[start:]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
