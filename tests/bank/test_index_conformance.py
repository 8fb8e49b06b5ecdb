"""Conformance suite for every :class:`adapterbank.bank.Index` backend (docs/design.md §5.1).

A new backend (FAISS, Qdrant, ...) plugs in by adding a factory to ``BACKENDS``. Exact backends must
equal the brute-force float64 reference exactly (ids, order, ties by id); an ANN backend would set
``exact=False`` and be held to a recall threshold instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from adapterbank.bank import Hit, Index, NumpyIndex
from adapterbank.bank.ann import AnnIndex, ann_available
from adapterbank.errors import NonFiniteError, ParameterError, ShapeMismatchError, UnknownNameError


@dataclass(frozen=True)
class Backend:
    name: str
    make: Callable[[], Any]
    exact: bool = True


def _small_numpy() -> NumpyIndex:
    """Compacts after a handful of changes, so the suite exercises delta rows, tombstones and compaction."""
    idx = NumpyIndex()
    idx.COMPACT_MIN = 16
    return idx


BACKENDS = [Backend("numpy", NumpyIndex), Backend("numpy-compacting", _small_numpy)]
if ann_available():
    # exact_below=0: the graph proposes candidates even on these small sets (scopes under 2c rows are exact).
    BACKENDS.append(Backend("ann", lambda: AnnIndex(exact_below=0), exact=False))


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param


def reference(X: np.ndarray, ids: list[str], q: np.ndarray, k: int, keep: np.ndarray | None = None) -> list[tuple[str, float]]:
    """Brute force in float64 over all rows; ties by id."""
    d = np.sum((X.astype(np.float64) - q.astype(np.float32).astype(np.float64)) ** 2, axis=1)
    rows = np.arange(len(ids)) if keep is None else np.flatnonzero(keep)
    return sorted(((ids[r], float(d[r])) for r in rows), key=lambda t: (t[1], t[0]))[:k]


def check_equal(hits: list[Hit], ref: list[tuple[str, float]], exact: bool) -> None:
    if exact:
        assert [h.id for h in hits] == [i for i, _ in ref]
        np.testing.assert_allclose([h.distance for h in hits], [d for _, d in ref], rtol=1e-12, atol=1e-12)
    else:  # approximate: which rows may differ a little, but every distance is exact and the order is (d, id)
        assert len(hits) == len(ref)
        assert [(h.distance, h.id) for h in hits] == sorted((h.distance, h.id) for h in hits)
        want = dict(ref)
        for h in hits:  # distances are re-ranked exactly
            if h.id in want:
                np.testing.assert_allclose(h.distance, want[h.id], rtol=1e-12, atol=1e-12)
        recall = len({h.id for h in hits} & set(want)) / len(ref) if ref else 1.0
        assert recall >= 0.8, f"recall {recall:.2f} on one query (random data: the hard case for a graph)"


def make_data(n: int, d: int, n_models: int, seed: int) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    ids = [f"ad{i:05d}" for i in rng.permutation(n)]  # ids not in row order
    models = rng.integers(0, n_models, n)
    attrs = [{"base_model": f"m{m}", "tags": [f"t{i % 3}"] + (["rare"] if i % 50 == 0 else [])}
             for i, m in enumerate(models)]
    return ids, X, attrs


def test_backend_implements_protocol(backend: Backend) -> None:
    assert isinstance(backend.make(), Index)


@pytest.mark.parametrize("k", [1, 7, 50])
def test_equals_bruteforce_reference(backend: Backend, k: int) -> None:
    ids, X, attrs = make_data(2000, 48, 5, seed=k)
    idx = backend.make()
    idx.build(ids, X, attrs)
    assert len(idx) == 2000
    rng = np.random.default_rng(100 + k)
    for _ in range(5):
        q = rng.standard_normal(48).astype(np.float32)
        check_equal(idx.search(q, k), reference(X, ids, q, k), backend.exact)
    # a query equal to a stored row: that row first at distance exactly 0
    hits = idx.search(X[123], k)
    assert hits[0].id == ids[123] and hits[0].distance == 0.0


def test_recall_at_10_on_clustered_data(backend: Backend) -> None:
    """Prototypes cluster (tasks, domains): there an ANN backend must reach recall@10 ≥ 0.99, exact ones 1."""
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((50, 32)).astype(np.float32)
    X = centres[rng.integers(0, 50, 6000)] + 0.5 * rng.standard_normal((6000, 32)).astype(np.float32)
    ids = [f"c{i:05d}" for i in range(6000)]
    idx = backend.make()
    idx.build(ids, X, [{} for _ in ids])
    found = total = 0
    for r in rng.choice(6000, 60, replace=False):
        q = X[r] + 0.5 * rng.standard_normal(32).astype(np.float32)
        ref = reference(X, ids, q, 10)
        hits = idx.search(q, 10)
        found += len({h.id for h in hits} & {i for i, _ in ref})
        total += 10
    assert found / total >= (1.0 if backend.exact else 0.99)


def test_deterministic_ties_by_id(backend: Backend) -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((5, 16)).astype(np.float32)
    X = np.repeat(base, 8, axis=0)  # 8 exact duplicates of each of 5 vectors
    ids = [f"id{i:03d}" for i in rng.permutation(40)]
    idx = backend.make()
    idx.build(ids, X, [{} for _ in ids])
    for k in (3, 8, 11):
        hits = idx.search(base[2], k)
        ref = reference(X, ids, base[2], k)
        assert [h.id for h in hits] == [i for i, _ in ref]
        assert [h.id for h in hits[:min(k, 8)]] == sorted(h.id for h in hits[:min(k, 8)])  # tie group sorted by id
    # same answer when the rows are given in another order
    perm = rng.permutation(40)
    idx2 = backend.make()
    idx2.build([ids[p] for p in perm], X[perm], [{} for _ in ids])
    assert idx2.search(base[2], 11) == idx.search(base[2], 11)


def test_near_ties_beyond_float32_resolution(backend: Backend) -> None:
    """Vectors whose distances differ below float32 rounding of ‖x‖² − 2xᵀq must still come out exactly."""
    rng = np.random.default_rng(2)
    centre = (rng.standard_normal(64) * 100).astype(np.float32)
    X = centre + rng.standard_normal((3000, 64)).astype(np.float32) * 1e-3
    ids = [f"r{i}" for i in range(3000)]
    idx = backend.make()
    idx.build(ids, X, [{} for _ in ids])
    q = centre + rng.standard_normal(64).astype(np.float32) * 1e-3
    check_equal(idx.search(q, 10), reference(X, ids, q, 10), backend.exact)


@pytest.mark.parametrize("selectivity", [0.0, 0.001, 0.1, 1.0])
def test_base_model_filter_never_leaks(backend: Backend, selectivity: float) -> None:
    n = 5000
    rng = np.random.default_rng(3)
    X = rng.standard_normal((n, 32)).astype(np.float32)
    ids = [f"a{i}" for i in range(n)]
    n_target = int(round(selectivity * n))
    target_rows = set(rng.choice(n, n_target, replace=False).tolist())
    attrs = [{"base_model": "target" if i in target_rows else f"other{i % 7}"} for i in range(n)]
    idx = backend.make()
    idx.build(ids, X, attrs)
    keep = np.array([i in target_rows for i in range(n)])
    for k in (1, 10, 100):
        q = rng.standard_normal(32).astype(np.float32)
        hits = idx.search(q, k, where={"base_model": "target"})
        assert all(attrs[int(h.id[1:])]["base_model"] == "target" for h in hits)
        assert len(hits) == min(k, n_target)
        check_equal(hits, reference(X, ids, q, k, keep), backend.exact)


def test_filter_by_tags_and_unknown_values(backend: Backend) -> None:
    ids, X, attrs = make_data(3000, 24, 4, seed=4)
    idx = backend.make()
    idx.build(ids, X, attrs)
    q = np.random.default_rng(5).standard_normal(24).astype(np.float32)
    for where in ({"tags": ["t1"]}, {"tags": ["rare"]}, {"tags": ["t0", "rare"]}, {"base_model": "m2", "tags": ["t2"]}):
        keep = np.array([all(t in a["tags"] for t in where["tags"])
                         and a["base_model"] == where.get("base_model", a["base_model"]) for a in attrs])
        hits = idx.search(q, 20, where=where)
        check_equal(hits, reference(X, ids, q, 20, keep), backend.exact)
    assert idx.search(q, 5, where={"tags": ["no-such-tag"]}) == []
    assert idx.search(q, 5, where={"base_model": "no-such-model"}) == []
    assert idx.search(q, 5, where={"base_model": "x' OR 1=1 --"}) == []
    assert len(idx.search(q, 5, where={"base_model": None})) == 5  # None: no filter


def test_rows_without_base_model_never_match_a_filter(backend: Backend) -> None:
    X = np.eye(4, dtype=np.float32)
    idx = backend.make()
    idx.build(["a", "b", "c", "d"], X, [{"base_model": None}, {}, {"base_model": "m"}, {"base_model": "m"}])
    assert [h.id for h in idx.search(X[0], 10, where={"base_model": "m"})] == ["c", "d"]


def test_delete_then_search(backend: Backend) -> None:
    ids, X, attrs = make_data(500, 16, 3, seed=6)
    idx = backend.make()
    idx.build(ids, X, attrs)
    q = X[10].copy()
    assert idx.search(q, 1)[0].id == ids[10]
    gone = [ids[10]] + ids[100:200]
    idx.delete(gone + ["never-existed"])
    assert len(idx) == 399
    keep = np.array([i not in set(gone) for i in ids])
    hits = idx.search(q, 50)
    assert not {h.id for h in hits} & set(gone)
    check_equal(hits, reference(X, ids, q, 50, keep), backend.exact)
    idx.delete(ids)  # everything
    assert len(idx) == 0 and idx.search(q, 3) == []


def test_update_vector_then_search(backend: Backend) -> None:
    ids, X, attrs = make_data(500, 16, 3, seed=7)
    idx = backend.make()
    idx.build(ids, X, attrs)
    q = np.full(16, 5.0, dtype=np.float32)
    new = X.copy()
    new[42] = q + 0.01
    idx.upsert([ids[42]], new[42:43], [{"base_model": "moved", "tags": []}])
    assert len(idx) == 500
    hits = idx.search(q, 5)
    assert hits[0].id == ids[42]
    check_equal(hits, reference(new, ids, q, 5), backend.exact)
    assert idx.search(q, 5, where={"base_model": "moved"})[0].id == ids[42]
    assert ids[42] not in {h.id for h in idx.search(q, 500, where={"base_model": attrs[42]["base_model"]})}
    idx.upsert(["brand-new"], (q - 0.001)[None, :], [{"base_model": "moved"}])
    assert [h.id for h in idx.search(q, 2)] == ["brand-new", ids[42]]


def test_k_larger_than_n(backend: Backend) -> None:
    ids, X, attrs = make_data(12, 8, 2, seed=8)
    idx = backend.make()
    idx.build(ids, X, attrs)
    q = np.zeros(8, dtype=np.float32)
    hits = idx.search(q, 100)
    assert len(hits) == 12
    check_equal(hits, reference(X, ids, q, 100), backend.exact)
    m0 = sum(a["base_model"] == "m0" for a in attrs)
    assert len(idx.search(q, 100, where={"base_model": "m0"})) == m0


def test_empty_index(backend: Backend) -> None:
    idx = backend.make()
    idx.build([], np.zeros((0, 8), np.float32), [])
    assert len(idx) == 0 and idx.search(np.zeros(8), 5) == []


def test_bad_queries_are_refused(backend: Backend) -> None:
    ids, X, attrs = make_data(20, 8, 2, seed=9)
    idx = backend.make()
    idx.build(ids, X, attrs)
    with pytest.raises(ShapeMismatchError, match="dim 7"):
        idx.search(np.zeros(7), 3)
    with pytest.raises(NonFiniteError):
        idx.search(np.array([np.nan] + [0.0] * 7), 3)
    for k in (0, -1, 10_001, 2.5, True):
        with pytest.raises(ParameterError, match="'k'"):
            idx.search(np.zeros(8), k)  # type: ignore[arg-type]
    with pytest.raises(UnknownNameError, match="base_model"):
        idx.search(np.zeros(8), 3, where={"basemodel": "m0"})


def test_bad_builds_are_refused(backend: Backend) -> None:
    idx = backend.make()
    with pytest.raises(ShapeMismatchError, match="unique"):
        idx.build(["a", "a"], np.zeros((2, 3), np.float32), [{}, {}])
    with pytest.raises(NonFiniteError, match="row 1"):
        idx.build(["a", "b"], np.array([[0, 0], [np.inf, 0]], np.float32), [{}, {}])
    with pytest.raises(ShapeMismatchError):
        idx.build(["a", "b"], np.zeros((3, 2), np.float32), [{}, {}])
