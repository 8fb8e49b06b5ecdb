"""Exact k-nearest-neighbour search over prototypes (Eq. 2: d_i = ‖p_T − p_i‖²₂) behind a small interface.

:class:`Index` is what the bank needs from a search backend; :class:`NumpyIndex` is the embedded default
(exact), :class:`~adapterbank.bank.ann.AnnIndex` the approximate one for large spaces; a remote one (Qdrant)
would implement the same five methods. All run the conformance suite (``tests/bank/test_index_conformance.py``).
:mod:`adapterbank.bank.persisted` keeps an index on disk so a new process maps it instead of rebuilding it.

How :class:`NumpyIndex` stays exact and fast (docs/design.md §5.1; targets in BENCHMARKS.md):

| step | what | cost |
|------|------|------|
| filter | a base model's rows are a slice when contiguous (persisted indexes are grouped), else gathered in chunks; tags are sorted row lists | O(1) / O(rows kept) |
| score  | ã_i = ‖x_i‖² − 2 x_iᵀq in float32 (precomputed norms, one BLAS matrix-vector product) | O(n·d), memory-bound |
| select | argpartition of ã, the top m = k + 8 candidates | O(n) |
| re-rank| d_i = Σ_j (x_ij − q_j)² in float64 over the candidates, sorted by (d_i, id) | O(m·d) |
| certify| every row left out has ã_i + ‖q‖² − E > d_(k) with E a float32 rounding bound, else widen | O(1) usually |

So distances are exact float64 values of the stored float32 vectors, ties are broken by id, and the
result equals a brute-force float64 reference.

Memory: the matrix given to :meth:`~NumpyIndex.build` is used as is when it is C-ordered float32 (read-only
and memory-mapped arrays included): the index adds 8 bytes a row (norm, base-model code) and no temporary as
large as the matrix. :meth:`~NumpyIndex.upsert` appends to a delta buffer and :meth:`~NumpyIndex.delete`
tombstones (O(rows changed)); past a quarter of the base, :meth:`~NumpyIndex.compact` folds both into a new
base (one copy of the live rows).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from adapterbank._validation import MAX_K, check_k
from adapterbank.errors import NonFiniteError, ShapeMismatchError, UnknownNameError

__all__ = ["MAX_K", "WHERE_KEYS", "Hit", "Index", "NumpyIndex", "PackedIds"]

WHERE_KEYS = ("base_model", "tags")
_U32 = 2.0**-24  # unit roundoff of float32
_SLACK = 8  # candidates beyond k re-ranked exactly; the rounding certificate widens the set when needed
_GATHER_BELOW = 0.3  # a tag filter keeping fewer rows than this fraction gathers them instead of masking
_CHUNK = 8192  # rows per chunk of the passes that would otherwise allocate a temporary as big as the matrix


@dataclass(frozen=True, order=True)
class Hit:
    """One search result: an adapter id and its squared L2 distance to the query (Eq. 2).

    Ordered by ``(distance, id)``, the order search results come in.

    >>> sorted([Hit("b", 1.0), Hit("a", 1.0), Hit("c", 0.5)])[0]
    Hit(id='c', distance=0.5)
    """

    distance: float
    id: str

    def __init__(self, id: str, distance: float) -> None:
        object.__setattr__(self, "distance", float(distance))
        object.__setattr__(self, "id", str(id))

    def __repr__(self) -> str:
        return f"Hit(id={self.id!r}, distance={self.distance!r})"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "distance": self.distance}


def _check_where(where: Mapping[str, Any] | None) -> tuple[str | None, tuple[str, ...]]:
    if not where:
        return None, ()
    unknown = sorted(set(where) - set(WHERE_KEYS))
    if unknown:
        raise UnknownNameError(f"Unknown search filter key(s) {unknown}; valid keys are {list(WHERE_KEYS)}.")
    bm = where.get("base_model")
    if bm is not None and not isinstance(bm, str):
        raise ShapeMismatchError(f"The 'base_model' filter must be a string or None. Got {type(bm).__name__} instead.")
    tags = where.get("tags") or ()
    if isinstance(tags, str):
        tags = (tags,)
    if not all(isinstance(t, str) for t in tags):
        raise ShapeMismatchError(f"The 'tags' filter must be a sequence of strings. Got {tags!r} instead.")
    return bm, tuple(dict.fromkeys(tags))


def _check_query(query: Any, dim: int | None) -> np.ndarray:
    q = np.asarray(query, dtype=np.float32)
    if q.ndim != 1:
        raise ShapeMismatchError(f"A search query must be a 1-D vector. Got shape {q.shape} instead.")
    if dim is not None and q.shape[0] != dim:
        raise ShapeMismatchError(f"The query has dim {q.shape[0]} but the index holds vectors of dim {dim}.")
    if not np.isfinite(q).all():
        raise NonFiniteError("The search query contains NaN or Inf.")
    return q


@runtime_checkable
class Index(Protocol):
    """What the bank needs from a nearest-neighbour backend.

    ``attrs[i]`` holds the filterable attributes of row i: ``base_model`` (str or None) and ``tags``
    (sequence of str). ``where`` filters on them: ``{"base_model": "x"}`` keeps rows of exactly that base
    model (never rows of another or of an unknown one), ``{"tags": ["a", "b"]}`` keeps rows carrying *all*
    the given tags. Results are sorted by (distance, id); fewer than ``k`` come back when fewer match.
    """

    @property
    def dim(self) -> int | None: ...

    def build(self, ids: Sequence[str], vectors: np.ndarray, attrs: Sequence[Mapping[str, Any]]) -> None:
        """Replace the whole content by ``vectors`` (n, d) with ``ids`` and ``attrs``."""
        ...

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, attrs: Sequence[Mapping[str, Any]]) -> None:
        """Insert rows, replacing rows whose id exists."""
        ...

    def delete(self, ids: Sequence[str]) -> None:
        """Remove rows by id (unknown ids are ignored)."""
        ...

    def search(self, query: np.ndarray, k: int, *, where: Mapping[str, Any] | None = None) -> list[Hit]:
        """The ``k`` rows nearest to ``query`` (squared L2), ascending, ties broken by id."""
        ...

    def __len__(self) -> int: ...


def _as_matrix(vectors: Any, n: int) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 (n, d) array: the same object (no copy) when it already is one,
    read-only and memory-mapped arrays included."""
    X = np.asarray(vectors)
    if X.ndim != 2 or X.shape[0] != n:
        raise ShapeMismatchError(f"Index vectors must have shape ({n}, d) to match {n} ids. Got {X.shape} instead.")
    return np.ascontiguousarray(X, dtype=np.float32)


