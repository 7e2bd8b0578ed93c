"""The Ollama ``Modelfile``: the GGUF, its chat template in Go syntax, stops and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sloth_core.sdk import stop_tokens

from .translate import TemplateTranslationError, Translation, translate

GGUF_NAME = "model.gguf"
#: ``num_ctx`` is the model's ``max_position_embeddings``, at most this (Ollama allocates
#: the KV cache for the whole context up front); ``num_ctx=`` overrides it.
MAX_NUM_CTX = 8192
DEFAULT_TEMPERATURE = 0.7


@dataclass
class Modelfile:
    """A Modelfile's parts; ``text`` is what is written."""

    template: str
    family: str
    system: str | None = None
    stops: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    gguf: str = GGUF_NAME
    bos: str = ""

    @property
    def text(self) -> str:
        lines = [
            f"# Written by sloth-ollama (chat template family: {self.family}).",
            f"# Create the model with: ollama create NAME -f {'Modelfile'}",
            f"FROM ./{self.gguf}",
            f'TEMPLATE """{self.template}"""',
        ]
        if self.system is not None:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f'PARAMETER stop "{stop}"' for stop in self.stops]
        lines += [f"PARAMETER {name} {value}" for name, value in self.parameters.items()]
        return "\n".join(lines) + "\n"


def _check_quotable(what: str, value: str) -> None:
    if '"""' in value:
        raise TemplateTranslationError(f'the {what} contains """, which a Modelfile cannot quote')


def _parameters(config: Any, generation_config: Any, options: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    sampling = generation_config is not None and getattr(generation_config, "do_sample", False)
    temperature = options.get("temperature")
    if temperature is None and sampling:
        temperature = getattr(generation_config, "temperature", None)
    params["temperature"] = DEFAULT_TEMPERATURE if temperature is None else temperature
    top_p = options.get("top_p")
    if top_p is None and sampling and getattr(generation_config, "top_p", None) not in (None, 1.0):
        top_p = generation_config.top_p
    if top_p is not None:
        params["top_p"] = top_p
    num_ctx = options.get("num_ctx")
    if num_ctx is None:
        max_positions = getattr(config, "max_position_embeddings", None) if config else None
        num_ctx = min(int(max_positions), MAX_NUM_CTX) if max_positions else 4096
    params["num_ctx"] = int(num_ctx)
    return params


def build_modelfile(
    tokenizer: Any,
    config: Any = None,
    *,
    generation_config: Any = None,
    options: dict[str, Any] | None = None,
    gguf_name: str = GGUF_NAME,
) -> Modelfile:
    """The Modelfile of a model with this tokenizer and config.

    Args:
        tokenizer: the Hugging Face tokenizer (its chat template is translated).
        config: the model config (``max_position_embeddings`` gives ``num_ctx``).
        generation_config: sampling defaults (``temperature``, ``top_p``) when it samples.
        options: ``chat_template`` (a built-in name or a Jinja template instead of the
            tokenizer's), ``system`` (replaces the default system prompt), ``temperature``,
            ``top_p``, ``num_ctx``.
        gguf_name: the GGUF file's name next to the Modelfile.

    Raises:
        TemplateTranslationError: the chat template cannot be written for Ollama.
    """
    options = options or {}
    template = options.get("chat_template")
    if template:
        from sloth_core.sdk import resolve_chat_template

        template = resolve_chat_template(tokenizer, template)
    translation: Translation = translate(tokenizer, template)
    system = options.get("system", translation.system)
    stops = [token for token, _ in stop_tokens(_with_template(tokenizer, template))]
    for stop in translation.stops:
        if stop not in stops:
            stops.append(stop)
    _check_quotable("template", translation.template)
    if system is not None:
        _check_quotable("system prompt", system)
    stops = [s for s in stops if '"' not in s and "\n" not in s]
    return Modelfile(
        template=translation.template,
        family=translation.family,
        system=system,
        stops=stops,
        parameters=_parameters(config, generation_config, options),
        gguf=gguf_name,
        bos=translation.bos,
    )


class _TemplateView:
    """The tokenizer seen with another chat template (for :func:`stop_tokens`)."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        self._tokenizer, self.chat_template = tokenizer, template

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _with_template(tokenizer: Any, template: str | None) -> Any:
    return tokenizer if not template else _TemplateView(tokenizer, template)
