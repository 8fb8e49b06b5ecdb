"""AnnIndex beyond the conformance suite: the graph path at a size where it is used, filters, updates."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

from adapterbank.bank import NumpyIndex
from adapterbank.bank.ann import AnnIndex, ann_available
from adapterbank.errors import AdapterbankError

pytestmark = pytest.mark.skipif(not ann_available(), reason="usearch (the 'ann' extra) is not installed")

N, D = 24_000, 24


@pytest.fixture(scope="module")
def data() -> tuple[list[str], np.ndarray, list[dict[str, Any]], np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((60, D)).astype(np.float32) * 2
    X = centres[rng.integers(0, 60, N)] + 0.4 * rng.standard_normal((N, D)).astype(np.float32)
    ids = [f"r{i:05d}" for i in rng.permutation(N)]
    attrs = [{"base_model": "big" if i % 2 else f"small{i % 40}", "tags": ["t"] if i % 4 == 0 else []}
             for i in range(N)]
    Q = X[rng.choice(N, 40, replace=False)] + 0.4 * rng.standard_normal((40, D)).astype(np.float32)
    return ids, X, attrs, Q


@pytest.fixture(scope="module")
def pair(data: Any) -> tuple[AnnIndex, NumpyIndex]:
    ids, X, attrs, _ = data
    ann, exact = AnnIndex(), NumpyIndex()
    ann.build(ids, X, attrs)
    exact.build(ids, X, attrs)
    return ann, exact


def recall(ann: Any, exact: Any, Q: np.ndarray, k: int = 10, where: dict[str, Any] | None = None) -> float:
    found = total = 0
    for q in Q:
        ref = exact.search(q, k, where=where)
        hits = ann.search(q, k, where=where)
        assert len(hits) == len(ref)
        want = {h.id: h.distance for h in ref}
        assert all(h.distance == want[h.id] for h in hits if h.id in want)  # distances re-ranked exactly
        found += len({h.id for h in hits} & set(want))
        total += len(ref)
    return found / total


def test_graph_is_used_and_recall_is_high(pair: Any, data: Any) -> None:
    ann, exact = pair
    assert ann.ensure_graph() is not None and len(ann.ensure_graph()) == N
    assert recall(ann, exact, data[3]) >= 0.99
    assert recall(ann, exact, data[3], k=50) >= 0.99


def test_filters_post_filter_or_go_exact(pair: Any, data: Any) -> None:
    ann, exact = pair
    Q = data[3]
    assert recall(ann, exact, Q, where={"base_model": "big"}) >= 0.99  # half the rows: graph + post-filter
    assert recall(ann, exact, Q, where={"tags": ["t"]}) >= 0.99  # a quarter: oversampled 4×
    for q in Q[:5]:  # 1/80 of the rows: answered by the exact path, equal to the reference
        assert ann.search(q, 10, where={"base_model": "small3"}) == exact.search(q, 10, where={"base_model": "small3"})
        hits = ann.search(q, 10, where={"base_model": "big", "tags": ["t"]})
        assert hits == exact.search(q, 10, where={"base_model": "big", "tags": ["t"]})


def test_updates_without_rebuilding_the_graph(data: Any) -> None:
    n = 8000
    ids, X, attrs, Q = data[0][:n], data[1][:n], data[2][:n], data[3]
    ann, exact = AnnIndex(exact_below=0), NumpyIndex()
    ann.build(ids, X.copy(), attrs)
    exact.build(ids, X.copy(), attrs)
    graph = ann.ensure_graph()
    rng = np.random.default_rng(1)
    gone = [ids[i] for i in rng.choice(n, 300, replace=False)]
    moved = [i for i in ids[:200] if i not in set(gone)]
    vecs = Q[rng.integers(0, len(Q), len(moved))] + 0.01 * rng.standard_normal((len(moved), D)).astype(np.float32)
    for idx in (ann, exact):
        idx.delete(gone)
        idx.upsert(moved, vecs, [{"base_model": "big", "tags": []} for _ in moved])
        idx.upsert(["fresh"], Q[:1] + 1e-3, [{"base_model": "new"}])
    assert ann.ensure_graph() is graph and ann.n_pending > 0  # rows went to the delta buffer, graph kept
    assert recall(ann, exact, Q) >= 0.99
    assert not {h.id for q in Q for h in ann.search(q, 20)} & set(gone)
    assert ann.search(Q[0], 1, where={"base_model": "new"})[0].id == "fresh"
    ann.compact()  # folds the delta in and rebuilds the graph
    assert ann.n_pending == 0 and ann.ensure_graph() is not graph and len(ann.ensure_graph()) == len(exact)
    assert recall(ann, exact, Q) >= 0.99


def test_large_common_offset() -> None:
    rng = np.random.default_rng(2)
    X = (1000.0 + rng.standard_normal((3000, 8)) * 1e-2).astype(np.float32)  # differences far below the norms
    ids = [f"o{i}" for i in range(3000)]
    ann, exact = AnnIndex(exact_below=0), NumpyIndex()
    ann.build(ids, X, [{} for _ in ids])
    exact.build(ids, X, [{} for _ in ids])
    Q = X[:20] + (rng.standard_normal((20, 8)) * 1e-2).astype(np.float32)
    assert recall(ann, exact, Q) >= 0.99


def test_missing_usearch_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "usearch.index", None)  # what an environment without the extra looks like
    assert not ann_available()
    with pytest.raises(AdapterbankError, match=r"pip install 'adapterbank\[ann\]'"):
        AnnIndex()
