"""The training methods: siblings that share a run's phases and differ in data and step.

A method tokenizes its data files, batches the examples, attaches to the loaded model
(the reference model of DPO and KTO), forwards and backwards one optimizer step's
micro-batches, and evaluates. ``sft`` is this module's; the preference methods are
:class:`~.preference.PreferenceMethod`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch

from .config import TrainConfig
from .step import accumulate, evaluate


class Method(Protocol):
    """What the loop asks of a method (``sloth train --method``).

    The loop sets ``step`` (optimizer steps done) before each step, ``rank`` and, on rank
    0, ``output_dir`` (where a method may log beside ``metrics.jsonl``); a micro-batch's
    rows on one rank are ``rows_per_device`` (GRPO's are prompts).
    """

    name: str
    rows_per_device: int
    steps_per_batch: int  # optimizer steps each batch of data serves (GRPO's num_iterations)
    step: int
    rank: int
    output_dir: Path | None
    #: Keeps a frozen copy of the whole model (full fine-tuning's reference): the model
    #: then loads whole on every rank, not sharded (``loop._loads_sharded``).
    frozen_reference: bool

    def tokenize(self, path: str, tokenizer: Any) -> tuple[list[Any], Any]: ...

    def needs_data(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) takes new micro-batches."""
        ...

    def batches(self, examples: list[Any], *, batch_size: int, pad_token_id: int, seed: int,
                train: bool) -> Any: ...  # fmt: skip

    def attach(self, model: Any) -> None: ...

    def forward_shape(self, examples: list[Any], model: Any) -> tuple[int, int]:
        """The rows and width of the largest forward a micro-batch of ``examples`` makes
        on ``model``: what a memory plan is made for (the worst case of the data at hand,
        not of ``max_seq_length``)."""
        ...

    def precompute(self, batches: Any, count: int, autocast: Any) -> None: ...

    def forward_backward(
        self, model: Any, micro_batches: list[dict[str, torch.Tensor]], *, autocast: Any, group: Any
    ) -> tuple[float, dict[str, float]]: ...

    def evaluate(self, model: Any, batches: Any, *, autocast: Any) -> dict[str, float]: ...

    def eval_line(self, when: str, metrics: dict[str, float]) -> str: ...


class SFTMethod:
    """Supervised fine-tuning: token cross entropy on the responses (or every token)."""

    name = "sft"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.rows_per_device = config.per_device_train_batch_size
        self.steps_per_batch = 1
        self.step, self.rank = 0, 0
        self.output_dir: Path | None = None
        self.frozen_reference = False

    def needs_data(self, step: int) -> bool:
        return True

    def tokenize(self, path: str, tokenizer: Any) -> tuple[list[Any], Any]:
        from sloth_core import data

        config = self.config
        try:
            return data.tokenize(
                data.load_records(path), tokenizer, data_format=config.data_format or None,
                chat_template=config.chat_template or None, max_seq_length=config.max_seq_length,
                train_on_responses_only=config.train_on_responses_only,
            )  # fmt: skip
        except data.DataError as exc:  # "row 3: ..." from the tokenizer: name the file too
            if path in str(exc):
                raise
            raise data.DataError(f"{path}: {exc}") from None

    def batches(self, examples: list[Any], *, batch_size: int, pad_token_id: int, seed: int,
                train: bool) -> Any:  # fmt: skip
        from sloth_core import data

        return data.Batches(
            examples, batch_size=batch_size, max_seq_length=self.config.max_seq_length,
            packing=train and self.config.packing, pad_token_id=pad_token_id, seed=seed,
            shuffle=train,
        )  # fmt: skip

    def attach(self, model: Any) -> None:
        pass

    def forward_shape(self, examples: list[Any], model: Any) -> tuple[int, int]:
        """Rows padded to the batch's longest example; packed rows are full."""
        limit = self.config.max_seq_length
        if self.config.packing:
            return self.rows_per_device, limit
        return self.rows_per_device, min(limit, max((len(e) for e in examples), default=limit))

    def precompute(self, batches: Any, count: int, autocast: Any) -> None:
        pass

    def forward_backward(
        self, model: Any, micro_batches: list[dict[str, torch.Tensor]], *,
        autocast: Any = contextlib.nullcontext, group: Any = None,
    ) -> tuple[float, dict[str, float]]:  # fmt: skip
        return accumulate(model, micro_batches, autocast=autocast, group=group), {}

    def evaluate(self, model: Any, batches: Any, *, autocast: Any) -> dict[str, float]:
        return evaluate(model, batches, autocast=autocast)

    @staticmethod
    def eval_line(when: str, metrics: dict[str, float]) -> str:
        return (
            f"eval {when}: loss {metrics['eval_loss']:.4f}, "
            f"next-token accuracy {metrics['eval_accuracy']:.1%}"
        )


def method_for(config: TrainConfig) -> Method:
    """The method ``config.method`` names."""
    if config.method == "sft":
        return SFTMethod(config)
    if config.method == "grpo":
        from .grpo import GRPOMethod  # imports its reward functions: only when asked

        return GRPOMethod(config)
    from .preference import PreferenceMethod

    return PreferenceMethod(config)
