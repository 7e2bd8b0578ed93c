"""The prompts of reinforcement learning from rewards (GRPO): rows -> token ids -> batches.

::

    records = load_records("prompts.jsonl")
    examples, stats = tokenize_prompts(records, tokenizer, max_prompt_length=256)
    batches = PromptBatches(examples, batch_size=8, pad_token_id=tokenizer.pad_token_id,
                            seed=0)
    batch = batches.batch(epoch, index)            # left-padded, for generation
    columns = reward_columns(batches.examples_of(epoch, index), repeat=num_generations)

The rows are TRL's (``GRPOTrainer``): ``{"prompt": str}`` or ``{"prompt": [messages]}``
(the conversational form), and any other fields, the *columns*, which the reward
functions get as keyword lists (an ``answer`` to check against, say). As in TRL,
``completion`` and ``completion_ids`` fields are not columns, and no column may take the
name of a keyword the reward functions get anyway (:data:`REWARD_KEYWORDS`).

A string prompt is tokenised with the special tokens the tokenizer puts before plain text
(a bos), as TRL's ``processing_class(text=prompts)`` does; a message list is rendered
with the chat template and its generation prompt (the template writes any bos), as
``apply_chat_template(..., add_generation_prompt=True, tokenize=True)`` does. Both are the
prompt tokens of the preference pipeline (:mod:`.preference`), whose encoder renders them.

Bad rows raise a :class:`~sloth_core.data.errors.DataError` naming the row (1-based) and
the field: a missing or empty prompt, a value of the wrong type, a malformed message, a
role the template does not know, a column with a reserved name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batching import ExampleBatches
from .errors import DataError
from .preference import Part, PreferenceStats, _Encoder, _part

__all__ = [
    "REWARD_KEYWORDS",
    "PromptBatches",
    "PromptExample",
    "PromptStats",
    "reward_columns",
    "tokenize_prompts",
]

#: The keywords every reward function gets besides the columns (TRL's names).
REWARD_KEYWORDS = ("prompts", "completions", "completion_ids")
# Fields of a row that are not columns: the prompt, and what TRL leaves out of the
# reward functions' keywords (trl 1.16.0, GRPOTrainer._calculate_rewards).
_NOT_COLUMNS = ("prompt", "completion", "completion_ids")


@dataclass(frozen=True)
class PromptExample:
    """One prompt: its token ids, the prompt as the row gave it, and the row's columns."""

    ids: tuple[int, ...]
    prompt: Part
    columns: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PromptStats:
    """What :func:`tokenize_prompts` did with the rows.

    ``rows`` went in, one example each; ``conversational`` of them were message lists;
    ``truncated`` lost their first tokens to ``max_prompt_length``; ``tokens`` counts the
    kept tokens and ``longest`` is the longest prompt after truncation.
    """

    rows: int = 0
    conversational: int = 0
    truncated: int = 0
    tokens: int = 0
    longest: int = 0
    max_prompt_length: int | None = None

    def summary(self) -> str:
        """One line for logs, such as ``200 prompts (100 conversational); 2 truncated to
        their last 64 tokens; 3120 tokens, longest 64``."""
        line = f"{self.rows} prompts ({self.conversational} conversational)"
        if self.max_prompt_length is not None:
            line += f"; {self.truncated} truncated to their last {self.max_prompt_length} tokens"
        return line + f"; {self.tokens} tokens, longest {self.longest}"


