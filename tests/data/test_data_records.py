"""load_records: each file format, in-memory sources, and errors that say where."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest

from sloth_core.data import DataError, load_records
from sloth_core.errors import SlothError

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Add", "input": "1, 2", "output": "3"},
]


def test_data_error_is_a_sloth_error_and_a_value_error():
    assert issubclass(DataError, SlothError) and issubclass(DataError, ValueError)


def test_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n", encoding="utf-8")
    assert load_records(path) == ROWS
    assert load_records(str(path)) == ROWS


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"instruction": "x",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_records(path)


def test_jsonl_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object, got list"):
        load_records(path)


def test_json_list_wrapped_list_and_json_lines_under_json_name(tmp_path):
    plain, wrapped, lines = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    plain.write_text(json.dumps(ROWS), encoding="utf-8")
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}), encoding="utf-8")
    lines.write_text("\n".join(json.dumps(r) for r in ROWS), encoding="utf-8")
    assert load_records(plain) == load_records(wrapped) == load_records(lines) == ROWS


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        load_records(path)


def test_csv_with_bom_and_quoted_newlines(tmp_path):
    path = tmp_path / "train.csv"
    rows = [*ROWS, {"instruction": "Two lines", "input": "a,b", "output": "one\ntwo"}]
    with path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    assert load_records(path) == rows


def test_csv_row_with_extra_field_names_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nfine,1\nnot,fine,at all\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: 3 fields, the header has 2"):
        load_records(path)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_records(path) == ROWS


def test_parquet_without_pyarrow_or_pandas_names_the_package(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    for name in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(DataError, match=r"train\.parquet: reading parquet needs .*pyarrow"):
        load_records(path)


def test_file_format_overrides_suffix_and_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(json.dumps(ROWS[0]), encoding="utf-8")
    assert load_records(path, file_format="jsonl") == ROWS[:1]
    with pytest.raises(DataError, match=r"cannot tell the file format.*'\.txt'"):
        load_records(path)
    with pytest.raises(DataError, match="unknown file_format 'xml'"):
        load_records(path, file_format="xml")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_records(empty)


class _FakeDataset:  # what load_records uses of a datasets.Dataset
    def to_list(self):
        return [dict(r) for r in ROWS]


def test_in_memory_sources():
    rows = load_records(ROWS)
    assert rows == ROWS and rows is not ROWS
    assert load_records(_FakeDataset()) == ROWS
    assert load_records(iter(ROWS)) == ROWS
    with pytest.raises(DataError, match="no records"):
        load_records([])
    with pytest.raises(DataError, match="row 2: expected a mapping, got str"):
        load_records([ROWS[0], "text"])
    with pytest.raises(DataError, match="DatasetDict"):
        load_records({"train": ROWS})


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets not installed")
def test_datasets_dataset():
    import datasets

    assert load_records(datasets.Dataset.from_list(ROWS)) == ROWS
