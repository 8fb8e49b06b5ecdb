"""The SQLite catalog of a bank: schema, connection settings, transactions. All SQL is parameterised.

Tables (``FORMAT_VERSION`` 1):

| table      | key                     | holds |
|------------|-------------------------|-------|
| meta       | key                     | ``format_version``, ``version`` (bumped by every write), ``created`` |
| adapters   | id                      | the card: base_model, format, rank, ranks/targets/tags/versions/extra as JSON, ... |
| files      | (adapter_id, name)      | sha256 and size of every original file of an adapter |
| prototypes | (adapter_id, space_key) | space JSON, dim, vector BLOB (float32 little-endian), n_samples, source |

WAL journal (readers never block the writer and see committed snapshots), ``busy_timeout`` so concurrent
writers queue instead of failing, ``synchronous=FULL`` so an acknowledged write survives a crash, and
``BEGIN IMMEDIATE`` for writes so a writer takes the lock before it reads what it will change.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from adapterbank.errors import BankError

__all__ = ["FORMAT_VERSION", "CATALOG", "Catalog", "SCHEMA"]

FORMAT_VERSION = 1
CATALOG = "catalog.sqlite"
BUSY_TIMEOUT_MS = 60_000

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
"""


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

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self.lock = threading.RLock()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return conn

    @staticmethod
    def _configure(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")

    @classmethod
    def create(cls, path: Path) -> Catalog:
        conn = cls._connect(path)
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
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    @classmethod
    def open(cls, path: Path) -> Catalog:
        conn = cls._connect(path)
        try:
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = ?", ("format_version",)).fetchone()
                uv = int(conn.execute("PRAGMA user_version").fetchone()[0])
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
            cls._configure(conn)
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed on success, rolled back on any exception."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

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
