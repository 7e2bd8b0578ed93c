"""Test data that needs no download: the bundled instruction rows (convergence tests), the
bundled preference and prompt sets, and the synthetic batches of the parity harness."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Batch",
    "load_tiny_instructions",
    "make_batch",
    "preference_dataset",
    "prompt_dataset",
    "to_messages",
]

_DATA = Path(__file__).parent / "data"


@functools.lru_cache(maxsize=1)
def _tiny_instructions() -> tuple[dict[str, str], ...]:
    rows = []
    path = _DATA / "tiny_instructions.jsonl"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not {"instruction", "input", "output"} <= row.keys():
                raise ValueError(f"{path.name}:{number}: needs instruction, input and output")
            rows.append(row)
    return tuple(rows)


def load_tiny_instructions() -> list[dict[str, str]]:
    """Return the bundled instruction data set: 242 rows of short, learnable tasks.

    Each row has ``instruction``, ``input`` (often empty) and ``output``: arithmetic facts,
    capital cities, word reversal, antonyms, plurals, even/odd and one-sentence
    definitions, written for sloth (no third-party text). A new list of new dicts on every
    call, so callers may change them.
    """
    return [dict(row) for row in _tiny_instructions()]


_PREFERENCE_FILES = {"pairs": "tiny_preferences.jsonl", "kto": "tiny_kto.jsonl"}


def preference_dataset(kind: str = "pairs") -> Path:
    """The bundled preference data set of ``kind`` (JSONL), for ``sloth train --method``.

    ``"pairs"`` (DPO, ORPO, SimPO): 257 rows ``{prompt, chosen, rejected}``; ``"kto"``:
    514 rows ``{prompt, completion, label}``. Built from the instruction set by
    ``scripts/make_preference_data.py``: the chosen (desirable) completion is the right
    short answer, the rejected one a plausible wrong one ending with a full stop (1 to 8
    tokens each; the full stop makes the preference learnable by a tiny model within an
    epoch, see the script); the rows mix plain strings, TRL's conversational form and, for
    pairs, the implicit prompt.
    """
    if kind not in _PREFERENCE_FILES:
        raise ValueError(f"unknown kind {kind!r}; accepted: {', '.join(_PREFERENCE_FILES)}")
    return _DATA / _PREFERENCE_FILES[kind]


def prompt_dataset() -> Path:
    """The bundled GRPO prompt set (JSONL), for ``sloth train --method grpo``.

    210 rows ``{prompt, answer, task}``: the instruction set's questions with a short
    answer (arithmetic, capitals, antonyms, reversed words, plurals, parity), the prompt a
    string (``"<question>\\nAnswer:"``) or one user message in turn, ``answer`` what the
    ``exact_match`` reward checks, ``task`` the kind of question. Built by
    ``scripts/make_prompt_data.py``.
    """
    return _DATA / "tiny_prompts.jsonl"


def to_messages(row: dict[str, str]) -> list[dict[str, str]]:
    """One row as a user/assistant conversation for ``apply_chat_template``."""
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": row["output"]},
    ]


@dataclass
class Batch:
    """Model inputs, labels, and which positions' logits are meaningful (not padding)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    valid: torch.Tensor


def make_batch(config: Any, batch_size: int, seq_len: int, *, packed: bool, seed: int, device):
    """Random tokens (the last vocab id included) with masked labels: prompt tokens and one
    in the middle; unpacked, the last row is right-padded; packed, each row holds several
    sequences whose positions restart and whose first label is masked (no cross-talk).

    Packed, the first row opens with one long sequence (all but the last 4 tokens of the
    row), so that a row longer than a sliding window by 5 tokens has a packed sequence
    that crosses the window; the other sequences are short and of random lengths."""
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    ids[0, seq_len // 3] = vocab - 1  # the last id: where an odd vocab's tail goes wrong
    labels = ids.clone()
    valid = torch.ones(batch_size, seq_len, dtype=torch.bool)
    inputs: dict[str, torch.Tensor] = {}
    if packed:
        positions = torch.empty_like(ids)
        for row in range(batch_size):
            start = 0
            while start < seq_len:
                length = int(torch.randint(3, max(4, seq_len // 2), (1,), generator=gen))
                if row == 0 and start == 0:
                    length = max(length, seq_len - 4)
                length = min(length, seq_len - start)
                positions[row, start : start + length] = torch.arange(length)
                labels[row, start] = -100
                start += length
        inputs["position_ids"] = positions
    else:
        mask = torch.ones_like(ids)
        labels[:, :3] = -100
        labels[:, seq_len // 2] = -100
        if batch_size > 1:
            pad = seq_len // 3
            ids[-1, -pad:] = config.pad_token_id or 0
            mask[-1, -pad:] = 0
            labels[-1, -pad:] = -100
            valid[-1, -pad:] = False
        inputs["attention_mask"] = mask
    inputs["input_ids"] = ids
    move = {k: v.to(device) for k, v in inputs.items()}
    return Batch(move, labels.to(device), valid.to(device))
