"""The catalog's store: a SQLite index (WAL) beside content-addressed files (sha256).

Layout under the home directory (`nomoat.catalog.home`):

    catalog.sqlite              artifacts, their files and hashes, names, lineage, attached results
    objects/<ab>/<sha256>       every stored file once, named by its content's sha256, read-only
    entries/<digest>/<root>     what loaders open: the GGUF file or directory, hard links to objects/
    tmp/                        staging, on the same file system so that storing is a rename

An artifact is one exact content (a model or an adapter), named by its digest: a single file's sha256,
or a directory's manifest digest (`nomoat.adapters.artifact.manifest_digest`). Names (`NAME:TAG`) point
at artifacts; adding the same content twice stores it once. Removing the last name of an artifact
deletes its files but keeps its row (a tombstone), so the lineage of what was derived from it stays
readable.

Concurrency: copying and hashing happen outside any lock; a writer then takes SQLite's write lock
(BEGIN IMMEDIATE) only to move staged files into place and write its rows, so two processes adding at
once both succeed and leave a consistent index. Every read hashes the files again (large files: again
whenever their inode, size, mtime or ctime changed), so a corrupted or swapped file is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nomoat.catalog.home import home_dir
from nomoat.catalog.names import DEFAULT_TAG, Ref
from nomoat.digests import sha256_file
from nomoat.errors import NomoatError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 120_000  # a writer holds the lock only for renames and rows: waiting this long means trouble
ALWAYS_HASH_BYTES = 256 << 20  # files up to this size are hashed on every read
KINDS = ("model", "adapter")
STALE_STAGING_SECONDS = 86400  # a staging directory this old belongs to an add that was killed

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('model', 'adapter')),
    digest TEXT NOT NULL UNIQUE,
    format TEXT NOT NULL,          -- gguf | hf | peft
    root TEXT NOT NULL,            -- the file or directory name inside entries/<digest>/
    fingerprint TEXT,              -- a model's weights fingerprint; an adapter's base fingerprint
    info TEXT NOT NULL,            -- JSON: shape, provenance, what the artifact says about itself
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    source TEXT,                   -- where it was added from
    removed REAL,                  -- set when its last name went: files deleted, row kept for lineage
    former_names TEXT              -- JSON list of the names it had when removed
);
CREATE INDEX IF NOT EXISTS artifacts_fp ON artifacts (kind, fingerprint);
CREATE TABLE IF NOT EXISTS files (
    artifact INTEGER NOT NULL REFERENCES artifacts (id),
    path TEXT NOT NULL,            -- relative to entries/<digest>/
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (artifact, path)
);
CREATE INDEX IF NOT EXISTS files_sha ON files (sha256);
CREATE TABLE IF NOT EXISTS names (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    artifact INTEGER NOT NULL REFERENCES artifacts (id),
    created REAL NOT NULL,
    PRIMARY KEY (kind, name, tag)
);
CREATE INDEX IF NOT EXISTS names_artifact ON names (artifact);
CREATE TABLE IF NOT EXISTS parents (
    child INTEGER NOT NULL REFERENCES artifacts (id),
    position INTEGER NOT NULL,
    digest TEXT,                   -- the parent's content digest; it may never have been in the catalog
    relation TEXT NOT NULL,        -- finetune-on | dpo-on | combine | merge | ...
    weight REAL,
    path TEXT,                     -- where the producer read it
    PRIMARY KEY (child, position)
);
CREATE INDEX IF NOT EXISTS parents_digest ON parents (digest);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    artifact INTEGER NOT NULL REFERENCES artifacts (id),
    kind TEXT NOT NULL,            -- eval | judge | ratings | ...
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    detail TEXT NOT NULL,          -- JSON: data file and hash, interval, stack, ...
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_artifact ON results (artifact);
CREATE TABLE IF NOT EXISTS verified (
    path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, stamp TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class ContentGone(Exception):
    """An add that meant only to name stored content found it removed meanwhile: stage it and commit again."""


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to the artifact's entry directory
    sha256: str
    size: int


@dataclass
class Artifact:
    """One stored content, as the index records it."""

    id: int
    kind: str
    digest: str
    format: str
    root: str
    fingerprint: str | None
    info: dict[str, Any]
    size: int
    created: float
    source: str | None
    removed: float | None = None
    names: list[str] = field(default_factory=list)  # "name:tag", oldest first
    former_names: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The name people know it by: its first name, else its former one, else a short digest."""
        if self.names:
            return self.names[0]
        if self.former_names:
            return f"{self.former_names[0]} (removed)"
        return f"{self.digest[:12]} (removed)" if self.removed else self.digest[:12]


