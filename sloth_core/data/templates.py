"""Built-in chat templates, which template a run uses, and which roles a template knows.

Every template marks each assistant turn with a ``{% generation %}`` block (so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` finds the responses too)
and renders ``add_generation_prompt``. The masking in :mod:`.tokenizing` does not rely on
the blocks, so a tokenizer's own template without them works as well.

Each built-in renders a conversation of system, user and assistant turns as the model's
published template does (tests/data/test_data_official_templates.py checks them against
the published text), except where a comment says otherwise.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import DataError

__all__ = [
    "BASE_ROLES",
    "CHAT_TEMPLATES",
    "TEMPLATE_ALIASES",
    "knows_role",
    "resolve_chat_template",
    "template_roles",
]

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


def _llama_3(system_turn: str = "", tool_turn: str = "") -> str:
    # Llama 3 renders every turn alike, its content trimmed; 3.1 adds a system turn that is
    # always there (``system_turn``, which sets ``loop_messages``) and writes tool results
    # as ipython turns (``tool_turn``).
    return (
        _BOS
        + (system_turn or "{%- set loop_messages = messages %}")
        + "{%- for message in loop_messages %}"
        + tool_turn
        + "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if message['role'] == 'assistant' %}"
        "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{%- else %}"
        "{{- message['content'] | trim + '<|eot_id|>' }}"
        "{%- endif %}" + ("{%- endif %}" if tool_turn else "") + "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif %}"
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
# Llama 3.1, 3.2 and 3.3 open every conversation with this system turn, before any system
# message's text. 3.2's own template writes the current date where transformers offers
# strftime_now; the built-in keeps the fixed one, so that training data do not change
# with the day they are tokenised on.
_LLAMA_31_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
)
_LLAMA_31_TOOL = (
    "{%- if message['role'] in ('tool', 'ipython') %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | tojson + '<|eot_id|>' }}"  # (a string too, as Meta's does)
    "{%- else %}"
)
# The published Alpaca prompts (tatsu-lab/stanford_alpaca): a row with an input gets its
# own preamble and an "### Input:" section. An alpaca row's user message carries its
# `instruction` and `input` apart (see .formats); other conversations use the content.
_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_ALPACA_INPUT_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)


def _has_input(message: str) -> str:
    return f"{message}['input'] is defined and {message}['input']"


#: Jinja chat templates by name.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _chatml(),
    # Qwen 2.5: ChatML with a default system turn when the conversation has none.
    "qwen": _chatml(
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\n" + _QWEN_SYSTEM + "<|im_end|>\\n' }}"
        "{%- endif %}"
    ),
    "llama-3": _llama_3(),
    "llama-3.1": _llama_3(_LLAMA_31_SYSTEM, _LLAMA_31_TOOL),
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
    # Gemma 2 (content trimmed, as its template does); a system message, which Gemma 2's
    # own template refuses, leads the first user turn as Gemma 3's does.
    "gemma": (
        _BOS + _split_system() + "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<start_of_turn>model\\n' }}"
        "{% generation %}{{- message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}"
        "{{- '\\n' }}"
        "{%- elif message['role'] == 'user' %}"
        "{{- '<start_of_turn>user\\n' + (system if loop.first else '')"
        " + message['content'] | trim + '<end_of_turn>\\n' }}"
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
    # The published prompt, then the response and eos: nothing after the last response.
    "alpaca": (
        _BOS + "{%- if messages[0]['role'] == 'system' %}"
        "{%- set preamble = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}"
        "{%- else %}"
        f"{{%- set preamble = '{_ALPACA_INPUT_PREAMBLE}' if {_has_input('messages[0]')}"
        f" else '{_ALPACA_PREAMBLE}' %}}"
        "{%- set loop_messages = messages %}"
        "{%- endif %}"
        "{{- preamble + '\\n\\n' }}"
        "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'user' and " + _has_input("message") + " %}"
        "{{- '### Instruction:\\n' + message['instruction'] + '\\n\\n### Input:\\n'"
        " + message['input'] + '\\n\\n' }}"
        "{%- elif message['role'] == 'user' %}"
        "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{%- elif message['role'] == 'assistant' %}"
        "{{- '### Response:\\n' }}"
        "{% generation %}{{- message['content'] + (eos_token or '') }}{% endgeneration %}"
        "{%- if not loop.last %}{{- '\\n\\n' }}{%- endif %}"
        "{%- else %}" + _UNSUPPORTED + "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
    ),
}

#: Other spellings accepted by :func:`resolve_chat_template`.
TEMPLATE_ALIASES: dict[str, str] = {
    "llama3": "llama-3",
    "llama3.1": "llama-3.1",
    "llama-3.2": "llama-3.1",
    "llama3.2": "llama-3.1",
    "llama-3.3": "llama-3.1",
    "llama3.3": "llama-3.1",
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


#: The roles every conversation may use, whatever the template.
BASE_ROLES = ("system", "user", "assistant")

# A role a template tests for: ``message['role'] == 'tool'``, ``message.role != "tool"``,
# ``message['role'] in ('tool', 'ipython')``.
_ROLE_TEST = re.compile(
    r"""role['"]?\]?\s*(?:[!=]=\s*(['"])([\w-]+)\1|(?:not\s+)?in\s*[(\[]([^)\]]*))"""
)
_QUOTED = re.compile(r"""(['"])([\w-]+)\1""")


def knows_role(template: str, role: str) -> bool:
    """Whether ``template`` renders messages of ``role`` on purpose.

    The :data:`BASE_ROLES` always; any other role (``tool``, ``ipython``, ``function``...)
    only if the template names it (as a quoted string): a template that writes
    ``message['role']`` as it is would render a ``narrator`` turn just as well, but the
    model never saw one, and a template that skips roles it does not know would drop it.
    """
    if role in BASE_ROLES:
        return True
    return f"'{role}'" in template or f'"{role}"' in template


def template_roles(template: str) -> tuple[str, ...]:
    """The roles ``template`` accepts, for messages: the :data:`BASE_ROLES` and the roles
    it tests messages for."""
    named = []
    for match in _ROLE_TEST.finditer(template):
        if match.group(2):
            named.append(match.group(2))
        else:
            named += [quoted.group(2) for quoted in _QUOTED.finditer(match.group(3) or "")]
    extra = [role for role in dict.fromkeys(named) if role not in BASE_ROLES]
    return (*BASE_ROLES, *extra)
