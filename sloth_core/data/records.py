"""Reading training rows from files and in-memory data sets into plain dicts."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sloth_core.catalog import install_command

from .errors import DataError

__all__ = ["FILE_FORMATS", "load_records"]

#: File formats :func:`load_records` reads, by the suffixes that select them.
FILE_FORMATS: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".ndjson"),
    "json": (".json",),
    "csv": (".csv",),
    "parquet": (".parquet", ".pq"),
}


def load_records(source: Any, *, file_format: str | None = None) -> list[dict[str, Any]]:
    """Return the rows of ``source`` as a new list of dicts, in order.

    Args:
        source: a path (``str`` or ``os.PathLike``) to a ``.jsonl``, ``.json``, ``.csv`` or
            ``.parquet`` file; a ``datasets.Dataset`` (anything with ``to_list()``); or an
            iterable of mappings. A ``.json`` file holds a list of objects, or an object with
            one list of objects in it (``{"data": [...]}``); one holding an object per line
            is read as JSON Lines.
        file_format: ``"jsonl"``, ``"json"``, ``"csv"`` or ``"parquet"``, for a path whose
            suffix does not say; the suffix decides by default.

    Raises:
        DataError: a missing or unreadable file, a malformed row (``file:line``), a row that
            is not an object, a missing package for parquet, or no rows at all.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        records = _read_file(path, _file_format(path, file_format))
        where = str(path)
    else:
        records = _from_objects(source)
        where = type(source).__name__
    if not records:
        raise DataError(f"{where}: no records (the data set is empty)")
    return records


def _file_format(path: Path, file_format: str | None) -> str:
    if file_format is not None:
        name = file_format.lower().lstrip(".")
        if name not in FILE_FORMATS:
            raise DataError(
                f"unknown file_format {file_format!r}; accepted: {', '.join(FILE_FORMATS)}"
            )
        return name
    suffix = path.suffix.lower()
    for name, suffixes in FILE_FORMATS.items():
        if suffix in suffixes:
            return name
    accepted = ", ".join(s for suffixes in FILE_FORMATS.values() for s in suffixes)
    raise DataError(
        f"{path}: cannot tell the file format from the suffix {suffix!r}; use one of "
        f"{accepted} or pass file_format"
    )


def _read_file(path: Path, file_format: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if file_format == "parquet":
        return _read_parquet(path)
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from exc
    if file_format == "jsonl":
        return _parse_jsonl(path, text)
    if file_format == "json":
        return _parse_json(path, text)
    return _parse_csv(path, text)


def _parse_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: invalid JSON ({exc.msg}, column {exc.colno})"
            ) from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        records.append(row)
    return records


def _parse_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line under a .json name
            return _parse_jsonl(path, text)
        raise DataError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})"
        ) from exc
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a list of objects, or an object holding exactly one list; "
                f"got an object with keys {sorted(data)}"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects, got {type(data).__name__}")
    for number, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {number}: expected an object, got {type(row).__name__}")
    return data


def _parse_csv(path: Path, text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(text.splitlines(keepends=True), restkey=None, restval=None)
    records = []
    try:
        for row in reader:
            fields = len(reader.fieldnames or ())
            if None in row:
                raise DataError(
                    f"{path}:{reader.line_num}: {fields + len(row[None])} fields, the header "
                    f"has {fields}"
                )
            missing = [name for name, value in row.items() if value is None]
            if missing:
                raise DataError(
                    f"{path}:{reader.line_num}: {fields - len(missing)} fields, the header has "
                    f"{fields} (no value for {', '.join(map(repr, missing))})"
                )
            records.append(row)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    try:
        if pq is not None:
            return pq.read_table(path).to_pylist()
        try:
            import pandas as pd

            return pd.read_parquet(path).to_dict("records")
        except ImportError as exc:  # no pandas, or pandas without a parquet engine
            raise DataError(
                f"{path}: reading parquet needs the 'pyarrow' package: pip install pyarrow "
                f"(or {install_command('sloth-core', 'data')})"
            ) from exc
    except DataError:
        raise
    except Exception as exc:  # the engines' own errors for a corrupt or foreign file
        raise DataError(f"{path}: cannot read as parquet ({exc})") from exc


def _from_objects(source: Any) -> list[dict[str, Any]]:
    if isinstance(source, Mapping):
        raise DataError(
            "expected a list of rows, got a single mapping (a DatasetDict? pick a split, "
            "e.g. dataset['train'])"
        )
    to_list = getattr(source, "to_list", None)
    if callable(to_list):  # datasets.Dataset
        rows = to_list()
    elif hasattr(source, "columns") and callable(getattr(source, "to_dict", None)):
        rows = source.to_dict("records")  # a pandas DataFrame
    else:
        rows = source
    if not isinstance(rows, Iterable):
        raise DataError(f"cannot read records from a {type(source).__name__}")
    records = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise DataError(f"row {number}: expected a mapping, got {type(row).__name__}")
        records.append(dict(row))
    return records
