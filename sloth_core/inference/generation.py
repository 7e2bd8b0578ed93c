"""Generation through transformers' ``generate``: options, stop ids, streaming.

Greedy by default (``temperature=0``), so a reply is reproducible and comparable across
backends; ``temperature > 0`` samples, with ``top_p``, ``top_k`` and ``seed``.
``repetition_penalty`` applies to both.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from sloth_core.errors import SlothError


@dataclass
class SamplingOptions:
    """How to pick each next token, and how many at most."""

    max_new_tokens: int = 256
    #: 0 (or less): greedy, the most likely token each time.
    temperature: float = 0.0
    top_p: float = 1.0
    #: 0: no top-k cut.
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def check(self) -> SamplingOptions:
        """Raise :class:`SlothError` naming the first bad value; return ``self``."""
        if self.max_new_tokens < 1:
            raise SlothError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise SlothError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SlothError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise SlothError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Completion:
    """A reply: its ids and text without the stop token, and why it ended."""

    ids: list[int]
    text: str
    #: ``"stop"`` (an end-of-turn or EOS id) or ``"length"`` (``max_new_tokens`` reached).
    finish_reason: str
    stop_id: int | None = None


def cut_at_stop(ids: Iterable[int], stop_ids: Iterable[int]) -> tuple[list[int], int | None]:
    """``ids`` up to the first stop id (excluded), and that id (``None`` if none came)."""
    stops = set(stop_ids)
    out: list[int] = []
    for token in ids:
        if token in stops:
            return out, int(token)
        out.append(int(token))
    return out, None


def generation_config(
    model: Any, options: SamplingOptions, stop_ids: list[int], pad_token_id: int | None
) -> Any:
    """The model's generation config with ``options`` and ``stop_ids`` in it.

    A copy of the model's own (rather than a fresh one that transformers would merge with
    it), with the sampling fields cleared for greedy decoding, so a checkpoint's
    ``do_sample=True, temperature=0.6`` neither samples nor warns.
    """
    from transformers import GenerationConfig

    config = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    config.max_new_tokens = options.max_new_tokens
    config.max_length = None
    config.use_cache = True
    config.eos_token_id = list(stop_ids) or None
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    elif config.pad_token_id is None and stop_ids:
        config.pad_token_id = stop_ids[0]
    config.repetition_penalty = options.repetition_penalty
    config.do_sample = not options.greedy
    if options.greedy:
        config.temperature = config.top_p = config.top_k = None
    else:
        config.temperature = options.temperature
        config.top_p = options.top_p
        # 0 (off) as such: None would let generate fill in its own default (top-k 50).
        config.top_k = options.top_k
    return config


def terminal_streamer(
    tokenizer: Any, stream: TextIO | None = None, stop_ids: Iterable[int] = ()
) -> Any:
    """A ``TextStreamer`` that writes the reply (no prompt, no special tokens, no stop
    token) to ``stream`` (standard output by default) as the tokens come, and a newline at
    the end."""
    from transformers import TextStreamer

    stops = set(stop_ids)

    class _Streamer(TextStreamer):
        def put(self, value: Any) -> None:
            if stops and not (self.skip_prompt and self.next_tokens_are_prompt):
                keep = [t for t in value.flatten().tolist() if t not in stops]
                if not keep:
                    return
                value = value.new_tensor(keep)
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out = stream or sys.stdout
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    options: SamplingOptions,
    *,
    stop_ids: list[int],
    stream: TextIO | None = None,
    streamer: Any = None,
) -> Completion:
    """Continue ``prompt_ids`` with ``model.generate`` until a stop id or ``max_new_tokens``.

    Args:
        model: a model in inference mode (:func:`~sloth_core.modes.for_inference`).
        tokenizer: decodes the reply (and the streamed text).
        prompt_ids: the rendered, tokenised prompt.
        options: sampling and length.
        stop_ids: every id that ends the reply (:func:`~.stop.stop_token_ids`).
        stream: write the reply there as it comes (see :func:`terminal_streamer`).
        streamer: any transformers streamer instead (``TextIteratorStreamer``...).
    """
    import torch

    if stream is not None and streamer is None:
        streamer = terminal_streamer(tokenizer, stream, stop_ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    config = generation_config(model, options, stop_ids, tokenizer.pad_token_id)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            streamer=streamer,
        )
    new = output[0, len(prompt_ids) :].tolist()
    ids, stop = cut_at_stop(new, stop_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    # Short of max_new_tokens without one of stop_ids: an EOS transformers added itself.
    ended = stop is not None or len(new) < options.max_new_tokens
    return Completion(ids, text, "stop" if ended else "length", stop)
