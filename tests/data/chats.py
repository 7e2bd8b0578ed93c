"""A conversation the tokenize tests share, and how they read which tokens are trained."""

from __future__ import annotations

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say ok"},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine, thanks."},
]
RESPONSES = ["ok", "Fine, thanks."]


def trained_id_runs(example):
    """The runs of consecutive trained token ids (each label is its token)."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [*runs, current] if current else runs


def trained_runs(tokenizer, example):
    """The decoded runs of consecutive trained tokens."""
    return [tokenizer.decode(run) for run in trained_id_runs(example)]
