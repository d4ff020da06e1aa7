"""Question sets for judging: the built-in multi-turn set, MT-bench question files, plain `{"prompt"}`
records and Alpaca records; and the JSON / JSONL reading (with `file:line` errors) that answer and
verdict files share.

MT-bench's layout is the native one: `{"question_id", "category", "turns": [...], "reference": [...]}`.
A plain record is one turn (`prompt`, optional `question_id`/`id`, `category`, `reference`); an Alpaca
record asks `instruction` and then `input` (a blank line between) and its `output` becomes the reference.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from nomoat.data.records import kind_of as _kind
from nomoat.data.records import read_records
from nomoat.errors import NomoatError

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# Answers to questions with one right answer are greedy; creative ones are sampled; knowledge ones nearly
# greedy (MT-bench's own choice of temperatures per category).
CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "reasoning": 0.0, "math": 0.0, "coding": 0.0,
                        "extraction": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7  # any other category
DEFAULT_CATEGORY = "general"
BUILTIN = "builtin"


@dataclass(frozen=True)
class Question:
    """One question: its turns (user messages asked one after another) and optional reference answers."""

    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None
    source: str = ""  # "file:line", for messages

    @property
    def key(self) -> str:
        """The id as matched against answer files (1 and "1" are the same question)."""
        return str(self.question_id)

    def temperature(self) -> float:
        """The category's default answering temperature."""
        return CATEGORY_TEMPERATURE.get(self.category.lower(), DEFAULT_TEMPERATURE)

    def to_json(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"question_id": self.question_id, "category": self.category, "turns": list(self.turns)}
        if self.reference:
            rec["reference"] = list(self.reference)
        return rec


# --------------------------------------------------------------------------- JSON / JSONL files


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records as JSONL atomically: a temporary file in the same directory, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def str_list(rec: dict[str, Any], key: str, src: str, *, required: bool = True) -> tuple[str, ...] | None:
    """A field holding a non-empty list of strings (a lone string counts as a list of one)."""
    value = rec.get(key)
    if value is None:
        if required:
            raise NomoatError(f'{src}: no "{key}" field')
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise NomoatError(f'{src}: "{key}" must be a non-empty list of strings, got {_kind(value)}')
    return tuple(value)


def record_id(rec: dict[str, Any], key: str, src: str, default: int | str | None = None) -> int | str:
    value = rec.get(key, default)
    if value is None:
        raise NomoatError(f'{src}: no "{key}" field')
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise NomoatError(f'{src}: "{key}" must be a number or a non-empty string, got {_kind(value)}')
    return value


# --------------------------------------------------------------------------- questions


def _text(rec: dict[str, Any], key: str, src: str, required: bool = True) -> str:
    value = rec.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise NomoatError(f'{src}: "{key}" must be a non-empty string, got {_kind(value)}')
    return value


def parse_question(rec: dict[str, Any], src: str, line: int) -> Question:
    """One question record in any of the accepted layouts (told apart by `turns`, `instruction`, `prompt`)."""
    category = rec.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category:
        raise NomoatError(f'{src}: "category" must be a non-empty string, got {_kind(category)}')
    if "turns" in rec:  # MT-bench
        turns = str_list(rec, "turns", src)
        reference = str_list(rec, "reference", src, required=False)
        if any(not t.strip() for t in turns):
            raise NomoatError(f'{src}: "turns" holds an empty question')
        return Question(record_id(rec, "question_id", src), category, turns, reference, src)
    qid = record_id(rec, "question_id", src, rec.get("id", line))
    if "instruction" in rec:  # Alpaca
        prompt = _text(rec, "instruction", src)
        extra = _text(rec, "input", src, required=False)
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        output = _text(rec, "output", src, required=False)
        return Question(qid, category, (prompt,), (output,) if output.strip() else None, src)
    if "prompt" in rec:
        reference = str_list(rec, "reference", src, required=False)
        return Question(qid, category, (_text(rec, "prompt", src),), reference, src)
    keys = ", ".join(sorted(rec)) or "none"
    raise NomoatError(f'{src}: not a question record (keys: {keys}); expected "turns" (MT-bench), "prompt" or '
                      f'"instruction" (Alpaca)')


def builtin_path() -> Path:
    """The built-in question set: 24 two-turn questions, 3 per MT-bench category, written for nomoat."""
    return Path(str(resources.files("nomoat.eval") / "prompts" / "questions.jsonl"))


def load_questions(spec: str | Path) -> list[Question]:
    """Questions from `builtin` or a file (MT-bench, plain prompts or Alpaca; JSONL or a JSON array).

    Raises:
        NomoatError: `file:line` for a malformed record or a question id given twice.
    """
    path = builtin_path() if str(spec) == BUILTIN else Path(spec)
    out: list[Question] = []
    seen: dict[str, str] = {}
    for line, rec in read_records(path, "questions"):
        src = f"{path}:{line}"
        q = parse_question(rec, src, line)
        if q.key in seen:
            raise NomoatError(f"{src}: question_id {q.question_id!r} is already used at {seen[q.key]}")
        seen[q.key] = src
        out.append(q)
    return out


def write_questions(path: str | Path, questions: Iterable[Question]) -> Path:
    """Write questions in MT-bench's layout (atomically)."""
    return write_jsonl(path, (q.to_json() for q in questions))
