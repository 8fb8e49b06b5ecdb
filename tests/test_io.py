"""Atomic writes and name checks (adapterbank._io)."""

from __future__ import annotations

from pathlib import Path


def test_atomic_write_gives_files_the_umask_permissions(tmp_path: Path) -> None:
    """mkstemp creates 0600 files; what we write (reports, composites) must follow the umask like open() does."""
    import os

    from adapterbank._io import atomic_write_bytes

    old = os.umask(0o022)
    try:
        p = atomic_write_bytes(tmp_path / "x.json", b"{}")
        assert (p.stat().st_mode & 0o777) == 0o644 and p.read_bytes() == b"{}"
    finally:
        os.umask(old)
