"""Eq. 4–5 solvers against independent references: cvxpy (CLARABEL), brute force over sign patterns, SVD."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import scipy.linalg

from adapterbank.compose import solvers as S
from adapterbank.compose.solvers import (
    gram,
    lambda_max,
    solve_lin,
    solve_sparse,
    sparse_path,
)
from adapterbank.errors import NonFiniteError, ShapeMismatchError

Reference = Callable[..., tuple[float, np.ndarray]]  # the `cvx` fixture (conftest.py): cvxpy's Eq. 5


def objective(P: np.ndarray, t: np.ndarray, w: np.ndarray, lam: float = 0.0) -> float:
    r = t - P.T @ w
    return float(r @ r + lam * np.abs(w).sum())


def dscale(P: np.ndarray, t: np.ndarray) -> float:
    return float(np.median(((P - t) ** 2).sum(axis=1))) or 1.0


def problem(k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    P = rng.normal(size=(k, d)) + 3.0  # an offset: centring must not matter
    t = rng.normal(size=d) * 1.5 + 3.0
    return P, t


# (k, d): k > d included (10×3, 50×16, 200×16), a wide range of d
GRID = [(1, 3), (2, 2), (3, 16), (5, 384), (10, 3), (10, 1024), (50, 16), (200, 16)]


@pytest.mark.parametrize("k,d", GRID)
@pytest.mark.parametrize("lam_rel", [0.0, 0.03, 1.0, 100.0])
def test_sparse_objective_matches_cvxpy(k: int, d: int, lam_rel: float, cvx: Reference) -> None:
    P, t = problem(k, d, seed=k * 1000 + d)
    scale = dscale(P, t)
    lam = lam_rel * scale
    res = solve_sparse(P, t, lam)
    ref, _ = cvx(P, t, lam)
    assert res.weights.shape == (k,)
    assert abs(res.weights.sum() - 1) < 1e-9
    assert res.objective == pytest.approx(objective(P, t, res.weights, lam), rel=1e-12, abs=1e-12 * scale)
    assert abs(res.objective - ref) <= 1e-6 * max(ref, scale), (res.objective, ref, res.status)


@pytest.mark.parametrize("k,d", [(2, 2), (5, 384), (10, 3), (50, 16), (200, 16)])
def test_lin_matches_cvxpy_and_svd_min_norm(k: int, d: int, cvx: Reference) -> None:
    P, t = problem(k, d, seed=7 * k + d)
    res = solve_lin(P, t)
    ref, _ = cvx(P, t, 0.0)
    scale = dscale(P, t)
    assert abs(res.weights.sum() - 1) < 1e-9
    assert abs(res.objective - ref) <= 1e-6 * max(ref, scale)
    # independent min-norm reference: w = 1/k + N y, N ⟂ 1 from an SVD, y = min-norm lstsq (gelsd)
    N = scipy.linalg.null_space(np.ones((1, k)))
    w0 = np.full(k, 1.0 / k)
    y = scipy.linalg.lstsq(P.T @ N, t - P.T @ w0, lapack_driver="gelsd")[0]
    np.testing.assert_allclose(res.weights, w0 + N @ y, atol=1e-7 * max(1.0, np.abs(res.weights).max()))
    assert res.status == ("optimal" if k <= d + 1 else "optimal (min-norm, degenerate)")


def brute_force(P: np.ndarray, t: np.ndarray, lam: float) -> tuple[float, np.ndarray]:
    """Every sign pattern s ∈ {−1, 0, +1}^k: solve the equality-constrained QP in closed form, keep it if
    its signs agree, take the best objective."""
    G, c, _ = gram(P, t)
    k = len(c)
    best, best_w = np.inf, None
    for s in itertools.product((-1.0, 0.0, 1.0), repeat=k):
        s = np.array(s)
        F = np.flatnonzero(s)
        if F.size == 0:
            continue
        m = F.size
        K = np.zeros((m + 1, m + 1))
        K[:m, :m] = 2 * G[np.ix_(F, F)]
        K[:m, m] = K[m, :m] = 1
        rhs = np.append(2 * c[F] - lam * s[F], 1.0)
        x = np.linalg.lstsq(K, rhs, rcond=None)[0]
        w = np.zeros(k)
        w[F] = x[:m]
        if abs(w.sum() - 1) > 1e-9 or (s[F] * w[F] < -1e-12).any():
            continue
        f = objective(P, t, w, lam)
        if f < best:
            best, best_w = f, w
    return best, best_w


@pytest.mark.parametrize("seed", range(12))
def test_sparse_equals_brute_force_small_k(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 5))
    d = int(rng.integers(1, 6))
    P = rng.normal(size=(k, d))
    t = rng.normal(size=d) * rng.uniform(0.5, 3)
    for lam in (0.0, 0.02, 0.3, 2.0, 50.0):
        lam *= dscale(P, t)
        res = solve_sparse(P, t, lam)
        ref, w_ref = brute_force(P, t, lam)
        assert res.objective <= ref + 1e-9 * max(ref, 1.0)
        assert res.objective >= ref - 1e-9 * max(ref, 1.0)
        if k <= d + 1 and lam > 0:  # generic data: the optimum is unique
            np.testing.assert_allclose(res.weights, w_ref, atol=1e-7)


def test_k1_is_one() -> None:
    P, t = problem(1, 5, 0)
    for lam in (0.0, 1.0):
        assert solve_sparse(P, t, lam).weights.tolist() == [1.0]
    assert solve_lin(P, t).weights.tolist() == [1.0]


def test_duplicates_split_equally_and_match_cvxpy(cvx: Reference) -> None:
    P = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = np.array([0.8, 0.5])
    for lam in (0.0, 0.1, 10.0):
        res = solve_sparse(P, t, lam)
        ref, _ = cvx(P, t, lam)
        assert abs(res.objective - ref) <= 1e-8
        assert res.weights[1] == pytest.approx(res.weights[2], abs=1e-12)
        assert res.status == "optimal (min-norm, degenerate)"
    np.testing.assert_allclose(solve_sparse(P, t, 10.0).weights, [0.0, 0.325, 0.325, 0.35], atol=1e-12)
    np.testing.assert_allclose(solve_lin(P, t).weights, [-0.3, 0.4, 0.4, 0.5], atol=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_degenerate_prototypes_match_cvxpy(seed: int, cvx: Reference) -> None:
    """Duplicates, zero vectors, k > d, identical prototypes, target equal to a prototype."""
    rng = np.random.default_rng(100 + seed)
    k, d = int(rng.integers(3, 12)), int(rng.integers(1, 4))
    base = rng.normal(size=(max(1, k // 3), d))
    P = base[rng.integers(0, len(base), size=k)]
    P[rng.integers(0, k)] = 0.0
    t = P[0].copy() if seed % 2 else rng.normal(size=d) * 2
    for lam_rel in (0.0, 0.05, 0.5, 50.0):
        lam = lam_rel * dscale(P, t)
        res = solve_sparse(P, t, lam)
        ref, _ = cvx(P, t, lam)
        assert abs(res.weights.sum() - 1) < 1e-9
        assert abs(res.objective - ref) <= 1e-6 * max(ref, dscale(P, t)), (lam_rel, res.status)
        again = solve_sparse(P, t, lam)
        assert np.array_equal(again.weights, res.weights)  # deterministic
        # the robust (eigendecomposition, Bland's rule) iteration reaches the same optimum
        G, c, _ = gram(P, t)
        w2, _, _ = S._solve_sparse_gram(G, c, lam, robust=True)
        assert abs(objective(P, t, w2, lam) - ref) <= 1e-6 * max(ref, dscale(P, t))


def test_identical_prototypes_give_uniform_weights() -> None:
    P = np.tile([[1.0, -2.0, 0.5]], (4, 1))
    for lam in (0.0, 1.0):
        np.testing.assert_allclose(solve_sparse(P, np.array([0.0, 1.0, 2.0]), lam).weights, 0.25, atol=1e-12)


def test_target_equal_to_a_prototype() -> None:
    P, _ = problem(6, 32, 3)
    res = solve_sparse(P, P[4], 0.1 * dscale(P, P[4]))
    np.testing.assert_allclose(res.weights, np.eye(6)[4], atol=1e-10)


def test_inside_and_outside_the_hull(cvx: Reference) -> None:
    rng = np.random.default_rng(5)
    P = rng.normal(size=(4, 3))  # a simplex in 3-D
    bary = np.array([0.1, 0.2, 0.3, 0.4])
    inside = P.T @ bary
    big = 100 * dscale(P, inside)
    res = solve_sparse(P, inside, big)
    np.testing.assert_allclose(res.weights, bary, atol=1e-10)  # residual 0 and ‖w‖₁ = 1
    assert res.objective == pytest.approx(big, rel=1e-10)
    outside = P.T @ np.array([-0.5, 0.5, 0.5, 0.5])
    lin = solve_lin(P, outside).weights
    np.testing.assert_allclose(lin, [-0.5, 0.5, 0.5, 0.5], atol=1e-10)
    proj_val, proj_w = cvx(P, outside, 0.0, nonneg=True)
    w = solve_sparse(P, outside, 100 * dscale(P, outside)).weights
    assert (w >= 0).all()
    assert objective(P, outside, w) == pytest.approx(proj_val, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs(bad: float) -> None:
    P, t = problem(3, 4, 0)
    P2 = P.copy()
    P2[1, 2] = bad
    t2 = t.copy()
    t2[0] = bad
    for fn in (lambda P, t: solve_sparse(P, t, 1.0), solve_lin, sparse_path):
        with pytest.raises(NonFiniteError, match="rows \\[1\\]"):
            fn(P2, t)
        with pytest.raises(NonFiniteError, match="target"):
            fn(P, t2)
    with pytest.raises(NonFiniteError):
        solve_sparse(P, t, bad)


def test_shapes_and_parameters() -> None:
    P, t = problem(3, 4, 0)
    with pytest.raises(ShapeMismatchError, match="dim 4"):
        solve_sparse(P, t[:3], 1.0)
    with pytest.raises(ShapeMismatchError, match="2-D"):
        solve_lin(P[0], t)
    with pytest.raises(ShapeMismatchError):
        solve_lin(np.zeros((0, 4)), t)
    with pytest.raises(ValueError, match="The 'lam' parameter of sparse must be a number ≥ 0. Got -1 instead."):
        solve_sparse(P, t, -1)


def test_scale_and_translation_invariance() -> None:
    P, t = problem(8, 20, 11)
    lam = 0.1 * dscale(P, t)
    w = solve_sparse(P, t, lam).weights
    for a, b in ((1e-3, 0.0), (1e3, 0.0), (1.0, 1e4)):
        np.testing.assert_allclose(solve_sparse(a * P + b, a * t + b, a * a * lam).weights, w, atol=1e-8)
        np.testing.assert_allclose(solve_lin(a * P + b, a * t + b).weights, solve_lin(P, t).weights, atol=1e-8)


def test_lambda_path(cvx: Reference) -> None:
    rng = np.random.default_rng(9)
    P = rng.normal(size=(6, 4))
    t = rng.normal(size=4) * 3  # mostly outside the hull: negative Lin weights
    lams, W = sparse_path(P, t)
    assert lams.shape == (42,) and W.shape == (42, 6)
    assert lams[0] == 0 and np.all(np.diff(lams) > 0)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-9)
    assert objective(P, t, W[0]) == pytest.approx(solve_lin(P, t).objective, rel=1e-9)
    proj_val, _ = cvx(P, t, 0.0, nonneg=True)
    assert (W[-1] >= 0).all() and objective(P, t, W[-1]) == pytest.approx(proj_val, rel=1e-6)
    l1 = np.abs(W).sum(axis=1)
    assert np.all(np.diff(l1) <= 1e-9)  # the penalised term never grows with λ
    assert (W[0] < 0).sum() >= (W[-1] < 0).sum() == 0
    for lam, w in zip(lams[::10], W[::10], strict=True):  # each row exact
        ref, _ = cvx(P, t, lam)
        assert abs(objective(P, t, w, lam) - ref) <= 1e-6 * max(ref, dscale(P, t))
    # λ_max is the smallest λ that returns the hull projection
    lmax = lambda_max(P, t)
    assert lmax > 0
    assert (solve_sparse(P, t, lmax * (1 + 1e-9)).weights >= -1e-12).all()
    assert (solve_sparse(P, t, lmax * 0.9).weights < -1e-9).any()
    # a given grid is used as is
    lams2, W2 = sparse_path(P, t, np.array([2.0, 0.0]))
    assert lams2.tolist() == [2.0, 0.0]
    np.testing.assert_allclose(W2[0], solve_sparse(P, t, 2.0).weights, atol=1e-10)
