"""Battles: one comparison of two contestants and its outcome, in Chatbot Arena's cleaned-battle layout.

A battle is a dict with `model_a`, `model_b`, `winner` (`model_a|model_b|tie|tie (bothbad)`),
`conversation_a` / `conversation_b` (OpenAI-style message lists), `turn`, `anony`, `tstamp`, `judge` (who
decided: the voter's anonymous id, or the judge model), plus `rater`, the group ratings are split by: "human"
for people's votes (the default for imported battles), "judge NAME" for a judge model's verdicts.
Arena databases, judge verdict files and battle JSONL files (ours or another arena's) all read into this one
layout, so ratings, exports and preference data share one reader.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nomoat.data.records import kind_of, read_records
from nomoat.errors import NomoatError
from nomoat.eval.questions import write_jsonl

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
HUMAN = "human"
SQLITE_MAGIC = b"SQLite format 3\x00"
_VERDICT_WINNER = {"model_1": "model_a", "model_2": "model_b", "tie": "tie"}


def conversation(user_turns: Sequence[str], answers: Sequence[str]) -> list[dict[str, str]]:
    """User turns and one side's answers, interleaved as chat messages."""
    msgs: list[dict[str, str]] = []
    for q, a in zip(user_turns, answers):
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def user_turns(conv: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(str(m.get("content", "")) for m in conv if m.get("role") == "user")


def _check_conversation(value: Any, src: str, key: str) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise NomoatError(f'{src}: "{key}" must be a list of {{"role", "content"}} messages, got {kind_of(value)}')


def check_battle(rec: dict[str, Any], src: str) -> dict[str, Any]:
    """A battle record checked and normalised (missing optional fields filled); `src` names it in errors."""
    for k in ("model_a", "model_b"):
        if not isinstance(rec.get(k), str) or not rec[k]:
            raise NomoatError(f'{src}: "{k}" must be a non-empty string')
    if rec["model_a"] == rec["model_b"]:
        raise NomoatError(f'{src}: "model_a" and "model_b" are both {rec["model_a"]!r}')
    if rec.get("winner") not in WINNERS:
        raise NomoatError(f'{src}: "winner" must be one of {", ".join(WINNERS)}, got {rec.get("winner")!r}')
    for k in ("conversation_a", "conversation_b"):
        _check_conversation(rec.get(k), src, k)
    turn = rec.get("turn", 1)
    if not isinstance(turn, int) or isinstance(turn, bool) or turn < 1:
        raise NomoatError(f'{src}: "turn" must be a positive integer')
    ts = rec.get("tstamp", 0.0)
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise NomoatError(f'{src}: "tstamp" must be a number')
    rater = rec.get("rater", HUMAN)
    if not isinstance(rater, str) or not rater:
        raise NomoatError(f'{src}: "rater" must be a non-empty string')
    return {**rec, "turn": turn, "tstamp": float(ts), "anony": bool(rec.get("anony", True)), "rater": rater,
            "conversation_a": rec.get("conversation_a") or [], "conversation_b": rec.get("conversation_b") or []}


def battles_from_verdicts(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Battles from pairwise judge verdicts (`nomoat judge` records; single grades are skipped).

    A verdict's winner is already combined over both orders (a win needs both orders to agree); an
    unparseable or inconsistent pair counts as a tie, as in the judge's own report.
    """
    out = []
    for r in records:
        if r.get("mode") != "pairwise":
            continue
        turns, a1, a2 = r.get("turns") or [], r.get("answers_1") or [], r.get("answers_2") or []
        out.append({"model_a": r["model_1"], "model_b": r["model_2"],
                    "winner": _VERDICT_WINNER.get(r.get("winner") or "tie", "tie"),
                    "conversation_a": conversation(turns, a1), "conversation_b": conversation(turns, a2),
                    "turn": int(r["turn"]), "anony": True, "tstamp": float(r.get("tstamp", 0.0)),
                    "judge": str(r["judge"]), "rater": f"judge {r['judge']}", "question_id": r.get("question_id")})
    return out


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def read_battles(path: str | Path) -> list[dict[str, Any]]:
    """Voted battles from an arena database, a judge verdict file, or a battle file (JSONL or JSON array in
    the export layout, e.g. Chatbot Arena's cleaned battles).

    Raises:
        NomoatError: `file:line: field` for a malformed record; a missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise NomoatError(f"{path}: no such file")
    if _is_sqlite(path):
        from nomoat.eval.arena_store import ArenaStore

        try:
            with ArenaStore(path, readonly=True) as store:
                return store.battles()
        except sqlite3.DatabaseError as e:
            raise NomoatError(f"{path}: not a readable arena database: {e}") from None
    rows = read_records(path, "battles or verdicts")
    if all("mode" in rec for _, rec in rows):
        from nomoat.eval.judge_stats import load_verdicts

        return battles_from_verdicts(load_verdicts(path))
    return [check_battle(rec, f"{path}:{line}") for line, rec in rows]


def read_all(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in paths:
        out += read_battles(p)
    return out


EXPORT_FIELDS = ("question_id", "model_a", "model_b", "winner", "judge", "rater", "conversation_a", "conversation_b",
                 "turn", "anony", "language", "tstamp")


def write_battles(path: str | Path, battles: Iterable[dict[str, Any]]) -> Path:
    """Battles as JSONL in the cleaned-battle layout (atomically)."""
    return write_jsonl(path, ({k: b[k] for k in EXPORT_FIELDS if k in b} for b in battles))