def _row_norms(X: np.ndarray, first_row: int = 0) -> np.ndarray:
    """(n,) float64 ‖x_i‖² in chunks (no float64 copy of the matrix); :class:`NonFiniteError` names the first
    row holding NaN/Inf (a row is finite exactly when its float64 norm is: float32 squares cannot overflow it)."""
    out = np.empty(len(X), dtype=np.float64)
    for s in range(0, len(X), _CHUNK):
        blk = X[s:s + _CHUNK]
        out[s:s + len(blk)] = np.einsum("ij,ij->i", blk, blk, dtype=np.float64)
    if len(out) and not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise NonFiniteError(f"Index vector at row {bad + first_row} contains NaN or Inf.")
    return out


def _norm_attrs(a: Mapping[str, Any]) -> dict[str, Any]:
    bm = a.get("base_model")
    tags = a.get("tags") or ()
    if isinstance(tags, str):
        tags = (tags,)
    return {"base_model": None if bm is None else str(bm), "tags": tuple(dict.fromkeys(str(t) for t in tags))}


def _check_ids(ids: Sequence[str]) -> list[str]:
    out = [str(i) for i in ids]
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = sorted({i for i in out if i in seen or seen.add(i)})[:5]  # type: ignore[func-returns-value]
        raise ShapeMismatchError(f"Index ids must be unique. Got duplicates {dup}.")
    return out


