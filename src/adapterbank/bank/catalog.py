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
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from adapterbank.errors import BankError, ParameterError

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
"""
SETTINGS_TABLE = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS settings"):].rstrip().rstrip(";")


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
