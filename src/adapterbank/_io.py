"""Small shared file helpers: atomic files and folders, output checks, OS-error messages, name validation.

No adapterbank imports beyond errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from adapterbank.errors import AdapterbankError, InvalidNameError, OutputExistsError, OutputWriteError

try:  # POSIX advisory locks mark a temp folder as in use; elsewhere leftovers are only ignored
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MAX_NAME_LEN = 200
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@=-]*$")


def validate_file_name(name: object, what: str = "file name") -> str:
    """Return ``name`` if it is safe as one file-name component (looser than :func:`validate_name`).

    Spaces, brackets and non-ASCII letters are fine (``"Watercolor Style (v2).safetensors"``); refused are
    non-strings, empty, ``.``/``..``, NUL and other control characters, ``/`` or ``\\``, and names over 200
    characters.

    >>> validate_file_name("my style [v2].safetensors")
    'my style [v2].safetensors'
    >>> validate_file_name("../x.safetensors")
    Traceback (most recent call last):
    ...
    adapterbank.errors.InvalidNameError: The file name '../x.safetensors' is not allowed: it contains '..' or a path separator.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"The {what} must be a string. Got {type(name).__name__} instead.")
    if not name:
        raise InvalidNameError(f"The {what} must not be empty.")
    if name in (".", ".."):
        raise InvalidNameError(f"The {what} {name!r} is not a file name.")
    if len(name) > MAX_NAME_LEN:
        raise InvalidNameError(f"The {what} is {len(name)} characters long; the limit is {MAX_NAME_LEN}.")
    if "/" in name or "\\" in name or ".." in name:
        raise InvalidNameError(f"The {what} {name!r} is not allowed: it contains '..' or a path separator.")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidNameError(f"The {what} {name!r} contains a NUL byte or another control character.")
    return name


def validate_name(name: object, what: str = "id") -> str:
    """Return ``name`` if it is safe as a file-system component and an id; raise otherwise.

    Refused: non-strings, empty, longer than 200 characters, NUL, ``/`` or ``\\``, ``..``, a leading dot or
    dash, Windows device names, characters outside ``[A-Za-z0-9._+@=-]`` and names that change under
    NFKC normalisation (confusables).

    >>> validate_name("ct-head_v2")
    'ct-head_v2'
    >>> validate_name("../etc")
    Traceback (most recent call last):
    ...
    adapterbank.errors.InvalidNameError: The adapter id '../etc' is not allowed: it contains '..' or a path separator.
    """
    label = "adapter id" if what == "id" else what
    name = validate_file_name(name, label)  # type, empty, length, separators, '..', NUL and control characters
    if unicodedata.normalize("NFKC", name) != name:
        raise InvalidNameError(f"The {label} {name!r} changes under Unicode NFKC normalisation.")
    if not _NAME_OK.match(name):
        raise InvalidNameError(
            f"The {label} {name!r} must start with a letter or digit and use only letters, digits and . _ + @ = -."
        )
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise InvalidNameError(f"The {label} {name!r} is a reserved device name on Windows.")
    return name


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file already written and closed (errors propagate: its content may not be durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write a file atomically: ``write(fh)`` into a temp file beside it, fsync, rename, fsync the dir.

    A crash at any point leaves either the old file or the new one under ``path``, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual permissions
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """:func:`atomic_write` of a bytes object."""
    return atomic_write(path, lambda fh: fh.write(data))


# -- outputs: refuse to overwrite, write all-or-nothing, say clearly what the OS refused ------------------

OVERWRITE_HINT = "pass overwrite=True (--overwrite on the command line) to replace it"
_TMP_MARK = ".tmp-"  # ".OUT.tmp-XXXX": a folder being written (hidden, so it never looks like an output)
_NEW_MARK = ".new-"  # ".OUT.new-XXXX": the same for the microseconds before it is locked
_STALE_NEW_S = 60.0
_ADVICE = {
    errno.ENOSPC: "free some disk space and run again",
    errno.EDQUOT: "free some space in your disk quota and run again",
    errno.EFBIG: "a file-size limit was reached (ulimit -f, or the file system's maximum); raise it or write elsewhere",
    errno.EACCES: "choose a location you are allowed to write to",
    errno.EPERM: "choose a location you are allowed to write to",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "the path is a folder; give a file name",
    errno.ENAMETOOLONG: "choose a shorter path",
}
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def check_output(path: str | os.PathLike[str], *, overwrite: bool = False, kind: str = "folder") -> None:
    """Refuse an output ``path`` that would replace a user's files: :class:`OutputExistsError` unless allowed.

    ``kind="folder"``: a missing or empty folder is fine; a non-empty one only with ``overwrite``; a file or
    a symbolic link in its place never. ``kind="file"``: a missing path is fine; an existing file only with
    ``overwrite``; a folder never.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "x").write_text("mine")
    >>> check_output(d / "new"); check_output(d, overwrite=True)
    >>> check_output(d)
    Traceback (most recent call last):
    ...
    adapterbank.errors.OutputExistsError: The output folder ... already exists and is not empty; pass overwrite=True (--overwrite on the command line) to replace it, or choose another path.
    """
    p = Path(path)
    if kind == "file":
        if p.is_dir():
            raise OutputExistsError(f"The output file {p} is an existing folder; give a file name or another path.")
        if (p.exists() or p.is_symlink()) and not overwrite:
            raise OutputExistsError(f"The output file {p} already exists; {OVERWRITE_HINT}, or choose another path.")
        return
    if p.is_symlink():
        raise OutputExistsError(f"The output folder {p} is a symbolic link; give the real folder or another path.")
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"The output folder {p} is an existing file, not a folder; choose another path.")
    if not overwrite and p.is_dir():
        try:
            empty = next(os.scandir(p), None) is None
        except OSError as e:
            raise output_write_error(e, p) from e
        if not empty:
            raise OutputExistsError(
                f"The output folder {p} already exists and is not empty; {OVERWRITE_HINT}, or choose another path."
            )


