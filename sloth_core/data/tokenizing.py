"""Rows -> token ids and labels: chat template, response masking, truncation.

A chat row's tokens are exactly what ``apply_chat_template(messages, tokenize=True)`` gives
for its conversation, so that the prompt part of training is token for token what the
model is prompted with at inference: the template writes any bos it wants (Llama 3 and
Gemma do, ChatML, Qwen and Phi-3 do not), none is added. Which tokens are trained is
:mod:`.masking`'s part. A ``text`` row gets the special tokens the tokenizer adds to plain
text (a bos) unless it already has them, as a chat rendered into text does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError
from .formats import DATA_FORMATS, detect_format, to_messages
from .masking import IGNORE_INDEX, Markers, label_by_offsets, response_spans
from .templates import knows_role, resolve_chat_template, template_roles

__all__ = ["IGNORE_INDEX", "Example", "TokenizeStats", "tokenize"]


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
    on; ``dropped_truncated`` of them had some before truncation (the others had none: an
    empty text, a conversation without a response). ``tokens`` and ``trained_tokens``
    count the kept examples' tokens and trained labels; ``longest`` is the longest kept
    example.
    """

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    dropped_truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    max_seq_length: int = 0

    def summary(self) -> str:
        """One line for logs, such as ``48 rows: 46 kept, 2 dropped (no trained tokens
        left after truncation), 3 truncated to 64 tokens; 2210 tokens, 905 trained``."""
        line = f"{self.rows} rows: {self.kept} kept"
        reasons = [
            (self.dropped_empty - self.dropped_truncated, "nothing to train on"),
            (self.dropped_truncated, "no trained tokens left after truncation"),
        ]
        reasons = [(count, why) for count, why in reasons if count]
        if len(reasons) == 1:
            line += f", {self.dropped_empty} dropped ({reasons[0][1]})"
        elif reasons:
            why = ", ".join(f"{count} with {why}" for count, why in reasons)
            line += f", {self.dropped_empty} dropped ({why})"
        if self.truncated:
            limit = f" to {self.max_seq_length} tokens" if self.max_seq_length else ""
            line += f", {self.truncated} truncated{limit}"
        return line + f"; {self.tokens} tokens, {self.trained_tokens} trained"


def tokenize(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    data_format: str | None = None,
    chat_template: str | None = None,
    max_seq_length: int,
    train_on_responses_only: bool = True,
    add_eos: bool = True,
    source: str | None = None,
) -> tuple[list[Example], TokenizeStats]:
    """Tokenise ``records`` into training examples, in order, with their statistics.

    ``text`` rows are tokenised as they are (with the special tokens the tokenizer adds to
    plain text, a bos, unless the text starts with them; and an eos appended when
    ``add_eos``), every token trained. The other formats become chat messages (see
    :func:`~sloth_core.data.formats.to_messages`), rendered with the chat template and
    tokenised as ``apply_chat_template`` tokenises them (no special token added); with
    ``train_on_responses_only`` only the assistant responses and their end-of-turn
    markers are trained, otherwise every token.

    Args:
        records: rows, as :func:`~sloth_core.data.records.load_records` returns them.
        tokenizer: a Hugging Face tokenizer (a fast one gives exact token boundaries).
        data_format: ``"text"``, ``"alpaca"``, ``"chat"`` or ``"sharegpt"``; detected from
            the first row by default.
        chat_template: a template name, ``"auto"``/``None`` or a Jinja template (see
            :func:`~sloth_core.data.templates.resolve_chat_template`).
        max_seq_length: longer examples keep their first ``max_seq_length`` tokens.
        train_on_responses_only: mask everything but the assistant responses.
        add_eos: append the eos token to ``text`` rows that do not end with it (whitespace
            after a final eos is dropped; chat rows end with their template's end-of-turn
            marker).
        source: where the rows came from (a file name), for error messages.

    Raises:
        DataError: an unknown format, a malformed row (named by number and field), a
            role the template does not name, a conversation the template cannot render,
            or no row left with a token to train on (the message says when
            ``max_seq_length`` is the cause). Row errors name ``source`` when given.
    """
    if max_seq_length < 2:
        raise DataError(f"max_seq_length must be at least 2, got {max_seq_length}")
    if data_format is None:
        data_format = detect_format(records)
    elif data_format not in DATA_FORMATS:
        raise DataError(f"unknown data_format {data_format!r}; accepted: {', '.join(DATA_FORMATS)}")
    stats = TokenizeStats(rows=len(records), max_seq_length=max_seq_length)
    encode: _TextEncoder | _ChatEncoder
    if data_format == "text":
        encode = _TextEncoder(tokenizer, add_eos)
    else:
        template = resolve_chat_template(tokenizer, chat_template)
        encode = _ChatEncoder(tokenizer, template, data_format, train_on_responses_only)

    examples = []
    for row, record in enumerate(records, 1):
        try:
            ids, labels = encode(record, row)
        except DataError as exc:
            if source:
                raise DataError(f"{source}: {exc}") from exc
            raise
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
        self.eos_text = getattr(tokenizer, "eos_token", None) if add_eos else None
        self.ends = _added_ends(tokenizer)

    def __call__(self, record: Mapping[str, Any], row: int) -> tuple[list[int], list[int]]:
        text = record.get("text")
        if not isinstance(text, str):
            got = "missing" if text is None else f"a {type(text).__name__}"
            raise DataError(f"row {row}: field 'text' must be a string, got {got}")
        if not text.strip():
            return [], []
        if self.eos_text and text.rstrip().endswith(self.eos_text):
            # (rows joined by newlines): nothing follows an eos, and it needs no second one
            text = text.rstrip()
        if self.ends is None:
            ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        else:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            prefix, suffix = self.ends
            if prefix and ids[: len(prefix)] != prefix:
                ids = prefix + ids
            if suffix and ids[-len(suffix) :] != suffix:
                ids = ids + suffix
        if self.eos is not None and ids[-1] != self.eos:
            ids.append(self.eos)
        return ids, list(ids)


