"""The row layouts sloth trains on, and how each becomes a chat conversation.

``text``: ``{"text": ...}``, trained on every token. ``alpaca``: ``instruction``,
``output`` and optionally ``input`` and ``system``. ``chat``: ``messages``, a list of
``{"role", "content"}`` (OpenAI / TRL style). ``sharegpt``: ``conversations``, a list of
``{"from", "value"}`` with ``human``/``gpt``/``system`` speakers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import DataError

__all__ = ["DATA_FORMATS", "detect_format", "to_messages"]

#: Each format and the fields that identify it, in the order detection tries them:
#: structured layouts first, because a data set often carries a rendered ``text`` column
#: beside the fields it came from, and only the structure says what to train on.
DATA_FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}

# ShareGPT speakers (and the role names that turn up in its variants) -> chat roles.
_SPEAKERS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
}


def detect_format(records: Sequence[Mapping[str, Any]]) -> str:
    """Return the data format of ``records`` from the fields of their first row.

    ``"chat"`` (``messages``), ``"sharegpt"`` (``conversations``), ``"alpaca"``
    (``instruction`` and ``output``, ``input`` optional) or ``"text"`` (``text``), tried in
    that order. Every row is checked against it later, when converted.

    Raises:
        DataError: no rows, or a first row that fits none (the message lists the fields it
            has and the ones each format needs).
    """
    if not records:
        raise DataError("no records to detect the data format of")
    first = records[0]
    for name, fields in DATA_FORMATS.items():
        if all(field in first for field in fields):
            return name
    accepted = "; ".join(f"{name}: {' + '.join(fields)}" for name, fields in DATA_FORMATS.items())
    raise DataError(
        f"row 1: cannot tell the data format from the fields {sorted(first)}; accepted "
        f"fields: {accepted} (alpaca may add input and system)"
    )


def to_messages(record: Mapping[str, Any], data_format: str, row: int) -> list[dict[str, str]]:
    """One row of a conversational format (not ``text``) as a list of chat messages.

    ``row`` is the 1-based row number, for error messages. An alpaca row's user message
    is its instruction and input joined by a blank line, and keeps them apart as well
    (``instruction``, ``input``) for templates that write them apart (``alpaca``).

    Raises:
        DataError: a missing field, a value of the wrong type, or an unknown speaker; the
            message names the row and the field.
    """
    if data_format == "alpaca":
        return _alpaca(record, row)
    if data_format in ("chat", "sharegpt"):
        field = DATA_FORMATS[data_format][0]
        turns = record.get(field)
        if not isinstance(turns, (list, tuple)) or not turns:
            raise DataError(f"row {row}: field {field!r} must be a non-empty list of turns")
        return [_turn(turn, row, field, number) for number, turn in enumerate(turns)]
    raise DataError(f"row {row}: {data_format!r} rows are not conversations")


def _alpaca(record: Mapping[str, Any], row: int) -> list[dict[str, str]]:
    instruction = _string(record, "instruction", row)
    output = _string(record, "output", row)
    extra = _string(record, "input", row, required=False)
    system = _string(record, "system", row, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    # The parts too, for the alpaca template's "### Input:" section; others use content.
    user = {"role": "user", "content": prompt, "instruction": instruction, "input": extra}
    messages = [{"role": "system", "content": system}] if system else []
    messages += [user, {"role": "assistant", "content": output}]
    return messages


def _string(record: Mapping[str, Any], field: str, row: int, *, required: bool = True) -> str:
    value = record.get(field)
    if value is None:
        if required:
            raise DataError(f"row {row}: missing field {field!r}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"row {row}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _turn(turn: Any, row: int, field: str, number: int) -> dict[str, str]:
    where = f"row {row}: {field}[{number}]"
    if not isinstance(turn, Mapping):
        raise DataError(f"{where}: expected an object, got {type(turn).__name__}")
    # Either spelling in either column: ShareGPT dumps with role/content exist, and so do
    # "messages" columns with from/value.
    if "role" in turn:
        role, content = turn["role"], turn.get("content")
    elif "from" in turn:
        speaker = turn["from"]
        role = _SPEAKERS.get(str(speaker).lower())
        if role is None:
            raise DataError(
                f"{where}: unknown speaker 'from': {speaker!r}; accepted: {', '.join(_SPEAKERS)}"
            )
        content = turn.get("value")
    else:
        raise DataError(f"{where}: needs 'role' and 'content' (or 'from' and 'value')")
    return {"role": str(role), "content": _content(content, where)}


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise DataError(f"{where}: missing 'content'")
    # Multimodal-style parts; only text can be trained on here.
    if isinstance(content, (list, tuple)) and all(
        isinstance(part, Mapping) and part.get("type") == "text" for part in content
    ):
        return "".join(str(part.get("text", "")) for part in content)
    raise DataError(f"{where}: 'content' must be a string (or text parts)")
