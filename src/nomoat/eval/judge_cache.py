"""The verdict cache: one SQLite file of judge replies keyed by a hash of everything that decides a reply.

A re-run costs nothing, an interrupted run resumes where it stopped (each reply is committed as it
arrives), and verdicts judged once are never judged again by accident. Replies are stored as JSON text:
nothing in the file is ever executed or unpickled.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nomoat.errors import NomoatError

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class JudgeReply:
    """What a judge said: its text and, when asked for, the logprobs of its tokens (OpenAI chat layout:
    `[{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]`)."""

    text: str
    logprobs: list[dict[str, Any]] | None = None
    error: str | None = None  # the request failed for this input (e.g. too long for the judge's context)


def cache_key(**parts: Any) -> str:
    """SHA-256 of the parts as canonical JSON (sorted keys), so the same inputs always give the same key."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class VerdictCache:
    """Judge replies by key in a SQLite file; safe to use from several threads (one lock, one connection)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
                             "reply TEXT NOT NULL, created REAL NOT NULL)")
            row = self._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise NomoatError(f"{self.path}: verdict cache schema {row[0]}, this nomoat reads "
                                  f"{SCHEMA_VERSION}; use another --cache file")
            self._db.commit()
        except sqlite3.DatabaseError as e:
            raise NomoatError(f"{self.path}: not a nomoat verdict cache ({e})") from None

    def get(self, key: str) -> JudgeReply | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            obj = json.loads(row[0])
            return JudgeReply(str(obj["text"]), obj.get("logprobs"))
        except (json.JSONDecodeError, KeyError, TypeError):
            return None  # a damaged entry is judged again

    def put(self, key: str, judge: str, reply: JudgeReply) -> None:
        """Store a reply and commit at once, so an interrupted run keeps it (failed requests are not stored)."""
        if reply.error is not None:
            return
        blob = json.dumps({"text": reply.text, "logprobs": reply.logprobs}, ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)", (key, judge, blob, time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
