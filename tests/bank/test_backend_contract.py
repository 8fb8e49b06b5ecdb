"""The storage contract of adapterbank.bank.backend, checked on every implementation: the embedded SQLite Catalog
and BlobStore, and the server's PgCatalog (real PostgreSQL + pgvector) and FsspecBlobStore (real moto S3 server
through s3fs, plus memory:// and file://). Server cases skip only when the server extra is not installed."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import adapterbank_test_servers as servers  # registered by tests/bank/conftest.py
import numpy as np
import pytest

from adapterbank.bank.backend import BlobBackend, CatalogBackend
from adapterbank.bank.blobs import BlobStore, Staging
from adapterbank.bank.catalog import Catalog
from adapterbank.bank.index import NumpyIndex
from adapterbank.errors import BankError, ConflictError, IntegrityError
from adapterbank.prototypes.space import Prototype, PrototypeSpace

make_entry = servers.make_entry

SPACE = PrototypeSpace("enc", "r1", "mean", True, 6)
OTHER = PrototypeSpace("img", None, "cls", False, 3)


class Catalogs:
    """Creates the catalog under test and opens second handles on the same storage (another process/machine)."""

    def __init__(self, create: Callable[[], Any], reopen: Callable[[float], Any]) -> None:
        self.create, self.reopen = create, reopen


@pytest.fixture(params=["embedded", "server"])
def catalogs(request: pytest.FixtureRequest, tmp_path: Path) -> Catalogs:
    if request.param == "embedded":
        path = tmp_path / "catalog.sqlite"
        return Catalogs(lambda: Catalog.create(path), lambda t: Catalog.open(path, lock_timeout=t))
    servers.need_server_extra()
    from adapterbank.bank.pg import PgCatalog

    url = request.getfixturevalue("pg_url")
    return Catalogs(lambda: PgCatalog.create(url), lambda t: PgCatalog.open(url, lock_timeout=t))


@pytest.fixture
def cat(catalogs: Catalogs) -> Any:
    c = catalogs.create()
    yield c
    c.close()


@pytest.fixture(params=["embedded", "s3", "memory", "file"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "embedded":
        return BlobStore(tmp_path / "blobs", tmp_path / "tmp")
    servers.need_server_extra()
    from adapterbank.bank.remote_blobs import FsspecBlobStore

    kw: dict[str, Any] = {"cache_dir": tmp_path / "cache", "staging_dir": tmp_path / "staging"}
    if request.param == "s3":
        return FsspecBlobStore(request.getfixturevalue("s3_url"),
                               storage_options=request.getfixturevalue("s3_server").storage_options(), **kw)
    if request.param == "memory":
        return FsspecBlobStore(f"memory://bank-{uuid.uuid4().hex}", **kw)
    return FsspecBlobStore(f"file://{tmp_path / 'remote'}", **kw)


def _vec(seed: int, space: PrototypeSpace = SPACE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(space.dim).astype(np.float32)


# -- catalogs ----------------------------------------------------------------------------------------------
def test_catalog_conforms(cat: Any) -> None:
    assert isinstance(cat, CatalogBackend) and isinstance(cat.location, str) and cat.location
    assert (cat.version(), cat.count(), cat.some_ids(5), cat.spaces(), cat.file_rows()) == (0, 0, [], {}, [])
    assert cat.integrity_problems() == [] and cat.card("a") is None and not cat.has("a")


def test_commit_and_read_cards(cat: Any) -> None:
    entries = [make_entry("b", _vec(1), space=SPACE, base_model="m1", tags=("x", "y")),
               make_entry("a", _vec(2), space=SPACE, base_model="m2", tags=("x",)),
               make_entry("c", _vec(3, OTHER), space=OTHER, base_model=None,
                          files=(("one.safetensors", "1" * 64, 10), ("cfg.json", "2" * 64, 2)))]
    assert cat.commit(entries) == [False, False, False]
    assert (cat.version(), cat.count(), cat.some_ids(2)) == (1, 3, ["a", "b"])
    card = cat.card("c")
    assert dict(card.row) == dict(entries[2].row)
    assert card.files == {"cfg.json": "2" * 64, "one.safetensors": "1" * 64} and list(card.spaces) == [OTHER.key]
    assert [c.row["id"] for c in cat.cards()] == ["a", "b", "c"]
    assert [c.row["id"] for c in cat.cards(base_model="m1")] == ["b"]
    assert [c.row["id"] for c in cat.cards(space_key=SPACE.key)] == ["a", "b"]
    assert [c.row["id"] for c in cat.cards(ids=["c", "a", "zz"])] == ["a", "c"]
    assert [c.row["id"] for c in cat.cards(base_model="m2", space_key=OTHER.key)] == []
    assert json.loads(cat.card("b").row["tags"]) == ["x", "y"]
    assert cat.file_rows() == [("a", "adapter_model.safetensors", entries[1].files[0][1], entries[1].files[0][2]),
                               ("b", "adapter_model.safetensors", entries[0].files[0][1], entries[0].files[0][2]),
                               ("c", "cfg.json", "2" * 64, 2), ("c", "one.safetensors", "1" * 64, 10)]
    assert list(cat.spaces()) == sorted([SPACE.key, OTHER.key]) and cat.spaces()[OTHER.key] == OTHER
    assert cat.integrity_problems() == []


def test_conflicts_replace_and_all_or_none(cat: Any) -> None:
    cat.commit([make_entry("a", _vec(1), space=SPACE), make_entry("b")])
    v = cat.version()
    with pytest.raises(ConflictError):
        cat.commit([make_entry("new"), make_entry("a")])
    with pytest.raises(ConflictError):
        cat.commit([make_entry("x"), make_entry("x")])

    def fail() -> None:
        raise OSError("a blob vanished")

    with pytest.raises(OSError, match="vanished"):
        cat.commit([make_entry("new")], under_lock=fail)
    assert cat.version() == v and cat.some_ids(10) == ["a", "b"]
    replaced = make_entry("a", _vec(5, OTHER), space=OTHER, files=(("new.bin", "9" * 64, 9),))
    assert cat.commit([replaced, make_entry("c")], replace=True) == [True, False]
    assert cat.version() == v + 1
    assert cat.card("a").files == {"new.bin": "9" * 64} and list(cat.card("a").spaces) == [OTHER.key]
    assert [p.space for p in cat.prototypes("a")] == [OTHER]
    assert cat.changes_since(SPACE.key, v) == ["a"] and cat.changes_since(OTHER.key, v) == ["a"]


def test_prototypes_round_trip_bit_exact(cat: Any) -> None:
    tricky = np.array([1e-45, -3.4028235e38, 0.1, -0.0, 1.0000001, 7e-39], dtype=np.float32)  # subnormals, extremes
    p = Prototype(tricky, SPACE, n_samples=17, source="data.jsonl", extra={"k": [1, 2]})
    cat.commit([make_entry("a"), make_entry("b", _vec(2), space=SPACE), make_entry("c", _vec(3), space=SPACE)])
    assert cat.prototypes("a") == []
    assert cat.set_prototype("a", p) is True
    assert cat.set_prototype("a", Prototype(_vec(9, OTHER), OTHER)) is True
    got = cat.prototypes("a")
    assert [g.space for g in got] == sorted([SPACE, OTHER], key=lambda s: s.key)
    back = next(g for g in got if g.space == SPACE)
    assert back.vector.dtype == np.float32 and back.vector.tobytes() == tricky.tobytes()
    assert (back.n_samples, back.source, back.extra) == (17, "data.jsonl", {"k": [1, 2]})
    m = cat.space_matrix(SPACE.key)
    assert m.ids == ["a", "b", "c"] and m.vectors.dtype == np.float32 and m.version == cat.version()
    assert m.vectors[0].tobytes() == tricky.tobytes() and m.vectors[1].tobytes() == _vec(2).tobytes()
    assert m.attrs[1] == {"base_model": "base-a", "tags": []}
    sub = cat.vectors(SPACE.key, ["c", "nope", "a"])
    assert sub.ids == ["a", "c"] and sub.vectors[1].tobytes() == _vec(3).tobytes()
    empty = cat.space_matrix("no-space")
    assert empty.ids == [] and empty.vectors.shape[0] == 0


def test_set_prototype_remove_settings_and_versions(cat: Any) -> None:
    cat.commit([make_entry("a", _vec(1), space=SPACE)])
    v = cat.version()
    assert cat.set_prototype("ghost", Prototype(_vec(1), SPACE)) is False and cat.version() == v
    assert cat.remove("ghost") is False and cat.version() == v
    assert cat.get_setting("compose.auto") is None and cat.settings("enc") == {}
    cat.set_setting("encoder.b", json.dumps("two"))
    cat.set_setting("encoder.a", json.dumps("one"))
    cat.set_setting("compose.auto", json.dumps({"k": 3}))
    assert cat.version() == v + 3
    assert cat.settings("encoder.") == {"encoder.a": '"one"', "encoder.b": '"two"'}
    assert list(cat.settings("encoder.")) == ["encoder.a", "encoder.b"] and cat.settings("encoder_") == {}
    assert json.loads(cat.get_setting("compose.auto")) == {"k": 3}
    cat.set_setting("compose.auto", None)
    assert cat.get_setting("compose.auto") is None and cat.version() == v + 4
    assert cat.remove("a") is True and cat.version() == v + 5
    assert cat.count() == 0 and cat.prototypes("a") == [] and cat.file_rows() == [] and cat.spaces() == {}


def test_change_log(cat: Any) -> None:
    cat.commit([make_entry("a", _vec(1), space=SPACE), make_entry("b", _vec(2), space=SPACE)])
    v1 = cat.version()
    cat.set_setting("x", "1")
    assert cat.changes_since(SPACE.key, v1) == []
    cat.set_prototype("b", Prototype(_vec(3), SPACE))
    cat.commit([make_entry("c", _vec(4, OTHER), space=OTHER)])
    cat.remove("a")
    assert cat.changes_since(SPACE.key, v1) == ["a", "b"] and cat.changes_since(OTHER.key, v1) == ["c"]
    assert cat.changes_since(SPACE.key, cat.version()) == []
    assert cat.changes_since(SPACE.key, cat.version() + 5) is None


def test_writer_section_excludes_other_writers(catalogs: Catalogs, cat: Any) -> None:
    """``under_lock`` and ``collect_garbage``'s callback run while this handle holds the bank's writer lock."""
    other = catalogs.reopen(0.3)
    seen: dict[str, Any] = {}

    def try_write() -> None:
        with pytest.raises(BankError, match="locked"):
            other.set_setting("blocked", "1")
        seen["blocked"] = True

    cat.commit([make_entry("a", _vec(1), space=SPACE)], under_lock=try_write)
    assert seen.pop("blocked") and cat.has("a") and other.get_setting("blocked") is None

    def delete_unused(used: set[str]) -> int:
        try_write()
        seen["used"] = used
        return 7

    v = cat.version()
    assert cat.collect_garbage(delete_unused) == 7
    assert seen["blocked"] and seen["used"] == {make_entry("a").files[0][1]}
    assert cat.version() == v  # gc changes no row
    other.set_setting("free", "1")  # the lock is released after each write
    assert cat.get_setting("free") == "1" and cat.version() == v + 1
    other.close()


def test_search_is_none_or_equal_to_the_embedded_index(cat: Any) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, SPACE.dim)).astype(np.float32)
    cat.commit([make_entry(f"a{i:03d}", X[i], space=SPACE, base_model=("m1", "m2")[i % 2],
                           tags=("t",) if i % 3 == 0 else ()) for i in range(200)])
    m = cat.space_matrix(SPACE.key)
    idx = NumpyIndex()
    idx.build(m.ids, m.vectors, m.attrs)
    for q in rng.standard_normal((3, SPACE.dim)):
        for where in (None, {"base_model": "m2"}, {"tags": ["t"]}, {"tags": ["t"], "base_model": "m1"}):
            hits = cat.search(SPACE.key, q, 7, where)
            assert hits is None or hits == idx.search(q, 7, where=where)


# -- blob stores ---------------------------------------------------------------------------------------
def test_blob_store_round_trip(blobs: Any, tmp_path: Path) -> None:
    assert isinstance(blobs, BlobBackend) and blobs.location
    data = np.random.default_rng(0).bytes(300_000)
    src = tmp_path / "w.safetensors"
    src.write_bytes(data)
    with blobs.staging() as st:
        assert isinstance(st, Staging) and st.dir.is_dir()
        staged, sha, size = st.stage_file(src, "files/w.safetensors")
        assert not blobs.exists(sha) and blobs.size(sha) is None
        blobs.put(staged, sha, size, st.token)
    assert not st.dir.exists()
    assert blobs.exists(sha) and blobs.exists(sha, size) and not blobs.exists(sha, size - 1)
    assert blobs.size(sha) == size and sha in blobs.name(sha)
    absent = hashlib.sha256(b"never stored").hexdigest()
    assert blobs.missing({}) == set() and blobs.missing({sha: size}) == set()
    assert blobs.missing({sha: size, absent: 3}) == {absent} and blobs.missing({sha: size + 1, absent: 3}) == {sha, absent}
    assert list(blobs.iter_blobs()) == [sha] and blobs.check(sha) is None
    assert blobs.copy_verified(sha, tmp_path / "out" / "w", what="adapter 'a'") == size
    assert (tmp_path / "out" / "w").read_bytes() == data
    assert list(blobs.stale_files()) == []
    assert blobs.delete(sha) is True and blobs.delete(sha) is False
    assert not blobs.exists(sha) and list(blobs.iter_blobs()) == [] and "missing" in blobs.check(sha)
    with pytest.raises(IntegrityError, match="missing"):
        blobs.copy_verified(sha, tmp_path / "again", what="adapter 'a'")


def test_put_twice_leaves_one_blob_and_no_temp_file(blobs: Any, tmp_path: Path) -> None:
    """The Bank puts a blob again when its re-check under the writer lock finds it gone (or to repair it)."""
    src = tmp_path / "w.bin"
    src.write_bytes(b"same content twice")
    with blobs.staging() as st:
        staged, sha, size = st.stage_file(src, "w.bin")
        blobs.put(staged, sha, size, st.token)
        blobs.put(staged, sha, size, st.token)
    assert list(blobs.iter_blobs()) == [sha] and blobs.check(sha) is None
    assert list(blobs.stale_files()) == []
