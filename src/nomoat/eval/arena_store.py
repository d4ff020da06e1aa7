"""The arena's battles in SQLite: both conversations, who fought (names, adapter stacks, base fingerprint),
the vote, when, by which anonymous voter, and whether identities were still hidden.

Write-ahead logging with full sync: a vote is acknowledged only after its transaction is on disk, so a
server killed mid-load leaves a database that opens and holds every acknowledged vote. One connection
under a lock serves the server's threads; readers (`nomoat ratings`) open the file read-only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from nomoat.errors import NomoatError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS battles (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    stack_a TEXT NOT NULL,          -- JSON: the adapters behind model_a ({name: {"weight", "source"}})
    stack_b TEXT NOT NULL,
    base TEXT NOT NULL,
    base_fingerprint TEXT,
    question_id TEXT,
    conversation_a TEXT NOT NULL,   -- JSON message lists, every turn so far
    conversation_b TEXT NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    winner TEXT,                    -- model_a | model_b | tie | tie (bothbad); NULL until voted
    vote_turn INTEGER,              -- turns completed when the vote was cast
    voter TEXT,
    anony INTEGER,                  -- 1: the voter had not seen the names
    tstamp REAL
);
CREATE INDEX IF NOT EXISTS battles_voted ON battles (winner);
"""
VOTES = {"a": "model_a", "b": "model_b", "tie": "tie", "bothbad": "tie (bothbad)"}


class UnknownBattle(LookupError):
    pass


class AlreadyVoted(RuntimeError):
    pass


class ArenaStore:
    """Open (creating if needed) an arena database; `readonly` for readers that must not change it."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            if readonly:
                self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                           check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._db.execute("PRAGMA busy_timeout=5000")
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise NomoatError(f"{self.path}: not an arena database: {e}") from None
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise NomoatError(f"{self.path}: arena database schema {row[0] if row else '?'} is not supported "
                              f"(expected {SCHEMA_VERSION})")
        self._db.row_factory = sqlite3.Row

    def __enter__(self) -> ArenaStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, model_a: str, model_b: str, stack_a: dict[str, Any], stack_b: dict[str, Any], base: str,
               base_fingerprint: str | None, question_id: str | None = None) -> str:
        """A new battle between two contestants; returns its id (unguessable, so votes need one we made)."""
        bid = uuid.uuid4().hex
        with self._lock:
            self._db.execute(
                "INSERT INTO battles (id, created, model_a, model_b, stack_a, stack_b, base, base_fingerprint, "
                "question_id, conversation_a, conversation_b) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, '[]', '[]')",
                (bid, time.time(), model_a, model_b, json.dumps(stack_a), json.dumps(stack_b), base,
                 base_fingerprint, question_id))
        return bid

    def save_turn(self, bid: str, conversation_a: list[dict[str, str]], conversation_b: list[dict[str, str]],
                  turns: int) -> None:
        with self._lock:
            self._db.execute("UPDATE battles SET conversation_a=?, conversation_b=?, turns=? WHERE id=?",
                             (json.dumps(conversation_a, ensure_ascii=False),
                              json.dumps(conversation_b, ensure_ascii=False), turns, bid))

    def get(self, bid: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT * FROM battles WHERE id=?", (bid,)).fetchone()
        if row is None:
            raise UnknownBattle(bid)
        return _decode(row)

    def vote(self, bid: str, vote: str, voter: str, anony: bool = True) -> dict[str, Any]:
        """Record the vote (`a`, `b`, `tie` or `bothbad`) once; the battle after the vote.

        Raises:
            UnknownBattle: no battle with that id. AlreadyVoted: it has a vote already.
            ValueError: an unknown vote, or a battle with no completed turn.
        """
        winner = VOTES.get(vote)
        if winner is None:
            raise ValueError(f"vote must be one of {', '.join(VOTES)}")
        with self._lock:
            cur = self._db.execute(
                "UPDATE battles SET winner=?, vote_turn=turns, voter=?, anony=?, tstamp=? "
                "WHERE id=? AND winner IS NULL AND turns > 0", (winner, voter, int(anony), time.time(), bid))
            if cur.rowcount != 1:
                row = self._db.execute("SELECT winner, turns FROM battles WHERE id=?", (bid,)).fetchone()
                if row is None:
                    raise UnknownBattle(bid)
                if row["winner"] is not None:
                    raise AlreadyVoted(bid)
                raise ValueError("the battle has no answers to vote on yet")
            row = self._db.execute("SELECT * FROM battles WHERE id=?", (bid,)).fetchone()
        return _decode(row)

    def counts(self) -> tuple[int, int]:
        """(battles, voted battles)."""
        with self._lock:
            n, v = self._db.execute("SELECT COUNT(*), COUNT(winner) FROM battles").fetchone()
        return int(n), int(v)

    def battles(self) -> list[dict[str, Any]]:
        """Voted battles in the cleaned-battle layout, each conversation as it was when the vote was cast."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM battles WHERE winner IS NOT NULL ORDER BY tstamp").fetchall()
        out = []
        for r in rows:
            d = _decode(r)
            n = 2 * (d["vote_turn"] or 0)
            out.append({"question_id": d["question_id"], "model_a": d["model_a"], "model_b": d["model_b"],
                        "winner": d["winner"], "judge": f"arena_user_{d['voter']}", "rater": "human",
                        "conversation_a": d["conversation_a"][:n], "conversation_b": d["conversation_b"][:n],
                        "turn": d["vote_turn"], "anony": bool(d["anony"]), "tstamp": d["tstamp"],
                        "battle_id": d["id"], "stack_a": d["stack_a"], "stack_b": d["stack_b"],
                        "base": d["base"], "base_fingerprint": d["base_fingerprint"]})
        return out


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for k in ("stack_a", "stack_b", "conversation_a", "conversation_b"):
        d[k] = json.loads(d[k])
    return d
