"""Search indexes kept on disk next to the catalog, memory-mapped by every new process.

A new process used to rebuild the index of a space from the catalog on its first search (22.8 s and 6.8 GB
at 1e6 prototypes, d=768). :func:`load_index` instead opens the files of the last index written, maps the
vectors (no copy, no load time) and brings them up to date with the catalog's change log.

Layout, one folder per prototype space (``<bank>/index/<safe name of the space key>/``)::

    meta.json          {"format", "space_key", "catalog_version", "kind", "n", "d", "base", "delta"}
    g-<token>/         one immutable *base*, written once:
        vectors.npy    (n, d) float32, rows grouped by base model (a base-model filter is a slice)
        sqn.npy        (n,) float32 ‖x_i‖²
        ids.npy        UTF-8 bytes of the ids, idoff.npy (n + 1,) int64 offsets
        tagrows.npy    rows of every tag, concatenated; tagoff.npy (T + 1,) int64 offsets
        part.json      base-model names and their row ranges, ‖x‖ bounds, tag names
        graph.usearch  the HNSW graph (kind "ann"; usearch's file: links and its own copy of the vectors)
    x-<token>.npz      the *delta* since the base: rows added or replaced, base rows deleted
    .lock              held (flock) by the one process writing

Crash safety: a base is written into ``tmp-<token>/``, every file fsynced, then renamed to ``g-<token>``;
``meta.json`` is replaced atomically (temp file, fsync, ``os.replace``, fsync of the folder) only after, so a
reader sees the old index or the new one, never half of one. Writers hold ``.lock`` and re-read ``meta.json``
under it (a racing writer that lost finds the work done); files no meta names are removed under the lock.
Readers take no lock: one that finds a file gone (replaced meanwhile) reads ``meta.json`` again.

Staleness: ``catalog_version`` is the catalog version the index reflects. If the catalog moved on,
``catalog.changes_since(space, v)`` lists the ids to re-fetch (upsert those present, delete those absent) and
only a small delta file is written; a full rebuild happens when the log does not reach back (``None``) or
when the changes exceed a quarter of the rows (the index compacts then anyway).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from adapterbank._validation import check_choice
from adapterbank.bank.ann import ANN_MIN_ROWS, AnnIndex, ann_available
from adapterbank.bank.backend import CatalogBackend
from adapterbank.bank.index import NumpyIndex, PackedIds
from adapterbank.errors import AdapterbankError

__all__ = ["FORMAT", "INDEX_DIR", "KINDS", "load_index", "space_dir_name", "write_index"]

log = logging.getLogger(__name__)

FORMAT = 1
INDEX_DIR = "index"
KINDS = ("auto", "exact", "ann")
_CHUNK = 65_536
_READ_RETRIES = 5

try:  # POSIX advisory lock; elsewhere writers rely on rename atomicity alone (still never a half index)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def space_dir_name(space_key: str) -> str:
    """A file-system-safe, collision-free folder name for a space key: a readable part and a hash.

    >>> space_dir_name("sentence-transformers/all-MiniLM-L6-v2|mean|norm|384")[:40]
    'sentence-transformers_all-MiniLM-L6-v2_m'
    >>> space_dir_name("a/b") != space_dir_name("a_b")
    True
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", space_key).strip("._-")[:64] or "space"
    return f"{readable}-{hashlib.sha256(space_key.encode('utf-8')).hexdigest()[:16]}"


