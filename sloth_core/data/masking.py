"""Which characters of a rendered conversation are trained: the assistant responses.

Masking finds each assistant response as a span of characters in the rendered
conversation, then trains the tokens that overlap a span. The span of assistant turn ``i``
starts where rendering ``messages[:i]`` with the generation prompt ends, which is where
the model starts writing at inference. It holds what rendering ``messages[: i + 1]`` adds
(the response and its end-of-turn marker, less trailing whitespace), checked against the
full rendering; that needs no markers in the template and is exact for multi-turn
conversations. Two ways a template renders a turn differently in the whole conversation:

- it drops the start of an earlier response (Qwen3 keeps the ``<think>`` block of the turns
  after the last user message only): the span is what the whole rendering kept, up to the
  same end-of-turn marker, provided that is the end of the response rendered alone;
- it appends an eos after the end-of-turn marker of the last turn only (Phi-3): the eos is
  not trained, in any turn. Generation stops at the end-of-turn marker (see
  :mod:`sloth_core.inference.stop`), so the model never writes what follows it, and
  training it on the last turn alone would teach that a reply goes on after its end.

A template that changes a response otherwise falls back to finding the response's text in
order, plus the special token that ends it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["IGNORE_INDEX", "Markers", "label_by_offsets", "response_spans"]

#: The label of a token that is not trained on (PyTorch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100

Render = Callable[[list[dict[str, str]], bool], str]


@dataclass(frozen=True)
class Markers:
    """A tokenizer's special tokens (longest first) and its eos, as text."""

    specials: tuple[str, ...]
    eos: str | None

    @classmethod
    def of(cls, tokenizer: Any) -> Markers:
        specials = set(getattr(tokenizer, "all_special_tokens", ()) or ())
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        specials.update(
            token.content for token in added.values() if getattr(token, "special", False)
        )
        # Longest first, so that a marker that extends another is matched whole.
        ordered = tuple(sorted((s for s in specials if s), key=len, reverse=True))
        return cls(ordered, getattr(tokenizer, "eos_token", None) or None)

    def ending(self, text: str) -> str | None:
        """The special token ``text`` ends with, if any."""
        return next((s for s in self.specials if text.endswith(s)), None)

    def response(self, rendered: str) -> str:
        """A response as rendered alone, less trailing whitespace and an eos after its
        end-of-turn marker."""
        rendered = rendered.rstrip()
        if self.eos and rendered.endswith(self.eos):
            before = rendered[: -len(self.eos)].rstrip()
            marker = self.ending(before)
            if marker is not None and marker != self.eos:
                return before
        return rendered

    def kept(self, text: str, start: int, response: str) -> int | None:
        """How much of ``response`` the whole rendering ``text`` has at ``start``: all of
        it, or its end (from the same end-of-turn marker back) when the template drops the
        start of an earlier turn; ``None`` when neither."""
        if text.startswith(response, start):
            return len(response)
        marker = self.ending(response)
        at = text.find(marker, start) if marker else -1
        if not marker or at < 0:
            return None
        end = at + len(marker)
        return end - start if response.endswith(text[start:end]) else None


def response_spans(
    text: str, messages: list[dict[str, str]], render: Render, markers: Markers
) -> list[tuple[int, int]] | None:
    """The character spans of the assistant responses in ``text``; ``None`` if one is lost."""
    spans = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = _turn_span(text, messages, index, render, cursor, markers)
        if span is None:
            return None
        if span[1] > span[0]:
            spans.append(span)
        cursor = span[1]
    return spans


def _turn_span(
    text: str,
    messages: list[dict[str, str]],
    index: int,
    render: Render,
    cursor: int,
    markers: Markers,
) -> tuple[int, int] | None:
    if index > 0:  # (a conversation that opens with the assistant has no prompt to render)
        try:
            prompt = render(messages[:index], True)
            turn = render(messages[: index + 1], False)
        except Exception:
            prompt = turn = ""
        if prompt and len(prompt) >= cursor and text.startswith(prompt):
            start = len(prompt)
            if turn.startswith(prompt):
                kept = markers.kept(text, start, markers.response(turn[start:]))
                if kept is not None:
                    return start, start + kept
            cursor = start  # the response is after the prompt, not in it
    return _search_span(text, messages[index]["content"], cursor, markers.specials)


def _search_span(
    text: str, content: str, cursor: int, specials: Sequence[str]
) -> tuple[int, int] | None:
    needle = content.strip()
    if not needle:  # an empty response: nothing to find, nothing to train
        return cursor, cursor
    start = text.find(needle, cursor)
    if start < 0:
        return None
    end = start + len(needle)
    for token in specials:
        if text.startswith(token, end):
            return start, end + len(token)
    return start, end


def label_by_offsets(
    ids: list[int], offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """``ids`` where a token overlaps a span, :data:`IGNORE_INDEX` elsewhere."""
    # A token is trained if it holds any character of a response: a token that straddles
    # the start of one (a marker merged with the first word) is needed to produce it.
    labels = [IGNORE_INDEX] * len(ids)
    span = 0
    for index, (start, end) in enumerate(offsets):
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        if span == len(spans):
            break
        low, high = spans[span]
        if (start < high and end > low) or (start == end and low <= start < high):
            labels[index] = ids[index]
    return labels
