"""The trainer's data pipeline: rows -> chat template -> tokens -> masked labels -> batches.

::

    records = load_records("train.jsonl")
    examples, stats = tokenize(records, tokenizer, max_seq_length=2048)
    train, evaluation = split_eval(examples, eval_fraction=0.05, seed=0)
    batches = Batches(train, batch_size=8, max_seq_length=2048, packing=True,
                      pad_token_id=tokenizer.pad_token_id, seed=0)
    batch = batches.batch(epoch, step)

Preference tuning (DPO, ORPO, SimPO, KTO) has its own rows and batches::

    examples, stats = tokenize_preferences(records, tokenizer, kind="pairs", max_length=1024)
    batches = PreferenceBatches(examples, batch_size=8, pad_token_id=tokenizer.pad_token_id,
                                seed=0)

GRPO (reinforcement learning from rewards) batches prompts, left-padded for generation::

    examples, stats = tokenize_prompts(records, tokenizer, max_prompt_length=256)
    batches = PromptBatches(examples, batch_size=8, pad_token_id=tokenizer.pad_token_id, seed=0)
"""

from __future__ import annotations

from .batching import Batches, EpochOrder, pack, split_eval
from .errors import DataError
from .formats import DATA_FORMATS, detect_format, to_messages
from .preference import (
    PREFERENCE_KINDS,
    TRUNCATION_MODES,
    KTOExample,
    PairExample,
    PreferenceStats,
    tokenize_preferences,
)
from .preference_batches import PreferenceBatches
from .prompts import PromptBatches, PromptExample, PromptStats, reward_columns, tokenize_prompts
from .records import FILE_FORMATS, load_records
from .templates import CHAT_TEMPLATES, TEMPLATE_ALIASES, resolve_chat_template
from .tokenizing import IGNORE_INDEX, Example, TokenizeStats, tokenize

__all__ = [
    "CHAT_TEMPLATES",
    "DATA_FORMATS",
    "FILE_FORMATS",
    "IGNORE_INDEX",
    "PREFERENCE_KINDS",
    "TEMPLATE_ALIASES",
    "TRUNCATION_MODES",
    "Batches",
    "DataError",
    "EpochOrder",
    "Example",
    "KTOExample",
    "PairExample",
    "PreferenceBatches",
    "PreferenceStats",
    "PromptBatches",
    "PromptExample",
    "PromptStats",
    "TokenizeStats",
    "detect_format",
    "load_records",
    "pack",
    "resolve_chat_template",
    "reward_columns",
    "split_eval",
    "to_messages",
    "tokenize",
    "tokenize_preferences",
    "tokenize_prompts",
]
