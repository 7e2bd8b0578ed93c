"""Prompts: the chat template a model talks through, rendered on the Python side.

Both backends (transformers and llama.cpp) get the text rendered here with the same
Jinja template (transformers' renderer) and only tokenise it, so a merged model and its
GGUF export see identical prompt ids. Without a chat template the conversation goes in
as plain text, for a base model to continue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sloth_core.errors import SlothError

#: ``--chat-template`` value that forces plain text.
PLAIN = "none"


class PromptTooLongError(SlothError):
    """The prompt does not fit in the model's context (the message gives both lengths)."""


@dataclass
class PromptFormat:
    """How messages become prompt text: a Jinja template, or plain text when ``None``."""

    template: str | None
    #: Where the template came from: "tokenizer", "gguf", "train_config", "option", "none".
    origin: str
    #: Tokens the template may name (``bos_token``, ``eos_token``, ...).
    special_tokens: dict[str, str]

    @property
    def plain(self) -> bool:
        return self.template is None

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of ``messages``, ending where the assistant's reply starts."""
        if self.template is None:
            return "\n\n".join(m["content"] for m in messages)
        from transformers.utils.chat_template_utils import render_jinja_template

        variables: dict[str, Any] = self.special_tokens  # the template's, through **kwargs
        # transformers annotates it `-> str`; it returns (rendered, generation indices).
        rendered, _ = render_jinja_template(  # type: ignore[str-unpack]
            conversations=[messages],
            chat_template=self.template,
            add_generation_prompt=True,
            **variables,
        )
        return rendered[0]


def own_template(tokenizer_template: Any) -> str | None:
    """A tokenizer's chat template as one string (the ``default`` of named ones), or ``None``."""
    if isinstance(tokenizer_template, dict):
        tokenizer_template = tokenizer_template.get("default")
    if isinstance(tokenizer_template, str) and tokenizer_template.strip():
        return tokenizer_template
    return None


def choose_format(
    own: str | None,
    *,
    origin: str,
    special_tokens: dict[str, str],
    option: str | None = None,
    trained: str = "",
) -> PromptFormat:
    """The prompt format: ``option`` (``--chat-template``) first, then the template the
    ``sloth train`` run used (``trained``), then the model's own (``own``), else plain text.

    ``option`` and ``trained`` are a built-in template name (``chatml``, ``llama-3``...),
    a Jinja template, or a path to a ``.jinja`` file; ``option`` may be ``"none"``.

    Raises:
        SlothError: an unknown template name (``DataError``) or an unreadable file.
    """
    from sloth_core.data.templates import resolve_chat_template

    for value, where in ((option, "option"), (trained, "train_config")):
        if not value or value.strip().lower() == "auto":
            continue
        if value.strip().lower() == PLAIN:
            return PromptFormat(None, "none", special_tokens)
        path = Path(value).expanduser()
        if "{" not in value and (path.is_file() or path.suffix in (".jinja", ".j2")):
            try:
                return PromptFormat(path.read_text(encoding="utf-8"), where, special_tokens)
            except OSError as exc:
                raise SlothError(f"cannot read the chat template {path}: {exc}") from None
        return PromptFormat(resolve_chat_template(None, value), where, special_tokens)
    if own is not None:
        return PromptFormat(own, origin, special_tokens)
    return PromptFormat(None, "none", special_tokens)


def no_template_notice(model: str) -> str:
    return (
        f"note: {model} has no chat template: the conversation goes in as plain text, "
        "for the model to continue (pass --chat-template chatml, llama-3, ... to use one)"
    )


def fit_context(prompt_tokens: int, max_new_tokens: int, context: int | None) -> int:
    """How many new tokens fit after ``prompt_tokens`` in ``context`` (at most ``max_new_tokens``).

    Raises:
        PromptTooLongError: the prompt alone fills the context.
    """
    if not context:
        return max_new_tokens
    if prompt_tokens >= context:
        raise PromptTooLongError(
            f"the prompt is {prompt_tokens} tokens but the model's context is {context} "
            "tokens (max_position_embeddings): shorten the prompt or the system prompt"
        )
    return min(max_new_tokens, context - prompt_tokens)
