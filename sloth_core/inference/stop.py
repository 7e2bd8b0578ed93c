"""Which token ids end a reply: every EOS id and the chat template's end-of-turn markers.

A fine-tuned chat model ends its turn with the template's marker (``<|im_end|>``,
``<|eot_id|>``, ...), which is often not the tokenizer's EOS; stopping only at EOS runs
on into an invented next turn. The ids come from the tokenizer, the model config and its
generation config (each may list several), plus every known end-of-turn marker that the
vocabulary has and the chat template uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: End-of-turn markers of common chat templates (ChatML/Qwen, Llama 3, Gemma, Phi-3).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def end_of_turn_ids(vocab: Mapping[str, int], chat_template: str | None) -> list[int]:
    """Ids of the :data:`END_OF_TURN_TOKENS` in ``vocab`` that ``chat_template`` uses
    (all that ``vocab`` has when there is no template)."""
    return [
        vocab[token]
        for token in END_OF_TURN_TOKENS
        if token in vocab and (not chat_template or token in chat_template)
    ]


def stop_token_ids(
    tokenizer: Any, model: Any = None, chat_template: str | None = None
) -> list[int]:
    """Every id that ends generation for ``model`` talking through ``tokenizer``, sorted.

    Args:
        tokenizer: a transformers tokenizer (``eos_token_id``, ``get_vocab()``).
        model: the model, for ``config.eos_token_id`` and ``generation_config.eos_token_id``
            (either may be a list); optional.
        chat_template: the template prompts are rendered with (default: the tokenizer's).
    """
    found = set(_ids(getattr(tokenizer, "eos_token_id", None)))
    for source in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        found.update(_ids(getattr(source, "eos_token_id", None)))
    template = chat_template
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = "\n".join(str(t) for t in template.values())
    found.update(end_of_turn_ids(tokenizer.get_vocab(), template))
    return sorted(found)
