"""Small shared file helpers: atomic writes and name validation. No adapterbank imports beyond errors."""

from __future__ import annotations

import os
import re
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from adapterbank.errors import InvalidNameError

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
