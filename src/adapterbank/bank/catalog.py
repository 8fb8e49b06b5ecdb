"""The SQLite catalog of a bank: schema, connection settings, transactions. All SQL is parameterised.

Tables (``FORMAT_VERSION`` 1):

| table      | key                     | holds |
|------------|-------------------------|-------|
| meta       | key                     | ``format_version``, ``version`` (bumped by every write), ``created`` |
| adapters   | id                      | the card: base_model, format, rank, ranks/targets/tags/versions/extra as JSON, ... |
| files      | (adapter_id, name)      | sha256 and size of every original file of an adapter |
| prototypes | (adapter_id, space_key) | space JSON, dim, vector BLOB (float32 little-endian), n_samples, source |
| settings   | key                     | a JSON value and when it was written (e.g. ``compose.auto``, the setting ``tune`` chose) |

``settings`` came after format 1's first release: a bank without it reads as having no settings, and the
first :meth:`Catalog.set_setting` creates it inside its own write transaction (the migration). Older
adapterbank versions open such a bank unchanged (they never read the table), so ``FORMAT_VERSION`` stays 1.

WAL journal (readers never block the writer and see committed snapshots), ``busy_timeout`` so concurrent
writers queue instead of failing, ``synchronous=FULL`` so an acknowledged write survives a crash, and
``BEGIN IMMEDIATE`` for writes so a writer takes the lock before it reads what it will change.

A writer that finds the lock taken waits up to ``lock_timeout`` seconds: after one second it logs a warning
("waiting for another writer ..."), and when the time is up it raises :class:`BankError` naming the bank,
how long it waited and what to do. SQLite errors of a write (disk full, read-only file) become
:class:`BankError` naming the catalog file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapterbank.bank.backend import CARD_COLUMNS, CardRow, Entry, SpaceMatrix
from adapterbank.errors import BankError, ConflictError, NonFiniteError, ParameterError
from adapterbank.prototypes.space import Prototype, PrototypeSpace

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "CATALOG", "Catalog", "SCHEMA", "DEFAULT_LOCK_TIMEOUT"]

FORMAT_VERSION = 1
CATALOG = "catalog.sqlite"
#: Seconds a write waits for another process's write transaction before it gives up (``--lock-timeout``).
DEFAULT_LOCK_TIMEOUT = 60.0
#: Seconds of waiting after which the wait is announced (once).
WAIT_NOTICE_S = 1.0
_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED


def check_lock_timeout(value: object) -> float:
    """``value`` as seconds if it is a finite number >= 0, else :class:`ParameterError`.

    >>> check_lock_timeout(2)
    2.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ParameterError(f"The 'lock_timeout' parameter (--lock-timeout) must be a number of seconds >= 0. "
                             f"Got {value!r} instead.")
    return float(value)


#: How the "id exists" errors end: the way out.
REPLACE_HINT = "pass replace=True (--replace on the command line) to replace it"


def jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that JSON can hold (others are dropped), keys as strings.

    >>> jsonable({"a": 1, "b": object()})
    {'a': 1}
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[str(k)] = v
    return out


