"""The two ways ``sloth chat`` / ``sloth generate`` run a model: transformers or llama.cpp.

Both render the prompt with :class:`~.prompt.PromptFormat` and only tokenise it
themselves, check it against the context, and stop at the same kind of ids, so their
greedy replies can be compared token for token.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TextIO

from sloth_core.errors import PluginMissingError, SlothError
from sloth_core.modes import for_inference
from sloth_core.sources import ModelSource, load_source, resolve_source

from .generation import Completion, SamplingOptions, cut_at_stop
from .prompt import PromptFormat, choose_format, fit_context, own_template

Messages = list[dict[str, str]]


class Engine:
    """A loaded model that turns messages into a reply."""

    #: ``"transformers"`` or ``"llama.cpp"``.
    backend = ""
    source: ModelSource
    format: PromptFormat
    context_length: int | None = None
    stop_ids: list[int]

    def prompt_ids(self, messages: Messages) -> list[int]:
        raise NotImplementedError

    def generate_ids(
        self, prompt_ids: list[int], options: SamplingOptions, stream: TextIO | None
    ) -> Completion:
        raise NotImplementedError

    def reply(
        self, messages: Messages, options: SamplingOptions, *, stream: TextIO | None = None
    ) -> tuple[list[int], Completion]:
        """The prompt ids of ``messages`` and the model's reply to them.

        ``max_new_tokens`` is cut to what fits in the context after the prompt.

        Raises:
            PromptTooLongError: the prompt alone fills the context.
        """
        ids = self.prompt_ids(messages)
        room = fit_context(len(ids), options.max_new_tokens, self.context_length)
        options = dataclasses.replace(options, max_new_tokens=room)
        return ids, self.generate_ids(ids, options, stream)


class TransformersEngine(Engine):
    """A model directory, adapter or hub id through ``FastLanguageModel`` (patched)."""

    backend = "transformers"

    def __init__(
        self,
        source: ModelSource,
        *,
        chat_template: str | None = None,
        load_in_4bit: bool = False,
        device: str = "auto",
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ) -> None:
        self.source = source
        self.model, self.tokenizer = load_transformers(
            source, load_in_4bit=load_in_4bit, device=device,
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        )  # fmt: skip
        from sloth_core.patching import unwrap_model

        from .stop import stop_token_ids

        base = unwrap_model(self.model)
        self.context_length = getattr(base.config, "max_position_embeddings", None)
        specials = self.tokenizer.special_tokens_map
        specials = {k: v for k, v in specials.items() if isinstance(v, str)}
        self.format = choose_format(
            own_template(getattr(self.tokenizer, "chat_template", None)),
            origin="tokenizer",
            special_tokens=specials,
            option=chat_template,
            trained=source.trained_chat_template,
        )
        self.stop_ids = stop_token_ids(self.tokenizer, base, self.format.template or "")

    def prompt_ids(self, messages: Messages) -> list[int]:
        text = self.format.render(messages)
        # A template writes its own bos; plain text gets the tokenizer's usual specials.
        return self.tokenizer(text, add_special_tokens=self.format.plain)["input_ids"]

    def generate_ids(
        self, prompt_ids: list[int], options: SamplingOptions, stream: TextIO | None
    ) -> Completion:
        from .generation import generate

        return generate(
            self.model, self.tokenizer, prompt_ids, options, stop_ids=self.stop_ids, stream=stream
        )


def load_transformers(
    source: ModelSource, *, load_in_4bit: bool = False, device: str = "auto",
    trust_remote_code: bool = False, allow_pickle: bool = False,
) -> tuple[Any, Any]:  # fmt: skip
    """Load ``source`` through the model-source service (:func:`sloth_core.sources.load_source`)
    and put it in inference mode (:func:`~.modes.for_inference`)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_source(
        source, device=None if device == "cpu" else device, load_in_4bit=load_in_4bit,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        apply_trained_template=False,  # weighed against --chat-template in choose_format
    )  # fmt: skip
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    for_inference(model, tokenizer)
    return model, tokenizer