@dataclass
class Parent:
    position: int
    digest: str | None
    relation: str
    weight: float | None
    path: str | None
    artifact: Artifact | None  # None when the parent was never in the catalog


@dataclass
class Result:
    id: int
    kind: str
    metric: str
    value: float
    detail: dict[str, Any]
    created: float


@dataclass
class Staged:
    """Files copied into the catalog's tmp/ and hashed on the way, laid out as the entry will be."""

    dir: Path
    root: str
    files: list[StoredFile]

    @property
    def path(self) -> Path:
        return self.dir / self.root

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _stamp(st: os.stat_result) -> str:
    # ctime cannot be set by a user: any write to the file changes it.
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def copy_hashing(src: Path, dst: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """Copy a file and hash what was copied (one read): (sha256, size)."""
    import hashlib

    h, n = hashlib.sha256(), 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(chunk):
            h.update(block)
            fo.write(block)
            n += len(block)
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest(), n


class Catalog:
    """The index and the files under one home directory. Connections are opened per operation, so one
    Catalog may be used from several threads (the server's watcher and its request handlers)."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home) if home is not None else home_dir()
        self.db_path = self.home / "catalog.sqlite"

    # ---- connections and transactions ----
    @property
    def exists(self) -> bool:
        return self.db_path.is_file()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                             check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA foreign_keys = ON")
        self._check_version(db)
        return db

    def _create(self) -> None:
        """Make the home and the index. The index is built under a private name and linked into place, so a
        concurrent reader never sees a database without its tables, and of two creators one simply wins."""
        for d in ("objects", "entries", "tmp"):
            (self.home / d).mkdir(parents=True, exist_ok=True)
        if self.exists:
            return
        tmp = self.home / "tmp" / f"catalog.{uuid.uuid4().hex}.sqlite"
        try:
            db = sqlite3.connect(tmp, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode = WAL")  # readers never wait for a writer
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            finally:
                db.close()  # the last connection folds the WAL back: one self-contained file
            try:
                os.link(tmp, self.db_path)
            except FileExistsError:
                pass  # another process made it first: theirs is as good
        except sqlite3.DatabaseError as e:
            raise NomoatError(f"{self.db_path}: cannot create the catalog's index ({e})") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _check_version(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise NomoatError(f"{self.db_path}: made by a newer nomoat (schema {version}); upgrade nomoat")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection | None]:
        """A connection for reading, or None when there is no catalog yet (nothing is created by a read)."""
        if not self.exists:
            yield None
            return
        try:
            db = self._connect()
        except sqlite3.Error as e:
            raise NomoatError(f"{self.db_path}: cannot open the catalog ({e})") from None
        try:
            yield db
        except sqlite3.DatabaseError as e:
            raise NomoatError(f"{self.db_path}: the catalog's index is unreadable ({e})") from None
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (SQLite's write lock held throughout); bumps the change counter."""
        if not self.exists:
            self._create()
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("INSERT INTO counters VALUES ('generation', 1) "
                       "ON CONFLICT (key) DO UPDATE SET value = value + 1")
            db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise NomoatError(f"{self.db_path}: the catalog's index could not be written ({e})") from None
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def generation(self) -> int:
        """A number that changes whenever anything in the catalog does (for watchers)."""
        with self._read() as db:
            if db is None:
                return 0
            row = db.execute("SELECT value FROM counters WHERE key = 'generation'").fetchone()
            return int(row[0]) if row else 0

    # ---- reading the index ----
    def _artifact(self, db: sqlite3.Connection, row: sqlite3.Row) -> Artifact:
        names = [f"{r['name']}:{r['tag']}" for r in db.execute(
            "SELECT name, tag FROM names WHERE artifact = ? ORDER BY created, name, tag", (row["id"],))]
        return Artifact(id=row["id"], kind=row["kind"], digest=row["digest"], format=row["format"],
                        root=row["root"], fingerprint=row["fingerprint"], info=json.loads(row["info"]),
                        size=row["size"], created=row["created"], source=row["source"], removed=row["removed"],
                        names=names, former_names=json.loads(row["former_names"] or "[]"))

    def find(self, kind: str, ref: Ref) -> Artifact | None:
        """The live artifact a name points at. A bare NAME means NAME:latest, or NAME's only tag."""
        with self._read() as db:
            if db is None:
                return None
            if ref.tag:
                rows = db.execute("SELECT artifact FROM names WHERE kind = ? AND name = ? AND tag = ?",
                                  (kind, ref.name, ref.tag)).fetchall()
            else:
                rows = db.execute("SELECT artifact, tag FROM names WHERE kind = ? AND name = ? ORDER BY tag",
                                  (kind, ref.name)).fetchall()
                latest = [r for r in rows if r["tag"] == DEFAULT_TAG]
                if latest:
                    rows = latest
                elif len(rows) > 1:
                    tags = ", ".join(f"{ref.name}:{r['tag']}" for r in rows)
                    raise NomoatError(f"{kind} {ref.name!r} has several tags ({tags}) and none is {DEFAULT_TAG!r}: "
                                      "say which")
            if not rows:
                return None
            row = db.execute("SELECT * FROM artifacts WHERE id = ?", (rows[0]["artifact"],)).fetchone()
            return self._artifact(db, row)

    def get(self, digest: str) -> Artifact | None:
        """An artifact by its digest, live or removed."""
        with self._read() as db:
            if db is None:
                return None
            row = db.execute("SELECT * FROM artifacts WHERE digest = ?", (digest,)).fetchone()
            return self._artifact(db, row) if row else None

    def artifacts(self, kind: str, fingerprint: str | None = None, removed: bool = False) -> list[Artifact]:
        """Live artifacts of a kind (optionally with this fingerprint), oldest first; with `removed`, only
        the removed ones."""
        with self._read() as db:
            if db is None:
                return []
            sql = "SELECT * FROM artifacts WHERE kind = ? AND removed IS " + ("NOT NULL" if removed else "NULL")
            args: list[Any] = [kind]
            if fingerprint is not None:
                sql += " AND fingerprint = ?"
                args.append(fingerprint)
            rows = db.execute(sql + " ORDER BY created, id", args).fetchall()
            names: dict[int, list[str]] = {}
            for r in db.execute("SELECT artifact, name, tag FROM names WHERE kind = ? ORDER BY created, name, tag",
                                (kind,)):
                names.setdefault(r["artifact"], []).append(f"{r['name']}:{r['tag']}")
            out = []
            for row in rows:
                a = Artifact(id=row["id"], kind=row["kind"], digest=row["digest"], format=row["format"],
                             root=row["root"], fingerprint=row["fingerprint"], info=json.loads(row["info"]),
                             size=row["size"], created=row["created"], source=row["source"],
                             removed=row["removed"], names=names.get(row["id"], []),
                             former_names=json.loads(row["former_names"] or "[]"))
                out.append(a)
            return out

    def names(self, kind: str) -> list[str]:
        """Every name of a kind, as NAME:TAG."""
        with self._read() as db:
            if db is None:
                return []
            return [f"{r[0]}:{r[1]}" for r in db.execute("SELECT name, tag FROM names WHERE kind = ? ORDER BY "
                                                         "name, tag", (kind,))]

    def files(self, artifact: Artifact) -> list[StoredFile]:
        with self._read() as db:
            if db is None:
                return []
            return [StoredFile(r["path"], r["sha256"], r["size"]) for r in db.execute(
                "SELECT path, sha256, size FROM files WHERE artifact = ? ORDER BY path", (artifact.id,))]

    def parents(self, artifact: Artifact) -> list[Parent]:
        with self._read() as db:
            if db is None:
                return []
            out = []
            for r in db.execute("SELECT * FROM parents WHERE child = ? ORDER BY position", (artifact.id,)).fetchall():
                row = db.execute("SELECT * FROM artifacts WHERE digest = ?", (r["digest"],)).fetchone() \
                    if r["digest"] else None
                out.append(Parent(r["position"], r["digest"], r["relation"], r["weight"], r["path"],
                                  self._artifact(db, row) if row else None))
            return out

    def children(self, artifact: Artifact) -> list[tuple[str, Artifact]]:
        """(relation, child) for every artifact that names this one as a parent."""
        with self._read() as db:
            if db is None:
                return []
            rows = db.execute("SELECT DISTINCT p.relation, a.* FROM parents p JOIN artifacts a ON a.id = p.child "
                              "WHERE p.digest = ? ORDER BY a.created, a.id", (artifact.digest,)).fetchall()
            return [(r["relation"], self._artifact(db, r)) for r in rows]

    def lineage_rows(self) -> list[tuple[int, str, str | None, str | None]]:
        """Every (child id, relation, parent digest, parent path), in order: listings read them in one query."""
        with self._read() as db:
            if db is None:
                return []
            return [(r[0], r[1], r[2], r[3]) for r in db.execute(
                "SELECT child, relation, digest, path FROM parents ORDER BY child, position")]

    def descendants(self, artifact: Artifact) -> list[Artifact]:
        """Every live artifact derived from this one, directly or not."""
        seen: dict[str, Artifact] = {}
        todo = [artifact]
        while todo:
            for _, child in self.children(todo.pop()):
                if child.digest not in seen:
                    seen[child.digest] = child
                    todo.append(child)
        return [a for a in seen.values() if a.removed is None]

    def results(self, artifact: Artifact) -> list[Result]:
        with self._read() as db:
            if db is None:
                return []
            return [Result(r["id"], r["kind"], r["metric"], r["value"], json.loads(r["detail"]), r["created"])
                    for r in db.execute("SELECT * FROM results WHERE artifact = ? ORDER BY created, id",
                                        (artifact.id,))]

    def latest_results(self, kind: str) -> dict[int, dict[str, Result]]:
        """artifact id -> metric -> its most recent result (one query, for listings)."""
        out: dict[int, dict[str, Result]] = {}
        with self._read() as db:
            if db is None:
                return out
            for r in db.execute("SELECT r.* FROM results r JOIN artifacts a ON a.id = r.artifact WHERE a.kind = ? "
                                "ORDER BY r.created, r.id", (kind,)):
                out.setdefault(r["artifact"], {})[r["metric"]] = Result(
                    r["id"], r["kind"], r["metric"], r["value"], json.loads(r["detail"]), r["created"])
        return out

    # ---- files ----
    def entry_dir(self, artifact: Artifact) -> Path:
        return self.entry_dir_of(artifact.digest)

    def entry_dir_of(self, digest: str) -> Path:
        return self.home / "entries" / digest

    def object_path(self, sha: str) -> Path:
        return self.home / "objects" / sha[:2] / sha

    def verified_path(self, artifact: Artifact) -> Path:
        """The artifact's file or directory, after checking every stored file against its recorded sha256."""
        if artifact.removed is not None:
            raise NomoatError(f"{artifact.kind} {artifact.label} was removed from the catalog")
        if artifact.info.get("external"):  # the default model: its package's file, not ours to check
            return Path(artifact.source or "")
        base = self.entry_dir(artifact)
        for f in self.files(artifact):
            self._verify_file(base / f.path, f, artifact)
        return base / artifact.root

    def _verify_file(self, p: Path, f: StoredFile, artifact: Artifact) -> None:
        how = f"remove it (nomoat {artifact.kind}s rm {artifact.label}) and add it again"
        try:
            st = p.stat()
        except OSError:
            raise NomoatError(f"{p}: missing from the catalog's store ({artifact.kind} {artifact.label}); {how}") \
                from None
        if st.st_size > ALWAYS_HASH_BYTES and self._stamp_matches(p, f.sha256, st):
            return
        sha = sha256_file(p)
        if sha != f.sha256:
            raise NomoatError(f"{p}: corrupt or swapped: its sha256 is {sha}, the catalog recorded {f.sha256} "
                              f"({artifact.kind} {artifact.label}); {how}")
        if st.st_size > ALWAYS_HASH_BYTES:
            with contextlib.suppress(sqlite3.Error), self._read() as db:
                if db is not None:
                    db.execute("INSERT OR REPLACE INTO verified VALUES (?, ?, ?)", (str(p), sha, _stamp(st)))

    def _stamp_matches(self, p: Path, sha: str, st: os.stat_result) -> bool:
        with self._read() as db:
            row = db.execute("SELECT sha256, stamp FROM verified WHERE path = ?", (str(p),)).fetchone() if db else None
        return bool(row) and row["sha256"] == sha and row["stamp"] == _stamp(st)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private directory under tmp/ (same file system as objects/), removed afterwards; what killed
        adds left there a day ago or more goes too."""
        if not self.exists:
            self._create()
        for old in (self.home / "tmp").iterdir():
            with contextlib.suppress(OSError):
                if time.time() - old.stat().st_mtime <= STALE_STAGING_SECONDS:
                    continue
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()
        d = self.home / "tmp" / uuid.uuid4().hex
        d.mkdir(parents=True)
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def stage(self, stage_dir: Path, src: Path, names: list[str] | None) -> Staged:
        """Copy `src` (a file, or these files of a directory) into `stage_dir`, hashing as it copies."""
        root = Path(os.path.abspath(src)).name  # abspath: '.' and '..' become names, symlinks stay as named
        files: list[StoredFile] = []
        if names is None:
            sha, size = copy_hashing(src, stage_dir / root)
            files.append(StoredFile(root, sha, size))
        else:
            (stage_dir / root).mkdir()
            for n in names:
                sha, size = copy_hashing(src / n, stage_dir / root / n)
                files.append(StoredFile(f"{root}/{n}", sha, size))
        return Staged(stage_dir, root, files)

    # ---- writing ----
    def commit(self, kind: str, digest: str, fmt: str, staged: Staged, fingerprint: str | None,
               info: dict[str, Any], source: str | None, parents: list[dict[str, Any]], ref: Ref,
               replace: bool = False) -> tuple[Artifact, bool]:
        """Store staged files as one artifact (unless its digest is already stored) and point `ref` at it.

        Returns (the artifact, whether its content was new). Everything here runs under the write lock: a
        concurrent removal cannot delete an object this add relies on, and two adds of the same content
        make one artifact.
        """
        moved: list[Path] = []
        made_entry: Path | None = None
        try:
            with self._write() as db:
                now = time.time()
                row = db.execute("SELECT * FROM artifacts WHERE digest = ?", (digest,)).fetchone()
                new = row is None or row["removed"] is not None
                if new and not staged.files:
                    raise ContentGone(digest)
                if new:
                    made_entry = self._place(staged, digest, moved)
                    if row is None:
                        cur = db.execute("INSERT INTO artifacts (kind, digest, format, root, fingerprint, info, size, "
                                         "created, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                         (kind, digest, fmt, staged.root, fingerprint, json.dumps(info, default=str),
                                          staged.size, now, source))
                        aid = int(cur.lastrowid)
                    else:  # revive a removed artifact: same content, so its lineage rows still hold
                        aid = int(row["id"])
                        db.execute("UPDATE artifacts SET removed = NULL, root = ?, info = ?, "
                                   "size = ?, created = ?, source = ? WHERE id = ?",
                                   (staged.root, json.dumps(info, default=str), staged.size, now, source, aid))
                        db.execute("DELETE FROM files WHERE artifact = ?", (aid,))
                        db.execute("DELETE FROM parents WHERE child = ?", (aid,))
                    db.executemany("INSERT INTO files VALUES (?, ?, ?, ?)",
                                   [(aid, f.path, f.sha256, f.size) for f in staged.files])
                    db.executemany("INSERT INTO parents VALUES (?, ?, ?, ?, ?, ?)",
                                   [(aid, i, p.get("digest"), str(p.get("relation") or "parent"), p.get("weight"),
                                     p.get("path")) for i, p in enumerate(parents)])
                else:
                    aid = int(row["id"])
                    if row["kind"] != kind:
                        raise NomoatError(f"this content is already in the catalog as a {row['kind']}")
                    if not self.entry_dir_of(digest).exists() and staged.files:
                        made_entry = self._place(staged, digest, moved)  # repair a damaged store
                self._point(db, kind, ref, aid, replace, now)
                art = self._artifact(db, db.execute("SELECT * FROM artifacts WHERE id = ?", (aid,)).fetchone())
            return art, new
        except BaseException:
            for p in moved:  # objects this add created and nothing recorded
                with contextlib.suppress(OSError):
                    p.unlink()
            if made_entry is not None:
                shutil.rmtree(made_entry, ignore_errors=True)
            raise

    def _point(self, db: sqlite3.Connection, kind: str, ref: Ref, aid: int, replace: bool, now: float) -> None:
        tag = ref.tag or DEFAULT_TAG
        old = db.execute("SELECT artifact FROM names WHERE kind = ? AND name = ? AND tag = ?",
                         (kind, ref.name, tag)).fetchone()
        if old is not None and old["artifact"] == aid:
            return
        if old is not None:
            if not replace:
                raise NomoatError(f"{ref.name}:{tag} already names another {kind}; remove it first (nomoat {kind}s "
                                  f"rm {ref.name}:{tag}), choose another --name, or pass --replace")
            db.execute("DELETE FROM names WHERE kind = ? AND name = ? AND tag = ?", (kind, ref.name, tag))
            self._retire_if_unnamed(db, int(old["artifact"]), [f"{ref.name}:{tag}"])
        db.execute("INSERT INTO names VALUES (?, ?, ?, ?, ?)", (kind, ref.name, tag, aid, now))

    def _place(self, staged: Staged, digest: str, moved: list[Path]) -> Path:
        """Move staged files into objects/ (keeping what is already there) and link the entry directory."""
        entry = self.home / "entries" / digest
        view = staged.dir / ".entry"
        for f in staged.files:
            obj = self.object_path(f.sha256)
            if not obj.exists():
                obj.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged.dir / f.path, obj)
                os.chmod(obj, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)  # stored content is never edited
                moved.append(obj)
            dst = view / f.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(obj, dst)
            except OSError:  # no hard links here (some file systems): a copy, verified like any file
                shutil.copyfile(obj, dst)
        if entry.exists():  # left by an add that died before its commit
            shutil.rmtree(entry)
        os.replace(view, entry)
        return entry

    def _retire_if_unnamed(self, db: sqlite3.Connection, aid: int, names: list[str]) -> bool:
        """Remember the names an artifact lost; with its last one, tombstone it and delete its files (those no
        other artifact holds)."""
        row = db.execute("SELECT digest, former_names FROM artifacts WHERE id = ?", (aid,)).fetchone()
        former = json.loads(row["former_names"] or "[]")
        former += [n for n in names if n not in former]
        db.execute("UPDATE artifacts SET former_names = ? WHERE id = ?", (json.dumps(former), aid))
        if db.execute("SELECT 1 FROM names WHERE artifact = ?", (aid,)).fetchone():
            return False
        db.execute("UPDATE artifacts SET removed = ? WHERE id = ?", (time.time(), aid))
        shared = {r[0] for r in db.execute(
            "SELECT f.sha256 FROM files f JOIN artifacts a ON a.id = f.artifact "
            "WHERE a.removed IS NULL AND f.sha256 IN (SELECT sha256 FROM files WHERE artifact = ?)", (aid,))}
        for (sha,) in db.execute("SELECT sha256 FROM files WHERE artifact = ?", (aid,)).fetchall():
            if sha not in shared:
                with contextlib.suppress(FileNotFoundError):
                    self.object_path(sha).unlink()
        shutil.rmtree(self.home / "entries" / row["digest"], ignore_errors=True)
        return True

    def remove(self, kind: str, ref: Ref) -> tuple[Artifact, bool]:
        """Drop a name; when it was the artifact's last, delete its files and keep a tombstone.

        Returns (the artifact as it was, whether its files went).
        """
        with self._write() as db:
            tag = ref.tag
            if tag is None:
                tags = [r[0] for r in db.execute("SELECT tag FROM names WHERE kind = ? AND name = ?",
                                                 (kind, ref.name))]
                tag = DEFAULT_TAG if DEFAULT_TAG in tags or len(tags) != 1 else tags[0]
            row = db.execute("SELECT artifact FROM names WHERE kind = ? AND name = ? AND tag = ?",
                             (kind, ref.name, tag)).fetchone()
            if row is None:
                raise NomoatError(f"no {kind} named {ref.name}:{tag} in the catalog ({self.home})")
            aid = int(row["artifact"])
            art = self._artifact(db, db.execute("SELECT * FROM artifacts WHERE id = ?", (aid,)).fetchone())
            db.execute("DELETE FROM names WHERE kind = ? AND name = ? AND tag = ?", (kind, ref.name, tag))
            gone = self._retire_if_unnamed(db, aid, [f"{ref.name}:{tag}"])
        return art, gone

    def add_result(self, artifact: Artifact, kind: str, metric: str, value: float,
                   detail: dict[str, Any] | None = None) -> None:
        with self._write() as db:
            db.execute("INSERT INTO results (artifact, kind, metric, value, detail, created) VALUES (?, ?, ?, ?, ?, ?)",
                       (artifact.id, kind, metric, float(value), json.dumps(detail or {}, default=str), time.time()))

    def ensure_external(self, kind: str, digest: str, fmt: str, path: Path, fingerprint: str | None,
                        info: dict[str, Any]) -> Artifact:
        """A row for content the catalog does not store (the embedded default model), so that results and
        lineage can point at it. Its files are never verified or deleted: they belong to their package."""
        with self._write() as db:
            row = db.execute("SELECT * FROM artifacts WHERE digest = ?", (digest,)).fetchone()
            if row is None:
                db.execute("INSERT INTO artifacts (kind, digest, format, root, fingerprint, info, size, created, "
                           "source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (kind, digest, fmt, path.name, fingerprint, json.dumps(info, default=str),
                            path.stat().st_size, time.time(), str(path)))
                row = db.execute("SELECT * FROM artifacts WHERE digest = ?", (digest,)).fetchone()
            return self._artifact(db, row)

    def integrity(self) -> list[str]:
        """Problems in the index or the store (empty when consistent): SQLite's own check, names pointing at
        removed artifacts, live artifacts with missing objects or entries."""
        problems: list[str] = []
        with self._read() as db:
            if db is None:
                return problems
            problems += [r[0] for r in db.execute("PRAGMA integrity_check") if r[0] != "ok"]
            for r in db.execute("SELECT n.name, n.tag FROM names n JOIN artifacts a ON a.id = n.artifact "
                                "WHERE a.removed IS NOT NULL"):
                problems.append(f"name {r[0]}:{r[1]} points at a removed artifact")
            for r in db.execute("SELECT a.digest, f.path, f.sha256 FROM files f JOIN artifacts a ON a.id = f.artifact "
                                "WHERE a.removed IS NULL"):
                if (self.home / "entries" / r[0]).exists() and not self.object_path(r[2]).exists():
                    problems.append(f"object {r[2]} of {r[0][:12]} ({r[1]}) is missing")
                if not (self.home / "entries" / r[0] / r[1]).exists() and self.object_path(r[2]).exists():
                    problems.append(f"entry file {r[1]} of {r[0][:12]} is missing")
        return problems
