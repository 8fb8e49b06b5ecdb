"""The server catalog of a bank: PostgreSQL + pgvector (docs/design.md §5; contract in :mod:`.backend`).

Tables (``PG_FORMAT_VERSION`` 1), in the connection's current schema (``options=-csearch_path=NAME`` in the
URL puts a bank in its own schema; one database may hold several banks that way):

| table      | key                     | holds |
|------------|-------------------------|-------|
| meta       | key                     | ``format_version``, ``version`` (bumped by every write), ``changes_floor`` |
| adapters   | id                      | the card as in SQLite + ``tag_set`` JSONB (from ``tags``, GIN index, ``@>``) |
| files      | (adapter_id, name)      | sha256 and size of every original file of an adapter |
| prototypes | (adapter_id, space_key) | space JSON, dim, ``embedding vector`` (no fixed dim), n_samples, source |
| settings   | key                     | a JSON value and when it was written |
| changes    | version, space_key      | (version, space, id) per changed prototype (:meth:`PgCatalog.changes_since`) |

Text keys (ids, file names, space keys, setting keys) are ``COLLATE "C"``: "sorted by id" is byte order, as in
SQLite and Python, whatever the database's default collation.

**Writes.** Each write is one transaction that first takes ``pg_advisory_xact_lock(<bank key>)`` (a 64-bit key
derived from the database and schema names; the lock is released by COMMIT/ROLLBACK and by the server when
a client dies), then bumps ``meta.version``. Writers of every machine therefore queue; a writer waits up to
``lock_timeout`` seconds (announced after one second) and then gets :class:`BankError`. ``adapters.id`` is a
primary key, so even a writer that bypassed the lock could not register an id twice: the loser gets
:class:`ConflictError`. A write whose connection is lost (server restart, network) raises :class:`BankError`
and PostgreSQL rolls the transaction back: nothing is half-committed.

**Reads** run in one ``REPEATABLE READ READ ONLY`` transaction when they need several statements (a card with
its files; a whole space with the version it was read at). A read whose connection was dropped (the server
restarted) reconnects and is retried once.

**Search** (:meth:`PgCatalog.search`) runs the k-NN in PostgreSQL with ``<->`` (L2) and the filters of the
embedded index (``base_model`` equality; ``tags``: all of them, ``tag_set @> '["a","b"]'``), then re-ranks the
fetched rows exactly in float64 (d_i = Σ_j (x_ij − q_j)² of the stored float32 values, ties by id):

* **exact** (a space with fewer than ``hnsw_threshold`` rows, default 20 000, or d > 2000): a sequential scan,
  ``LIMIT m`` with m = k + 16. pgvector's float32 distance of the m-th row, lowered by the float32 rounding bound
  (d + 8)·2·u, must exceed the k-th exact distance, else m grows ×4: the result equals brute force.
* **hnsw** (once the space reached the threshold; the index is built right after that commit with
  ``CREATE INDEX CONCURRENTLY``): a partial expression index ``USING hnsw ((embedding::vector(D)) vector_l2_ops)
  WHERE space_key = '<key>'`` per space; ``hnsw.ef_search`` = max(200, 2m), ``hnsw.iterative_scan = relaxed_order``
  (so filters still fill the LIMIT), m = max(4k, k + 64) candidates re-ranked exactly. Approximate; a filter so
  selective that fewer than k rows come back is answered exactly instead.

The index predicate and ``D`` are DDL (they cannot be bind parameters): the space key is quoted by
``psycopg.sql.Literal`` and ``D`` is an int. Everything else is parameterised. Sessions run with
``plan_cache_mode = force_custom_plan`` so the planner sees the space key and can use its partial index.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from adapterbank._validation import check_k
from adapterbank.bank.backend import CARD_COLUMNS, CardRow, Entry, SpaceMatrix
from adapterbank.bank.catalog import DEFAULT_LOCK_TIMEOUT, WAIT_NOTICE_S, check_lock_timeout
from adapterbank.bank.index import Hit, _check_query, _check_where
from adapterbank.errors import BankError, ConflictError, NonFiniteError, ParameterError, ShapeMismatchError
from adapterbank.prototypes.space import Prototype, PrototypeSpace

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

__all__ = ["HNSW_THRESHOLD", "PG_FORMAT_VERSION", "PgCatalog", "redact_url"]

PG_FORMAT_VERSION = 1
#: A space gets its HNSW index (and approximate search) when it holds this many prototypes.
HNSW_THRESHOLD = 20_000
#: pgvector's HNSW index takes vectors of at most this many dimensions; bigger spaces stay exact.
HNSW_MAX_DIM = 2000
#: Versions the change log reaches back; older rows are pruned (``changes_since`` then says ``None``).
CHANGE_LOG_VERSIONS = 10_000
_U32 = 2.0**-24  # unit roundoff of float32
_SLACK = 16  # exact mode: candidates beyond k fetched at first
_CONNECT_RETRY_S = 10.0  # a reconnect waits this long for a restarting server

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS adapters (
    id          TEXT COLLATE "C" PRIMARY KEY,
    base_model  TEXT COLLATE "C",
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
    extra       TEXT NOT NULL,
    tag_set     JSONB GENERATED ALWAYS AS (tags::jsonb) STORED
);
CREATE INDEX IF NOT EXISTS adapters_base_model ON adapters(base_model);
CREATE INDEX IF NOT EXISTS adapters_tag_set ON adapters USING gin (tag_set jsonb_path_ops);
CREATE TABLE IF NOT EXISTS files (
    adapter_id TEXT COLLATE "C" NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    name       TEXT COLLATE "C" NOT NULL,
    sha256     TEXT COLLATE "C" NOT NULL,
    size       BIGINT NOT NULL,
    PRIMARY KEY (adapter_id, name)
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files(sha256);
CREATE TABLE IF NOT EXISTS prototypes (
    adapter_id TEXT COLLATE "C" NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    space_key  TEXT COLLATE "C" NOT NULL,
    space      TEXT NOT NULL,
    dim        INTEGER NOT NULL,
    embedding  vector NOT NULL,
    n_samples  INTEGER NOT NULL,
    source     TEXT,
    extra      TEXT NOT NULL,
    PRIMARY KEY (adapter_id, space_key)
);
CREATE INDEX IF NOT EXISTS prototypes_space ON prototypes(space_key, adapter_id);
CREATE TABLE IF NOT EXISTS settings (
    key     TEXT COLLATE "C" PRIMARY KEY,
    value   TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    version    BIGINT NOT NULL,
    space_key  TEXT COLLATE "C" NOT NULL,
    adapter_id TEXT COLLATE "C" NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_space_version ON changes(space_key, version)
"""


