"""FsspecBlobStore on a real S3-compatible server (moto's standalone server, a subprocess) through s3fs: hash
checks on the way in and out, the verified read cache, AWS environment settings, and an endpoint that fails or
dies in the middle of an upload (a clear error naming the URL, nothing under the final name)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import adapterbank_test_servers as servers  # registered by tests/bank/conftest.py
import pytest

pytest.importorskip("s3fs", reason="the server extra is not installed: pip install 'adapterbank[server]'")
pytest.importorskip("moto", reason="the server extra is not installed: pip install 'adapterbank[server]'")

import s3fs

from adapterbank.bank.remote_blobs import FsspecBlobStore
from adapterbank.errors import BankError, IntegrityError

MB = 1 << 20


def _store(url: str, tmp: Path, opts: dict[str, Any] | None, **kw: Any) -> FsspecBlobStore:
    return FsspecBlobStore(url, storage_options=opts, cache_dir=tmp / "cache", staging_dir=tmp / "staging", **kw)


def _stage(store: FsspecBlobStore, tmp: Path, data: bytes, name: str = "w.safetensors") -> Any:
    src = tmp / f"src-{name}"
    src.write_bytes(data)
    st = store.staging()
    staged, sha, size = st.stage_file(src, name)
    return st, staged, sha, size


def test_put_read_through_a_verified_cache(s3_server: Any, s3_url: str, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    store = _store(s3_url, tmp_path, s3_server.storage_options())
    data = os.urandom(3 * MB + 17)
    st, staged, sha, size = _stage(store, tmp_path, data)
    with st:
        store.put(staged, sha, size, st.token)
    raw = s3fs.S3FileSystem(**s3_server.storage_options())
    assert raw.cat_file(store.remote_path(sha)) == data  # the object itself, complete, under its sha
    assert store.exists(sha, size) and not store.exists(sha, size + 1) and store.size(sha) == size
    assert list(store.iter_blobs()) == [sha] and store.check(sha) is None

    cached = tmp_path / "cache" / sha[:2] / sha
    assert cached.read_bytes() == data  # the adding machine keeps a copy
    cached.chmod(0o644)
    cached.write_bytes(b"bit rot" + data[7:])  # a damaged cache entry is noticed, dropped and fetched again
    with caplog.at_level(logging.WARNING, logger="adapterbank.bank.remote_blobs"):
        assert store.copy_verified(sha, tmp_path / "out1", what="adapter 'a'") == size
    assert (tmp_path / "out1").read_bytes() == data and cached.read_bytes() == data
    assert "is damaged" in caplog.text

    cached.unlink()  # no cache entry: fetched from the store, hashed while streaming, cached
    assert store.copy_verified(sha, tmp_path / "out2", what="adapter 'a'") == size
    assert (tmp_path / "out2").read_bytes() == data and cached.read_bytes() == data

    raw.pipe_file(store.remote_path(sha), b"tampered")  # damage in the store itself
    cached.chmod(0o644)
    cached.unlink()
    with pytest.raises(IntegrityError, match=f"Blob {store.blob_url(sha)} of adapter 'a' is corrupt"):
        store.copy_verified(sha, tmp_path / "out3", what="adapter 'a'")
    assert not (tmp_path / "out3").exists() and not cached.exists()  # the bad bytes went nowhere
    assert "is corrupt: sha256 is" in store.check(sha)
    assert store.delete(sha) and not store.delete(sha) and not store.exists(sha)
    with pytest.raises(IntegrityError, match="is missing from the bank"):
        store.copy_verified(sha, tmp_path / "out4", what="adapter 'a'")
    assert "is missing" in store.check(sha) and store.size(sha) is None and list(store.iter_blobs()) == []


def test_put_refuses_a_staged_file_that_changed(s3_server: Any, s3_url: str, tmp_path: Path) -> None:
    store = _store(s3_url, tmp_path, s3_server.storage_options())
    st, staged, sha, size = _stage(store, tmp_path, b"original bytes")
    with st:
        staged.write_bytes(b"original bytez")
        with pytest.raises(IntegrityError, match="changed after it was hashed; nothing was stored"):
            store.put(staged, sha, size, st.token)
    assert not store.exists(sha) and list(store.iter_blobs()) == []


def test_aws_environment_variables_configure_s3(s3_server: Any, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.new_bucket()
    for k, v in {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    store = _store(f"s3://{bucket}/env-bank", tmp_path, {"skip_instance_cache": True})
    st, staged, sha, size = _stage(store, tmp_path, b"configured from the environment")
    with st:
        store.put(staged, sha, size, st.token)
    assert list(store.iter_blobs()) == [sha] and store.check(sha) is None


def test_connection_cut_mid_upload_leaves_nothing(s3_server: Any, s3_url: str, tmp_path: Path) -> None:
    """The network drops every connection after 512 KiB of a 4 MiB upload while the server stays up."""
    proxy = servers.CuttingProxy(s3_server.port)
    try:
        proxy.cut_after = MB // 2
        store = _store(s3_url, tmp_path, s3_server.storage_options(endpoint=proxy.endpoint))
        store.fs.retries = 2  # s3fs's own retry loop (default 5, with backoff): the test needs only the outcome
        direct = _store(s3_url, tmp_path / "direct", s3_server.storage_options())
        st, staged, sha, size = _stage(store, tmp_path, os.urandom(4 * MB))
        with st:
            t0 = time.monotonic()
            with pytest.raises(BankError, match=f"Cannot upload blob {store.blob_url(sha)}.*Nothing was stored"):
                store.put(staged, sha, size, st.token)
            assert time.monotonic() - t0 < 30 and proxy.cuts >= 1
            assert not direct.exists(sha) and list(direct.iter_blobs()) == []  # no partial object, no name
            proxy.cut_after = None  # the network is back: the same staged file goes up whole
            store.put(staged, sha, size, st.token)
        assert direct.exists(sha, size) and direct.check(sha) is None
    finally:
        proxy.close()


def test_s3_server_killed_mid_upload(tmp_path: Path) -> None:
    """A dedicated moto server is SIGKILLed after 512 KiB of a 4 MiB upload has reached it."""
    servers.need_server_extra()
    srv = servers.S3Server(tmp_path)
    proxy = servers.CuttingProxy(srv.port)
    try:
        bucket = srv.new_bucket()
        url = f"s3://{bucket}/bank"
        store = _store(url, tmp_path, srv.storage_options(endpoint=proxy.endpoint))
        store.fs.retries = 2  # s3fs's own retry loop (default 5, with backoff): the test needs only the outcome
        proxy.cut_after, proxy.on_cut = MB // 2, srv.kill
        st, staged, sha, size = _stage(store, tmp_path, os.urandom(4 * MB))
        with st:
            with pytest.raises(BankError, match=f"Cannot upload blob s3://{bucket}/bank/{sha[:2]}/{sha}") as e:
                store.put(staged, sha, size, st.token)
            assert "testing" not in str(e.value)  # no credentials in the message
            assert srv.proc.poll() is not None  # it really died mid-upload
            proxy.cut_after = None
            with pytest.raises(BankError, match="Cannot look up blob|Cannot list"):
                store.exists(sha)  # the endpoint is gone: a clear error, not a False
            srv.start()  # back (moto keeps no data: the bucket is new and the blob absent)
            s3fs.S3FileSystem(**srv.storage_options()).mkdir(bucket)
            assert not store.exists(sha)
            store.put(staged, sha, size, st.token)
        assert store.check(sha) is None
    finally:
        proxy.close()
        srv.stop()


def test_leftovers_of_crashed_writers(s3_server: Any, s3_url: str, tmp_path: Path) -> None:
    store = _store(s3_url, tmp_path, s3_server.storage_options())
    live = store.staging()
    dead = store.staging()
    dead._lock_fh.close()  # the process died: the kernel dropped its flock, the folder stayed
    dead._lock_fh = None
    dl = tmp_path / "cache" / "ab" / f".{'ab' * 32}.{'0' * 32}.999999999.dl"  # a download of a dead pid
    dl.parent.mkdir(parents=True)
    dl.write_bytes(b"half")
    stale = store.stale_files()
    assert str(dead.dir) in stale and str(dl) in stale and str(live.dir) not in stale
    for name in stale:
        store.remove_stale(name)
    assert store.stale_files() == [] and not dead.dir.exists() and not dl.exists() and live.dir.exists()
    with pytest.raises(BankError, match="is not a leftover"):
        store.remove_stale(str(live.dir))
    live.close()


def test_local_filesystem_url_places_atomically(tmp_path: Path) -> None:
    """file:// uses the embedded placing (temp name, fsync, rename); a crashed writer's temp file is a leftover."""
    root = tmp_path / "remote"
    store = _store(f"file://{root}", tmp_path, None)
    st, staged, sha, size = _stage(store, tmp_path, b"local weights")
    with st:
        store.put(staged, sha, size, st.token)
    assert (root / sha[:2] / sha).read_bytes() == b"local weights"
    assert list(store.iter_blobs()) == [sha] and store.check(sha) is None
    ghost = root / sha[:2] / f".{sha}.{'f' * 32}.tmp"  # the temp name of a writer whose staging is gone
    ghost.write_bytes(b"loc")
    assert store.stale_files() == [str(ghost)]
    store.remove_stale(str(ghost))
    assert not ghost.exists() and list(store.iter_blobs()) == [sha]
