"""Published chat templates (templates/*.jinja) and tokenizers that carry them.

Each ``templates/<name>.jinja`` is the ``chat_template`` string of the model's
``tokenizer_config.json``, decoded from JSON, with one trailing newline added (read back
without it): ``llama-3`` Meta-Llama-3-8B-Instruct, ``llama-3.1`` Llama-3.1-8B-Instruct (3.3
has the same; 3.2's differs only by the current date where ``strftime_now`` exists),
``gemma-2`` gemma-2-9b-it, ``qwen2.5`` Qwen2.5-7B-Instruct, ``qwen3`` Qwen3-8B,
``phi-3.5`` Phi-3.5-mini-instruct.

:func:`model_tokenizer` builds sloth's test tokenizer (trained on the spot) with the
model's bos, eos and special tokens, and with a post-processor that adds the bos to plain
text when the model's tokenizer does, so that token-level checks see the model's markers as
single tokens exactly as the real tokenizer would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from sloth_core.testing.tokenizer import PAD_TOKEN, build_tokenizer

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Model:
    bos: str | None  # None: the model has no bos (Qwen)
    eos: str
    specials: tuple[str, ...]  # the special tokens its template writes
    words: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's think tags)
    adds_bos: bool = False  # tokenizer(text) starts with the bos


_LLAMA = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_QWEN = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")

MODELS: dict[str, Model] = {
    "llama-3": Model("<|begin_of_text|>", "<|eot_id|>", _LLAMA, adds_bos=True),
    "llama-3.1": Model(
        "<|begin_of_text|>", "<|eot_id|>", (*_LLAMA, "<|eom_id|>", "<|python_tag|>"), adds_bos=True
    ),
    "gemma-2": Model("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), adds_bos=True),
    "qwen2.5": Model(None, "<|im_end|>", _QWEN),
    "qwen3": Model(None, "<|im_end|>", _QWEN, words=("<think>", "</think>")),
    # Phi-3.5's LlamaTokenizer adds <s> to plain text unless its config says otherwise;
    # adding it is the case where a training row could differ from inference.
    "phi-3.5": Model(
        "<s>",
        "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        adds_bos=True,
    ),
}


def template_text(name: str) -> str:
    """The published template of model ``name`` (a key of :data:`MODELS`)."""
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8").removesuffix("\n")


def model_tokenizer(name: str, *, adds_bos: bool | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer with model ``name``'s special tokens and published chat template.

    ``adds_bos`` overrides whether plain text gets the bos (the model's way by default).
    """
    model = MODELS[name]
    backend = Tokenizer.from_str(build_tokenizer().backend_tokenizer.to_str())
    backend.add_special_tokens([t for t in (model.bos, model.eos, *model.specials) if t])
    backend.add_tokens(list(model.words))
    steps = [processors.ByteLevel(trim_offsets=False)]
    if model.bos and (model.adds_bos if adds_bos is None else adds_bos):
        bos = (model.bos, backend.token_to_id(model.bos))
        steps.append(processors.TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos]))
    backend.post_processor = processors.Sequence(steps)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=model.bos,
        eos_token=model.eos,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(model.specials),
        chat_template=template_text(name),
        clean_up_tokenization_spaces=False,
    )
