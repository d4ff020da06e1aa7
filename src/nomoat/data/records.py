"""Reading records from JSONL files or JSON arrays, with each record's line for `file:line` errors.

Shared by training data, evaluation tasks, question sets, answers and verdicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nomoat.errors import NomoatError


def kind_of(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def read_records(path: str | Path, what: str = "records", name: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for every record of a JSONL file, or of a JSON array (a file whose first
    character is "[", unless it is named .jsonl / .ndjson), read in one linear pass.

    Raises:
        NomoatError: `file:line: what is wrong` for a missing or unreadable file, bad UTF-8, invalid or too
            deeply nested JSON, a record that is not an object, or no records at all.
    """
    path = Path(path)
    name = name or str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NomoatError(f"{name}: no such file") from None
    except OSError as e:
        raise NomoatError(f"{name}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise NomoatError(f"{name}:{line}: not UTF-8 text") from None
    if not text.strip():
        raise NomoatError(f"{name}:1: empty file, expected {what}")
    # .jsonl is always one record per line; for other names a leading "[" means a JSON array.
    is_array = path.suffix.lower() not in (".jsonl", ".ndjson") and text.lstrip().startswith("[")
    records = _read_array(text, name, what) if is_array else _read_lines(text, name)
    for line, rec in records:
        if not isinstance(rec, dict):
            raise NomoatError(f"{name}:{line}: a record is {kind_of(rec)}, expected a JSON object")
    if not records:
        raise NomoatError(f"{name}:1: no {what}")
    return records


def _read_lines(text: str, name: str) -> list[tuple[int, Any]]:
    records = []
    for line, row in enumerate(text.splitlines(), start=1):
        if not row.strip():
            continue
        try:
            records.append((line, json.loads(row)))
        except json.JSONDecodeError as e:
            raise NomoatError(f"{name}:{line}: invalid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise NomoatError(f"{name}:{line}: JSON nested too deeply") from None
    return records


def _read_array(text: str, name: str, what: str = "records") -> list[tuple[int, Any]]:
    """The elements of a top-level JSON array with each one's line, in one linear pass."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any]] = []
    pos, line, counted = text.index("[") + 1, 1, 0
    end = len(text)

    def skip(p: int) -> int:
        while p < end and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(p: int, what: str) -> NomoatError:
        return NomoatError(f"{name}:{text.count(chr(10), 0, p) + 1}: invalid JSON: {what}")

    pos = skip(pos)
    while pos < end and text[pos] != "]":
        line += text.count("\n", counted, pos)  # only the stretch since the last record: linear overall
        counted = pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise NomoatError(f"{name}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise NomoatError(f"{name}:{line}: JSON nested too deeply") from None
        records.append((line, item))
        pos = skip(pos)
        if pos < end and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos < end and text[pos] != "]":
            raise fail(pos, "expected ',' or ']' between records")
    if pos >= end:
        raise fail(end, "the JSON array is not closed")
    if text[pos + 1:].strip():
        raise fail(pos + 1, "extra data after the JSON array")
    if not records:
        raise NomoatError(f"{name}:1: the JSON array holds no {what}")
    return records