def load_index(dir: Path, space_key: str, catalog: CatalogBackend, kind: str = "auto", *,
               current: NumpyIndex | None = None) -> NumpyIndex:
    """The search index of ``space_key`` at the catalog's current version, from the files under
    ``dir/<space_dir_name(space_key)>/`` (``dir`` is ``<bank>/index``), updated and re-persisted as needed.

    ``kind``: ``"exact"`` (:class:`NumpyIndex`), ``"ann"`` (:class:`~adapterbank.bank.ann.AnnIndex`, needs
    usearch) or ``"auto"`` (ANN from :data:`~adapterbank.bank.ann.ANN_MIN_ROWS` rows on, when usearch is
    installed). ``current``: an index this process already holds for the space (updated in place from the
    change log instead of re-reading the files). The result carries ``catalog_version``. When the folder
    cannot be written (a read-only bank) the index is still returned, and a warning logged.

    >>> import tempfile
    >>> from adapterbank.bank import Bank
    >>> bank = Bank.init(Path(tempfile.mkdtemp()) / "bank")
    >>> idx = load_index(bank.root / "index", "no-such-space", bank._cat)
    >>> len(idx), idx.catalog_version == bank.version, (bank.root / "index").is_dir()
    (0, True, True)
    """
    kind = check_choice(kind, "kind", "load_index", KINDS)
    folder = Path(dir) / space_dir_name(space_key)
    want = catalog.version()
    idx = current if current is not None and _kind_fits(current, kind) else None
    if idx is None or _newer_on_disk(folder, space_key, idx):  # another process got further: start from there
        idx = _open(folder, space_key, kind) or idx
    if idx is not None and idx.catalog_version == want:
        return idx
    if idx is not None and idx.catalog_version is not None:
        changed = catalog.changes_since(space_key, idx.catalog_version)
        if changed is not None and len(changed) <= max(idx.COMPACT_MIN, idx.COMPACT_FRAC * len(idx)):
            if changed:
                m = catalog.vectors(space_key, changed)
                if m.ids:
                    if idx.dim is not None and len(idx) and m.vectors.shape[1] != idx.dim:
                        changed = None  # the space changed dim: rebuild
                    else:
                        idx.upsert(m.ids, m.vectors, m.attrs)
                if changed is not None:
                    gone = sorted(set(changed) - set(m.ids))
                    idx.delete(gone)
            if changed is not None:
                idx.catalog_version = want  # reflects at least every change up to `want`
                log.debug("index %s: applied %d changes up to catalog version %d", space_key, len(changed), want)
                return _persist(folder, space_key, idx)
    return _rebuild(folder, space_key, catalog, kind)


def _newer_on_disk(folder: Path, space_key: str, idx: NumpyIndex) -> bool:
    meta = _read_meta(folder)
    return (meta is not None and meta.get("space_key") == space_key and idx.catalog_version is not None
            and int(meta["catalog_version"]) > idx.catalog_version)


def _kind_fits(idx: NumpyIndex, kind: str) -> bool:
    return kind == "auto" or (kind == "ann") == isinstance(idx, AnnIndex)


def _rebuild(folder: Path, space_key: str, catalog: CatalogBackend, kind: str) -> NumpyIndex:
    t0 = time.perf_counter()
    with _locked(folder) as writable:
        if writable:  # another process may have written it while we waited for the lock
            idx = _open(folder, space_key, kind)
            if idx is not None and idx.catalog_version == catalog.version():
                return idx
        m = catalog.space_matrix(space_key)
        resolved = kind if kind != "auto" else ("ann" if len(m.ids) >= ANN_MIN_ROWS and ann_available() else "exact")
        # Exact first: the graph is built over the rows as written (grouped), from the mapped files.
        idx = AnnIndex() if resolved == "ann" and not writable else NumpyIndex()
        idx.build(m.ids, m.vectors, m.attrs)
        idx.catalog_version = m.version
        log.info("built %s index of space %s: %d rows at catalog version %d in %.1f s", resolved, space_key,
                 len(m.ids), m.version, time.perf_counter() - t0)
        del m
        if not writable:
            return idx
        try:
            return write_index(folder, space_key, idx, kind=resolved, force=True, _lock_held=True)
        except OSError as e:
            log.warning("could not persist the index of space %s in %s (%s); it is kept in memory only",
                        space_key, folder, e)
            return idx  # exact, in memory: correct, and no graph build without a place to keep it


def _persist(folder: Path, space_key: str, idx: NumpyIndex) -> NumpyIndex:
    try:
        with _locked(folder) as writable:
            if writable:
                return write_index(folder, space_key, idx, _lock_held=True)
    except OSError as e:
        log.warning("could not persist the index of space %s in %s (%s); it is kept in memory only",
                    space_key, folder, e)
    return idx


# -- reading -----------------------------------------------------------------------------------------
def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable index meta %s: %s", folder / "meta.json", e)
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        log.info("index %s has format %r (this adapterbank reads %d): rebuilding", folder,
                 meta.get("format") if isinstance(meta, dict) else None, FORMAT)
        return None
    return meta


