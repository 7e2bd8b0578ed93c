"""The trainer's data pipeline: rows -> chat template -> tokens -> masked labels -> batches.

::

    records = load_records("train.jsonl")
    examples, stats = tokenize(records, tokenizer, max_seq_length=2048)
    train, evaluation = split_eval(examples, eval_fraction=0.05, seed=0)
    batches = Batches(train, batch_size=8, max_seq_length=2048, packing=True,
                      pad_token_id=tokenizer.pad_token_id, seed=0)
    batch = batches.batch(epoch, step)
"""

from __future__ import annotations

from .batching import Batches, pack, split_eval
from .errors import DataError
from .formats import DATA_FORMATS, detect_format, to_messages
from .records import FILE_FORMATS, load_records
from .templates import CHAT_TEMPLATES, TEMPLATE_ALIASES, resolve_chat_template
from .tokenizing import IGNORE_INDEX, Example, TokenizeStats, tokenize

__all__ = [
    "CHAT_TEMPLATES",
    "DATA_FORMATS",
    "FILE_FORMATS",
    "IGNORE_INDEX",
    "TEMPLATE_ALIASES",
    "Batches",
    "DataError",
    "Example",
    "TokenizeStats",
    "detect_format",
    "load_records",
    "pack",
    "resolve_chat_template",
    "split_eval",
    "to_messages",
    "tokenize",
]
