"""Exact k-nearest-neighbour search over prototypes (Eq. 2: d_i = ‖p_T − p_i‖²₂) behind a small interface.

:class:`Index` is what the bank needs from a search backend; :class:`NumpyIndex` is the embedded default
(exact, in memory). An ANN backend (FAISS HNSW/IVF) or a remote one (Qdrant) implements the same five
methods and runs the same conformance suite (``tests/bank/test_index_conformance.py``).

How :class:`NumpyIndex` stays exact and fast (docs/design.md §5.1; targets in BENCHMARKS.md):

| step | what | cost |
|------|------|------|
| filter | rows are stored grouped by base model, so ``base_model=`` is a slice; tags are precomputed masks | O(1) / O(n) bools |
| score  | ã_i = ‖x_i‖² − 2 x_iᵀq in float32 (precomputed norms, one BLAS matrix-vector product) | O(n·d), memory-bound |
| select | argpartition of ã, the top m = k + 8 candidates | O(n) |
| re-rank| d_i = Σ_j (x_ij − q_j)² in float64 over the candidates, sorted by (d_i, id) | O(m·d) |
| certify| every row left out has ã_i + ‖q‖² − E > d_(k) with E a float32 rounding bound, else widen | O(1) usually |

So distances are exact float64 values of the stored float32 vectors, ties are broken by id, and the
result equals a brute-force float64 reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from adapterbank._validation import MAX_K, check_k
from adapterbank.errors import NonFiniteError, ShapeMismatchError, UnknownNameError

__all__ = ["Hit", "Index", "NumpyIndex", "WHERE_KEYS", "MAX_K"]

WHERE_KEYS = ("base_model", "tags")
_U32 = 2.0**-24  # unit roundoff of float32
_SLACK = 8  # candidates beyond k re-ranked exactly; the rounding certificate widens the set when needed
_GATHER_BELOW = 0.3  # a tag filter keeping fewer rows than this fraction gathers them instead of masking


@dataclass(frozen=True, order=True)
class Hit:
    """One search result: an adapter id and its squared L2 distance to the query (Eq. 2).

    Ordered by ``(distance, id)``, the order search results come in.

    >>> sorted([Hit("b", 1.0), Hit("a", 1.0), Hit("c", 0.5)])[0]
    Hit(id='c', distance=0.5)
    """

    distance: float
    id: str

    def __init__(self, id: str, distance: float) -> None:  # noqa: A002 - the public field name is `id`
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
    X = np.asarray(vectors)
    if X.ndim != 2 or X.shape[0] != n:
        raise ShapeMismatchError(f"Index vectors must have shape ({n}, d) to match {n} ids. Got {X.shape} instead.")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.isfinite(X).all():
        bad = int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
        raise NonFiniteError(f"Index vector at row {bad} contains NaN or Inf.")
    return X


def _norm_attrs(a: Mapping[str, Any]) -> dict[str, Any]:
    bm = a.get("base_model")
    tags = a.get("tags") or ()
    if isinstance(tags, str):
        tags = (tags,)
    return {"base_model": None if bm is None else str(bm), "tags": tuple(str(t) for t in tags)}


class NumpyIndex:
    """Exact squared-L2 k-NN in memory (float32 scoring, float64 re-ranking, certified by a rounding bound).

    >>> idx = NumpyIndex()
    >>> X = np.array([[0, 0], [1, 0], [0, 2], [1, 0]], dtype=np.float32)
    >>> idx.build(["a", "b", "c", "d"], X, [{"base_model": "m1"}, {"base_model": "m2"}, {}, {"base_model": "m2"}])
    >>> idx.search(np.array([1.0, 0.0]), k=3)
    [Hit(id='b', distance=0.0), Hit(id='d', distance=0.0), Hit(id='a', distance=1.0)]
    >>> idx.search(np.array([1.0, 0.0]), k=3, where={"base_model": "m1"})
    [Hit(id='a', distance=1.0)]
    """

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._X = np.zeros((0, 0), dtype=np.float32)  # (n, d), rows grouped by base model
        self._sqn = np.zeros(0, dtype=np.float32)  # (n,) ‖x_i‖² (rounded from float64)
        self._attrs: list[dict[str, Any]] = []
        self._groups: dict[str | None, tuple[int, int, float]] = {}  # base model -> (start, stop, max ‖x‖)
        self._tags: dict[str, np.ndarray] = {}  # tag -> (n,) bool
        self._maxnorm = 0.0
        self._dim: int | None = None
        self._pos: dict[str, int] = {}

    # -- content -----------------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        return self._dim

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id: object) -> bool:  # noqa: A002
        return id in self._pos

    @property
    def ids(self) -> list[str]:
        """Row ids in storage order (grouped by base model, then by insertion)."""
        return list(self._ids)

    def vector(self, id: str) -> np.ndarray:  # noqa: A002
        """A copy of the stored vector of ``id``."""
        try:
            return self._X[self._pos[id]].copy()
        except KeyError:
            raise UnknownNameError(f"No row with id {id!r} in the index ({len(self)} rows).") from None

    def build(self, ids: Sequence[str], vectors: np.ndarray, attrs: Sequence[Mapping[str, Any]] | None = None) -> None:
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ShapeMismatchError(f"Index ids must be unique. Got duplicates {dup}.")
        if ids:
            X = _as_matrix(vectors, len(ids))
        else:
            V = np.asarray(vectors)
            X = np.zeros((0, V.shape[1] if V.ndim == 2 else (self._dim or 0)), dtype=np.float32)
        at = [_norm_attrs(a) for a in attrs] if attrs is not None else [_norm_attrs({}) for _ in ids]
        if len(at) != len(ids):
            raise ShapeMismatchError(f"Index got {len(ids)} ids but {len(at)} attribute dicts.")
        # Group rows by base model (stable: insertion order inside a group) so a base-model filter is a slice.
        keys = [a["base_model"] for a in at]
        order_of: dict[str | None, int] = {}
        for b in keys:
            order_of.setdefault(b, len(order_of))
        perm = np.argsort(np.fromiter((order_of[b] for b in keys), dtype=np.int64, count=len(keys)), kind="stable")
        if len(perm) and not np.array_equal(perm, np.arange(len(perm))):
            X = X[perm]  # copies only when the input was not grouped already
            ids = [ids[i] for i in perm]
            at = [at[i] for i in perm]
        self._ids, self._attrs, self._X = ids, at, X
        self._dim = int(X.shape[1]) if X.shape[1] else None
        self._pos = {i: r for r, i in enumerate(ids)}
        sqn64 = np.einsum("ij,ij->i", X, X, dtype=np.float64) if len(ids) else np.zeros(0)
        self._sqn = sqn64.astype(np.float32)
        self._maxnorm = float(np.sqrt(sqn64.max())) if len(ids) else 0.0
        self._groups = {}
        start = 0
        for b in order_of:
            stop = start + keys.count(b)
            self._groups[b] = (start, stop, float(np.sqrt(sqn64[start:stop].max())))
            start = stop
        tags: dict[str, np.ndarray] = {}
        for r, a in enumerate(at):
            for t in a["tags"]:
                if t not in tags:
                    tags[t] = np.zeros(len(ids), dtype=bool)
                tags[t][r] = True
        self._tags = tags

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, attrs: Sequence[Mapping[str, Any]] | None = None) -> None:
        ids = [str(i) for i in ids]
        X = _as_matrix(vectors, len(ids))
        at = list(attrs) if attrs is not None else [{} for _ in ids]
        if self._dim is not None and len(self) and X.shape[1] != self._dim:
            raise ShapeMismatchError(f"Index holds vectors of dim {self._dim}; got vectors of dim {X.shape[1]}.")
        new = set(ids)
        keep = [r for r, i in enumerate(self._ids) if i not in new]
        self.build(
            [self._ids[r] for r in keep] + ids,
            np.concatenate([self._X[keep], X]) if len(self) else X,
            [self._attrs[r] for r in keep] + at,
        )

    def delete(self, ids: Sequence[str]) -> None:
        gone = set(ids)
        keep = [r for r, i in enumerate(self._ids) if i not in gone]
        if len(keep) != len(self._ids):
            self.build([self._ids[r] for r in keep], self._X[keep], [self._attrs[r] for r in keep])

    # -- search ------------------------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int, *, where: Mapping[str, Any] | None = None) -> list[Hit]:
        k = check_k(k, "search")
        q = _check_query(query, self._dim)
        bm, tags = _check_where(where)
        if not self._ids:
            return []
        if where and "base_model" in where and bm is None:
            bm_filter = False  # {"base_model": None} means no filter
        else:
            bm_filter = bm is not None
        if bm_filter:
            if bm not in self._groups:
                return []
            start, stop, maxnorm = self._groups[bm]
        else:
            start, stop, maxnorm = 0, len(self._ids), self._maxnorm
        X = self._X[start:stop]  # a view, no copy
        sqn = self._sqn[start:stop]
        rows: np.ndarray | None = None  # when set, the scored rows are X[rows]
        mask: np.ndarray | None = None
        if tags:
            if any(t not in self._tags for t in tags):
                return []
            mask = self._tags[tags[0]][start:stop].copy()
            for t in tags[1:]:
                mask &= self._tags[t][start:stop]
            n_ok = int(np.count_nonzero(mask))
            if n_ok == 0:
                return []
            if n_ok < _GATHER_BELOW * len(mask):
                rows = np.flatnonzero(mask)
                mask = None
        if rows is not None:
            approx = X[rows] @ q  # (n_ok,)
            approx *= -2.0
            approx += sqn[rows]
        else:
            approx = X @ q  # (n,)  float32, the one pass over the matrix
            approx *= -2.0
            approx += sqn
            if mask is not None:
                approx[~mask] = np.inf
        n_valid = len(approx) if mask is None else int(np.count_nonzero(mask))
        return self._select(q, approx, rows, start, k, n_valid, maxnorm)

    def _select(self, q: np.ndarray, approx: np.ndarray, rows: np.ndarray | None, start: int, k: int,
                n_valid: int, maxnorm: float) -> list[Hit]:
        """Top-k of ``approx`` (ã = ‖x‖² − 2xᵀq), re-ranked exactly and certified against rounding."""
        q64 = q.astype(np.float64)
        nq = float(q64 @ q64)
        d = len(q)
        # |ã_i + ‖q‖² − ‖x_i − q‖²| ≤ E for every row (float32 dot product bound γ_d‖x‖‖q‖, plus roundings).
        E = 2.0 * (d + 8) * _U32 * (maxnorm + math.sqrt(nq)) ** 2
        n = len(approx)
        m = min(n_valid, k + _SLACK)
        if m < n:
            part = np.argpartition(approx, m)  # approx[part[m]] is ≤ every row left out
            cand = part[:m]
            outside_min = float(approx[part[m]])
        else:
            cand = np.arange(n)
            outside_min = math.inf
        cand = cand[np.isfinite(approx[cand])]  # drop masked rows
        dist = self._exact(q64, cand, rows, start)
        if len(cand) > k and outside_min < math.inf:
            kth = float(np.partition(dist, k - 1)[k - 1])
            if not outside_min + nq - E > kth:  # a row left out might be as near as the k-th: widen
                wide = np.flatnonzero(approx + nq <= kth + E)
                cand = np.union1d(cand, wide)
                dist = self._exact(q64, cand, rows, start)
        ids = self._ids
        pos = (rows[cand] if rows is not None else cand) + start
        names = [ids[r] for r in pos.tolist()]
        order = sorted(zip(dist.tolist(), names, strict=True))[:k]
        return [Hit(i, dd) for dd, i in order]

    def _exact(self, q64: np.ndarray, cand: np.ndarray, rows: np.ndarray | None, start: int) -> np.ndarray:
        r = (rows[cand] if rows is not None else cand) + start
        diff = self._X[r].astype(np.float64)  # (m, d)
        diff -= q64
        return np.einsum("ij,ij->i", diff, diff)  # (m,) float64
