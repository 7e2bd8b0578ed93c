"""detect_format and the conversion of each format to chat messages."""

from __future__ import annotations

import pytest

from sloth_core.data import DataError, detect_format, to_messages


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"text": "plain"}, "text"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"instruction": "i", "input": "x", "output": "o", "text": "rendered"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "sharegpt"),
    ],
)
def test_detect_format(row, expected):
    assert detect_format([row]) == expected


def test_unknown_format_lists_fields_seen_and_accepted():
    with pytest.raises(DataError) as info:
        detect_format([{"question": "q", "answer": "a"}])
    message = str(info.value)
    assert "['answer', 'question']" in message
    for field in ("messages", "conversations", "instruction + output", "text"):
        assert field in message
    with pytest.raises(DataError, match="no records"):
        detect_format([])


def test_alpaca_to_messages():
    row = {"instruction": "Add", "input": "1, 2", "output": "3", "system": "Be exact."}
    assert to_messages(row, "alpaca", 1) == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add\n\n1, 2", "instruction": "Add", "input": "1, 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert to_messages({"instruction": "Hi", "output": "Hello"}, "alpaca", 1)[0] == {
        "role": "user",
        "content": "Hi",
        "instruction": "Hi",
        "input": "",
    }


def test_sharegpt_speakers_become_roles():
    row = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    roles = [m["role"] for m in to_messages(row, "sharegpt", 1)]
    assert roles == ["system", "user", "assistant"]


def test_chat_text_parts_are_joined():
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    }
    assert to_messages(row, "chat", 1) == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize(
    ("row", "data_format", "match"),
    [
        ({"instruction": "i"}, "alpaca", r"row 7: missing field 'output'"),
        ({"instruction": "i", "output": 3}, "alpaca", r"row 7: field 'output' must be a string"),
        ({"messages": []}, "chat", r"row 7: field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "chat", r"row 7: messages\[0\]: missing 'content'"),
        ({"messages": [{"text": "x"}]}, "chat", r"row 7: messages\[0\]: needs 'role'"),
        (
            {"conversations": [{"from": "robot", "value": "x"}]},
            "sharegpt",
            r"row 7: conversations\[0\]: unknown speaker 'from': 'robot'",
        ),
    ],
)
def test_malformed_rows_name_row_and_field(row, data_format, match):
    with pytest.raises(DataError, match=match):
        to_messages(row, data_format, 7)
