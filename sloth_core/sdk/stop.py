"""Which tokens end a reply: every EOS id and the chat template's end-of-turn markers.

One table and one rule for everything that must stop where the model stops: ``sloth chat``
and ``sloth generate``, the ``generation_config.json`` of a merged export, an Ollama
Modelfile's ``stop`` lines, a GGUF file's end-of-turn ids. A fine-tuned chat model ends
its turn with the template's marker (``<|im_end|>``, ``<|eot_id|>``, ...), which is often
not the tokenizer's EOS; stopping only at EOS runs on into an invented next turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "END_OF_TURN_TOKENS",
    "chat_template_text",
    "end_of_turn_ids",
    "end_of_turn_tokens",
    "eos_token_ids",
    "stop_token_ids",
    "stop_tokens",
]

#: Tokens that end a turn in the chat-template families sloth knows (ChatML/Qwen, Llama 3,
#: Gemma, Phi-3, older Llama/Mistral); one counts when the vocabulary has it and the chat
#: template writes it.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
    "</s>", "<|end_of_text|>",
)  # fmt: skip


def chat_template_text(template: Any) -> str:
    """A chat template as one string: a tokenizer's (``template`` a tokenizer), a named set
    of templates (a dict) joined, or ``""`` when there is none."""
    if template is not None and not isinstance(template, (str, dict)):
        template = getattr(template, "chat_template", None)
    if isinstance(template, dict):
        template = "\n".join(str(t) for t in template.values())
    return template if isinstance(template, str) else ""


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def end_of_turn_tokens(
    vocab: Mapping[str, int], chat_template: str | None
) -> list[tuple[str, int]]:
    """``(token, id)`` of the :data:`END_OF_TURN_TOKENS` in ``vocab`` that ``chat_template``
    writes (all that ``vocab`` has when there is no template), in the table's order."""
    return [
        (token, int(vocab[token]))
        for token in END_OF_TURN_TOKENS
        if token in vocab and (not chat_template or token in chat_template)
    ]


def end_of_turn_ids(vocab: Mapping[str, int], chat_template: str | None) -> list[int]:
    """The ids of :func:`end_of_turn_tokens`."""
    return [token_id for _, token_id in end_of_turn_tokens(vocab, chat_template)]


def stop_tokens(tokenizer: Any, chat_template: str | None = None) -> list[tuple[str, int]]:
    """``(token, id)`` of every token that ends a reply through ``tokenizer``: its EOS
    first, then the end-of-turn markers the vocabulary has and the template writes
    (``chat_template``, default the tokenizer's own)."""
    if tokenizer is None:
        return []
    found: dict[str, int] = {}
    eos = getattr(tokenizer, "eos_token", None)
    if eos is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        found[str(eos)] = int(tokenizer.eos_token_id)
    template = chat_template_text(tokenizer if chat_template is None else chat_template)
    for token, token_id in end_of_turn_tokens(tokenizer.get_vocab(), template):
        found.setdefault(token, token_id)
    return list(found.items())


def eos_token_ids(
    tokenizer: Any, config: Any = None, chat_template: str | None = None
) -> list[int]:
    """Every id generation should stop at, in order: ``config.eos_token_id`` (one or a
    list), then :func:`stop_tokens`. What a merged export writes to its generation config."""
    ids: list[int] = []
    for value in _ids(getattr(config, "eos_token_id", None)):
        if value not in ids:
            ids.append(value)
    for _, token_id in stop_tokens(tokenizer, chat_template):
        if token_id not in ids:
            ids.append(token_id)
    return ids


def stop_token_ids(
    tokenizer: Any, model: Any = None, chat_template: str | None = None
) -> list[int]:
    """Every id that ends generation for ``model`` talking through ``tokenizer``, sorted:
    the EOS ids of the tokenizer, the model's config and its generation config, and the
    end-of-turn markers of ``chat_template`` (default: the tokenizer's)."""
    found = set()
    for source in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        found.update(_ids(getattr(source, "eos_token_id", None)))
    found.update(token_id for _, token_id in stop_tokens(tokenizer, chat_template))
    return sorted(found)
