"""Rows -> token ids and labels: chat template, response masking, truncation.

Masking finds each assistant response as a span of characters in the rendered
conversation, then trains the tokens that overlap a span. The span of assistant turn ``i``
is what rendering ``messages[: i + 1]`` adds to rendering ``messages[:i]`` with the
generation prompt (the response and its end-of-turn marker, less trailing whitespace),
checked against the full rendering; that needs no markers in the template and is exact
for multi-turn conversations. A template that renders a prefix differently from the whole
(one that appends an eos after the last turn only, say) falls back to finding the
response's text in order, plus the special token that ends it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError
from .formats import DATA_FORMATS, detect_format, to_messages
from .templates import resolve_chat_template

__all__ = ["IGNORE_INDEX", "Example", "TokenizeStats", "tokenize"]

#: The label of a token that is not trained on (PyTorch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenised row: ``labels`` is ``input_ids`` with ``-100`` where not trained.

    Labels are not shifted (the model shifts them), so ``labels[0]`` is always ``-100``:
    no position predicts the first token.
    """

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids and labels differ in length ({len(self.input_ids)} and "
                f"{len(self.labels)})"
            )

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeStats:
    """What :func:`tokenize` did with the rows.

    ``rows`` went in, ``kept`` came out. ``truncated`` rows were cut to ``max_seq_length``
    (kept or not). ``dropped_empty`` rows were dropped because no token was left to train
    on; ``dropped_truncated`` of them had some before truncation. ``tokens`` and
    ``trained_tokens`` count the kept examples' tokens and trained labels; ``longest`` is
    the longest kept example.
    """

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    dropped_truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"{self.kept}/{self.rows} rows kept, {self.truncated} truncated, "
            f"{self.dropped_empty} dropped with nothing to train on "
            f"({self.dropped_truncated} by truncation); {self.tokens} tokens, "
            f"{self.trained_tokens} trained, longest {self.longest}"
        )


def tokenize(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    data_format: str | None = None,
    chat_template: str | None = None,
    max_seq_length: int,
    train_on_responses_only: bool = True,
    add_eos: bool = True,
) -> tuple[list[Example], TokenizeStats]:
    """Tokenise ``records`` into training examples, in order, with their statistics.

    ``text`` rows are tokenised as they are (with the tokenizer's bos, and an eos appended
    when ``add_eos``), every token trained. The other formats become chat messages (see
    :func:`~sloth_core.data.formats.to_messages`), rendered with the chat template and
    tokenised; with ``train_on_responses_only`` only the assistant responses and their
    end-of-turn markers are trained, otherwise every token. A bos is prepended when the
    tokenizer adds one to plain text and the template did not render it.

    Args:
        records: rows, as :func:`~sloth_core.data.records.load_records` returns them.
        tokenizer: a Hugging Face tokenizer (a fast one gives exact token boundaries).
        data_format: ``"text"``, ``"alpaca"``, ``"chat"`` or ``"sharegpt"``; detected from
            the first row by default.
        chat_template: a template name, ``"auto"``/``None`` or a Jinja template (see
            :func:`~sloth_core.data.templates.resolve_chat_template`).
        max_seq_length: longer examples keep their first ``max_seq_length`` tokens.
        train_on_responses_only: mask everything but the assistant responses.
        add_eos: append the eos token to ``text`` rows that do not end with it (chat rows
            end with their template's end-of-turn marker).

    Raises:
        DataError: an unknown format, a malformed row (named by number and field), a
            conversation the template cannot render, or no row left with a token to train
            on (the message says when ``max_seq_length`` is the cause).
    """
    if max_seq_length < 2:
        raise DataError(f"max_seq_length must be at least 2, got {max_seq_length}")
    if data_format is None:
        data_format = detect_format(records)
    elif data_format not in DATA_FORMATS:
        raise DataError(f"unknown data_format {data_format!r}; accepted: {', '.join(DATA_FORMATS)}")
    stats = TokenizeStats(rows=len(records))
    if data_format == "text":
        encode = _TextEncoder(tokenizer, add_eos)
    else:
        template = resolve_chat_template(tokenizer, chat_template)
        encode = _ChatEncoder(tokenizer, template, data_format, train_on_responses_only)

    examples = []
    for row, record in enumerate(records, 1):
        ids, labels = encode(record, row)
        if labels:
            labels[0] = IGNORE_INDEX  # no position predicts the first token
        trainable = any(label != IGNORE_INDEX for label in labels)
        if len(ids) > max_seq_length:
            stats.truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if not any(label != IGNORE_INDEX for label in labels):
            stats.dropped_empty += 1
            stats.dropped_truncated += trainable
            continue
        examples.append(Example(ids, labels))
        stats.tokens += len(ids)
        stats.trained_tokens += sum(label != IGNORE_INDEX for label in labels)
        stats.longest = max(stats.longest, len(ids))
    stats.kept = len(examples)
    if not examples:
        raise DataError(_nothing_left(stats, max_seq_length))
    return examples, stats