def _open(folder: Path, space_key: str, kind: str) -> NumpyIndex | None:
    """The persisted index (base mapped, delta replayed), or ``None`` when there is none usable."""
    for _ in range(_READ_RETRIES):
        meta = _read_meta(folder)
        if meta is None or meta.get("space_key") != space_key:
            return None
        if kind == "ann" and meta.get("kind") != "ann":
            return None  # no graph on disk: rebuild with one
        as_ann = meta.get("kind") == "ann" and kind != "exact"
        if as_ann and not ann_available():
            log.warning("index %s was written with an ANN graph but usearch is not installed: searching exactly",
                        folder)
            as_ann = False
        try:
            idx = _open_base(folder / meta["base"], AnnIndex() if as_ann else NumpyIndex())
            if meta.get("delta"):
                with np.load(folder / meta["delta"], allow_pickle=False) as z:
                    idx._replay([str(i) for i in z["ids"].tolist()], z["vectors"],
                                json.loads(str(z["attrs"])), z["dead"])
        except FileNotFoundError:
            continue  # a writer replaced this version meanwhile: read meta.json again
        except (OSError, ValueError, KeyError, AdapterbankError) as e:
            log.warning("ignoring damaged index files in %s: %s", folder, e)
            return None
        if len(idx) != meta.get("n") or (idx.dim or 0) != meta.get("d", 0) and len(idx):
            log.warning("index %s does not match its meta.json (n=%d, d=%s): rebuilding", folder, len(idx), idx.dim)
            return None
        idx.catalog_version = int(meta["catalog_version"])
        idx.origin = meta["base"]
        return idx
    return None


def _open_base(gen: Path, idx: NumpyIndex) -> NumpyIndex:
    part = json.loads((gen / "part.json").read_text(encoding="utf-8"))
    X = np.load(gen / "vectors.npy", mmap_mode="r")  # (n, d) float32, mapped: never read whole
    if X.dtype != np.float32 or X.ndim != 2 or not X.flags.c_contiguous:
        raise ValueError(f"{gen / 'vectors.npy'} holds {X.dtype} {X.shape}; expected C-ordered float32 (n, d)")
    n = X.shape[0]
    sqn = np.load(gen / "sqn.npy", mmap_mode="r")
    ids = PackedIds(np.load(gen / "ids.npy", mmap_mode="r"), np.load(gen / "idoff.npy", mmap_mode="r"))
    if len(sqn) != n or len(ids) != n:
        raise ValueError(f"{gen}: {n} vectors but {len(sqn)} norms and {len(ids)} ids")
    groups = [tuple(g) for g in part["groups"]]
    sizes = np.array([b - a for a, b in groups], dtype=np.int64)
    codes = np.repeat(np.arange(len(groups), dtype=np.int32), sizes)
    tag_rows = np.load(gen / "tagrows.npy", mmap_mode="r")
    tag_off = np.load(gen / "tagoff.npy")
    tags = {t: tag_rows[tag_off[i]:tag_off[i + 1]] for i, t in enumerate(part["tags"])}
    idx._dim = int(X.shape[1]) if n else None
    idx._set_base(ids, X, sqn, part["base_models"], codes, tags, part["maxnorm"],
                  {c: (int(a), int(b)) for c, (a, b) in enumerate(groups)})
    if isinstance(idx, AnnIndex) and (gen / "graph.usearch").exists():
        idx.view_graph(gen / "graph.usearch")
    return idx


