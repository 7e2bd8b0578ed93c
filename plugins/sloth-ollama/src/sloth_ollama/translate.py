"""The tokenizer's Jinja chat template, translated into an Ollama (Go) ``TEMPLATE``.

Two steps:

1. **Family**, by the template's markers: ``<|im_start|>`` chatml (``qwen`` when it adds
   a default system turn), ``<|start_header_id|>`` llama-3, ``[INST]`` mistral,
   ``<start_of_turn>`` gemma, ``<|assistant|>`` phi-3, ``### Instruction`` alpaca. The
   family names the template and adds its stop words.
2. **Structure**, by probing: the Jinja template is rendered on sentinel conversations,
   and the text around each sentinel gives each role's prefix and suffix, the generation
   prompt, where a system message goes (its own turn, or merged into the first user turn as
   Mistral and Gemma do), and the default system prompt. When every role's turn differs
   only by the role's name (ChatML, Llama 3, Phi-3) the template writes ``{{ .Role }}``,
   so other roles (``tool``) render too.

Every translation is then rendered with :mod:`.gotemplate` on several conversations and
must equal the Jinja rendering exactly (bos aside: llama.cpp adds it when the tokenizer
does); otherwise :class:`TemplateTranslationError` says where they differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sloth_core.sdk import SlothError

from .gotemplate import GoTemplateError, render

__all__ = ["FAMILIES", "TemplateTranslationError", "Translation", "render_messages", "translate"]


class TemplateTranslationError(SlothError):
    """The chat template cannot be written as an Ollama template (the message says why)."""


#: Family -> (markers, any of which identifies it; extra stop words).
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chatml": (("<|im_start|>",), ()),
    "llama-3": (("<|start_header_id|>",), ()),
    "gemma": (("<start_of_turn>",), ()),
    "phi-3": (("<|assistant|>", "<|user|>"), ()),
    "mistral": (("[INST]",), ("[INST]",)),
    "alpaca": (("### Instruction", "### Response"), ("### Instruction:",)),
}

# Sentinels: plain words no template changes and no template contains.
_S, _U1, _A1, _U2 = (
    "SlothProbeSystem",
    "SlothProbeUserOne",
    "SlothProbeAssistant",
    "SlothProbeUserTwo",
)

#: Conversations every translation must render exactly as the Jinja template does.
CHECK_CONVERSATIONS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Hello there!"),),
    (("system", "You are a terse assistant."), ("user", "Hi.")),
    (("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?")),
    (
        ("system", "Answer in French."),
        ("user", "Good morning"),
        ("assistant", "Bonjour"),
        ("user", "Thank you"),
    ),
    (("user", "Name a colour."), ("assistant", "Blue.")),
    (
        ("system", "Be brief."),
        ("user", "One?"),
        ("assistant", "1"),
        ("user", "Two?"),
        ("assistant", "2"),
    ),
)


@dataclass
class Translation:
    """An Ollama template and what goes with it in the Modelfile."""

    template: str
    family: str  # a key of FAMILIES, or "generic"
    system: str | None = None  # the template's default system prompt
    bos: str = ""  # stripped from the template's start: llama.cpp adds it
    stops: list[str] = field(default_factory=list)  # the family's extra stop words


@dataclass
class _Parts:
    lead: str  # text before everything (the bos), kept in the template unless stripped
    preamble: str  # after lead, before the first message when there is no system message
    user: tuple[str, str]
    assistant: tuple[str, str]  # the prefix is the generation prompt
    system_mode: str  # "turn", "merged" or "none"
    system: tuple[str, str] = ("", "")  # turn: prefix and suffix; merged: ("", separator)
    default_system: str | None = None


def _messages(conversation) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in conversation]


def _jinja(tokenizer: Any, template: str, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation
    )


def _between(text: str, before: str, after: str | None) -> str:
    start = text.index(before) + len(before)
    return text[start:] if after is None else text[start : text.index(after, start)]


def _fail(why: str) -> TemplateTranslationError:
    return TemplateTranslationError(
        f"cannot translate the chat template into an Ollama template: {why}. Pass a "
        "simpler template (options chat_template=, e.g. 'chatml') or write the Modelfile's "
        "TEMPLATE by hand"
    )


def _probe(tokenizer: Any, template: str, bos: str) -> _Parts:
    def run(roles: str, generation: bool) -> str:
        names = {"s": ("system", _S), "u": ("user", _U1), "a": ("assistant", _A1),
                 "v": ("user", _U2)}  # fmt: skip
        try:
            return _jinja(tokenizer, template, _messages(names[r] for r in roles), generation)
        except Exception as exc:
            raise _fail(f"rendering a probe conversation raised {exc!r}") from None

    user_only, user_gen = run("u", False), run("u", True)
    if not user_gen.startswith(user_only):
        raise _fail("the generation prompt is not appended after the last turn")
    gen = user_gen[len(user_only) :]
    closed = run("ua", False)
    if _A1 not in closed:
        raise _fail("an assistant message's content does not appear in the rendering")
    asst_suffix = _between(closed, _A1, None)
    three = run("uav", True)
    if not 0 <= three.find(_U1) < three.find(_A1) < three.find(_U2):
        raise _fail("the messages do not appear once each, in order")
    head, between_ua = three[: three.index(_U1)], _between(three, _U1, _A1)
    between_av, tail = _between(three, _A1, _U2), _between(three, _U2, None)
    if not between_av.startswith(asst_suffix):
        raise _fail("an assistant turn ends differently when it is the last one")
    user_prefix = between_av[len(asst_suffix) :]
    if not between_ua.endswith(gen) or not head.endswith(user_prefix):
        raise _fail("the assistant turn does not open with the generation prompt")
    user_suffix = between_ua[: len(between_ua) - len(gen)]
    if tail != user_suffix + gen:
        raise _fail("the last user turn ends differently from the others")
    lead = bos if bos and head.startswith(bos) else ""
    preamble = head[len(lead) : len(head) - len(user_prefix)]
    parts = _Parts(lead, preamble, (user_prefix, user_suffix), (gen, asst_suffix), "none")
    try:
        with_system = _jinja(
            tokenizer, template,
            _messages([("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)]), True,
        )  # fmt: skip
    except Exception:  # a template without a system role raises: the system is dropped
        return parts
    if _S not in with_system:
        return parts
    if not 0 <= with_system.find(_S) < with_system.find(_U1):
        raise _fail("the system message does not come before the first user message")
    if with_system[with_system.index(_U1) :] != three[three.index(_U1) :]:
        raise _fail("a system message changes the turns after the first one")
    before_s, after_s = with_system[: with_system.index(_S)], _between(with_system, _S, _U1)
    if after_s.endswith(user_prefix) and before_s.startswith(lead):
        prefix, suffix = before_s[len(lead) :], after_s[: len(after_s) - len(user_prefix)]
        parts.system_mode, parts.system = "turn", (prefix, suffix)
        if preamble:
            if not (preamble.startswith(prefix) and preamble.endswith(suffix)):
                raise _fail("text before the first turn that is not a default system turn")
            parts.default_system = preamble[len(prefix) : len(preamble) - len(suffix)]
        return parts
    if before_s == head and not preamble:
        parts.system_mode, parts.system = "merged", ("", after_s)
        return parts
    raise _fail("the system message is neither a turn of its own nor part of the first user turn")


class _Go:
    """Builds a Go template from text and actions; an action directly after another goes on
    a new line with ``{{-`` (trimming only that newline), so literal text is never trimmed."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, str]] = []

    def text(self, value: str) -> _Go:
        if value:
            if "{{" in value:  # literal braces: written as a Go string
                escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                return self.action(f'"{escaped}"')
            self.parts.append(("text", value))
        return self

    def action(self, value: str) -> _Go:
        self.parts.append(("action", value))
        return self

    def build(self) -> str:
        out, previous = [], "text"
        for kind, value in self.parts:
            if kind == "text":
                out.append(value)
            elif previous == "action":
                out.append(f"\n{{{{- {value} }}}}")
            else:
                out.append(f"{{{{ {value} }}}}")
            previous = kind
        return "".join(out)


def _uniform(parts: _Parts) -> tuple[str, str, str] | None:
    """``(before_role, after_role, suffix)`` when every turn is ``before ROLE after CONTENT
    suffix``: the template can then write ``{{ .Role }}``."""
    (user_prefix, user_suffix), (gen, asst_suffix) = parts.user, parts.assistant
    if parts.system_mode != "turn" or user_prefix.count("user") != 1:
        return None
    before, after = user_prefix.split("user")
    system_prefix, system_suffix = parts.system
    if (
        gen == f"{before}assistant{after}"
        and system_prefix == f"{before}system{after}"
        and user_suffix == asst_suffix == system_suffix
    ):
        return before, after, user_suffix
    return None


def _go_template(parts: _Parts, keep_lead: bool) -> str:
    go = _Go()
    if keep_lead:
        go.text(parts.lead)
    go.action("range $i, $_ := .Messages")
    go.action("$last := eq (len (slice $.Messages $i)) 1")
    if parts.default_system is not None:
        prefix, suffix = parts.system
        go.action('if and (eq $i 0) (ne .Role "system")')
        go.text(prefix + parts.default_system + suffix).action("end")
    uniform = _uniform(parts)
    if uniform is not None:
        before, after, suffix = uniform
        go.text(before).action(".Role").text(after).action(".Content").text(suffix)
    else:
        user_prefix, user_suffix = parts.user
        gen, asst_suffix = parts.assistant
        go.action('if eq .Role "user"').text(user_prefix)
        if parts.system_mode == "merged":
            go.action('if and (eq $i 1) (eq (index $.Messages 0).Role "system")')
            go.action("(index $.Messages 0).Content").text(parts.system[1]).action("end")
        go.action(".Content").text(user_suffix)
        go.action('else if eq .Role "assistant"').text(gen).action(".Content").text(asst_suffix)
        if parts.system_mode == "turn":
            prefix, suffix = parts.system
            go.action('else if eq .Role "system"').text(prefix).action(".Content").text(suffix)
        go.action("end")
    if parts.assistant[0]:  # the generation prompt (Mistral has none: [/INST] ends the turn)
        go.action('if and $last (ne .Role "assistant")').text(parts.assistant[0]).action("end")
    go.action("end")
    return go.build()


def render_messages(template: str, messages: list[dict[str, str]]) -> str:
    """Render an Ollama ``template`` for ``messages`` as Ollama passes them (``.Messages``
    with ``.Role``/``.Content``, ``.System`` the system messages joined)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
        "System": system,
        "Prompt": "",
        "Response": "",
        "Tools": None,
    }
    return render(template, data)


def family_of(template: str) -> str:
    """The family whose markers ``template`` contains, else ``"generic"``."""
    for name, (markers, _) in FAMILIES.items():
        if any(marker in template for marker in markers):
            return name
    return "generic"


def _check(tokenizer: Any, jinja: str, go: str, bos: str) -> None:
    for conversation in CHECK_CONVERSATIONS:
        messages = _messages(conversation)
        generation = messages[-1]["role"] != "assistant"
        try:
            expected = _jinja(tokenizer, jinja, messages, generation)
        except Exception:  # the template refuses this conversation (a system role): skip it
            continue
        try:
            got = bos + render_messages(go, messages)
        except GoTemplateError as exc:
            raise _fail(f"the translated template does not render: {exc}") from None
        if got != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None
            )
            at = min(len(got), len(expected)) if at is None else at
            raise _fail(
                f"for roles {[m['role'] for m in messages]} it writes "
                f"{got[max(0, at - 20) : at + 30]!r} where the chat template writes "
                f"{expected[max(0, at - 20) : at + 30]!r}"
            )


def translate(
    tokenizer: Any, template: str | None = None, *, runtime_bos: bool | None = None
) -> Translation:
    """Translate ``template`` (default: the tokenizer's own) into an Ollama template.

    Args:
        tokenizer: a Hugging Face tokenizer (renders the Jinja template; gives the bos).
        template: a Jinja chat template, or ``None`` for ``tokenizer.chat_template``.
        runtime_bos: whether llama.cpp adds the bos itself (the GGUF's ``add_bos_token``);
            by default, whether the tokenizer adds it when encoding. When it does, a bos at
            the template's start is left out of the Ollama template.

    Raises:
        TemplateTranslationError: no template, or one this cannot express exactly.
    """
    template = template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise TemplateTranslationError(
            "the tokenizer has no chat template to translate for Ollama; pass one "
            "(options chat_template='chatml', a built-in name, or a Jinja template)"
        )
    bos = str(getattr(tokenizer, "bos_token", None) or "")
    if runtime_bos is None:
        runtime_bos = _adds_bos(tokenizer)
    parts = _probe(tokenizer, template, bos)
    strip = bool(parts.lead) and runtime_bos
    go = _go_template(parts, keep_lead=not strip)
    _check(tokenizer, template, go, parts.lead if strip else "")
    family = family_of(template)
    if family == "chatml" and parts.default_system:
        family = "qwen"
    stops = list(FAMILIES.get("chatml" if family == "qwen" else family, ((), ()))[1])
    return Translation(go, family, parts.default_system, parts.lead if strip else "", stops)


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return len(ids) > len(plain) and ids[0] == bos