def _nothing_left(stats: TokenizeStats, max_seq_length: int) -> str:
    if stats.dropped_truncated == stats.rows:
        return (
            f"every row is too long: all {stats.rows} rows have their trained tokens past "
            f"max_seq_length={max_seq_length}; raise max_seq_length or shorten the prompts"
        )
    message = f"no row has a token to train on ({stats.rows} rows"
    if stats.dropped_truncated:
        message += f"; {stats.dropped_truncated} of them only past max_seq_length={max_seq_length}"
    return message + "); check the responses are not empty"


class _TextEncoder:
    def __init__(self, tokenizer: Any, add_eos: bool) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id if add_eos else None

    def __call__(self, record: Mapping[str, Any], row: int) -> tuple[list[int], list[int]]:
        text = record.get("text")
        if not isinstance(text, str):
            got = "missing" if text is None else f"a {type(text).__name__}"
            raise DataError(f"row {row}: field 'text' must be a string, got {got}")
        if not text.strip():
            return [], []
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        return ids, list(ids)


class _ChatEncoder:
    def __init__(
        self, tokenizer: Any, template: str, data_format: str, responses_only: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.data_format = data_format
        self.responses_only = responses_only
        self.bos = _added_bos(tokenizer)
        self.offsets = bool(getattr(tokenizer, "is_fast", False))
        specials = set(getattr(tokenizer, "all_special_tokens", ()) or ())
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        specials.update(
            token.content for token in added.values() if getattr(token, "special", False)
        )
        # Longest first, so that a marker that extends another is matched whole.
        self.specials = sorted((s for s in specials if s), key=len, reverse=True)

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def __call__(self, record: Mapping[str, Any], row: int) -> tuple[list[int], list[int]]:
        messages = to_messages(record, self.data_format, row)
        try:
            text = self.render(messages, False)
        except Exception as exc:  # jinja2 errors and the template's raise_exception
            raise DataError(
                f"row {row}: the chat template cannot render this conversation ({exc})"
            ) from exc
        if self.responses_only:
            spans = _response_spans(text, messages, self.render, self.specials)
            if spans is None:
                raise DataError(
                    f"row {row}: cannot find the assistant responses in the rendered "
                    "conversation (the chat template changes them); use another "
                    "chat_template or train_on_responses_only=False"
                )
        else:
            spans = [(0, len(text))]
        ids, labels = self._encode(text, spans)
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids, labels = [self.bos, *ids], [IGNORE_INDEX, *labels]
        return ids, labels

    def _encode(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        if self.offsets:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(encoded["input_ids"])
            return ids, _label_by_offsets(ids, encoded["offset_mapping"], spans)
        # A slow tokenizer has no offsets: encode the pieces between span edges apart.
        ids: list[int] = []
        labels: list[int] = []
        cursor = 0
        for start, end in [*spans, (len(text), len(text))]:
            for piece, trained in ((text[cursor:start], False), (text[start:end], True)):
                if piece:
                    piece_ids = self.tokenizer.encode(piece, add_special_tokens=False)
                    ids += piece_ids
                    labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
            cursor = end
        return ids, labels


def _added_bos(tokenizer: Any) -> int | None:
    """The bos id if the tokenizer puts one before plain text, else ``None``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _label_by_offsets(
    ids: list[int], offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
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


def _response_spans(
    text: str,
    messages: list[dict[str, str]],
    render: Callable[[list[dict[str, str]], bool], str],
    specials: list[str],
) -> list[tuple[int, int]] | None:
    """The character spans of the assistant responses in ``text``; ``None`` if one is lost."""
    spans = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = _turn_span(text, messages, index, render, cursor, specials)
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
    render: Callable[[list[dict[str, str]], bool], str],
    cursor: int,
    specials: list[str],
) -> tuple[int, int] | None:
    prompt = turn = None
    if index > 0:  # (a conversation that opens with the assistant has no prompt to render)
        try:
            prompt = render(messages[:index], True)
            turn = render(messages[: index + 1], False)
        except Exception:
            prompt = None
    if prompt is not None and turn is not None and len(prompt) >= cursor:
        if text.startswith(prompt):
            start, end = len(prompt), len(turn.rstrip())
            if end >= start and turn.startswith(prompt) and text.startswith(turn[:end]):
                return start, end
            cursor = start  # the response is after the prompt, not in it
    return _search_span(text, messages[index]["content"], cursor, specials)


def _search_span(
    text: str, content: str, cursor: int, specials: list[str]
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