def _is_busy(e: sqlite3.OperationalError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return (code & 0xFF) in _BUSY_CODES if isinstance(code, int) else "locked" in str(e)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS adapters (
    id          TEXT PRIMARY KEY,
    base_model  TEXT,
    format      TEXT NOT NULL,
    rank        INTEGER NOT NULL,
    ranks       TEXT NOT NULL,
    targets     TEXT NOT NULL,
    source      TEXT,
    description TEXT,
    license     TEXT,
    tags        TEXT NOT NULL,
    created     TEXT NOT NULL,
    versions    TEXT NOT NULL,
    extra       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_base_model ON adapters(base_model);
CREATE TABLE IF NOT EXISTS files (
    adapter_id TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    size       INTEGER NOT NULL,
    PRIMARY KEY (adapter_id, name)
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files(sha256);
CREATE TABLE IF NOT EXISTS prototypes (
    adapter_id TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    space_key  TEXT NOT NULL,
    space      TEXT NOT NULL,
    dim        INTEGER NOT NULL,
    vector     BLOB NOT NULL,
    n_samples  INTEGER NOT NULL,
    source     TEXT,
    extra      TEXT NOT NULL,
    PRIMARY KEY (adapter_id, space_key)
);
CREATE INDEX IF NOT EXISTS prototypes_space ON prototypes(space_key);
CREATE TABLE IF NOT EXISTS settings (
    key     TEXT PRIMARY KEY,
    value   TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    version    INTEGER NOT NULL,
    space_key  TEXT NOT NULL,
    adapter_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_space_version ON changes(space_key, version);
"""
SETTINGS_TABLE = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS settings"):SCHEMA.index("CREATE TABLE IF NOT EXISTS changes")
                        ].rstrip().rstrip(";")
CHANGES_TABLES = [s.strip() for s in SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS changes"):].split(";") if s.strip()]


class Catalog:
    """One SQLite connection to ``<bank>/catalog.sqlite``, shared by the threads of one :class:`Bank`.

    >>> import tempfile, pathlib
    >>> cat = Catalog.create(pathlib.Path(tempfile.mkdtemp()) / "catalog.sqlite")
    >>> cat.version(), cat.format_version()
    (0, 1)
    >>> with cat.write() as c:
    ...     cat.bump(c)
    >>> cat.version()
    1
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = path
        self.conn = conn
        self.lock = threading.RLock()
        self.lock_timeout = check_lock_timeout(lock_timeout)

    @staticmethod
    def _connect(path: Path, lock_timeout: float) -> sqlite3.Connection:
        timeout = check_lock_timeout(lock_timeout)
        try:
            conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.OperationalError as e:
            raise BankError(f"Cannot open the catalog {path}: {e}. Check that the bank folder {path.parent} "
                            f"exists and that you may read and write it.") from None
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        return conn

    @staticmethod
    def _configure(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")

    @classmethod
    def create(cls, path: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Catalog:
        conn = cls._connect(path, lock_timeout)
        try:
            cls._configure(conn)
            conn.execute("BEGIN IMMEDIATE")
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            conn.executemany("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)",
                             [("format_version", str(FORMAT_VERSION)), ("version", "0"), ("created", now)])
            conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
            conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            conn.close()
            raise BankError(f"Cannot create the catalog {path}: {e}; no bank was created.") from None
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, lock_timeout)

    @classmethod
    def open(cls, path: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Catalog:
        conn = cls._connect(path, lock_timeout)
        try:
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = ?", ("format_version",)).fetchone()
                uv = int(conn.execute("PRAGMA user_version").fetchone()[0])
            except sqlite3.OperationalError as e:  # the OS or a lock, not the catalog's content
                raise BankError(f"Cannot read the catalog {path}: {e}. Check that you may read and write the "
                                f"bank folder {path.parent} (SQLite keeps -wal/-shm files beside the catalog).") from e
            except sqlite3.DatabaseError as e:
                raise BankError(f"{path} is not an adapterbank catalog ({e}).") from e
            if row is None:
                raise BankError(f"{path} is not an adapterbank catalog: its meta table has no 'format_version'.")
            try:
                fv = max(int(row[0]), uv)
            except ValueError:
                raise BankError(f"{path}: format_version {row[0]!r} is not an integer.") from None
            if fv > FORMAT_VERSION:
                raise BankError(
                    f"{path} has bank format_version {fv}, newer than this adapterbank understands "
                    f"({FORMAT_VERSION}). Upgrade adapterbank to open it."
                )
            try:
                cls._configure(conn)
            except sqlite3.OperationalError as e:
                raise BankError(f"Cannot open the catalog {path} for writing: {e}. Check that you may write the "
                                f"bank folder {path.parent}.") from e
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, lock_timeout)

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def _begin_write(self) -> None:
        """``BEGIN IMMEDIATE``, waiting up to ``lock_timeout`` s for another writer (announced after 1 s)."""
        t0 = time.monotonic()
        first = min(WAIT_NOTICE_S, self.lock_timeout)
        try:
            for i, wait in enumerate((first, self.lock_timeout - first)):
                if i == 1:
                    if wait <= 0:
                        break
                    log.warning("waiting for another writer to finish with the bank %s (up to %.0f s more; "
                                "--lock-timeout / lock_timeout= sets the limit)...", self.path.parent, wait)
                self.conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
                try:
                    self.conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as e:
                    if not _is_busy(e):
                        raise self._write_failed(e) from None
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {int(self.lock_timeout * 1000)}")
        raise BankError(
            f"The bank {self.path.parent} is locked by another writer (an add, remove or gc in another process); "
            f"gave up after waiting {time.monotonic() - t0:.1f} s. Run again when it has finished, or wait longer "
            f"with --lock-timeout SECONDS (lock_timeout= in Python)."
        )

    def _write_failed(self, e: sqlite3.OperationalError) -> BankError:
        what = str(e)
        advice = ("free some disk space" if "full" in what else
                  "check that the catalog file and the bank folder are writable" if "readonly" in what or
                  "read-only" in what or "unable to open" in what else "run `adapterbank verify` on the bank")
        return BankError(f"Cannot write the catalog {self.path}: {what}; nothing was changed. {advice[0].upper()}"
                         f"{advice[1:]} and run again.")

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed on success, rolled back on any exception.

        Waits for another process's write up to ``lock_timeout`` seconds, then raises :class:`BankError`;
        a failed SQLite write (disk full, read-only) raises :class:`BankError` naming the catalog.
        """
        with self.lock:
            self._begin_write()
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self._rollback()
                raise (BankError(f"The bank {self.path.parent} stayed locked by another process for more than "
                                 f"{self.lock_timeout:.0f} s; nothing was changed. Run again, or raise --lock-timeout.")
                       if _is_busy(e) else self._write_failed(e)) from None
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every SELECT inside sees the same committed snapshot."""
        with self.lock:
            self.conn.execute("BEGIN")
            try:
                yield self.conn
            finally:
                self.conn.execute("COMMIT")

    def bump(self, conn: sqlite3.Connection) -> None:
        """Increase the catalog version (inside a write transaction): cached indexes are rebuilt."""
        conn.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = ?", ("version",))

    def version(self) -> int:
        with self.lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", ("version",)).fetchone()
        return int(row[0])

    def format_version(self) -> int:
        with self.lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", ("format_version",)).fetchone()
        return int(row[0])

    # -- settings (a small key -> JSON text table; see the module docstring for its migration) -----------
    def has_settings(self, conn: sqlite3.Connection) -> bool:
        """Whether the catalog has its ``settings`` table (banks created before it existed do not, until written)."""
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                            ("settings",)).fetchone() is not None

    def get_setting(self, key: str) -> str | None:
        """The JSON text stored under ``key``, or ``None``."""
        with self.read() as c:
            if not self.has_settings(c):
                return None
            row = c.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def settings(self, prefix: str) -> dict[str, str]:
        """Every setting whose key starts with ``prefix``: key -> JSON text, sorted by key."""
        with self.read() as c:
            if not self.has_settings(c):
                return {}
            rows = c.execute("SELECT key, value FROM settings WHERE substr(key, 1, ?) = ? ORDER BY key",
                             (len(prefix), prefix)).fetchall()
        return {str(k): str(v) for k, v in rows}

    def set_setting(self, key: str, value: str | None) -> None:
        """Store the JSON text ``value`` under ``key`` (``None`` deletes it) in one write transaction that also
        bumps the version; creates the ``settings`` table first in a bank that has none."""
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with self.write() as c:
            c.execute(SETTINGS_TABLE)
            if value is None:
                c.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                c.execute("INSERT INTO settings(key, value, updated) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE "
                          "SET value = excluded.value, updated = excluded.updated", (key, value, now))
            self.bump(c)

    # -- the CatalogBackend interface (adapterbank.bank.backend): what Bank calls ---------------------------
    @property
    def location(self) -> str:
        return str(self.path)

    def _version_in(self, c: sqlite3.Connection) -> int:
        return int(c.execute("SELECT value FROM meta WHERE key = ?", ("version",)).fetchone()[0])

    def _log_changes(self, c: sqlite3.Connection, pairs: Iterable[tuple[str, str]]) -> None:
        """Record (space_key, adapter_id) pairs as changed at the version this transaction bumps to.

        A bank created before the change log gets its table here, with ``changes_from`` = the version it
        starts at (an index persisted before that is rebuilt, not patched)."""
        pairs = list(pairs)
        if not pairs:
            return
        if c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'changes'").fetchone() is None:
            for stmt in CHANGES_TABLES:
                c.execute(stmt)
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('changes_from', ?)", (str(self._version_in(c)),))
        v = self._version_in(c) + 1  # the version bump() will set
        c.executemany("INSERT INTO changes(version, space_key, adapter_id) VALUES (?, ?, ?)",
                      [(v, k, i) for k, i in pairs])

    def _spaces_of(self, c: sqlite3.Connection, id: str) -> list[str]:  # noqa: A002
        return [r[0] for r in c.execute("SELECT space_key FROM prototypes WHERE adapter_id = ?", (id,))]

    def count(self) -> int:
        with self.read() as c:
            return int(c.execute("SELECT COUNT(*) FROM adapters").fetchone()[0])

    def has(self, id: str) -> bool:  # noqa: A002
        with self.read() as c:
            return c.execute("SELECT 1 FROM adapters WHERE id = ?", (id,)).fetchone() is not None

    def some_ids(self, limit: int) -> list[str]:
        with self.read() as c:
            return [r[0] for r in c.execute("SELECT id FROM adapters ORDER BY id LIMIT ?", (int(limit),))]

    def card(self, id: str) -> CardRow | None:  # noqa: A002
        with self.read() as c:
            row = c.execute(f"SELECT {', '.join(CARD_COLUMNS)} FROM adapters WHERE id = ?", (id,)).fetchone()
            if row is None:
                return None
            files = dict(c.execute("SELECT name, sha256 FROM files WHERE adapter_id = ? ORDER BY name", (id,)))
            spaces = [r[0] for r in c.execute(
                "SELECT space_key FROM prototypes WHERE adapter_id = ? ORDER BY space_key", (id,))]
        return CardRow(dict(zip(CARD_COLUMNS, row, strict=True)), files, spaces)

    def cards(self, *, base_model: str | None = None, space_key: str | None = None,
              ids: Sequence[str] | None = None) -> list[CardRow]:
        where, params = [], []
        if base_model is not None:
            where.append("a.base_model = ?")
            params.append(base_model)
        if space_key is not None:
            where.append("a.id IN (SELECT adapter_id FROM prototypes WHERE space_key = ?)")
            params.append(space_key)
        # ids: looked up through the primary keys (json_each: any number of ids as one bound parameter)
        only, only_params = "", []
        if ids is not None:
            where.append("a.id IN (SELECT value FROM json_each(?))")
            params.append(json.dumps([str(i) for i in ids]))
            only, only_params = " WHERE adapter_id IN (SELECT value FROM json_each(?))", [params[-1]]
        sql = f"SELECT {', '.join('a.' + k for k in CARD_COLUMNS)} FROM adapters a"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self.read() as c:
            rows = list(c.execute(sql + " ORDER BY a.id", params))
            files: dict[str, dict[str, str]] = {}
            for aid, name, sha in c.execute(f"SELECT adapter_id, name, sha256 FROM files{only} "
                                            "ORDER BY adapter_id, name", only_params):
                files.setdefault(aid, {})[name] = sha
            spaces: dict[str, list[str]] = {}
            for aid, key in c.execute(f"SELECT adapter_id, space_key FROM prototypes{only} "
                                      "ORDER BY adapter_id, space_key", only_params):
                spaces.setdefault(aid, []).append(key)
        return [CardRow(dict(zip(CARD_COLUMNS, r, strict=True)), files.get(r[0], {}), spaces.get(r[0], []))
                for r in rows]

    def commit(self, entries: Sequence[Entry], *, replace: bool = False,
               under_lock: Callable[[], None] | None = None) -> list[bool]:
        ids = [e.id for e in entries]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ConflictError(f"One batch adds the same id twice: {dup}.")
        replaced = []
        with self.write() as c:
            for e in entries:
                exists = c.execute("SELECT 1 FROM adapters WHERE id = ?", (e.id,)).fetchone() is not None
                if exists and not replace:
                    raise ConflictError(f"The bank already has an adapter with id {e.id!r} (added concurrently); "
                                        f"{REPLACE_HINT}.")
                replaced.append(exists)
            if under_lock is not None:
                under_lock()
            changed: list[tuple[str, str]] = []
            for e, exists in zip(entries, replaced, strict=True):
                if exists:
                    changed += [(k, e.id) for k in self._spaces_of(c, e.id)]
                    c.execute("DELETE FROM adapters WHERE id = ?", (e.id,))
                c.execute(f"INSERT INTO adapters({', '.join(CARD_COLUMNS)}) VALUES ({', '.join('?' * len(CARD_COLUMNS))})",
                          [e.row[k] for k in CARD_COLUMNS])
                c.executemany("INSERT INTO files(adapter_id, name, sha256, size) VALUES (?, ?, ?, ?)",
                              [(e.id, name, sha, size) for name, sha, size in e.files])
                for p in e.prototypes:
                    self._insert_prototype(c, e.id, p)
                    changed.append((p.space.key, e.id))
            self._log_changes(c, changed)
            self.bump(c)
        return replaced

    @staticmethod
    def _insert_prototype(c: sqlite3.Connection, id: str, p: Prototype) -> None:  # noqa: A002
        vec = np.ascontiguousarray(p.vector, dtype="<f4")
        if not np.isfinite(vec).all():
            raise NonFiniteError(f"The prototype of {id!r} contains NaN or Inf.")
        c.execute(
            "INSERT OR REPLACE INTO prototypes(adapter_id, space_key, space, dim, vector, n_samples, source, extra) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (id, p.space.key, json.dumps(p.space.to_dict(), sort_keys=True), p.dim, vec.tobytes(),
             int(p.n_samples), p.source, json.dumps(jsonable(p.extra), sort_keys=True)),
        )

    def remove(self, id: str) -> bool:  # noqa: A002
        with self.write() as c:
            if c.execute("SELECT 1 FROM adapters WHERE id = ?", (id,)).fetchone() is None:
                return False
            self._log_changes(c, [(k, id) for k in self._spaces_of(c, id)])
            c.execute("DELETE FROM adapters WHERE id = ?", (id,))
            self.bump(c)
        return True

    def set_prototype(self, id: str, prototype: Prototype) -> bool:  # noqa: A002
        with self.write() as c:
            if c.execute("SELECT 1 FROM adapters WHERE id = ?", (id,)).fetchone() is None:
                return False
            self._insert_prototype(c, id, prototype)
            self._log_changes(c, [(prototype.space.key, id)])
            self.bump(c)
        return True

    def prototypes(self, id: str) -> list[Prototype]:  # noqa: A002
        with self.read() as c:
            rows = c.execute("SELECT space, vector, n_samples, source, extra FROM prototypes WHERE adapter_id = ? "
                             "ORDER BY space_key", (id,)).fetchall()
        return [Prototype(np.frombuffer(vec, dtype="<f4").astype(np.float32), PrototypeSpace.from_dict(json.loads(sp)),
                          int(n), src or "", json.loads(extra)) for sp, vec, n, src, extra in rows]

    def spaces(self) -> dict[str, PrototypeSpace]:
        with self.read() as c:
            keys = [r[0] for r in c.execute("SELECT DISTINCT space_key FROM prototypes ORDER BY space_key")]
            return {key: PrototypeSpace.from_dict(json.loads(c.execute(
                "SELECT space FROM prototypes WHERE space_key = ? LIMIT 1", (key,)).fetchone()[0])) for key in keys}

    def _matrix(self, c: sqlite3.Connection, space_key: str, ids: Sequence[str] | None) -> SpaceMatrix:
        version = self._version_in(c)
        sql = ("SELECT p.adapter_id, p.vector, p.dim, a.base_model, a.tags FROM prototypes p "
               "JOIN adapters a ON a.id = p.adapter_id WHERE p.space_key = ?")
        if ids is None:
            rows = c.execute(sql + " ORDER BY p.adapter_id", (space_key,)).fetchall()
        else:
            rows = []
            uniq = sorted(set(ids))
            for i in range(0, len(uniq), 500):
                chunk = uniq[i:i + 500]
                rows += c.execute(sql + f" AND p.adapter_id IN ({', '.join('?' * len(chunk))}) ORDER BY p.adapter_id",
                                  (space_key, *chunk)).fetchall()
        dims = {r[2] for r in rows}
        if len(dims) > 1:
            raise BankError(f"Prototypes in space {space_key!r} have different dims {sorted(dims)}: the catalog "
                            f"{self.path} is damaged.")
        d = dims.pop() if dims else 0
        X = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), d) if rows else \
            np.zeros((0, d), np.float32)
        return SpaceMatrix(version, [r[0] for r in rows], X,
                           [{"base_model": r[3], "tags": json.loads(r[4])} for r in rows])

    def space_matrix(self, space_key: str) -> SpaceMatrix:
        with self.read() as c:
            return self._matrix(c, space_key, None)

    def vectors(self, space_key: str, ids: Sequence[str]) -> SpaceMatrix:
        with self.read() as c:
            return self._matrix(c, space_key, ids)

    def changes_since(self, space_key: str, version: int) -> list[str] | None:
        with self.read() as c:
            if c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'changes'").fetchone() is None:
                return None
            row = c.execute("SELECT value FROM meta WHERE key = 'changes_from'").fetchone()
            if int(version) < (int(row[0]) if row else 0) or int(version) > self._version_in(c):
                return None
            return [r[0] for r in c.execute("SELECT DISTINCT adapter_id FROM changes WHERE space_key = ? AND "
                                            "version > ? ORDER BY adapter_id", (space_key, int(version)))]

    def file_rows(self) -> list[tuple[str, str, str, int]]:
        with self.read() as c:
            return [tuple(r) for r in c.execute(  # type: ignore[misc]
                "SELECT adapter_id, name, sha256, size FROM files ORDER BY adapter_id, name")]

    def integrity_problems(self) -> list[str]:
        with self.read() as c:
            ic = [r[0] for r in c.execute("PRAGMA quick_check").fetchall()]
            no_files = [r[0] for r in c.execute(
                "SELECT id FROM adapters WHERE id NOT IN (SELECT adapter_id FROM files) ORDER BY id")]
            bad_protos = c.execute(
                "SELECT adapter_id, space_key, dim, length(vector) FROM prototypes WHERE length(vector) != 4 * dim"
            ).fetchall()
        problems = [] if ic == ["ok"] else [f"catalog {self.path}: sqlite quick_check says {ic[:5]}"]
        problems += [f"adapter {a!r} has no files" for a in no_files]
        problems += [f"prototype of {a!r} in {s!r}: {n} bytes for dim {d}" for a, s, d, n in bad_protos]
        return problems

    def collect_garbage(self, delete_unused: Callable[[set[str]], int]) -> int:
        with self.write() as c:
            used = {r[0] for r in c.execute("SELECT DISTINCT sha256 FROM files")}
            return delete_unused(used)

    def search(self, space_key: str, query: np.ndarray, k: int, where: Mapping[str, Any] | None) -> None:
        """The embedded catalog does not search: the bank uses its own index (``None``)."""
        return None