class PackedIds(Sequence[str]):
    """Row ids as one UTF-8 buffer and (n + 1,) offsets: what a persisted index maps instead of n Python strings.

    >>> p = PackedIds.pack(["a", "bé", "c"])
    >>> len(p), p[1], list(p)
    (3, 'bé', ['a', 'bé', 'c'])
    """

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self.blob = blob  # (B,) uint8
        self.offsets = offsets  # (n + 1,) int64

    @classmethod
    def pack(cls, ids: Sequence[str]) -> PackedIds:
        enc = [i.encode("utf-8") for i in ids]
        offsets = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(e) for e in enc), dtype=np.int64, count=len(enc)), out=offsets[1:])
        return cls(np.frombuffer(b"".join(enc), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        o = self.offsets
        return self.blob[o[i]:o[i + 1]].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        raw = self.blob.tobytes()
        o = self.offsets.tolist()
        return (raw[o[r]:o[r + 1]].decode("utf-8") for r in range(len(o) - 1))


class NumpyIndex:
    """Exact squared-L2 k-NN in memory (float32 scoring, float64 re-ranking, certified by a rounding bound).

    Storage: a *base* matrix taken as given (a read-only or memory-mapped float32 array is used in place,
    never copied) plus a small *delta* buffer that :meth:`upsert` appends to; replaced and deleted rows are
    tombstoned. :meth:`compact` (run on its own once delta + tombstones exceed a quarter of the base) folds
    both into a new base grouped by base model. Every search stays exact over the live rows.

    >>> idx = NumpyIndex()
    >>> X = np.array([[0, 0], [1, 0], [0, 2], [1, 0]], dtype=np.float32)
    >>> idx.build(["a", "b", "c", "d"], X, [{"base_model": "m1"}, {"base_model": "m2"}, {}, {"base_model": "m2"}])
    >>> idx.search(np.array([1.0, 0.0]), k=3)
    [Hit(id='b', distance=0.0), Hit(id='d', distance=0.0), Hit(id='a', distance=1.0)]
    >>> idx.search(np.array([1.0, 0.0]), k=3, where={"base_model": "m1"})
    [Hit(id='a', distance=1.0)]
    >>> idx.upsert(["a"], np.array([[1.0, 0.1]], np.float32), [{"base_model": "m1"}]); idx.delete(["d"])
    >>> idx.search(np.array([1.0, 0.0]), k=2)
    [Hit(id='b', distance=0.0), Hit(id='a', distance=0.010000000298023226)]
    """

    #: Compact once delta rows + tombstones exceed max(COMPACT_MIN, COMPACT_FRAC · base rows).
    COMPACT_MIN = 4096
    COMPACT_FRAC = 0.25

    def __init__(self) -> None:
        self._dim: int | None = None
        self.catalog_version: int | None = None  # the catalog version the content reflects (bank.persisted)
        self._set_base([], np.zeros((0, 0), np.float32), np.zeros(0, np.float32), [], np.zeros(0, np.int32), {})

    # -- storage -----------------------------------------------------------------------------------
    def _set_base(self, ids: Sequence[str], X: np.ndarray, sqn: np.ndarray, bm_names: list[str | None],
                  codes: np.ndarray, tags: dict[str, np.ndarray], maxnorm: list[float] | None = None,
                  groups: dict[int, tuple[int, int]] | None = None) -> None:
        """Install a base: ``X`` (n, d) float32 as is, ``sqn`` (n,) float32 ‖x‖², ``codes`` (n,) index into
        ``bm_names``, ``tags`` tag -> sorted (m,) int64 rows; ``groups`` code -> contiguous (start, stop)."""
        n = len(ids)
        self._ids: Sequence[str] = ids
        self._X = X  # (n, d)
        self._sqn = sqn  # (n,) float32
        self._codes = codes  # (n,) int32
        self._bm_names = list(bm_names)
        self._bm_code = {b: c for c, b in enumerate(self._bm_names)}
        self._tags = tags
        if maxnorm is None:
            mx = np.zeros(len(bm_names))
            if n:
                np.maximum.at(mx, codes, sqn.astype(np.float64))
            maxnorm = np.sqrt(mx * (1.0 + 1e-6)).tolist()  # ‖x‖ bound per base model (sqn is float32-rounded)
        self._bm_maxnorm = list(maxnorm)
        if groups is None:
            groups = {}
            if n:
                order = np.argsort(codes, kind="stable")
                bounds = np.searchsorted(codes[order], np.arange(len(bm_names) + 1))
                for c in range(len(bm_names)):
                    rows = order[bounds[c]:bounds[c + 1]]
                    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
                        groups[c] = (int(rows[0]), int(rows[-1]) + 1)
        self._groups = groups  # code -> (start, stop) when its base rows are contiguous
        self._group_rows: dict[int, np.ndarray] = {}  # code -> sorted rows otherwise (filled on demand)
        self._nb = n
        self._bdead: np.ndarray | None = None  # (n,) bool tombstones, allocated on the first delete
        d = int(X.shape[1]) if X.ndim == 2 else 0
        self._D = np.zeros((0, d), np.float32)  # (cap, d) delta buffer, rows [0, _nd) used
        self._dsqn = np.zeros(0, np.float32)
        self._dcodes = np.zeros(0, np.int32)
        self._ddead = np.zeros(0, bool)
        self._dids: list[str] = []
        self._dtags: dict[str, list[int]] = {}  # tag -> delta rows
        self._nd = 0
        self._ndead = 0
        self._pos_cache: dict[str, int] | None = None
        self.origin: str | None = None  # which persisted base files hold this base (set by bank.persisted)
        self._on_new_base()

    def _on_new_base(self) -> None:
        """Called whenever the base changes (subclasses rebuild what they derive from it)."""

    @property
    def _pos(self) -> dict[str, int]:
        """id -> live global row (base rows first, then delta rows), built on first use."""
        if self._pos_cache is None:
            pos = {i: r for r, i in enumerate(self._ids)}
            if self._bdead is not None:
                for r in np.flatnonzero(self._bdead).tolist():
                    del pos[self._ids[r]]
            for j, i in enumerate(self._dids):
                if not self._ddead[j]:
                    pos[i] = self._nb + j
            self._pos_cache = pos
        return self._pos_cache

    # -- content -----------------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        return self._dim

    def __len__(self) -> int:
        return self._nb + self._nd - self._ndead

    def __contains__(self, id: object) -> bool:
        return id in self._pos

    @property
    def ids(self) -> list[str]:
        """Live row ids in storage order (base rows, then rows added since the last compaction)."""
        dead = self._bdead
        out = [i for r, i in enumerate(self._ids) if dead is None or not dead[r]]
        return out + [i for j, i in enumerate(self._dids) if not self._ddead[j]]

    @property
    def n_pending(self) -> int:
        """Delta rows plus tombstones: the work :meth:`compact` would fold into the base."""
        return self._nd + self._ndead

    def vector(self, id: str) -> np.ndarray:
        """A copy of the stored vector of ``id``."""
        try:
            r = self._pos[id]
        except KeyError:
            raise UnknownNameError(f"No row with id {id!r} in the index ({len(self)} rows).") from None
        return self._gather(np.array([r]))[0].astype(np.float32)

    def build(self, ids: Sequence[str], vectors: np.ndarray, attrs: Sequence[Mapping[str, Any]] | None = None) -> None:
        ids = _check_ids(ids)
        if ids:
            X = _as_matrix(vectors, len(ids))
        else:
            V = np.asarray(vectors)
            X = np.zeros((0, V.shape[1] if V.ndim == 2 else (self._dim or 0)), dtype=np.float32)
        at = [_norm_attrs(a) for a in attrs] if attrs is not None else [_norm_attrs({}) for _ in ids]
        if len(at) != len(ids):
            raise ShapeMismatchError(f"Index got {len(ids)} ids but {len(at)} attribute dicts.")
        sqn64 = _row_norms(X)
        names: dict[str | None, int] = {}
        codes = np.fromiter((names.setdefault(a["base_model"], len(names)) for a in at), dtype=np.int32, count=len(at))
        tag_rows: dict[str, list[int]] = {}
        for r, a in enumerate(at):
            for t in a["tags"]:
                tag_rows.setdefault(t, []).append(r)
        self._dim = int(X.shape[1]) if X.shape[1] else None
        self._set_base(ids, X, sqn64.astype(np.float32), list(names), codes,
                       {t: np.asarray(v, dtype=np.int64) for t, v in tag_rows.items()})

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, attrs: Sequence[Mapping[str, Any]] | None = None) -> None:
        ids = _check_ids(ids)
        X = _as_matrix(vectors, len(ids))
        at = [_norm_attrs(a) for a in attrs] if attrs is not None else [_norm_attrs({}) for _ in ids]
        if len(at) != len(ids):
            raise ShapeMismatchError(f"Index got {len(ids)} ids but {len(at)} attribute dicts.")
        if not ids:
            return
        if len(self) == 0:  # (re)start from scratch, the dim may change
            self.build(ids, X.copy(), at)
            return
        if X.shape[1] != self._dim:
            raise ShapeMismatchError(f"Index holds vectors of dim {self._dim}; got vectors of dim {X.shape[1]}.")
        sqn64 = _row_norms(X)
        self._kill([i for i in ids if i in self._pos])
        self._append(ids, X, sqn64, at)
        self._maybe_compact()

    def _append(self, ids: list[str], X: np.ndarray, sqn64: np.ndarray, at: list[dict[str, Any]]) -> None:
        """Add rows (ids not live, attrs normalised) to the delta buffer."""
        m, nd = len(ids), self._nd
        if nd + m > len(self._D):  # grow the delta buffer geometrically
            cap = max(64, 2 * len(self._D), nd + m)
            self._D = _grow(self._D, cap, nd)
            self._dsqn = _grow(self._dsqn, cap, nd)
            self._dcodes = _grow(self._dcodes, cap, nd)
            self._ddead = _grow(self._ddead, cap, nd)
        self._D[nd:nd + m] = X
        self._dsqn[nd:nd + m] = sqn64
        self._ddead[nd:nd + m] = False
        for j, a in enumerate(at):
            b = a["base_model"]
            if b not in self._bm_code:
                self._bm_code[b] = len(self._bm_names)
                self._bm_names.append(b)
                self._bm_maxnorm.append(0.0)
            c = self._bm_code[b]
            self._dcodes[nd + j] = c
            self._bm_maxnorm[c] = max(self._bm_maxnorm[c], math.sqrt(float(sqn64[j]) * (1.0 + 1e-6)))
            for t in a["tags"]:
                self._dtags.setdefault(t, []).append(nd + j)
        self._dids.extend(ids)
        self._nd = nd + m
        if self._pos_cache is not None:
            for j, i in enumerate(ids):
                self._pos_cache[i] = self._nb + nd + j

    def delete(self, ids: Sequence[str]) -> None:
        self._kill([str(i) for i in dict.fromkeys(ids) if i in self._pos])
        self._maybe_compact()

    def _kill(self, ids: list[str]) -> None:
        """Tombstone the live rows of ``ids`` (all known)."""
        if not ids:
            return
        pos = self._pos
        for i in ids:
            r = pos.pop(i)
            if r < self._nb:
                if self._bdead is None:
                    self._bdead = np.zeros(self._nb, dtype=bool)
                self._bdead[r] = True
            else:
                self._ddead[r - self._nb] = True
        self._ndead += len(ids)

    def _maybe_compact(self) -> None:
        if len(self) == 0:
            dim = self._dim
            self.build([], np.zeros((0, dim or 0), np.float32), [])
            self._dim = dim
        elif self.n_pending > max(self.COMPACT_MIN, self.COMPACT_FRAC * self._nb):
            self.compact()

    def compact(self) -> None:
        """Fold delta rows and tombstones into a new base (one copy of the live rows, grouped by base model)."""
        if not self.n_pending:
            return
        nb = self._nb
        live_b = np.arange(nb) if self._bdead is None else np.flatnonzero(~self._bdead)
        live_d = np.flatnonzero(~self._ddead[:self._nd]) + nb
        rows = np.concatenate([live_b, live_d])  # global rows
        codes = np.concatenate([self._codes[live_b], self._dcodes[live_d - nb]])
        order = np.argsort(codes, kind="stable")
        rows, codes = rows[order], codes[order]
        used = np.unique(codes)
        remap = np.full(len(self._bm_names), -1, np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        names = [self._bm_names[c] for c in used.tolist()]
        maxnorm = [self._bm_maxnorm[c] for c in used.tolist()]
        X = np.empty((len(rows), self._dim or 0), np.float32)
        for s in range(0, len(rows), _CHUNK):
            X[s:s + _CHUNK] = self._gather(rows[s:s + _CHUNK], np.float32)
        sqn = np.concatenate([self._sqn, self._dsqn[:self._nd]])[rows]
        ids = [self._id_of(r) for r in rows.tolist()]
        new_of = np.full(nb + self._nd, -1, np.int64)
        new_of[rows] = np.arange(len(rows))
        tags: dict[str, np.ndarray] = {}
        for t in set(self._tags) | set(self._dtags):
            old = np.concatenate([self._tags.get(t, np.zeros(0, np.int64)),
                                  np.asarray(self._dtags.get(t, []), dtype=np.int64) + nb])
            new = new_of[old]
            new = np.sort(new[new >= 0])
            if len(new):
                tags[t] = new
        codes = remap[codes]
        bounds = np.searchsorted(codes, np.arange(len(names) + 1))
        groups = {c: (int(bounds[c]), int(bounds[c + 1])) for c in range(len(names))}
        self._set_base(ids, X, sqn, names, codes, tags, maxnorm, groups)

    def delta_state(self) -> tuple[list[str], np.ndarray, list[dict[str, Any]], np.ndarray]:
        """What changed since the base: live delta rows (ids, (m, d) float32 vectors, attrs) and the
        tombstoned base rows (sorted int64). A persisted index stores these beside its base files."""
        live = np.flatnonzero(~self._ddead[:self._nd])
        tags_of: dict[int, list[str]] = {}
        for t, rows in self._dtags.items():
            for j in rows:
                tags_of.setdefault(j, []).append(t)
        attrs = [{"base_model": self._bm_names[int(self._dcodes[j])], "tags": tags_of.get(j, [])} for j in live.tolist()]
        dead = np.zeros(0, np.int64) if self._bdead is None else np.flatnonzero(self._bdead).astype(np.int64)
        return [self._dids[j] for j in live.tolist()], self._D[live], attrs, dead

    def _replay(self, ids: list[str], X: np.ndarray, attrs: list[dict[str, Any]], dead_base: np.ndarray) -> None:
        """Re-apply a :meth:`delta_state` onto the same base (trusted input: no checks, no compaction)."""
        if len(dead_base):
            self._bdead = np.zeros(self._nb, dtype=bool)
            self._bdead[dead_base] = True
            self._ndead += len(dead_base)
        if ids:
            X = np.ascontiguousarray(X, dtype=np.float32)
            self._append(ids, X, _row_norms(X), [_norm_attrs(a) for a in attrs])
        self._pos_cache = None

    def _id_of(self, r: int) -> str:
        return self._ids[r] if r < self._nb else self._dids[r - self._nb]

    def _gather(self, rows: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
        """(m, d) vectors of global ``rows`` (base or delta), as ``dtype``."""
        nb = self._nb
        out = np.empty((len(rows), self._dim or 0), dtype=dtype)
        inb = rows < nb
        if inb.all():
            out[:] = self._X[rows]
        else:
            out[inb] = self._X[rows[inb]]
            out[~inb] = self._D[rows[~inb] - nb]
        return out

    # -- search ------------------------------------------------------------------------------------
    def _scope(self, where: Mapping[str, Any] | None) -> _Scope | None:
        """The rows a filter keeps (``None``: none can match): base part as a slice or rows, delta rows,
        tombstones and tag misses still to mask, and a bound on their norms."""
        bm, tags = _check_where(where)
        if bm is not None:
            c = self._bm_code.get(bm)
            if c is None:
                return None
            maxnorm = self._bm_maxnorm[c]
            if c in self._groups:
                base: slice | np.ndarray = slice(*self._groups[c])
            else:
                if c not in self._group_rows:
                    self._group_rows[c] = np.flatnonzero(self._codes == c)
                base = self._group_rows[c]
            drows = np.flatnonzero(self._dcodes[:self._nd] == c)
        else:
            maxnorm = max(self._bm_maxnorm, default=0.0)
            base = slice(0, self._nb)
            drows = np.arange(self._nd)
        if tags:
            if any(t not in self._tags and t not in self._dtags for t in tags):
                return None
            brows = self._tags.get(tags[0], _EMPTY)
            dsel = np.asarray(self._dtags.get(tags[0], []), dtype=np.int64)
            for t in tags[1:]:
                brows = np.intersect1d(brows, self._tags.get(t, _EMPTY), assume_unique=True)
                dsel = np.intersect1d(dsel, np.asarray(self._dtags.get(t, []), dtype=np.int64), assume_unique=True)
            if isinstance(base, slice):
                brows = brows[(brows >= base.start) & (brows < base.stop)]
                n_scope = base.stop - base.start
            else:
                brows = np.intersect1d(brows, base, assume_unique=True)
                n_scope = len(base)
            drows = np.intersect1d(drows, dsel, assume_unique=True)
            if len(brows) < _GATHER_BELOW * n_scope or not isinstance(base, slice):
                base = brows
                keep = None
            else:  # most rows of the slice pass: one pass over the slice, the others masked
                keep = np.zeros(base.stop - base.start, dtype=bool)
                keep[brows - base.start] = True
            return _Scope(base, drows + self._nb, keep, maxnorm)
        return _Scope(base, drows + self._nb, None, maxnorm)

    def search(self, query: np.ndarray, k: int, *, where: Mapping[str, Any] | None = None) -> list[Hit]:
        k = check_k(k, "search")
        q = _check_query(query, self._dim)
        sc = self._scope(where)
        if sc is None or not len(self):
            return []
        approx = self._approx(q, sc)
        return self._select(q, approx, sc, k)

    def _approx(self, q: np.ndarray, sc: _Scope) -> np.ndarray:
        """ã = ‖x‖² − 2xᵀq over the scope (base part then delta part); +inf on tombstones and tag misses."""
        base, nb = sc.base, self._nb
        nbs = sc.n_base
        approx = np.empty(nbs + len(sc.delta), dtype=np.float32)
        a = approx[:nbs]
        if isinstance(base, slice):
            np.matmul(self._X[base], q, out=a)  # the one pass over the matrix (a view, no copy)
            sqn = self._sqn[base]
        else:
            for s in range(0, nbs, _CHUNK):  # gathered in chunks: bounded temporary memory
                np.matmul(self._X[base[s:s + _CHUNK]], q, out=a[s:s + _CHUNK])
            sqn = self._sqn[base]
        a *= -2.0
        a += sqn
        if sc.keep is not None:
            a[~sc.keep] = np.inf
        if self._bdead is not None:
            a[self._bdead[base]] = np.inf
        if len(sc.delta):
            dr = sc.delta - nb
            b = approx[nbs:]
            np.matmul(self._D[dr], q, out=b)
            b *= -2.0
            b += self._dsqn[dr]
            b[self._ddead[dr]] = np.inf
        return approx

    def _select(self, q: np.ndarray, approx: np.ndarray, sc: _Scope, k: int) -> list[Hit]:
        """Top-k of ``approx`` (ã = ‖x‖² − 2xᵀq), re-ranked exactly and certified against rounding."""
        q64 = q.astype(np.float64)
        nq = float(q64 @ q64)
        d = len(q)
        # |ã_i + ‖q‖² − ‖x_i − q‖²| ≤ E for every row (float32 dot product bound γ_d‖x‖‖q‖, plus roundings).
        E = 2.0 * (d + 8) * _U32 * (sc.maxnorm + math.sqrt(nq)) ** 2
        n = len(approx)
        masked = sc.keep is not None or self._ndead
        n_valid = int(np.count_nonzero(approx < np.inf)) if masked else n
        m = min(n_valid, k + _SLACK)
        if m < n:
            part = np.argpartition(approx, m)  # approx[part[m]] is ≤ every row left out
            cand = part[:m]
            outside_min = float(approx[part[m]])
        else:
            cand = np.arange(n)
            outside_min = math.inf
        cand = cand[np.isfinite(approx[cand])]  # drop masked rows
        dist = self._exact(q64, sc.to_global(cand))
        if len(cand) > k and outside_min < math.inf:
            kth = float(np.partition(dist, k - 1)[k - 1])
            if not outside_min + nq - E > kth:  # a row left out might be as near as the k-th: widen
                wide = np.flatnonzero(approx + nq <= kth + E)
                cand = np.union1d(cand, wide)
                dist = self._exact(q64, sc.to_global(cand))
        return self._hits(sc.to_global(cand), dist, k)

    def _hits(self, rows: np.ndarray, dist: np.ndarray, k: int) -> list[Hit]:
        names = [self._id_of(r) for r in rows.tolist()]
        order = sorted(zip(dist.tolist(), names, strict=True))[:k]
        return [Hit(i, dd) for dd, i in order]

    def _exact(self, q64: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.float64)
        for s in range(0, len(rows), _CHUNK):  # chunks: a widened set (many near-ties) stays bounded in memory
            diff = self._gather(rows[s:s + _CHUNK])  # (m, d) float64
            diff -= q64
            out[s:s + len(diff)] = np.einsum("ij,ij->i", diff, diff)
        return out  # (m,) float64


_EMPTY = np.zeros(0, dtype=np.int64)


def _grow(a: np.ndarray, cap: int, used: int) -> np.ndarray:
    out = np.zeros((cap, *a.shape[1:]), dtype=a.dtype)
    out[:used] = a[:used]
    return out


@dataclass
class _Scope:
    """The rows one search scores: ``base`` (a slice of the base, or sorted base rows), ``delta`` (global
    rows of the delta buffer), ``keep`` (mask over a slice, or ``None``) and ‖x‖ ≤ ``maxnorm`` for all."""

    base: slice | np.ndarray
    delta: np.ndarray
    keep: np.ndarray | None
    maxnorm: float

    @property
    def n_base(self) -> int:
        b = self.base
        return b.stop - b.start if isinstance(b, slice) else len(b)

    def to_global(self, idx: np.ndarray) -> np.ndarray:
        """Positions in the approx array -> global rows."""
        nbs = self.n_base
        inb = idx < nbs
        out = np.empty(len(idx), dtype=np.int64)
        b = self.base
        out[inb] = idx[inb] + b.start if isinstance(b, slice) else b[idx[inb]]
        out[~inb] = self.delta[idx[~inb] - nbs]
        return out
