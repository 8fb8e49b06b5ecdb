"""Content-addressed blob store: ``<bank>/blobs/<sha256[:2]>/<sha256>``, written crash-safely.

A file enters the store in two steps (docs/design.md §5.1):

1. *staging*: it is copied into ``<bank>/tmp/<token>/`` while its sha256 is computed, then fsynced — or,
   in a bulk ingest (``staging(bulk=True)``), made durable for the whole batch at once by :meth:`Staging.sync`
   (one ``syncfs`` of the bank's file system instead of one ``fsync`` per file) before any of it is placed.
   The staging folder belongs to a live writer as long as that writer holds an ``flock`` on
   ``<bank>/tmp/<token>.lock``; the kernel drops the lock when the process dies (even by ``kill -9``),
   which is how :meth:`BlobStore.clean_stale` tells crashed leftovers from work in progress.
2. *placing*: the staged file is hard-linked (or, where links are not possible, copied to a temp name,
   fsynced and renamed) to its final name, and the directory is fsynced. A final name therefore only
   ever holds complete content.

Reading re-hashes the bytes (:meth:`BlobStore.copy_verified`). Blobs are made read-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from adapterbank._io import fsync_dir, fsync_file
from adapterbank.errors import IntegrityError

try:  # POSIX advisory locks; elsewhere stale staging folders are recognised by age
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = ["BlobStore", "Staging", "sha256_file", "CHUNK"]

CHUNK = 1 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_STALE_AGE_S = 24 * 3600.0  # only without flock: staging older than this is considered abandoned


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in 1 MiB chunks.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"
    >>> _ = p.write_bytes(b"abc")
    >>> sha256_file(p)[0][:16], sha256_file(p)[1]
    ('ba7816bf8f01cfea', 3)
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _syncfs(path: Path) -> bool:
    """``syncfs(2)`` on the file system holding ``path``: True if done, False where unavailable (not Linux)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            import ctypes.util

            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            _LIBC = lib if hasattr(lib, "syncfs") else False
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC is False:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _LIBC.syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)
    return True


_LIBC: Any = None