def _require() -> Any:
    """The ``psycopg`` module, or :class:`BankError` saying how to install the server extra."""
    try:
        import pgvector.psycopg  # noqa: F401
        import psycopg
    except ImportError as e:
        raise BankError(f"The PostgreSQL catalog needs psycopg 3 and pgvector ({e}): "
                        f"pip install 'adapterbank[server]'.") from None
    return psycopg


def redact_url(url: str) -> str:
    """A PostgreSQL connection string without its password, for messages and logs.

    >>> redact_url("postgresql://bank:s3cret@db.example:5433/adapters?sslmode=require")
    'postgresql://bank@db.example:5433/adapters?sslmode=require'
    >>> redact_url("host=/tmp/pg dbname=x password=s3cret user=u")
    'host=/tmp/pg dbname=x user=u'
    """
    if "://" in url:
        p = urllib.parse.urlsplit(url)
        netloc = p.netloc.rpartition("@")
        userinfo, host = (netloc[0], netloc[2]) if netloc[1] else ("", netloc[2])
        user = userinfo.split(":", 1)[0]
        query = urllib.parse.urlencode([(k, v) for k, v in urllib.parse.parse_qsl(p.query, keep_blank_values=True)
                                        if k.lower() != "password"], safe="/")
        return urllib.parse.urlunsplit((p.scheme, f"{user}@{host}" if user else host, p.path, query, ""))
    parts = [w for w in url.split() if not w.lower().startswith("password=")]
    return " ".join(parts)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _extra_json(extra: Mapping[str, Any]) -> str:
    """A prototype's ``extra`` as JSON text, leaving out values JSON cannot hold (as the embedded catalog does).

    >>> _extra_json({"b": 1, "a": object()})
    '{"b": 1}'
    """
    out: dict[str, Any] = {}
    for k, v in extra.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[str(k)] = v
    return json.dumps(out, sort_keys=True)


def _msg(e: BaseException) -> str:
    """A psycopg error on one line without its final period (its DETAIL/HINT lines joined).

    >>> _msg(ValueError("duplicate key\\nDETAIL:  Key (id)=(a) already exists.\\n"))
    'duplicate key; DETAIL: Key (id)=(a) already exists'
    """
    lines = [" ".join(line.split()) for line in str(e).strip().splitlines() if line.strip()]
    return "; ".join(lines).rstrip(".") or type(e).__name__


def _lost(conn: psycopg.Connection | None) -> bool:
    return conn is None or conn.closed or conn.broken


def _space_index_name(space_key: str) -> str:
    return "prototypes_hnsw_" + hashlib.sha256(space_key.encode()).hexdigest()[:16]


def _certified(last_pg: float, kth: float, d: int) -> bool:
    """Whether every row pgvector left out (its float32 distance ≥ ``last_pg``) is farther than ``kth`` (exact).

    pgvector sums (x_j − q_j)² in float32: the sum is within a factor 1 ± (d + 8)·u of the exact value (u the
    float32 unit roundoff; the +8 covers the subtraction, the square, sqrt and squaring back, and underflow).

    >>> _certified(2.0, 1.0, 384), _certified(1.0 + 1e-9, 1.0, 384)
    (True, False)
    """
    bound = last_pg * (1.0 - 2.0 * (d + 8) * _U32) - 1e-30 * d
    return bound > kth


class _VectorLoader:
    """Binary pgvector values as float32 numpy arrays (big-endian on the wire: int16 dim, int16 unused, floats)."""

    @staticmethod
    def make(psycopg: Any) -> type:
        from psycopg.adapt import Loader
        from psycopg.pq import Format

        class VectorNumpyLoader(Loader):
            format = Format.BINARY

            def load(self, data: Any) -> np.ndarray:
                return np.frombuffer(data, dtype=">f4", offset=4).astype(np.float32)

        return VectorNumpyLoader