def _template_beside(gguf: Path) -> str | None:
    """The chat template of a Hugging Face tokenizer saved next to a GGUF file, if any."""
    directory = gguf.parent
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if config.is_file():
        try:
            return own_template(json.loads(config.read_text()).get("chat_template"))
        except ValueError:
            return None
    return None


def _llama_cpp() -> Any:
    try:
        from sloth_core.sdk import llama_cpp
    except ImportError:
        pass
    else:
        if llama_cpp.available():
            return llama_cpp
    raise PluginMissingError(llama_cpp_missing("running a GGUF file"))


def llama_cpp_missing(what: str) -> str:
    """Why ``what`` needs llama-cpp-python, and the commands that install it here."""
    from sloth_core.catalog import install_command

    return (
        f"{what} needs llama.cpp's Python bindings (llama-cpp-python), which are not "
        f"installed: `{install_command('sloth-gguf', 'llama-cpp')}`, or `pip install "
        'llama-cpp-python` (a source build of several minutes; CMAKE_ARGS="-DGGML_NATIVE=OFF" '
        "where the native build dies with an illegal instruction). Or run the merged model "
        "directory instead (`sloth export ... --format merged_16bit`)"
    )


class LlamaCppEngine(Engine):
    """A GGUF file through llama.cpp (greedy only), prompts rendered here."""

    backend = "llama.cpp"

    def __init__(self, source: ModelSource, *, chat_template: str | None = None) -> None:
        from .gguf_file import read_gguf

        self.source = source
        self.path = Path(source.path)
        self.llama_cpp = _llama_cpp()
        self.info = read_gguf(self.path)
        own, origin = self.info.chat_template, "gguf"
        if own is None:
            own, origin = _template_beside(self.path), "tokenizer beside the GGUF file"
        self.format = choose_format(
            own, origin=origin, special_tokens=self.info.special_tokens(),
            option=chat_template, trained=source.trained_chat_template,
        )  # fmt: skip
        self.context_length = self.info.context_length
        self.stop_ids = self.info.stop_ids(self.format.template or "")

    def prompt_ids(self, messages: Messages) -> list[int]:
        text = self.format.render(messages)
        tokenized = self.llama_cpp.run_tokenize(
            str(self.path), [text], add_special=self.format.plain, parse_special=True
        )
        return list(tokenized[0])

    def generate_ids(
        self, prompt_ids: list[int], options: SamplingOptions, stream: TextIO | None
    ) -> Completion:
        if not options.greedy or options.repetition_penalty != 1.0:
            raise SlothError(
                "a GGUF file runs greedy only here (temperature 0, no repetition penalty); "
                "sample with the merged model directory instead"
            )
        out = self.llama_cpp.run_generate(
            str(self.path), prompt_ids, max_new_tokens=options.max_new_tokens,
            stop_ids=self.stop_ids,
        )  # fmt: skip
        ids, stop = cut_at_stop(out, self.stop_ids)
        text = self.info.decode(ids)
        if stream is not None:  # the subprocess returns the reply whole
            stream.write(text + "\n")
            stream.flush()
        return Completion(ids, text, "stop" if stop is not None else "length", stop)


def open_engine(
    name: str | Path,
    *,
    chat_template: str | None = None,
    load_in_4bit: bool = False,
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Engine:
    """Resolve ``name`` (:func:`sloth_core.sources.resolve_source`) and load it with the right
    backend: llama.cpp for a GGUF file, transformers for the rest."""
    source = resolve_source(name)
    if source.kind == "gguf":
        if load_in_4bit:
            raise SlothError("--load-in-4bit applies to transformers models, not to a GGUF file")
        return LlamaCppEngine(source, chat_template=chat_template)
    return TransformersEngine(
        source, chat_template=chat_template, load_in_4bit=load_in_4bit, device=device,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
    )  # fmt: skip
