"""The batched Eq. 5 solver of bench/bench_solvers.py (bench/_sparse_batch.py): every row equals the library's
single-target ``solve_sparse``, and bad inputs raise the library's errors."""

from __future__ import annotations

import doctest
from collections.abc import Callable
from types import ModuleType

import numpy as np
import pytest

from adapterbank.compose.solvers import solve_sparse
from adapterbank.errors import NonFiniteError, ShapeMismatchError


@pytest.fixture(scope="module")
def sb(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("_sparse_batch")


@pytest.mark.parametrize("k,d", [(3, 2), (10, 768), (30, 16)])
def test_batch_equals_single(sb: ModuleType, k: int, d: int) -> None:
    rng = np.random.default_rng(k + d)
    P = rng.normal(size=(k, d))
    P[1] = P[0]  # a duplicate: the batch must also return the min-norm optimum
    T = rng.normal(size=(9, d)) * rng.uniform(0.3, 3, size=(9, 1))
    T[0] = P[2]
    lam = rng.uniform(0, 1, size=9) * np.median(((P[None] - T[:, None]) ** 2).sum(-1))
    lam[1] = 0.0
    W = sb.solve_sparse_batch(P, T, lam)
    for i in range(9):
        np.testing.assert_allclose(W[i], solve_sparse(P, T[i], lam[i]).weights, atol=1e-8)
    W1 = sb.solve_sparse_batch(P, T, 0.5)  # scalar λ
    np.testing.assert_allclose(W1[3], solve_sparse(P, T[3], 0.5).weights, atol=1e-8)
    assert sb.solve_sparse_batch(P, T[:0], 0.5).shape == (0, k)


def test_batch_rejects_bad_inputs(sb: ModuleType) -> None:
    rng = np.random.default_rng(0)
    P, t = rng.normal(size=(3, 4)) + 3.0, rng.normal(size=4) + 3.0
    t2 = t.copy()
    t2[0] = np.nan
    with pytest.raises(NonFiniteError, match="rows \\[1\\]"):
        sb.solve_sparse_batch(P, np.stack([t, t2]), 1.0)
    with pytest.raises(ShapeMismatchError, match="dim 4"):
        sb.solve_sparse_batch(P, np.zeros((2, 5)), 1.0)
    with pytest.raises(ShapeMismatchError, match="2-D"):
        sb.solve_sparse_batch(P, t, 1.0)
    with pytest.raises(ValueError, match="'lam'"):
        sb.solve_sparse_batch(P, np.stack([t, t]), np.array([1.0, -1.0]))


def test_docstring_example_runs(sb: ModuleType) -> None:
    res = doctest.testmod(sb, raise_on_error=False, verbose=False)
    assert res.attempted >= 4 and res.failed == 0


def test_the_library_no_longer_carries_it() -> None:
    from adapterbank.compose import solvers

    assert not hasattr(solvers, "solve_sparse_batch") and "solve_sparse_batch" not in solvers.__all__
