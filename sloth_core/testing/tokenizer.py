"""A byte-level BPE tokenizer trained on the spot, for tests that must not download anything.

The tokenizer is trained with the `tokenizers` library on a small corpus that ships with
sloth (``data/corpus.txt``), so every test and every third-party plugin gets the same real
tokenizer (merges, special tokens, a chat template) without a model hub.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS_TOKEN",
    "CHATML_TEMPLATE",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "corpus_lines",
]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# The order fixes the ids (0..4), which tests and configs may rely on.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# Qwen2's split (the Llama 3 one, but one digit per token). transformers rebuilds any
# tokenizer found next to a qwen2 config as its own Qwen2Tokenizer with this pattern, so
# using it here makes a written tiny qwen2 model tokenise exactly as it did in memory.
_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 (one regex)

# Every special token plus every one of the 256 byte symbols must fit, or some string
# could not be encoded.
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256

# ChatML as Qwen writes it, led by the bos token as Llama 3 does: `apply_chat_template`
# tokenises with add_special_tokens=False, so the bos must come from the template, while
# a plain `tokenizer(text)` adds it through the post-processor. The `generation` block lets
# `return_assistant_tokens_mask=True` find the assistant turns (what training learns from).
CHATML_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@functools.lru_cache(maxsize=1)
def corpus_lines() -> tuple[str, ...]:
    """Return the non-empty lines of the bundled training corpus, in file order.

    Useful as ready-made text data for tests (for example to build a tiny data set).
    """
    text = (Path(__file__).parent / "data" / "corpus.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


@functools.lru_cache(maxsize=16)
def _trained_json(vocab_size: int, seed: int) -> str:
    # Cached as the serialised form rather than the object, so that each caller gets its
    # own independent backend (adding tokens to one must never leak into another test).
    lines = list(corpus_lines())
    if seed != 0:
        # BPE counts do not depend on line order, so a seed must change the data itself
        # to give a different (still reproducible) vocabulary: keep a seeded 90 %.
        rng = random.Random(seed)
        lines = [line for line in lines if rng.random() < 0.9]

    backend = Tokenizer(models.BPE())
    # No normaliser: any normalisation would break exact round trips of arbitrary strings.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer=trainer, length=len(lines))
    # The bos comes from the post-processor stored in tokenizer.json, as in Llama 3's files:
    # transformers does not save `add_bos_token`, so a flag would be lost on reload while
    # this survives, and the in-memory tokenizer then behaves exactly like a reloaded one.
    bos = (BOS_TOKEN, backend.token_to_id(BOS_TOKEN))
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[bos],
            ),
        ]
    )
    return backend.to_str()


def build_tokenizer(
    vocab_size: int = 512,
    *,
    chat_template: str | None = None,
    seed: int = 0,
) -> PreTrainedTokenizerFast:
    """Train (or fetch from the in-process cache) a byte-level BPE tokenizer and wrap it.

    The tokenizer has ``<|begin_of_text|>`` (bos, id 0), ``<|end_of_text|>`` (eos, id 1),
    ``<|pad|>`` (pad, id 2), ``<|im_start|>`` (3) and ``<|im_end|>`` (4), a byte-level
    pre-tokenizer and decoder (every string round-trips), adds the bos token when encoding
    with special tokens, and carries a ChatML chat template. Training is deterministic: the
    same arguments give the same vocabulary in every process.

    Args:
        vocab_size: upper bound on ``len(tokenizer)``, special tokens included. At least 261
            (5 special tokens + 256 bytes); the bundled corpus may yield fewer merges than
            asked for large values, so the result can be smaller.
        chat_template: a Jinja chat template to use instead of the default ChatML one.
        seed: ``0`` trains on the whole corpus; any other value trains on a reproducible
            90 % subset of its lines, for tests that need two different vocabularies.

    Returns:
        A new ``PreTrainedTokenizerFast`` on every call (cheap: only training is cached),
        so callers may modify it freely.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be at least {_MIN_VOCAB} (256 byte symbols + "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    backend = Tokenizer.from_str(_trained_json(int(vocab_size), int(seed)))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=CHATML_TEMPLATE if chat_template is None else chat_template,
        clean_up_tokenization_spaces=False,
    )