def output_write_error(
    e: OSError, target: str | os.PathLike[str], *, what: str = "the output", nothing: str = "nothing was written",
    staging: str | os.PathLike[str] | None = None, hide: str | os.PathLike[str] | None = None, hint: str = "",
) -> OutputWriteError:
    """An :class:`OutputWriteError` for ``e``: which path, what the OS said, what to do.

    A file inside ``staging`` (a temp folder) is named by its place under ``target``; a file under ``hide``
    (internal, e.g. a bank's staging area) is not named at all.

    >>> import errno as E
    >>> str(output_write_error(OSError(E.ENOSPC, "No space left on device"), "out"))
    'Cannot write the output out: No space left on device; nothing was written. Free some disk space and run again.'
    """
    fn = os.fsdecode(e.filename) if e.filename is not None else None
    if fn is not None and staging is not None and _under(fn, staging):
        fn = str(Path(target) / os.path.relpath(os.path.abspath(fn), os.path.abspath(staging)))
    if fn is not None and hide is not None and _under(fn, hide):
        fn = None
    reason = e.strerror or str(e) or type(e).__name__
    detail = f" ({fn})" if fn and os.path.abspath(fn) != os.path.abspath(target) else ""
    advice = _ADVICE.get(e.errno or 0, "check the path and run again")
    err = OutputWriteError(f"Cannot write {what} {target}: {reason}{detail}; {nothing}. {advice[0].upper()}{advice[1:]}."
                           + (f" {hint}" if hint else ""))
    err.errno, err.strerror, err.filename = e.errno, e.strerror, fn or str(target)
    return err


def renamed_paths(e: AdapterbankError, paths: Mapping[Path, Path]) -> AdapterbankError:
    """``e`` with every internal path in its message (a staging copy, a temp folder) replaced by the user's
    path it stands for; ``e`` itself when its message names none of them.

    >>> from adapterbank.errors import FormatError
    >>> str(renamed_paths(FormatError("/bank/tmp/x/files/a.json: bad"), {Path("/bank/tmp/x/files"): Path("ad")}))
    'ad/a.json: bad'
    """
    msg = str(e)
    for internal, user in sorted(paths.items(), key=lambda kv: -len(str(kv[0]))):
        msg = msg.replace(str(internal), str(user))
    if msg == str(e):
        return e
    new = type(e)(msg)
    if isinstance(e, OSError) and isinstance(new, OSError):
        fn = os.fsdecode(e.filename) if e.filename is not None else None
        for internal, user in paths.items():
            if fn is not None and _under(fn, internal):
                fn = str(Path(user) / os.path.relpath(os.path.abspath(fn), os.path.abspath(internal)))
        new.errno, new.strerror, new.filename = e.errno, e.strerror, fn
    return new