def tokenize_prompts(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_prompt_length: int | None = None,
    chat_template: str | None = None,
) -> tuple[list[PromptExample], PromptStats]:
    """Tokenise the prompt ``records`` (see the module for the layout), in order.

    Args:
        records: rows, as :func:`~sloth_core.data.records.load_records` returns them.
        tokenizer: a Hugging Face tokenizer.
        max_prompt_length: a longer prompt keeps its last ``max_prompt_length`` tokens,
            as trl 0.25.0's GRPOTrainer cut them (the last with this option: its tokenizer
            truncates on the left); ``None``: no limit.
        chat_template: for message lists, a template name, ``"auto"``/``None`` or a Jinja
            template (see :func:`~sloth_core.data.templates.resolve_chat_template`).

    Returns:
        One :class:`PromptExample` per row, and the statistics.

    Raises:
        DataError: a bad setting, a bad row (``row N: ...``, naming the field), or no rows.
    """
    if max_prompt_length is not None and max_prompt_length < 1:
        raise DataError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    if not records:
        raise DataError("no prompt rows")
    stats = PromptStats(rows=len(records), max_prompt_length=max_prompt_length)
    # The preference pipeline's encoder renders prompts; with no completion to tokenise,
    # its statistics stay untouched.
    encoder = _Encoder(tokenizer, chat_template, PreferenceStats(kind="pairs", max_length=0))
    examples = []
    for row, record in enumerate(records, 1):
        if not isinstance(record, Mapping):
            raise DataError(f"row {row}: expected an object, got {type(record).__name__}")
        prompt = _part(record, "prompt", row)
        texts = [prompt] if isinstance(prompt, str) else [turn["content"] for turn in prompt]
        if not any(text.strip() for text in texts):
            raise DataError(f"row {row}: field 'prompt' is empty")
        ids, _ = encoder(prompt, [], row, ())
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids = ids[len(ids) - max_prompt_length :]
            stats.truncated += 1
        examples.append(PromptExample(tuple(ids), prompt, _columns(record, row)))
        stats.conversational += not isinstance(prompt, str)
        stats.tokens += len(ids)
        stats.longest = max(stats.longest, len(ids))
    return examples, stats


def _columns(record: Mapping[str, Any], row: int) -> dict[str, Any]:
    columns = {key: value for key, value in record.items() if key not in _NOT_COLUMNS}
    for name in REWARD_KEYWORDS:
        if name in columns:
            raise DataError(
                f"row {row}: a column may not be named {name!r}: the reward functions get "
                "that keyword already; rename the field"
            )
    return columns


def reward_columns(examples: Sequence[PromptExample], *, repeat: int = 1) -> dict[str, list]:
    """The examples' columns as the reward functions get them: one list per column name.

    Each value is repeated ``repeat`` times in a row (once per completion of its prompt,
    ``num_generations``), as TRL repeats its inputs. A row without a column that others
    have gives ``None`` there (as a ``datasets`` table fills a missing field).
    """
    names: dict[str, None] = {}
    for example in examples:
        names.update(dict.fromkeys(example.columns))
    return {
        name: [example.columns.get(name) for example in examples for _ in range(repeat)]
        for name in names
    }


class PromptBatches(ExampleBatches):
    """The prompt batches of ``examples``, addressable by ``(epoch, index)``.

    Each batch holds int64 tensors: ``input_ids`` and ``attention_mask`` ``[B, P]``,
    LEFT-padded to the batch's longest prompt (so that generation appends to every row
    at the same position), and ``index`` ``[B]``, each example's position in
    ``examples``. The order of every epoch is that of the SFT and preference batches
    with the same seed (they share :class:`~sloth_core.data.batching.EpochOrder`, through
    :class:`~sloth_core.data.batching.ExampleBatches`).

    Args:
        examples: :class:`PromptExample` items.
        batch_size: prompts per batch.
        pad_token_id: the id padding uses.
        seed: with the epoch, seeds the order of each epoch.
        shuffle: a new order every epoch; otherwise the input order.
        drop_last: leave out a last, smaller batch.
    """

    what = "prompts"
    examples: list[PromptExample]

    def examples_of(self, epoch: int, index: int) -> list[PromptExample]:
        """The examples of batch ``index`` of ``epoch``, in the batch's order."""
        return [self.examples[position] for position in self.indices(epoch, index)]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of ``epoch`` (see the class for the tensors)."""
        chosen = self.indices(epoch, index)
        rows = [self.examples[position].ids for position in chosen]
        longest = max(map(len, rows))
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for row, ids in enumerate(rows):
            start = longest - len(ids)
            input_ids[row, start:] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, start:] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.tensor(chosen, dtype=torch.long),
        }
