"""Content-addressed blobs in any fsspec filesystem (``s3://bucket/prefix``, ``gs://``, ``file://``, ``memory://``).

The server backend's blob store (docs/design.md §5; contract in :mod:`.backend`). Layout as in the embedded
store: ``<url>/<sha256[:2]>/<sha256>``, the original adapter files bit for bit.

* **staging**: files are staged and hashed in a local :class:`~adapterbank.bank.blobs.Staging` folder
  (``staging_dir``, default ``~/.cache/adapterbank/staging``).
* **put**: the staged file is re-hashed (it must still be ``sha``), then stored with **one** ``put_file``. An object
  store shows an object only once it is complete (a single PUT; with s3fs above ~100 MB a multipart upload, which
  becomes an object only when completed and is aborted on failure), so the final name ``sha256`` never holds a
  partial object; the stored size is checked after. On a local filesystem (``file://``) the embedded placing is
  used (temp name, fsync, rename).
* **read**: :meth:`FsspecBlobStore.copy_verified` goes through a local read cache (``cache_dir``, default
  ``~/.cache/adapterbank/blobs``): a cache entry is re-hashed on every read and a damaged one is deleted and fetched
  again; a fetched object is hashed while it streams and enters the cache only when its hash matches.
* **check**: :meth:`FsspecBlobStore.check` re-hashes the stored object itself (not the cache).

Credentials and endpoints come from ``storage_options`` or, for S3, from the usual AWS settings
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, profiles).
Errors of the store (unreachable endpoint, denied access, timeouts) become :class:`~adapterbank.errors.BankError`
naming the URL (never the credentials); damaged or missing content is :class:`~adapterbank.errors.IntegrityError`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from adapterbank.bank.blobs import CHUNK, BlobStore, Staging, _copy_hashing, sha256_file
from adapterbank.errors import AdapterbankError, BankError, IntegrityError, ParameterError

log = logging.getLogger(__name__)

__all__ = ["FsspecBlobStore", "default_cache_root", "redact_blob_url"]

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_LOCAL = {"file", "local"}
_DOWNLOAD_STALE_S = 24 * 3600.0  # a cache download temp file this old, of a dead process, is a leftover


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/adapterbank`` or ``~/.cache/adapterbank``: where the read cache and staging live.

    >>> default_cache_root().name
    'adapterbank'
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adapterbank"


def redact_blob_url(url: str) -> str:
    """``url`` without user info (``s3://key:secret@bucket/p`` -> ``s3://bucket/p``), for messages.

    >>> redact_blob_url("s3://AKIA:topsecret@bucket/bank"), redact_blob_url("memory://bank")
    ('s3://bucket/bank', 'memory://bank')
    """
    p = urllib.parse.urlsplit(url)
    if "@" not in p.netloc:
        return url
    return urllib.parse.urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path, p.query, ""))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FsspecBlobStore:
    """Blobs named by their sha256 under an fsspec URL, read through a local verified cache.

    ``storage_options`` go to the filesystem (``s3fs``: ``key``, ``secret``, ``client_kwargs={"endpoint_url":
    ...}``, ...). ``cache_dir``: the read cache (``None``: ``~/.cache/adapterbank/blobs``; ``False``: no cache).
    ``staging_dir``: where added files are staged (``None``: ``~/.cache/adapterbank/staging``).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> store = FsspecBlobStore("memory://doctest-bank", cache_dir=d / "cache", staging_dir=d / "staging")
    >>> src = d / "w.bin"; _ = src.write_bytes(b"weights")
    >>> with store.staging() as st:
    ...     staged, sha, size = st.stage_file(src, "w.bin")
    ...     store.put(staged, sha, size, st.token)
    >>> store.exists(sha, 7), store.copy_verified(sha, d / "out.bin", what="w.bin"), (d / "out.bin").read_bytes()
    (True, 7, b'weights')
    >>> list(store.iter_blobs()) == [sha], store.delete(sha), store.exists(sha)
    (True, True, False)
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None,
                 cache_dir: str | os.PathLike[str] | bool | None = None,
                 staging_dir: str | os.PathLike[str] | None = None) -> None:
        import fsspec

        if not isinstance(url, str) or not url:
            raise ParameterError(f"The 'url' parameter of FsspecBlobStore must be a non-empty fsspec URL (e.g. "
                                 f"s3://bucket/prefix). Got {url!r} instead.")
        self.url = url.rstrip("/")
        self.location = redact_blob_url(self.url)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise BankError(f"Cannot use the blob store {self.location}: {e} (an s3:// URL needs s3fs: pip install "
                            f"'adapterbank[server]').") from None
        self.root = str(root).rstrip("/")
        protocol = self.fs.protocol
        self.protocol = protocol if isinstance(protocol, str) else protocol[0]
        cache_root = default_cache_root()
        if cache_dir is False:
            self.cache_dir: Path | None = None
        else:
            chosen = cache_root / "blobs" if cache_dir in (None, True) else cache_dir
            self.cache_dir = Path(chosen)  # type: ignore[arg-type]
        self.staging_dir = Path(staging_dir) if staging_dir is not None else cache_root / "staging"
        # On a local filesystem the embedded placing (temp name, fsync, rename) is the atomic write.
        self._local = BlobStore(Path(self.root), self.staging_dir) if self.protocol in _LOCAL else None

    def __repr__(self) -> str:
        return f"FsspecBlobStore({self.location!r})"

    # -- names ------------------------------------------------------------------------------------
    def remote_path(self, sha: str) -> str:
        """The filesystem path of blob ``sha`` (``bucket/prefix/ab/ab12...`` for S3)."""
        return f"{self.root}/{sha[:2]}/{sha}"

    def blob_url(self, sha: str) -> str:
        """The URL of blob ``sha``, for messages."""
        return f"{self.location}/{sha[:2]}/{sha}"

    def name(self, sha: str) -> str:
        """Where blob ``sha`` lives (its URL without credentials), for messages."""
        return self.blob_url(sha)

    def _cache_path(self, sha: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / sha[:2] / sha

    def _failed(self, what: str, e: BaseException, nothing: str = "") -> BankError:
        msg = str(e).strip() or type(e).__name__
        return BankError(f"{what}: {type(e).__name__}: {msg}.{' ' + nothing if nothing else ''} Check that "
                         f"{self.location} is reachable and that the credentials allow it, then run again.")

    # -- the BlobBackend protocol -----------------------------------------------------------------
    def staging(self, *, bulk: bool = False) -> Staging:
        """A local staging folder (a context manager) for files on their way in. Its files are not fsynced: the
        staging is a local cache, and :meth:`put` re-hashes each file before its upload. ``bulk``: accepted for
        the :class:`~adapterbank.bank.backend.BlobBackend` interface (nothing to batch here)."""
        return Staging(self.staging_dir, sync="none")

    def put(self, staged: Path, sha: str, size: int, token: str) -> None:
        """Store the staged file under its final name ``sha``, complete or not at all.

        The file is re-hashed first (:class:`IntegrityError` if it is no longer ``sha``/``size``); after the
        upload the stored size is checked. A failed upload raises :class:`BankError` naming the URL.
        """
        found, n = sha256_file(staged)
        if found != sha or n != size:
            raise IntegrityError(f"The staged file {staged} has sha256 {found} ({n} bytes), not {sha} ({size} bytes): "
                                 f"it changed after it was hashed; nothing was stored in {self.location}.")
        url = self.blob_url(sha)
        if self._local is not None:
            try:
                final = self._local.path(sha)
                if final.exists() and os.path.samefile(staged, final):
                    return  # already placed from this very staged file (a hard link of it)
                self._local.place(staged, sha, token)
            except OSError as e:
                raise self._failed(f"Cannot store blob {url}", e, "Nothing was stored under its name.") from None
        else:
            try:
                self.fs.put_file(str(staged), self.remote_path(sha))
            except AdapterbankError:
                raise
            except Exception as e:  # noqa: BLE001 - every backend has its own errors (botocore, aiohttp, OSError)
                raise self._failed(f"Cannot upload blob {url}", e, "Nothing was stored under its name (an object "
                                   "store shows an object only once it is complete).") from None
        stored = self.size(sha)
        if stored != size:
            raise IntegrityError(f"Blob {url} was uploaded but the store reports {stored} bytes instead of {size}.")
        self._cache_staged(staged, sha)

    def _cache_staged(self, staged: Path, sha: str) -> None:
        """Put the just-stored file into the read cache too (a hard link where possible); failures are ignored."""
        cached = self._cache_path(sha)
        if cached is None or cached.exists():
            return
        tmp = cached.parent / f".{sha}.{uuid.uuid4().hex}.{os.getpid()}.dl"
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(staged, tmp)
            except OSError:
                shutil.copyfile(staged, tmp)
            os.replace(tmp, cached)
        except OSError as e:
            log.debug("could not cache blob %s locally: %s", sha, e)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _info(self, sha: str) -> dict[str, Any] | None:
        path = self.remote_path(sha)
        try:
            self.fs.invalidate_cache(path)
            return dict(self.fs.info(path))
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise self._failed(f"Cannot look up blob {self.blob_url(sha)}", e) from None

    def exists(self, sha: str, size: int | None = None) -> bool:
        info = self._info(sha)
        if info is None or info.get("type", "file") != "file":
            return False
        return size is None or int(info.get("size", -1)) == size

    def missing(self, blobs: Mapping[str, int]) -> set[str]:
        """The shas of ``blobs`` (sha -> size) that are absent or of another size: the lookups run concurrently
        (one HEAD request each; a batch of 256 would otherwise wait for 256 round trips in a row)."""
        items = list(blobs.items())
        if len(items) <= 1:
            return {sha for sha, size in items if not self.exists(sha, size)}
        with cf.ThreadPoolExecutor(max_workers=min(16, len(items)), thread_name_prefix="adapterbank-head") as ex:
            present = list(ex.map(lambda kv: self.exists(*kv), items))
        return {sha for (sha, _), ok in zip(items, present, strict=True) if not ok}

    def size(self, sha: str) -> int | None:
        info = self._info(sha)
        return None if info is None or info.get("type", "file") != "file" else int(info["size"])

    def copy_verified(self, sha: str, dst: Path, *, what: str) -> int:
        """Copy blob ``sha`` to ``dst`` re-hashing it: from the local cache when it holds an intact copy, else from
        the store (and into the cache). :class:`IntegrityError` when the stored blob is missing or damaged."""
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        cached = self._cache_path(sha)
        if cached is not None:
            try:
                fi = open(cached, "rb")  # noqa: SIM115
            except FileNotFoundError:
                fi = None
            if fi is not None:
                with fi, open(dst, "wb") as fo:
                    found, size = _copy_hashing(fi, fo, fsync=False)
                if found == sha:
                    return size
                log.warning("the cached copy %s of blob %s is damaged (sha256 %s); fetching it again from %s",
                            cached, sha, found, self.location)
                with contextlib.suppress(OSError):
                    cached.unlink()
        return self._fetch(sha, dst, what=what)

    def _fetch(self, sha: str, dst: Path, *, what: str) -> int:
        url = self.blob_url(sha)
        cached = self._cache_path(sha)
        tmp = None
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.parent / f".{sha}.{uuid.uuid4().hex}.{os.getpid()}.dl"
            except OSError as e:
                log.debug("no read cache for blob %s: %s", sha, e)
        h = hashlib.sha256()
        size = 0
        try:
            with self.fs.open(self.remote_path(sha), "rb") as fi, open(dst, "wb") as fo, \
                    (open(tmp, "xb") if tmp is not None else contextlib.nullcontext()) as fc:
                while chunk := fi.read(CHUNK):
                    h.update(chunk)
                    fo.write(chunk)
                    if fc is not None:
                        fc.write(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            self._discard(dst, tmp)
            raise IntegrityError(f"Blob {sha} ({url}) of {what} is missing from the bank.") from None
        except AdapterbankError:
            self._discard(dst, tmp)
            raise
        except Exception as e:  # noqa: BLE001
            self._discard(dst, tmp)
            raise self._failed(f"Cannot read blob {url} of {what}", e) from None
        found = h.hexdigest()
        if found != sha:
            self._discard(dst, tmp)
            raise IntegrityError(f"Blob {url} of {what} is corrupt: expected sha256 {sha}, found {found} "
                                 f"({size} bytes).")
        if tmp is not None and cached is not None:
            try:
                os.chmod(tmp, 0o444)
                os.replace(tmp, cached)
            except OSError as e:
                log.debug("could not cache blob %s locally: %s", sha, e)
                self._discard(None, tmp)
        return size

    @staticmethod
    def _discard(*paths: Path | None) -> None:
        for p in paths:
            if p is not None:
                with contextlib.suppress(OSError):
                    p.unlink()

    def check(self, sha: str) -> str | None:
        """``None`` if the stored blob (not the cache) is present and hashes to ``sha``, else the damage."""
        url = self.blob_url(sha)
        h = hashlib.sha256()
        size = 0
        try:
            with self.fs.open(self.remote_path(sha), "rb") as fi:
                while chunk := fi.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            return f"blob {sha} is missing ({url})"
        except Exception as e:  # noqa: BLE001
            raise self._failed(f"Cannot read blob {url} to check it", e) from None
        if h.hexdigest() != sha:
            return f"blob {url} is corrupt: sha256 is {h.hexdigest()} ({size} bytes)"
        return None

    def iter_blobs(self) -> Iterator[str]:
        """sha256 of every blob in the store (final names only), sorted."""
        root = self.root.strip("/")
        try:
            if not self.fs.exists(self.root):
                return
            paths = self.fs.find(self.root)
        except Exception as e:  # noqa: BLE001
            raise self._failed(f"Cannot list the blob store {self.location}", e) from None
        finally:
            with contextlib.suppress(Exception):
                self.fs.invalidate_cache()
        found = []
        for p in paths:
            parts = str(p).strip("/").split("/")
            if len(parts) >= 2 and _SHA_RE.match(parts[-1]) and parts[-2] == parts[-1][:2] \
                    and "/".join(parts[:-2]) == root:
                found.append(parts[-1])
        yield from sorted(found)

    def delete(self, sha: str) -> bool:
        """Delete blob ``sha`` (and its cached copy); ``False`` if it was not there."""
        cached = self._cache_path(sha)
        if cached is not None:
            self._discard(cached)
        if self._info(sha) is None:
            return False
        try:
            self.fs.rm_file(self.remote_path(sha))
        except FileNotFoundError:
            return False
        except Exception as e:  # noqa: BLE001
            raise self._failed(f"Cannot delete blob {self.blob_url(sha)}", e) from None
        return True

    # -- leftovers --------------------------------------------------------------------------------
    def stale_files(self) -> list[str]:
        """Leftovers of crashed writers, as printable names: unlocked local staging folders, interrupted cache
        downloads and, on a local filesystem, blob temp files. An object store keeps no temp objects (an upload
        is one PUT; an interrupted multipart upload is not an object and is expired by the bucket's lifecycle)."""
        if self._local is not None:
            out = [str(p) for p in self._local.stale_files()]
        else:
            out = [str(p) for p in BlobStore(self.staging_dir / ".no-blobs-here", self.staging_dir).stale_files()]
        if self.cache_dir is not None and self.cache_dir.is_dir():
            for sub in sorted(self.cache_dir.iterdir()):
                if not sub.is_dir():
                    continue
                for f in sorted(sub.iterdir()):
                    parts = f.name.split(".")
                    if f.name.startswith(".") and f.name.endswith(".dl") and len(parts) == 5:
                        pid = int(parts[3]) if parts[3].isdigit() else -1
                        try:
                            age = time.time() - f.stat().st_mtime
                        except FileNotFoundError:
                            continue
                        if not _pid_alive(pid) or age > _DOWNLOAD_STALE_S:
                            out.append(str(f))
        return out

    def remove_stale(self, name: str) -> None:
        """Delete one leftover that :meth:`stale_files` listed (anything else is refused)."""
        if name not in self.stale_files():
            raise BankError(f"{name} is not a leftover of the blob store {self.location} (see stale_files()); "
                            f"nothing was deleted.")
        p = Path(name)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