# -- writing -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[bool]:
    """Hold the folder's writer lock; yields ``False`` (and holds nothing) when the folder is not writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        log.warning("index folder %s is not writable (%s): the index is kept in memory only", folder, e)
        yield False
        return
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the flock


def write_index(folder: Path, space_key: str, idx: NumpyIndex, *, kind: str | None = None, force: bool = False,
                _lock_held: bool = False) -> NumpyIndex:
    """Persist ``idx`` (whose ``catalog_version`` is set) under ``folder``; return the index to use from now
    on: the same object after a delta write, or one mapped from the new base files after a full write.

    ``kind``: ``"ann"`` writes an HNSW graph with the base (default: whether ``idx`` is an AnnIndex). Nothing
    is written when ``meta.json`` already holds this or a newer version of that kind (another process won),
    unless ``force`` (a rebuild: what is there was found unusable).
    """
    if not _lock_held:
        with _locked(folder) as writable:
            return write_index(folder, space_key, idx, kind=kind, force=force, _lock_held=True) if writable else idx
    if idx.catalog_version is None:
        raise AdapterbankError("write_index needs an index whose catalog_version is set.")
    kind = kind or ("ann" if isinstance(idx, AnnIndex) else "exact")
    meta = _read_meta(folder)
    if not force and meta is not None and meta.get("space_key") == space_key \
            and int(meta["catalog_version"]) >= idx.catalog_version and (folder / meta["base"]).is_dir():
        return idx  # already persisted by someone (this process or another)
    if not force and meta is not None and idx.origin is not None and meta.get("base") == idx.origin:
        delta = _write_delta(folder, idx)  # the base (and its graph, if any) stays: only the changes are written
        _write_meta(folder, space_key, idx, str(meta.get("kind", kind)), idx.origin, delta)
        _cleanup(folder)
        return idx
    idx.compact()
    gen = _write_base(folder, idx, kind)
    _write_meta(folder, space_key, idx, kind, gen, None)
    _cleanup(folder)
    fresh = _open_base(folder / gen, AnnIndex() if kind == "ann" else NumpyIndex())
    fresh.catalog_version, fresh.origin = idx.catalog_version, gen
    if isinstance(idx, AnnIndex) and isinstance(fresh, AnnIndex):
        fresh.expansion_search, fresh.exact_below = idx.expansion_search, idx.exact_below
        if fresh._graph is not None:
            fresh._graph.expansion_search = fresh._ef()
    return fresh


def _token() -> str:
    return f"{int(time.time()):x}{secrets.token_hex(6)}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some platforms refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _save(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def _write_base(folder: Path, idx: NumpyIndex, kind: str) -> str:
    """Write the (compacted) base into tmp-<token>/, rows grouped by base model; rename to g-<token>."""
    tok = _token()
    tmp = folder / f"tmp-{tok}"
    tmp.mkdir()
    try:
        n, d = idx._nb, idx._dim or 0
        codes = idx._codes
        order = np.argsort(codes, kind="stable")  # grouped; the identity when the base already is
        identity = bool(np.array_equal(order, np.arange(n)))
        out = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, d))
        for s in range(0, n, _CHUNK):
            out[s:s + _CHUNK] = idx._X[s:s + _CHUNK] if identity else idx._X[order[s:s + _CHUNK]]
        out.flush()
        del out
        _fsync(tmp / "vectors.npy")
        _save(tmp / "sqn.npy", np.asarray(idx._sqn)[order])
        ids = PackedIds.pack([idx._ids[r] for r in order.tolist()])
        _save(tmp / "ids.npy", np.asarray(ids.blob))
        _save(tmp / "idoff.npy", ids.offsets)
        new_of = np.empty(n, dtype=np.int64)
        new_of[order] = np.arange(n)
        names = sorted(idx._tags)
        rows = [np.sort(new_of[idx._tags[t]]) for t in names]
        off = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=off[1:])
        _save(tmp / "tagrows.npy", np.concatenate(rows) if rows else np.zeros(0, np.int64))
        _save(tmp / "tagoff.npy", off)
        bounds = np.searchsorted(codes[order], np.arange(len(idx._bm_names) + 1))
        part = {"base_models": idx._bm_names, "maxnorm": idx._bm_maxnorm,
                "groups": [[int(bounds[c]), int(bounds[c + 1])] for c in range(len(idx._bm_names))],
                "tags": names}
        (tmp / "part.json").write_text(json.dumps(part), encoding="utf-8")
        _fsync(tmp / "part.json")
        if kind == "ann":
            if not (isinstance(idx, AnnIndex) and identity):  # graph keys are row numbers: use the rows as written
                g = AnnIndex()
                if isinstance(idx, AnnIndex):
                    g.connectivity, g.expansion_add, g.exact_below = idx.connectivity, idx.expansion_add, idx.exact_below
                idx = _open_base(tmp, g)
            if idx.save_graph(tmp / "graph.usearch"):
                _fsync(tmp / "graph.usearch")
        _fsync(tmp)
        gen = f"g-{tok}"
        os.replace(tmp, folder / gen)
        _fsync(folder)
        return gen
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_delta(folder: Path, idx: NumpyIndex) -> str | None:
    ids, X, attrs, dead = idx.delta_state()
    if not ids and not len(dead):
        return None
    name = f"x-{_token()}.npz"
    tmp = folder / f"tmp-{name}"
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=np.array(ids, dtype=str), vectors=X, attrs=np.array(json.dumps(attrs)), dead=dead)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return name


def _write_meta(folder: Path, space_key: str, idx: NumpyIndex, kind: str, base: str, delta: str | None) -> None:
    meta = {"format": FORMAT, "space_key": space_key, "catalog_version": idx.catalog_version, "kind": kind,
            "n": len(idx), "d": idx.dim or 0, "base": base, "delta": delta,
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    tmp = folder / f"tmp-meta-{_token()}.json"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / "meta.json")
    _fsync(folder)


def _cleanup(folder: Path) -> None:
    """Remove bases and deltas ``meta.json`` no longer names, and crashed writers' temp files (lock held)."""
    meta = _read_meta(folder) or {}
    keep = {"meta.json", ".lock", meta.get("base"), meta.get("delta")}
    for p in folder.iterdir():
        if p.name in keep or not p.name.startswith(("g-", "x-", "tmp-")):
            continue
        with contextlib.suppress(OSError):  # a reader on Windows may still map it; next writer retries
            shutil.rmtree(p) if p.is_dir() else p.unlink()