def _under(fn: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    a, r = os.path.abspath(fn), os.path.abspath(root)
    return a == r or a.startswith(r.rstrip(os.sep) + os.sep)


def is_write_error(e: OSError, *roots: str | os.PathLike[str]) -> bool:
    """Whether ``e`` came from writing under one of ``roots`` (or from a write with no file name: disk full)."""
    if isinstance(e, AdapterbankError):
        return False
    if e.errno in _WRITE_ERRNOS or e.filename is None:
        return True
    return any(_under(os.fsdecode(e.filename), r) for r in roots)


@contextlib.contextmanager
def writing(target: str | os.PathLike[str], *roots: str | os.PathLike[str], what: str = "the output",
            nothing: str = "nothing was written", hide: str | os.PathLike[str] | None = None, hint: str = "",
            ) -> Iterator[None]:
    """Turn an :class:`OSError` from writing ``target`` (a file, its :func:`atomic_write` temp file beside it,
    or anything under ``roots``) into an :class:`OutputWriteError`; other errors pass unchanged."""
    target = Path(target)
    try:
        yield
    except OSError as e:
        fn = os.fsdecode(e.filename) if e.filename is not None else None
        temp_sibling = fn is not None and os.path.dirname(os.path.abspath(fn)) == os.path.abspath(target.parent) \
            and os.path.basename(fn).startswith(f".{target.name}.")
        ancestor = fn is not None and _under(target, fn)  # creating the folders above target
        if not (temp_sibling or ancestor or is_write_error(e, target, *roots)):
            raise
        raise output_write_error(e, target, what=what, nothing=nothing, hide=hide, hint=hint) from e


def _lock_dir(path: Path) -> int:
    """Open ``path`` and hold an exclusive ``flock`` on it (released when the fd is closed or the process dies)."""
    fd = os.open(path, os.O_RDONLY)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def clean_stale_temp(parent: Path, name: str) -> int:
    """Remove temp folders of output ``name`` left in ``parent`` by killed runs (those nobody holds a lock on)."""
    if fcntl is None or not parent.is_dir():
        return 0
    n = 0
    tmp_prefix, new_prefix = f".{name}{_TMP_MARK}", f".{name}{_NEW_MARK}"
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith((tmp_prefix, new_prefix))]
    except OSError:
        return 0
    for p in entries:
        if p.is_symlink() or not p.is_dir():
            continue
        if p.name.startswith(new_prefix):
            with contextlib.suppress(OSError):
                if time.time() - p.stat().st_mtime < _STALE_NEW_S:
                    continue  # may be a live writer between mkdtemp and its lock
        try:
            fd = _lock_dir(p)
        except OSError:
            continue  # a live writer holds it
        try:
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        finally:
            os.close(fd)
    if n:
        log.info("removed %d temp folder(s) of %s left in %s by interrupted runs", n, name, parent)
    return n


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (whoever wrote them), so the rename publishes durable content."""
    for d, _dirs, files in os.walk(root):
        for f in files:
            fsync_file(os.path.join(d, f))
        fsync_dir(Path(d))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where not supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _publish(tmp: Path, final: Path, shown: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``final``; with ``overwrite``, swap it with the old folder, then delete that."""
    try:
        os.rename(tmp, final)  # ``final`` absent or an empty folder
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not overwrite:
            raise OutputExistsError(
                f"The output folder {shown} was created by someone else while this was written; {OVERWRITE_HINT}."
            ) from None
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # ``tmp`` now holds the old content
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rename(final, old / "content")  # a crash between the two renames leaves the old content in ``old``
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False, what: str = "the output folder",
               ) -> Iterator[Path]:
    """Write a folder all-or-nothing: yield a hidden temp folder beside ``path``; rename it into place at the end.

    The body writes into the yielded folder. On success every file is fsynced and the folder appears under
    ``path`` in one rename; on any error (or ``kill -9``) ``path`` is untouched: it does not exist, or it
    still holds what it held before. ``path`` must be missing or empty unless ``overwrite`` (then the old
    content stays until the new one is complete, and is swapped out atomically where the OS allows).
    Temp folders (``.<name>.tmp-XXXX``) of killed runs are removed by the next run for the same ``path``.
    An :class:`OSError` from writing becomes an :class:`OutputWriteError` naming ``path``.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "composite"
    >>> with atomic_dir(out) as tmp:
    ...     _ = (tmp / "a.json").write_text("{}")
    ...     out.exists()
    False
    >>> sorted(p.name for p in out.parent.iterdir()), (out / "a.json").read_text()
    (['composite'], '{}')
    """
    shown = Path(path)
    check_output(shown, overwrite=overwrite)
    final = Path(os.path.abspath(shown))
    parent = final.parent
    try:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(shown.parent))
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:  # a component of the path is a file
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), e.filename) from None
        clean_stale_temp(parent, final.name)
        new = Path(tempfile.mkdtemp(prefix=f".{final.name}{_NEW_MARK}", dir=parent))
        fd = _lock_dir(new)
        tmp = parent / new.name.replace(_NEW_MARK, _TMP_MARK, 1)
        os.rename(new, tmp)
    except OSError as e:
        raise output_write_error(e, shown, what=what) from e
    try:
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an output gets the usual permissions
            _fsync_tree(tmp)
            _publish(tmp, final, shown, overwrite)
        except AdapterbankError as e:  # e.g. a nested atomic_dir's error: name the final path, not our temp one
            renamed = renamed_paths(e, {tmp: shown})
            if renamed is e:
                raise
            raise renamed from e.__cause__
        except OSError as e:
            if not is_write_error(e, tmp, final):
                raise
            raise output_write_error(e, shown, what=what, staging=tmp) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)
    fsync_dir(parent)
