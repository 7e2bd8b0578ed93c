"""Built-in chat templates, and which template a run uses.

Every template marks each assistant turn with a ``{% generation %}`` block (so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` finds the responses too)
and renders ``add_generation_prompt``. The masking in :mod:`.tokenizing` does not rely on
the blocks, so a tokenizer's own template without them works as well.
"""

from __future__ import annotations

from typing import Any

from .errors import DataError

__all__ = ["CHAT_TEMPLATES", "TEMPLATE_ALIASES", "resolve_chat_template"]

_BOS = "{{- bos_token or '' }}"
_UNSUPPORTED = "{{- raise_exception('this chat template has no ' + message['role'] + ' role') }}"


def _chatml(preamble: str = "") -> str:
    return (
        preamble + "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' }}"
        "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{- '\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


# Gemma, Mistral and Alpaca have no system turn: the system text leads the first user turn
# (Gemma, Mistral) or replaces the preamble (Alpaca), as their own templates do.
def _split_system(default: str = "''", suffix: str = "'\\n\\n'") -> str:
    return (
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] + " + suffix + " %}"
        "{%- set loop_messages = messages[1:] %}"
        "{%- else %}"
        "{%- set system = " + default + " %}"
        "{%- set loop_messages = messages %}"
        "{%- endif %}"
    )


_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

#: Jinja chat templates by name.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _chatml(),
    # Qwen 2.5: ChatML with a default system turn when the conversation has none.
    "qwen": _chatml(
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\n" + _QWEN_SYSTEM + "<|im_end|>\\n' }}"
        "{%- endif %}"
    ),
    "llama-3": (
        _BOS + "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if message['role'] == 'assistant' %}"
        "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{%- else %}"
        "{{- message['content'] | trim + '<|eot_id|>' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif %}"
    ),
    # Mistral v0.1 (Llama 2 style) with no space before the response, so the response is
    # exactly the assistant's text; the prompt ends with [/INST], nothing more to add.
    "mistral": (
        _BOS + _split_system() + "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'user' %}"
        "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' %}"
        "{% generation %}{{- message['content'] + (eos_token or '') }}{% endgeneration %}"
        "{%- else %}" + _UNSUPPORTED + "{%- endif %}"
        "{%- endfor %}"
    ),
    "gemma": (
        _BOS + _split_system() + "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<start_of_turn>model\\n' }}"
        "{% generation %}{{- message['content'] + '<end_of_turn>' }}{% endgeneration %}"
        "{{- '\\n' }}"
        "{%- elif message['role'] == 'user' %}"
        "{{- '<start_of_turn>user\\n' + (system if loop.first else '') + message['content']"
        " + '<end_of_turn>\\n' }}"
        "{%- else %}" + _UNSUPPORTED + "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
    ),
    # Phi-3 without the eos its own template appends after the last turn: <|end|> ends a
    # turn, and an eos there would be trained only on the last one.
    "phi-3": (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|assistant|>\\n' }}"
        "{% generation %}{{- message['content'] + '<|end|>' }}{% endgeneration %}"
        "{{- '\\n' }}"
        "{%- elif message['role'] in ('system', 'user') %}"
        "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{%- else %}" + _UNSUPPORTED + "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
    ),
    "alpaca": (
        _BOS + _split_system("'" + _ALPACA_PREAMBLE + "\\n\\n'") + "{{- system }}"
        "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'user' %}"
        "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{%- elif message['role'] == 'assistant' %}"
        "{{- '### Response:\\n' }}"
        "{% generation %}{{- message['content'] + (eos_token or '') }}{% endgeneration %}"
        "{{- '\\n\\n' }}"
        "{%- else %}" + _UNSUPPORTED + "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
    ),
}

#: Other spellings accepted by :func:`resolve_chat_template`.
TEMPLATE_ALIASES: dict[str, str] = {
    "llama3": "llama-3",
    "llama-3.1": "llama-3",
    "llama-3.2": "llama-3",
    "llama-3.3": "llama-3",
    "qwen2": "qwen",
    "qwen2.5": "qwen",
    "qwen-2.5": "qwen",
    "gemma2": "gemma",
    "gemma-2": "gemma",
    "phi3": "phi-3",
    "phi-3.5": "phi-3",
}


def resolve_chat_template(tokenizer: Any, name: str | None) -> str:
    """Return the Jinja chat template a run named ``name`` uses.

    Args:
        tokenizer: the model's tokenizer (only read, for ``"auto"``).
        name: ``None`` or ``"auto"``: the tokenizer's own template, or ``chatml`` when it has
            none; a key of :data:`CHAT_TEMPLATES` or :data:`TEMPLATE_ALIASES`
            (case-insensitive); or a Jinja template itself (anything with ``{{`` or ``{%``).

    Raises:
        DataError: an unknown name (the message lists the built-in ones).
    """
    if name is None or name.strip().lower() == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # named templates: the default one is for chat
            own = own.get("default")
        return own if isinstance(own, str) and own.strip() else CHAT_TEMPLATES["chatml"]
    if "{{" in name or "{%" in name:
        return name
    key = name.strip().lower()
    key = TEMPLATE_ALIASES.get(key, key)
    if key not in CHAT_TEMPLATES:
        raise DataError(
            f"unknown chat template {name!r}; built-in: {', '.join(CHAT_TEMPLATES)} "
            "(or 'auto' for the tokenizer's own, or a Jinja template)"
        )
    return CHAT_TEMPLATES[key]