class PgCatalog:
    """A bank catalog in PostgreSQL with pgvector (one connection shared by the threads of one bank).

    ``url`` is a libpq connection string or URL (``postgresql://user:pass@host:5432/db``; the usual ``PG*``
    environment variables fill in what it leaves out). ``hnsw_threshold``: the size at which a space gets an
    HNSW index and approximate search (``None``: always exact).

    >>> cat = PgCatalog.create("postgresql://bank@localhost/adapters")  # doctest: +SKIP
    >>> cat.version(), cat.count()  # doctest: +SKIP
    (0, 0)
    """

    def __init__(self, url: str, conn: psycopg.Connection, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                 hnsw_threshold: int | None = HNSW_THRESHOLD) -> None:
        self.url = url
        self.location = redact_url(url)
        self.conn: psycopg.Connection | None = conn
        self.lock = threading.RLock()
        self.lock_timeout = check_lock_timeout(lock_timeout)
        if hnsw_threshold is not None and (isinstance(hnsw_threshold, bool) or not isinstance(hnsw_threshold, int)
                                           or hnsw_threshold < 1):
            raise ParameterError(f"The 'hnsw_threshold' parameter of PgCatalog must be an int >= 1 or None. "
                                 f"Got {hnsw_threshold!r} instead.")
        self.hnsw_threshold = hnsw_threshold
        self.change_log_versions = CHANGE_LOG_VERSIONS
        #: Seconds a reconnect keeps trying while the server is (re)starting before the read fails.
        self.reconnect_wait = _CONNECT_RETRY_S
        self._bank_key = self._key_of(conn)
        self._spaces_cache: tuple[int, dict[str, PrototypeSpace]] | None = None
        self._index_cache: tuple[int, set[str]] | None = None

    # -- connections ------------------------------------------------------------------------------
    @classmethod
    def _connect(cls, url: str, *, vector: bool = True, wait: float = 0.0) -> psycopg.Connection:
        """A new autocommit connection; ``wait``: seconds to keep trying while the server is (re)starting."""
        psycopg = _require()
        loc = redact_url(url)
        deadline = time.monotonic() + wait
        while True:
            try:
                conn = psycopg.connect(url, autocommit=True, prepare_threshold=None, connect_timeout=10)
                break
            except psycopg.OperationalError as e:
                msg = _msg(e)
                starting = "starting up" in msg or "shutting down" in msg or "Connection refused" in msg \
                    or "No such file or directory" in msg
                if starting and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise BankError(f"Cannot connect to the catalog {loc}: {msg}. Check that the server is running and "
                                f"that the URL, user and password are right.") from None
            except psycopg.ProgrammingError as e:
                raise BankError(f"The catalog location {loc} is not a valid PostgreSQL connection string: "
                                f"{e}.") from None
        try:
            conn.execute("SET plan_cache_mode = force_custom_plan")
            if vector:
                cls._register_vector(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _register_vector(conn: psycopg.Connection) -> None:
        import psycopg
        from pgvector.psycopg import register_vector

        try:
            register_vector(conn)
        except psycopg.ProgrammingError:
            raise BankError(
                "The database has no 'vector' type: the pgvector extension is not installed in it. Create the bank "
                "with PgCatalog.create (it runs CREATE EXTENSION vector), or ask an administrator to run "
                "CREATE EXTENSION vector."
            ) from None
        info = psycopg.types.TypeInfo.fetch(conn, "vector")
        conn.adapters.register_loader(info.oid, _VectorLoader.make(psycopg))

    @staticmethod
    def _key_of(conn: psycopg.Connection) -> int:
        """The advisory-lock key of the bank: 64 bits of sha256("adapterbank:<database>:<schema>")."""
        db, schema = conn.execute("SELECT current_database(), current_schema()").fetchone()
        if schema is None:
            raise BankError("The connection has no current schema (its search_path names no existing schema); "
                            "create the schema or fix options=-csearch_path=... in the URL.")
        h = hashlib.sha256(f"adapterbank:{db}:{schema}".encode()).digest()
        return int.from_bytes(h[:8], "big", signed=True)

    def _alive(self) -> psycopg.Connection:
        """The connection, reconnected first if it was lost."""
        if _lost(self.conn):
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    self.conn.close()
            self.conn = None
            self.conn = self._connect(self.url, wait=self.reconnect_wait)
            log.info("reconnected to the catalog %s", self.location)
        assert self.conn is not None
        return self.conn

    @classmethod
    def create(cls, url: str, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
               hnsw_threshold: int | None = HNSW_THRESHOLD) -> PgCatalog:
        """Create the catalog tables (and the ``vector`` extension) in the database of ``url``.

        :class:`BankError` if a bank is already there, or the server refuses (no permission, no pgvector).
        """
        psycopg = _require()
        loc = redact_url(url)
        conn = cls._connect(url, vector=False)
        try:
            key = cls._key_of(conn)
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
                    if conn.execute("SELECT to_regclass('meta')").fetchone()[0] is not None:
                        raise BankError(f"{loc} already holds a bank (its schema has a 'meta' table); open it with "
                                        f"PgCatalog.open.")
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                    for stmt in SCHEMA.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    conn.cursor().executemany(
                        "INSERT INTO meta(key, value) VALUES (%s, %s)",
                        [("format_version", str(PG_FORMAT_VERSION)), ("version", "0"), ("created", _now()),
                         ("changes_floor", "0"), ("backend", "postgresql+pgvector")])
            except psycopg.Error as e:
                raise BankError(f"Cannot create the catalog in {loc}: {_msg(e)}; no bank was created. "
                                f"The user needs CREATE on the schema, and pgvector must be available "
                                f"(CREATE EXTENSION vector).") from None
            cls._register_vector(conn)
        except BaseException:
            conn.close()
            raise
        log.info("created catalog at %s (format_version %d)", loc, PG_FORMAT_VERSION)
        return cls(url, conn, lock_timeout=lock_timeout, hnsw_threshold=hnsw_threshold)

    @classmethod
    def open(cls, url: str, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
             hnsw_threshold: int | None = HNSW_THRESHOLD) -> PgCatalog:
        """Open an existing catalog; :class:`BankError` if there is none or it has a newer format."""
        psycopg = _require()
        loc = redact_url(url)
        conn = cls._connect(url, vector=False)
        try:
            try:
                if conn.execute("SELECT to_regclass('meta')").fetchone()[0] is None:
                    raise BankError(f"{loc} is not an adapterbank catalog: it has no 'meta' table. Create one with "
                                    f"PgCatalog.create.")
                row = conn.execute("SELECT value FROM meta WHERE key = %s", ("format_version",)).fetchone()
            except psycopg.Error as e:
                raise BankError(f"Cannot read the catalog {loc}: {_msg(e)}.") from None
            if row is None:
                raise BankError(f"{loc} is not an adapterbank catalog: its meta table has no 'format_version'.")
            try:
                fv = int(row[0])
            except ValueError:
                raise BankError(f"{loc}: format_version {row[0]!r} is not an integer.") from None
            if fv > PG_FORMAT_VERSION:
                raise BankError(f"{loc} has bank format_version {fv}, newer than this adapterbank understands "
                                f"({PG_FORMAT_VERSION}). Upgrade adapterbank to open it.")
            cls._register_vector(conn)
        except BaseException:
            conn.close()
            raise
        return cls(url, conn, lock_timeout=lock_timeout, hnsw_threshold=hnsw_threshold)

    def close(self) -> None:
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

    def __repr__(self) -> str:
        return f"PgCatalog({self.location!r})"

    # -- transactions -----------------------------------------------------------------------------
    def _read(self, fn: Callable[[psycopg.Connection], Any], *, snapshot: bool = False) -> Any:
        """``fn(conn)`` (in one REPEATABLE READ READ ONLY transaction if ``snapshot``); retried once on a new
        connection when the old one was lost (a server restart)."""
        psycopg = _require()
        with self.lock:
            for attempt in (0, 1):
                conn = self._alive()
                try:
                    if not snapshot:
                        return fn(conn)
                    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    try:
                        out = fn(conn)
                    except BaseException:
                        if not _lost(conn):
                            conn.execute("ROLLBACK")
                        raise
                    conn.execute("COMMIT")
                    return out
                except psycopg.OperationalError as e:
                    if _lost(conn) and attempt == 0:
                        log.warning("lost the connection to the catalog %s (%s); reconnecting", self.location,
                                    _msg(e))
                        continue
                    raise BankError(f"Cannot read the catalog {self.location}: {_msg(e)}.") from None
                except psycopg.Error as e:
                    raise BankError(f"Cannot read the catalog {self.location}: {_msg(e)}.") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _take_writer_lock(self, conn: psycopg.Connection) -> None:
        """``pg_try_advisory_xact_lock`` until it succeeds or ``lock_timeout`` has passed (announced after 1 s)."""
        t0 = time.monotonic()
        pause, told = 0.01, False
        while not conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (self._bank_key,)).fetchone()[0]:
            waited = time.monotonic() - t0
            if waited >= self.lock_timeout:
                raise BankError(
                    f"The bank {self.location} is locked by another writer (an add, remove or gc on this or another "
                    f"machine); gave up after waiting {waited:.1f} s. Run again when it has finished, or wait longer "
                    f"with --lock-timeout SECONDS (lock_timeout= in Python)."
                )
            if not told and waited >= min(WAIT_NOTICE_S, self.lock_timeout):
                log.warning("waiting for another writer to finish with the bank %s (up to %.0f s more; "
                            "--lock-timeout / lock_timeout= sets the limit)...", self.location,
                            self.lock_timeout - waited)
                told = True
            time.sleep(min(pause, max(self.lock_timeout - waited, 0.0)))
            pause = min(pause * 1.5, 0.1)

    def _write(self, fn: Callable[[psycopg.Connection], Any], *, bump: bool = True) -> Any:
        """``fn(conn)`` inside the writer section: one transaction holding the bank's advisory lock, version bumped
        (if ``bump``, unless ``fn`` raises or returns :data:`_NO_CHANGE`); committed on success, rolled back on any
        exception."""
        psycopg = _require()
        with self.lock:
            conn = self._alive()
            try:
                conn.execute("BEGIN")
            except psycopg.OperationalError:
                if not _lost(conn):
                    raise
                conn = self._alive()  # the connection died while idle (a restart): nothing was sent yet
                conn.execute("BEGIN")
            committing = False
            try:
                self._take_writer_lock(conn)
                # a row lock held by a writer that bypassed the advisory lock is waited for as long, no longer
                wait_ms = max(int(self.lock_timeout * 1000), 1)
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{wait_ms}ms",))
                out = fn(conn)
                if out is _NO_CHANGE:
                    conn.execute("ROLLBACK")
                    return out
                if bump:
                    self._bump(conn)
                committing = True
                conn.execute("COMMIT")
                return out
            except psycopg.errors.UniqueViolation as e:
                self._rollback(conn)
                if e.diag.constraint_name != "adapters_pkey":
                    raise self._write_failed(e) from None
                raise ConflictError(f"Another writer registered the same adapter id in {self.location} at the same "
                                    f"time ({_msg(e)}); nothing was changed by this write. Pass replace=True "
                                    f"(--replace) to replace it.") from None
            except psycopg.OperationalError as e:
                self._rollback(conn)
                if _lost(conn):
                    what = ("the connection was lost while committing; the transaction either committed whole or "
                            "not at all (PostgreSQL commits atomically): check with `adapterbank list` before "
                            "running again" if committing else
                            "the server rolled the transaction back, nothing was changed; run again when the "
                            "server is back")
                    raise BankError(f"The write to the catalog {self.location} was interrupted "
                                    f"({_msg(e)}): {what}.") from None
                raise self._write_failed(e) from None
            except psycopg.Error as e:
                self._rollback(conn)
                raise self._write_failed(e) from None
            except BaseException:
                self._rollback(conn)
                raise

    def _write_failed(self, e: Exception) -> BankError:
        return BankError(f"Cannot write the catalog {self.location}: {_msg(e)}; nothing was changed. Check "
                         f"the server (disk space, permissions) and run again.")

    @staticmethod
    def _rollback(conn: psycopg.Connection) -> None:
        if not _lost(conn):
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")

    @staticmethod
    def _bump(conn: psycopg.Connection) -> int:
        row = conn.execute("UPDATE meta SET value = (value::bigint + 1)::text WHERE key = %s RETURNING value",
                           ("version",)).fetchone()
        return int(row[0])

    def _log_changes(self, conn: psycopg.Connection, pairs: Sequence[tuple[str, str]]) -> None:
        """Record (space_key, id) pairs under the version this write will commit as (current + 1)."""
        if not pairs:
            return
        v = int(conn.execute("SELECT value FROM meta WHERE key = %s", ("version",)).fetchone()[0]) + 1
        conn.cursor().executemany("INSERT INTO changes(version, space_key, adapter_id) VALUES (%s, %s, %s)",
                                  [(v, s, i) for s, i in sorted(set(pairs))])
        if v - self._changes_floor(conn) > 2 * self.change_log_versions:
            floor = max(v - self.change_log_versions, 0)
            conn.execute("DELETE FROM changes WHERE version <= %s", (floor,))
            conn.execute("UPDATE meta SET value = %s WHERE key = %s", (str(floor), "changes_floor"))

    @staticmethod
    def _changes_floor(conn: psycopg.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = %s", ("changes_floor",)).fetchone()
        return int(row[0]) if row else 0

    # -- small reads ------------------------------------------------------------------------------
    def version(self) -> int:
        """The catalog version: increases with every committed write, by any process or machine."""
        return self._read(lambda c: int(c.execute("SELECT value FROM meta WHERE key = %s",
                                                  ("version",)).fetchone()[0]))

    def format_version(self) -> int:
        return self._read(lambda c: int(c.execute("SELECT value FROM meta WHERE key = %s",
                                                  ("format_version",)).fetchone()[0]))

    def count(self) -> int:
        return self._read(lambda c: int(c.execute("SELECT count(*) FROM adapters").fetchone()[0]))

    def has(self, id: str) -> bool:
        return self._read(lambda c: c.execute("SELECT 1 FROM adapters WHERE id = %s", (id,)).fetchone() is not None)

    def some_ids(self, limit: int) -> list[str]:
        """The first ``limit`` ids in id order."""
        return self._read(lambda c: [r[0] for r in c.execute("SELECT id FROM adapters ORDER BY id LIMIT %s",
                                                             (int(limit),))])

    # -- cards ------------------------------------------------------------------------------------
    def card(self, id: str) -> CardRow | None:
        """One card, or ``None``."""
        cards = self.cards(ids=[id])
        return cards[0] if cards else None

    def cards(self, *, base_model: str | None = None, space_key: str | None = None,
              ids: Sequence[str] | None = None) -> list[CardRow]:
        """Cards sorted by id, optionally only of ``base_model``, with a prototype in ``space_key``, or in ``ids``."""
        where, params = [], []
        if base_model is not None:
            where.append("a.base_model = %s")
            params.append(base_model)
        if space_key is not None:
            where.append("a.id IN (SELECT adapter_id FROM prototypes WHERE space_key = %s)")
            params.append(space_key)
        if ids is not None:
            where.append("a.id = ANY(%s)")
            params.append([str(i) for i in ids])
        sql = f"SELECT {', '.join('a.' + k for k in CARD_COLUMNS)} FROM adapters a"
        if where:
            sql += " WHERE " + " AND ".join(where)

        def run(c: psycopg.Connection) -> list[CardRow]:
            rows = c.execute(sql + " ORDER BY a.id", params).fetchall()
            if not rows:
                return []
            got = [r[0] for r in rows]
            files: dict[str, dict[str, str]] = {}
            for aid, name, sha in c.execute("SELECT adapter_id, name, sha256 FROM files WHERE adapter_id = ANY(%s) "
                                            "ORDER BY adapter_id, name", (got,)):
                files.setdefault(aid, {})[name] = sha
            spaces: dict[str, list[str]] = {}
            for aid, key in c.execute("SELECT adapter_id, space_key FROM prototypes WHERE adapter_id = ANY(%s) "
                                      "ORDER BY adapter_id, space_key", (got,)):
                spaces.setdefault(aid, []).append(key)
            return [CardRow(dict(zip(CARD_COLUMNS, r, strict=True)), files.get(r[0], {}), tuple(spaces.get(r[0], [])))
                    for r in rows]

        return self._read(run, snapshot=True)

    # -- writes -----------------------------------------------------------------------------------
    @staticmethod
    def _proto_params(id: str, p: Prototype) -> tuple[Any, ...]:
        vec = np.ascontiguousarray(p.vector, dtype=np.float32)
        if vec.ndim != 1 or vec.shape[0] != p.space.dim:
            raise ShapeMismatchError(f"The prototype of {id!r} has shape {vec.shape} but its space "
                                     f"{p.space.key!r} says dim {p.space.dim}.")
        if not np.isfinite(vec).all():
            raise NonFiniteError(f"The prototype of {id!r} contains NaN or Inf.")
        return (id, p.space.key, json.dumps(p.space.to_dict(), sort_keys=True), p.dim, vec, int(p.n_samples),
                p.source, _extra_json(p.extra))

    _PROTO_UPSERT = (
        "INSERT INTO prototypes(adapter_id, space_key, space, dim, embedding, n_samples, source, extra) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (adapter_id, space_key) DO UPDATE SET "
        "space = excluded.space, dim = excluded.dim, embedding = excluded.embedding, n_samples = excluded.n_samples, "
        "source = excluded.source, extra = excluded.extra"
    )

    def commit(self, entries: Sequence[Entry], *, replace: bool = False,
               under_lock: Callable[[], None] | None = None) -> list[bool]:
        """Insert ``entries`` in one transaction (all or none); :class:`ConflictError` for an id already present
        unless ``replace``. ``under_lock()`` runs inside the writer section first. Returns, per entry, whether it
        replaced an existing card."""
        ids = [e.id for e in entries]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ConflictError(f"The ids {dup} appear more than once in one commit to {self.location}.")
        protos = [self._proto_params(e.id, p) for e in entries for p in e.prototypes]  # validated before the lock
        for e in entries:
            missing = [k for k in CARD_COLUMNS if k not in e.row]
            if missing:
                raise ParameterError(f"The card row of {e.id!r} lacks the columns {missing}.")

        def run(c: psycopg.Connection) -> list[bool]:
            present = {r[0] for r in c.execute("SELECT id FROM adapters WHERE id = ANY(%s)", (ids,))}
            if present and not replace:
                raise ConflictError(f"The bank {self.location} already has adapter(s) with id(s) {sorted(present)} "
                                    f"(added concurrently?); pass replace=True (--replace on the command line) to "
                                    f"replace them.")
            if under_lock is not None:
                under_lock()
            changed = [(s, i) for i, s in c.execute(
                "SELECT adapter_id, space_key FROM prototypes WHERE adapter_id = ANY(%s)", (sorted(present),))]
            if present:
                c.execute("DELETE FROM adapters WHERE id = ANY(%s)", (sorted(present),))
            cur = c.cursor()
            cur.executemany(f"INSERT INTO adapters({', '.join(CARD_COLUMNS)}) "
                            f"VALUES ({', '.join(['%s'] * len(CARD_COLUMNS))})",
                            [[e.row[k] for k in CARD_COLUMNS] for e in entries])
            files = [(e.id, name, sha, int(size)) for e in entries for name, sha, size in e.files]
            if files:
                cur.executemany("INSERT INTO files(adapter_id, name, sha256, size) VALUES (%s, %s, %s, %s)", files)
            if protos:
                cur.executemany(self._PROTO_UPSERT, protos)
            self._log_changes(c, changed + [(p[1], p[0]) for p in protos])
            return [i in present for i in ids]

        out = self._write(run)
        self._grow_indexes({p[1] for p in protos})
        return out

    def remove(self, id: str) -> bool:
        """Delete a card with its files and prototypes; ``False`` if there was none."""

        def run(c: psycopg.Connection) -> Any:
            spaces = [r[0] for r in c.execute("SELECT space_key FROM prototypes WHERE adapter_id = %s", (id,))]
            if c.execute("DELETE FROM adapters WHERE id = %s", (id,)).rowcount == 0:
                return _NO_CHANGE
            self._log_changes(c, [(s, id) for s in spaces])
            return True

        return self._write(run) is True

    def set_prototype(self, id: str, prototype: Prototype) -> bool:
        """Attach (or replace, same space) a prototype; ``False`` if there is no card ``id``."""
        params = self._proto_params(id, prototype)

        def run(c: psycopg.Connection) -> Any:
            if c.execute("SELECT 1 FROM adapters WHERE id = %s", (id,)).fetchone() is None:
                return _NO_CHANGE
            c.execute(self._PROTO_UPSERT, params)
            self._log_changes(c, [(prototype.space.key, id)])
            return True

        done = self._write(run) is True
        if done:
            self._grow_indexes({prototype.space.key})
        return done

    def set_setting(self, key: str, value: str | None) -> None:
        """Store the JSON text ``value`` under ``key`` (``None`` deletes it); bumps the version."""

        def run(c: psycopg.Connection) -> None:
            if value is None:
                c.execute("DELETE FROM settings WHERE key = %s", (key,))
            else:
                c.execute("INSERT INTO settings(key, value, updated) VALUES (%s, %s, %s) ON CONFLICT (key) DO UPDATE "
                          "SET value = excluded.value, updated = excluded.updated", (key, value, _now()))

        self._write(run)

    def settings(self, prefix: str) -> dict[str, str]:
        """Every setting whose key starts with ``prefix``: key -> JSON text, sorted by key."""
        rows = self._read(lambda c: c.execute("SELECT key, value FROM settings WHERE left(key, %s) = %s ORDER BY key",
                                              (len(prefix), prefix)).fetchall())
        return {str(k): str(v) for k, v in rows}

    def get_setting(self, key: str) -> str | None:
        row = self._read(lambda c: c.execute("SELECT value FROM settings WHERE key = %s", (key,)).fetchone())
        return None if row is None else str(row[0])

    def collect_garbage(self, delete_unused: Callable[[set[str]], int]) -> int:
        """Call ``delete_unused(used_sha256s)`` inside the writer section; return what it returns. No catalog row
        changes, so the version is not bumped (as in the embedded catalog)."""

        def run(c: psycopg.Connection) -> int:
            used = {r[0] for r in c.execute("SELECT DISTINCT sha256 FROM files")}
            return int(delete_unused(used))

        return self._write(run, bump=False)

    # -- prototypes -------------------------------------------------------------------------------
    @staticmethod
    def _proto_of(row: Sequence[Any]) -> Prototype:
        _, sp, vec, n, src, extra = row
        return Prototype(np.asarray(vec, dtype=np.float32), PrototypeSpace.from_dict(json.loads(sp)), int(n),
                         src or "", json.loads(extra))

    def prototypes(self, id: str) -> list[Prototype]:
        """The prototypes of ``id`` sorted by space key (empty if none or no such card)."""
        rows = self._read(lambda c: c.execute(
            "SELECT space_key, space, embedding, n_samples, source, extra FROM prototypes WHERE adapter_id = %s "
            "ORDER BY space_key", (id,), binary=True).fetchall())
        return [self._proto_of(r) for r in rows]

    def spaces(self) -> dict[str, PrototypeSpace]:
        """space key -> space of every space with at least one prototype, sorted by key (cached per version)."""

        def run(c: psycopg.Connection) -> tuple[int, dict[str, PrototypeSpace]]:
            version = int(c.execute("SELECT value FROM meta WHERE key = %s", ("version",)).fetchone()[0])
            cached = self._spaces_cache
            if cached is not None and cached[0] == version:
                return cached
            # a loose index scan: one probe of prototypes_space per distinct key, not a pass over the table
            keys = [r[0] for r in c.execute(
                "WITH RECURSIVE k AS (SELECT min(space_key) AS key FROM prototypes UNION ALL "
                "SELECT (SELECT min(space_key) FROM prototypes WHERE space_key > k.key) FROM k "
                "WHERE k.key IS NOT NULL) SELECT key FROM k WHERE key IS NOT NULL")]
            out = {}
            for key in keys:
                sp = c.execute("SELECT space FROM prototypes WHERE space_key = %s LIMIT 1", (key,)).fetchone()[0]
                out[key] = PrototypeSpace.from_dict(json.loads(sp))
            return version, out

        self._spaces_cache = self._read(run, snapshot=True)
        return dict(self._spaces_cache[1])

    def _matrix(self, c: psycopg.Connection, space_key: str, ids: Sequence[str] | None) -> SpaceMatrix:
        version = int(c.execute("SELECT value FROM meta WHERE key = %s", ("version",)).fetchone()[0])
        sql = ("SELECT p.adapter_id, p.embedding, p.dim, a.base_model, a.tags FROM prototypes p "
               "JOIN adapters a ON a.id = p.adapter_id WHERE p.space_key = %s")
        params: list[Any] = [space_key]
        if ids is not None:
            sql += " AND p.adapter_id = ANY(%s)"
            params.append([str(i) for i in ids])
        rows = c.execute(sql + " ORDER BY p.adapter_id", params, binary=True).fetchall()
        dims = {r[2] for r in rows}
        if len(dims) > 1:
            raise BankError(f"Prototypes in space {space_key!r} have different dims {sorted(dims)}: the catalog "
                            f"{self.location} is damaged.")
        d = dims.pop() if dims else 0
        X = np.stack([r[1] for r in rows]) if rows else np.zeros((0, d), np.float32)
        return SpaceMatrix(version, [r[0] for r in rows], X,
                           [{"base_model": r[3], "tags": json.loads(r[4])} for r in rows])

    def space_matrix(self, space_key: str) -> SpaceMatrix:
        """Every prototype of a space in one consistent snapshot (for building an index)."""
        return self._read(lambda c: self._matrix(c, space_key, None), snapshot=True)

    def vectors(self, space_key: str, ids: Sequence[str]) -> SpaceMatrix:
        """The current prototypes of ``ids`` in a space (ids without one are left out)."""
        return self._read(lambda c: self._matrix(c, space_key, ids), snapshot=True)

    def changes_since(self, space_key: str, version: int) -> list[str] | None:
        """Ids whose prototype in ``space_key`` changed after catalog ``version``; ``None`` when the log does not
        reach back that far (or ``version`` is from the future: another bank's index)."""

        def run(c: psycopg.Connection) -> list[str] | None:
            now = int(c.execute("SELECT value FROM meta WHERE key = %s", ("version",)).fetchone()[0])
            if version < self._changes_floor(c) or version > now:
                return None
            return [r[0] for r in c.execute("SELECT DISTINCT adapter_id FROM changes WHERE space_key = %s AND "
                                            "version > %s ORDER BY adapter_id", (space_key, int(version)))]

        return self._read(run, snapshot=True)

    # -- integrity --------------------------------------------------------------------------------
    def file_rows(self) -> list[tuple[str, str, str, int]]:
        """Every file row ``(adapter_id, name, sha256, size)`` sorted by adapter id and name."""
        return self._read(lambda c: [(a, n, s, int(z)) for a, n, s, z in c.execute(
            "SELECT adapter_id, name, sha256, size FROM files ORDER BY adapter_id, name")])

    def integrity_problems(self) -> list[str]:
        """Cards without files, prototypes whose vector length differs from their dim, invalid HNSW indexes."""

        def run(c: psycopg.Connection) -> list[str]:
            out = [f"adapter {r[0]!r} has no files" for r in c.execute(
                "SELECT id FROM adapters a WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.adapter_id = a.id) "
                "ORDER BY id")]
            out += [f"prototype of {a!r} in {s!r}: {n} values for dim {d}" for a, s, d, n in c.execute(
                "SELECT adapter_id, space_key, dim, vector_dims(embedding) FROM prototypes "
                "WHERE vector_dims(embedding) != dim ORDER BY adapter_id, space_key")]
            out += [f"catalog {self.location}: index {r[0]} is invalid (an interrupted build); it is rebuilt on the "
                    f"next add" for r in c.execute(
                        "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
                        "WHERE x.indrelid = to_regclass('prototypes') AND NOT x.indisvalid ORDER BY 1")]
            return out

        return self._read(run, snapshot=True)

    # -- HNSW indexes -----------------------------------------------------------------------------
    def _hnsw_spaces(self) -> set[str]:
        """Names of the valid HNSW indexes on ``prototypes`` (cached per catalog version)."""

        def run(c: psycopg.Connection) -> tuple[int, set[str]]:
            version = int(c.execute("SELECT value FROM meta WHERE key = %s", ("version",)).fetchone()[0])
            cached = self._index_cache
            if cached is not None and cached[0] == version:
                return cached
            names = {r[0] for r in c.execute(
                "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
                "WHERE x.indrelid = to_regclass('prototypes') AND x.indisvalid AND i.relname LIKE %s",
                ("prototypes_hnsw_%",))}
            return version, names

        self._index_cache = self._read(run)
        return self._index_cache[1]

    def search_mode(self, space_key: str) -> str:
        """``"hnsw"`` when the space has its (valid) HNSW index, else ``"exact"``."""
        return "hnsw" if _space_index_name(space_key) in self._hnsw_spaces() else "exact"

    def _grow_indexes(self, space_keys: set[str]) -> None:
        """Build the HNSW index of every space in ``space_keys`` that reached ``hnsw_threshold`` and has none."""
        if self.hnsw_threshold is None or not space_keys:
            return
        try:
            self._grow(space_keys)
        except BankError as e:  # the write itself is committed; the next write or build_index tries again
            log.warning("could not check or build the HNSW indexes of %s: %s", self.location, e)

    def _grow(self, space_keys: set[str]) -> None:
        assert self.hnsw_threshold is not None
        have = self._hnsw_spaces()
        for key in sorted(space_keys):
            if _space_index_name(key) in have:
                continue
            n, d = self._read(lambda c, key=key: c.execute(
                "SELECT count(*), max(dim) FROM prototypes WHERE space_key = %s", (key,)).fetchone())
            if n >= self.hnsw_threshold and d is not None and d <= HNSW_MAX_DIM:
                self.build_index(key)

    def build_index(self, space_key: str, *, m: int = 16, ef_construction: int = 64) -> None:
        """Build (``CREATE INDEX CONCURRENTLY``: writers are not blocked) the HNSW index of one space.

        Runs on its own connection; an invalid leftover of an interrupted build is dropped first. Searches of the
        space use the index (approximate, re-ranked exactly) once it is valid.
        """
        psycopg = _require()
        from psycopg import sql

        spaces = self.spaces()
        if space_key not in spaces:
            raise BankError(f"No prototypes in space {space_key!r} in {self.location}; nothing to index.")
        dim = int(spaces[space_key].dim)
        if dim > HNSW_MAX_DIM:
            raise ParameterError(f"Space {space_key!r} has dim {dim}; pgvector's HNSW index takes at most "
                                 f"{HNSW_MAX_DIM} dimensions (search stays exact).")
        name = _space_index_name(space_key)
        conn = self._connect(self.url, vector=False)
        t0 = time.monotonic()
        try:
            valid = conn.execute("SELECT x.indisvalid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
                                 "WHERE i.relname = %s AND x.indrelid = to_regclass('prototypes')", (name,)).fetchone()
            if valid is not None and valid[0]:
                return
            if valid is not None:
                conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (self.hnsw_build_memory,))
            conn.execute(sql.SQL(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON prototypes USING hnsw "
                "((embedding::vector({dim})) vector_l2_ops) WITH (m = {m}, ef_construction = {ef}) "
                "WHERE space_key = {key}").format(name=sql.Identifier(name), dim=sql.Literal(dim),
                                                   m=sql.Literal(int(m)), ef=sql.Literal(int(ef_construction)),
                                                   key=sql.Literal(space_key)))
            conn.execute("ANALYZE prototypes, adapters")  # fresh statistics, so the planner picks the new index
        except psycopg.Error as e:
            log.warning("could not build the HNSW index of space %s in %s (%s); its searches stay exact",
                        space_key, self.location, _msg(e))
            return
        finally:
            conn.close()
        self._index_cache = None
        log.info("built the HNSW index of space %s in %s in %.1f s", space_key, self.location, time.monotonic() - t0)

    #: ``maintenance_work_mem`` of an index build (the HNSW graph builds fastest when it fits).
    hnsw_build_memory = "256MB"

    # -- search -----------------------------------------------------------------------------------
    def search(self, space_key: str, query: np.ndarray, k: int, where: Mapping[str, Any] | None) -> list[Hit] | None:
        """The ``k`` prototypes of ``space_key`` nearest to ``query`` (squared L2, float64 exact re-rank, ties by
        id), searched by PostgreSQL: exact below ``hnsw_threshold``, HNSW above (see the module docstring)."""
        k = check_k(k, "search")
        bm, tags = _check_where(where)
        spaces = self.spaces()
        if space_key not in spaces:
            return []
        dim = int(spaces[space_key].dim)
        q = _check_query(query, dim)
        filters, params = ["p.space_key = %s"], [space_key]
        if bm is not None:
            filters.append("a.base_model = %s")
            params.append(bm)
        if tags:
            filters.append("a.tag_set @> %s::jsonb")
            params.append(json.dumps(list(tags)))
        # the adapters table is joined only when a filter needs it
        src = "prototypes p" + (" JOIN adapters a ON a.id = p.adapter_id" if len(filters) > 1 else "")
        cond = " AND ".join(filters)
        if self.search_mode(space_key) == "hnsw":
            hits = self._search_hnsw(q, k, dim, src, cond, params)
            if hits is not None:
                return hits
        return self._search_exact(q, k, dim, src, cond, params)

    def _rerank(self, q: np.ndarray, rows: Sequence[Sequence[Any]], k: int) -> tuple[list[Hit], float]:
        """Exact float64 distances of the fetched rows (id, vector, ...); the k best and the k-th distance."""
        q64 = q.astype(np.float64)
        diff = np.stack([r[1] for r in rows]).astype(np.float64)  # (m, d)
        diff -= q64
        dist = np.einsum("ij,ij->i", diff, diff)  # (m,) float64
        order = sorted(zip(dist.tolist(), (r[0] for r in rows), strict=True))[:k]
        return [Hit(i, dd) for dd, i in order], (order[-1][0] if order else math.inf)

    def _search_exact(self, q: np.ndarray, k: int, dim: int, src: str, cond: str, params: list[Any]) -> list[Hit]:
        m = k + _SLACK
        sql = (f"SELECT p.adapter_id, p.embedding, p.embedding <-> %s AS dist FROM {src} "
               f"WHERE {cond} ORDER BY dist, p.adapter_id LIMIT %s")
        while True:
            rows = self._read(lambda c, m=m: c.execute(sql, [q, *params, m], binary=True).fetchall())
            if not rows:
                return []
            hits, kth = self._rerank(q, rows, k)
            if len(rows) < m or (len(hits) == k and _certified(float(rows[-1][2]) ** 2, kth, dim)):
                return hits
            m *= 4

    def _search_hnsw(self, q: np.ndarray, k: int, dim: int, src: str, cond: str,
                     params: list[Any]) -> list[Hit] | None:
        m = max(4 * k, k + 64)
        ef = min(max(200, 2 * m), 1000)
        sql = (f"SELECT p.adapter_id, p.embedding FROM {src} "
               f"WHERE {cond} ORDER BY (p.embedding::vector({int(dim)})) <-> %s::vector({int(dim)}) LIMIT %s")

        def run(c: psycopg.Connection) -> list[Any]:
            c.execute("SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', %s, true)",
                      (str(ef), "relaxed_order"))
            return c.execute(sql, [*params, q, m], binary=True).fetchall()

        rows = self._read(run, snapshot=True)
        if len(rows) < k:
            return None  # a very selective filter exhausted the scan: answer exactly instead
        return self._rerank(q, rows, k)[0]

    def explain_search(self, space_key: str, k: int = 10) -> str:
        """The query plan PostgreSQL chooses for a search of ``space_key`` in its current mode (for diagnostics)."""
        spaces = self.spaces()
        if space_key not in spaces:
            raise BankError(f"No prototypes in space {space_key!r} in {self.location}.")
        dim = int(spaces[space_key].dim)
        q = np.zeros(dim, np.float32)
        if self.search_mode(space_key) == "hnsw":
            sql = (f"EXPLAIN SELECT p.adapter_id FROM prototypes p "
                   f"WHERE p.space_key = %s ORDER BY (p.embedding::vector({dim})) <-> %s::vector({dim}) LIMIT %s")
        else:
            sql = ("EXPLAIN SELECT p.adapter_id FROM prototypes p "
                   "WHERE p.space_key = %s ORDER BY p.embedding <-> %s LIMIT %s")
        return "\n".join(r[0] for r in self._read(lambda c: c.execute(sql, (space_key, q, k)).fetchall()))


class _NoChange:
    """A write that found nothing to do: rolled back, version not bumped."""


_NO_CHANGE = _NoChange()