def _copy_hashing(src: IO[bytes], dst: IO[bytes], *, fsync: bool = True) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` in chunks; (sha256 hex digest, size) of what was copied. ``fsync``: flush to disk."""
    h = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    if fsync:
        dst.flush()
        os.fsync(dst.fileno())
    return h.hexdigest(), size


class Staging:
    """A private folder under ``<bank>/tmp`` owned by this process while the ``flock`` is held.

    ``sync``: how staged files become durable — ``"fsync"`` (each file as it is staged), ``"batch"`` (none as
    they are staged; :meth:`sync` makes them all durable, and must be called before they are placed) or
    ``"none"`` (a staging whose files are verified again on their way out, e.g. before an upload).
    """

    SYNC_MODES = ("fsync", "batch", "none")

    def __init__(self, tmp_root: Path, *, sync: str = "fsync") -> None:
        if sync not in self.SYNC_MODES:
            raise ValueError(f"sync must be one of {self.SYNC_MODES}. Got {sync!r} instead.")
        tmp_root.mkdir(parents=True, exist_ok=True)
        self.sync_mode = sync
        self._unsynced: list[Path] = []
        self.token = uuid.uuid4().hex
        self.dir = tmp_root / self.token
        self._lock_path = tmp_root / f"{self.token}.lock"
        self._lock_fh: Any = None
        # Lock a temp name first, then rename it into place: gc never sees an unlocked live lock file.
        pre = tmp_root / f".{self.token}.lock.new"
        fh = open(pre, "wb")  # noqa: SIM115 - held until close()
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(pre, self._lock_path)
        self._lock_fh = fh
        self.dir.mkdir()

    def stage_file(self, src: Path, rel: str) -> tuple[Path, str, int]:
        """Copy ``src`` to ``<staging>/<rel>`` (fsynced unless the mode says otherwise); return (path, sha256, size)."""
        dst = self.dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fi, open(dst, "xb") as fo:
            sha, size = _copy_hashing(fi, fo, fsync=self.sync_mode == "fsync")
        if self.sync_mode == "batch":
            self._unsynced.append(dst)
        return dst, sha, size

    def sync(self, dirs: Iterable[Path] = ()) -> None:
        """Make every file staged so far, and the entries of ``dirs`` (folders renamed or linked into), durable:
        one ``syncfs`` of the staging's file system where the OS has it (Linux), else an ``fsync`` per file and
        folder. A no-op when nothing is pending."""
        pending, self._unsynced = self._unsynced, []
        dirs = sorted(set(dirs))
        if not pending and not dirs:
            return
        if not _syncfs(self.dir):
            for f in pending:
                fsync_file(f)
            for d in dirs:
                fsync_dir(d)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self._lock_path.unlink()
        if self._lock_fh is not None:
            self._lock_fh.close()  # releases the flock
            self._lock_fh = None

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobStore:
    """Blobs under ``root`` named by their sha256; staging under ``tmp``.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> store = BlobStore(d / "blobs", d / "tmp")
    >>> src = d / "w.bin"; _ = src.write_bytes(b"weights")
    >>> with store.staging() as st:
    ...     staged, sha, size = st.stage_file(src, "w.bin")
    ...     _ = store.place(staged, sha, st.token)
    >>> store.path(sha).read_bytes(), list(store.iter_blobs()) == [sha]
    (b'weights', True)
    """

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = Path(root)
        self.tmp = Path(tmp)

    @property
    def location(self) -> str:
        return str(self.root)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def name(self, sha: str) -> str:
        """Where blob ``sha`` lives, for messages."""
        return str(self.path(sha))

    def size(self, sha: str) -> int | None:
        """The size of blob ``sha`` in bytes, or ``None`` if it is absent."""
        try:
            return self.path(sha).stat().st_size
        except FileNotFoundError:
            return None

    def put(self, staged: Path, sha: str, size: int, token: str) -> None:
        """:meth:`place` (the :class:`~adapterbank.bank.backend.BlobBackend` name; ``size`` is known from staging)."""
        self.place(staged, sha, token)

    def staging(self, *, bulk: bool = False) -> Staging:
        """A staging folder; ``bulk``: its files are made durable together by :meth:`Staging.sync`."""
        return Staging(self.tmp, sync="batch" if bulk else "fsync")

    def exists(self, sha: str, size: int | None = None) -> bool:
        try:
            st = self.path(sha).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def missing(self, blobs: Mapping[str, int]) -> set[str]:
        """The shas of ``blobs`` (sha -> size) that are absent or of another size."""
        return {sha for sha, size in blobs.items() if not self.exists(sha, size)}

    def place(self, staged: Path, sha: str, token: str, *, durable: bool = True) -> Path:
        """Give the fully written, fsynced ``staged`` file its final name; returns the blob's folder.

        An existing blob of that name is replaced too (atomically, by identical content), which repairs a
        blob damaged on disk when the same content is added again. ``durable=False``: the folder is not
        fsynced (the caller makes it durable, e.g. with :meth:`Staging.sync`, before anything refers to it).
        """
        final = self.path(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged, 0o444)
        tmp = final.parent / f".{sha}.{token}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            try:
                os.link(staged, tmp)
            except OSError:  # no hard links here (other FS, permissions): copy, fsync
                with open(staged, "rb") as fi, open(tmp, "xb") as fo:
                    _copy_hashing(fi, fo)
                os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            # rename() of one link onto another link of the same inode does nothing: the temp name stays
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        except BaseException:  # disk full, permission denied, ...: leave no temp file behind
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if durable:
            fsync_dir(final.parent)
        return final.parent

    def copy_verified(self, sha: str, dst: Path, *, what: str) -> int:
        """Copy blob ``sha`` to ``dst`` while re-hashing it; :class:`IntegrityError` on mismatch or absence."""
        src = self.path(sha)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            fi = open(src, "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise IntegrityError(f"Blob {sha} ({src}) of {what} is missing from the bank.") from None
        with fi, open(dst, "wb") as fo:
            found, size = _copy_hashing(fi, fo, fsync=False)
        if found != sha:
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
            raise IntegrityError(
                f"Blob {src} of {what} is corrupt: expected sha256 {sha}, found {found} ({size} bytes)."
            )
        return size

    def check(self, sha: str) -> str | None:
        """None if blob ``sha`` is present and intact, else a description of the damage."""
        p = self.path(sha)
        try:
            actual, size = sha256_file(p)
        except FileNotFoundError:
            return f"blob {sha} is missing ({p})"
        if actual != sha:
            return f"blob {p} is corrupt: sha256 is {actual} ({size} bytes)"
        return None

    def iter_blobs(self) -> Iterator[str]:
        """sha256 of every blob on disk (final names only)."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for f in sorted(sub.iterdir()):
                if _SHA_RE.match(f.name) and f.name[:2] == sub.name:
                    yield f.name

    def delete(self, sha: str) -> bool:
        p = self.path(sha)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        return True

    # -- crashed writers' leftovers -----------------------------------------------------------------
    def _token_alive(self, token: str) -> bool:
        lock = self.tmp / f"{token}.lock"
        if fcntl is None:
            try:
                return time.time() - lock.stat().st_mtime < _STALE_AGE_S
            except FileNotFoundError:
                return False
        try:
            fh = open(lock, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return False
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return False

    def stale_files(self) -> list[Path]:
        """Leftovers of crashed writers: unlocked staging folders/locks and blob temp files."""
        out: list[Path] = []
        if self.tmp.is_dir():
            for p in sorted(self.tmp.iterdir()):
                name = p.name
                if name.endswith(".lock.new"):
                    tok = name[1:-len(".lock.new")]
                    if not (self.tmp / tok).exists() and time.time() - _mtime(p) > 60:
                        out.append(p)
                    continue
                tok = name[: -len(".lock")] if name.endswith(".lock") else name
                if not self._token_alive(tok):
                    out.append(p)
        if self.root.is_dir():
            for sub in sorted(self.root.iterdir()):
                if sub.is_dir():
                    for f in sorted(sub.iterdir()):
                        if f.name.startswith(".") and f.name.endswith(".tmp"):
                            parts = f.name.split(".")
                            if len(parts) < 4 or not self._token_alive(parts[2]):
                                out.append(f)
        return out

    def remove_stale(self, p: Path | str) -> None:
        """Delete one of :meth:`stale_files`."""
        self.remove_path(Path(p))

    def remove_path(self, p: Path) -> None:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return time.time()
