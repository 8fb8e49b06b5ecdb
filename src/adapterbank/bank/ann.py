"""Approximate k-NN for large spaces: an HNSW graph (usearch) proposes candidates, exact float64 re-ranks them.

:class:`AnnIndex` is a :class:`~adapterbank.bank.index.NumpyIndex` (same storage: a base matrix used in
place, a delta buffer, tombstones, base-model groups and tag rows) with an HNSW graph over the base rows:

| step | what |
|------|------|
| propose | the graph returns c = max(4k, 64) / f base rows near q (f: fraction of the live base rows the filter keeps) |
| filter  | tombstoned rows and rows outside ``where`` are dropped; too few left: c ×4 and ask again |
| delta   | rows added since the graph was built (few, see ``COMPACT_FRAC``) are all scored |
| re-rank | d_i = Σ_j (x_ij − q_j)² in float64 from the stored float32 vectors, sorted by (d_i, id) |

So every returned distance is exact and ties are broken by id, as in :class:`NumpyIndex`; only *which* rows
come back is approximate (recall@10 in ``bench/bench_search.py``). A selective filter (fewer than
``1/MAX_OVERSAMPLE`` of the rows, or fewer than ``exact_below`` rows in all) is answered by the exact path
over the filtered rows instead. In memory the graph points into the base matrix (no copy of the vectors:
links only, ~10 % of a d=384 float32 matrix); :mod:`adapterbank.bank.persisted` saves it to one file that a
new process memory-maps (usearch ``view``: no load time).

Why usearch rather than FAISS HNSW (measured on this project's bench machine, see BENCHMARKS.md): the saved
index is mapped, not read (cold start in milliseconds), the graph can reference our matrix instead of copying
it, and the wheels are small (usearch 2.3 MB + numkong 10.6 MB against faiss-cpu 18.8 MB).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapterbank._validation import check_int, check_k
from adapterbank.bank.index import Hit, NumpyIndex, _check_query, _Scope
from adapterbank.errors import AdapterbankError

__all__ = ["ANN_MIN_ROWS", "AnnIndex", "ann_available"]

log = logging.getLogger(__name__)

#: ``kind="auto"`` (see :func:`adapterbank.bank.persisted.load_index`) uses :class:`AnnIndex` from this many
#: rows on: below it exact search takes ≲ 5 ms at d=768 on one core and needs no graph build.
ANN_MIN_ROWS = 100_000

def auto_ef(n: int) -> int:
    """The HNSW search breadth for a graph of ``n`` rows: 64 up to 150 000 rows, doubled per doubling of n
    beyond, at most 1024. Calibrated with ``bench/bench_search.py`` (clustered d=384 data): recall@10 of the
    re-ranked top-64 was 0.999 at 1e5 rows with ef=64 and 0.994 at 1e6 with ef=512 (0.973 with 256).

    >>> [auto_ef(n) for n in (10_000, 150_000, 300_000, 1_000_000, 10_000_000)]
    [64, 64, 128, 512, 1024]
    """
    return int(min(1024, 64 * 2 ** max(0, math.ceil(math.log2(max(n, 1) / 150_000)))))


def ann_available() -> bool:
    """Whether the optional ANN dependency (usearch) is installed.

    >>> isinstance(ann_available(), bool)
    True
    """
    try:
        import usearch.index  # noqa: F401
    except ImportError:
        return False
    return True


def _usearch() -> Any:
    try:
        import usearch.index as ui
    except ImportError as e:
        raise AdapterbankError(
            "Approximate search (kind='ann') needs usearch: pip install 'adapterbank[ann]'. "
            "kind='exact' (or 'auto', which falls back to exact) works without it."
        ) from e
    return ui


class AnnIndex(NumpyIndex):
    """Approximate squared-L2 k-NN: HNSW candidates (usearch), exact float64 re-ranking, ties by id.

    ``connectivity`` (HNSW M), ``expansion_add`` (ef at build) and ``expansion_search`` (ef at query) are
    usearch's parameters; ``expansion_search=None`` picks ef from the size of the graph (:func:`auto_ef`); ``exact_below``: spaces (or filtered scopes) with fewer live rows are searched
    exactly, without the graph.

    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((500, 8)).astype(np.float32)
    >>> idx = AnnIndex(exact_below=0)
    >>> idx.build([f"a{i}" for i in range(500)], X, [{} for _ in range(500)])
    >>> idx.search(X[7], k=1)
    [Hit(id='a7', distance=0.0)]
    """

    #: Without a filter the graph proposes c = max(OVERSAMPLE · k, MIN_CANDIDATES) rows.
    OVERSAMPLE = 4
    MIN_CANDIDATES = 64
    #: A filter keeping less than 1/MAX_OVERSAMPLE of the live rows goes to the exact path.
    MAX_OVERSAMPLE = 16

    def __init__(self, *, connectivity: int = 16, expansion_add: int = 128, expansion_search: int | None = None,
                 exact_below: int = 20_000, threads: int = 0) -> None:
        _usearch()
        self.connectivity = check_int(connectivity, "connectivity", "AnnIndex", low=2, high=1024)
        self.expansion_add = check_int(expansion_add, "expansion_add", "AnnIndex", low=1, high=100_000)
        self.expansion_search = None if expansion_search is None else check_int(
            expansion_search, "expansion_search", "AnnIndex", low=1, high=100_000)
        self.exact_below = check_int(exact_below, "exact_below", "AnnIndex", low=0)
        self.threads = check_int(threads, "threads", "AnnIndex", low=0, high=4096)
        self._graph: Any = None
        super().__init__()

    # -- graph -------------------------------------------------------------------------------------
    def _on_new_base(self) -> None:
        self._graph = None  # built on demand (build/compact call ensure_graph; a loader may attach a view)

    def build(self, ids: Sequence[str], vectors: np.ndarray, attrs: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().build(ids, vectors, attrs)
        self.ensure_graph()

    def compact(self) -> None:
        had = self.n_pending
        super().compact()
        if had:
            self.ensure_graph()

    def ensure_graph(self) -> Any:
        """The HNSW graph over the base rows (keys = base row numbers), built now if missing; ``None`` when
        the base is smaller than ``exact_below`` (searched exactly).

        The graph references the base matrix (usearch ``copy=False``) instead of holding a copy of the
        vectors: the base is immutable, and lives as long as this index.
        """
        if self._graph is not None or self._nb == 0 or self._nb < self.exact_below:
            return self._graph
        ui = _usearch()
        g = ui.Index(ndim=self._dim or 0, metric="l2sq", dtype="f32", connectivity=self.connectivity,
                     expansion_add=self.expansion_add, expansion_search=self._ef())
        t0 = time.perf_counter()
        # one thread below 50 000 rows: a multi-threaded insert order makes the graph (and its recall) vary run to run
        threads = self.threads or (1 if self._nb < 50_000 else (os.cpu_count() or 1))
        X = self._X
        if not X.flags.c_contiguous or X.dtype != np.float32:  # pragma: no cover - _set_base guarantees both
            raise AdapterbankError("AnnIndex needs a C-ordered float32 base matrix.")
        g.add(np.arange(self._nb, dtype=np.uint64), X, copy=False, threads=threads)
        log.info("built HNSW graph over %d rows (d=%s) in %.1f s", self._nb, self._dim, time.perf_counter() - t0)
        self._graph = g
        return g

    def save_graph(self, path: Path) -> bool:
        """Write the graph (links and a copy of the vectors: usearch's format) to ``path``; ``False`` if there
        is none (a base below ``exact_below``). :mod:`~adapterbank.bank.persisted` writes temp names and renames."""
        g = self.ensure_graph()
        if g is None:
            return False
        g.save(str(path))
        return True

    def view_graph(self, path: Path) -> None:
        """Attach a saved graph memory-mapped (read-only; rows added later go to the delta buffer)."""
        ui = _usearch()
        g = ui.Index.restore(str(path), view=True)
        if g is None or len(g) != self._nb or g.ndim != (self._dim or 0):
            raise AdapterbankError(f"The HNSW graph {path} does not match its index ({self._nb} rows, d={self._dim}).")
        g.expansion_search = self._ef()
        self._graph = g

    def _ef(self) -> int:
        return self.expansion_search if self.expansion_search is not None else auto_ef(self._nb)

    # -- search ------------------------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int, *, where: Mapping[str, Any] | None = None) -> list[Hit]:
        k = check_k(k, "search")
        q = _check_query(query, self._dim)
        sc = self._scope(where)
        if sc is None or not len(self):
            return []
        live_base = self._nb - (0 if self._bdead is None else int(self._bdead_count()))
        n_scope = sc.n_base if sc.keep is None else int(np.count_nonzero(sc.keep))
        frac = n_scope / max(live_base, 1)
        c = max(self.OVERSAMPLE * k, self.MIN_CANDIDATES)
        if (n_scope < max(self.exact_below, 2 * c) or frac * self.MAX_OVERSAMPLE < 1
                or self.ensure_graph() is None):
            return self._select(q, self._approx(q, sc), sc, k)
        c = math.ceil(c / frac)
        while True:
            found = self._graph.search(q, min(c, self._nb), threads=1)
            rows = np.asarray(found.keys, dtype=np.int64)[:len(found)]
            rows = rows[self._in_scope(rows, sc)]
            if len(rows) >= k or c >= self._nb:
                break
            c *= 4
            if c * self.MAX_OVERSAMPLE > self._nb:  # asking for most of the graph: the exact pass is cheaper
                return self._select(q, self._approx(q, sc), sc, k)
        delta = sc.delta[~self._ddead[sc.delta - self._nb]] if len(sc.delta) else sc.delta
        cand = np.concatenate([rows, delta])
        return self._hits(cand, self._exact(q.astype(np.float64), cand), k)

    def _bdead_count(self) -> int:
        return int(np.count_nonzero(self._bdead)) if self._bdead is not None else 0

    def _in_scope(self, rows: np.ndarray, sc: _Scope) -> np.ndarray:
        """(m,) bool: base ``rows`` that are live and kept by the scope's filter."""
        ok = np.ones(len(rows), dtype=bool) if self._bdead is None else ~self._bdead[rows]
        b = sc.base
        if isinstance(b, slice):
            ok &= (rows >= b.start) & (rows < b.stop)
            if sc.keep is not None:
                ok[ok] = sc.keep[rows[ok] - b.start]
        else:
            i = np.searchsorted(b, rows)
            ok &= (i < len(b)) & (b[np.minimum(i, len(b) - 1)] == rows) if len(b) else False
        return ok