def _added_ends(tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """The ids the tokenizer puts before and after plain text (a bos; some add an eos),
    found by encoding a probe with and without them; ``None`` if they cannot be told."""
    probe = "Hello world"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for at in range(len(full) - len(plain) + 1):
        if full[at : at + len(plain)] == plain:
            return full[:at], full[at + len(plain) :]
    return None


class _ChatEncoder:
    def __init__(
        self, tokenizer: Any, template: str, data_format: str, responses_only: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.field = DATA_FORMATS[data_format][0]
        self.data_format = data_format
        self.responses_only = responses_only
        self.offsets = bool(getattr(tokenizer, "is_fast", False))
        self.markers = Markers.of(tokenizer)
        self.roles: dict[str, bool] = {}

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def __call__(self, record: Mapping[str, Any], row: int) -> tuple[list[int], list[int]]:
        messages = to_messages(record, self.data_format, row)
        self.check_roles(messages, row)
        try:
            text = self.render(messages, False)
        except Exception as exc:  # jinja2 errors and the template's raise_exception
            raise DataError(
                f"row {row}: the chat template cannot render this conversation ({exc})"
            ) from exc
        if self.responses_only:
            spans = response_spans(text, messages, self.render, self.markers)
            if spans is None:
                raise DataError(
                    f"row {row}: cannot find the assistant responses in the rendered "
                    "conversation (the chat template changes them); use another "
                    "chat_template or train_on_responses_only=False"
                )
        else:
            spans = [(0, len(text))]
        return self._encode(text, spans)

    def check_roles(
        self, messages: list[dict[str, str]], row: int, field: str | None = None
    ) -> None:
        """Raise a :class:`DataError` naming ``row`` and ``field`` (the row's messages field
        by default) for a role the template does not know."""
        # A role the template does not name would be rendered as it is, or dropped, and
        # trained either way on a turn the model was never shown.
        field = field or self.field
        for number, message in enumerate(messages):
            role = message["role"]
            if role not in self.roles:
                self.roles[role] = knows_role(self.template, role)
            if not self.roles[role]:
                accepted = ", ".join(template_roles(self.template))
                raise DataError(
                    f"row {row}: {field}[{number}] has the role {role!r}, which the "
                    f"chat template does not know; accepted: {accepted}"
                )

    def _encode(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        if self.offsets:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids: list[int] = list(encoded["input_ids"])
            return ids, label_by_offsets(ids, encoded["offset_mapping"], spans)
        # A slow tokenizer has no offsets: encode the pieces between span edges apart.
        ids = []
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
