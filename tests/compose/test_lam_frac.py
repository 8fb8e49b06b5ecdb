"""``lam_frac``: λ = F·λ_max, Eq. 5 on its natural scale — exact against Lin, the hull projection and cvxpy."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import numpy as np
import pytest

from adapterbank.compose.solvers import hull_projection, lambda_max, solve_lin, solve_sparse
from adapterbank.compose.strategies import compute_weights, get_strategy, parse_param_specs, sparse
from adapterbank.errors import LambdaAtHullWarning, NonFiniteError, ParameterError

Reference = Callable[..., tuple[float, np.ndarray]]  # the `cvx` fixture (conftest.py): cvxpy's Eq. 5


def outside(k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A target outside the hull of k prototypes whose Lin weights are partly negative (λ_max > 0): an affine
    combination with weight −0.8 on one prototype plus noise, with a common offset (centring must not matter)."""
    rng = np.random.default_rng(seed)
    P = rng.normal(size=(k, d)) + 3.0
    w = rng.dirichlet(np.ones(k)) * 1.8
    w[0] = -0.8
    t = P.T @ w + 0.3 * rng.normal(size=d)
    return P, t


# k ≤ d: the optimum is unique, so weights (not only objectives) are compared
CASES = [(2, 2), (3, 16), (5, 384), (8, 12), (12, 64)]


@pytest.mark.parametrize("k,d", CASES)
def test_lam_frac_0_is_lin(k: int, d: int) -> None:
    P, t = outside(k, d, k * 100 + d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = compute_weights("sparse", t, P, lam_frac=0.0)
    assert res.params["lam"] == 0.0 and res.params["lam_frac"] == 0.0 and res.params["lam_max"] > 0
    np.testing.assert_allclose(res.weights, solve_lin(P, t).weights, rtol=0, atol=1e-10)
    assert (res.weights < -1e-6).any()  # outside the hull: Lin keeps a negative weight


@pytest.mark.parametrize("k,d", CASES)
def test_lam_frac_1_is_the_hull_projection_at_lam_max(k: int, d: int, cvx: Reference) -> None:
    P, t = outside(k, d, k * 100 + d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user asked for the hull: no LambdaAtHullWarning
        res = compute_weights("sparse", t, P, lam_frac=1.0)
    lmax = lambda_max(P, t)
    assert res.params["lam"] == pytest.approx(lmax, rel=1e-15) and res.params["lam_max"] == lmax
    assert res.params["lam_frac"] == 1.0
    assert (res.weights >= 0).all()  # exactly, not up to rounding
    ref_obj, ref_w = cvx(P, t, 0.0, nonneg=True)  # the projection onto the convex hull
    np.testing.assert_allclose(res.weights, ref_w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.weights, solve_sparse(P, t, lmax).weights, rtol=0, atol=1e-9)
    # the reported objective is Eq. 5's at λ = λ_max (‖w‖₁ = 1 on the simplex)
    assert res.objective == pytest.approx(ref_obj + lmax, rel=1e-7)
    np.testing.assert_allclose(res.weights, hull_projection(P, t).weights, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,d", CASES)
@pytest.mark.parametrize("frac", [0.05, 0.25, 0.5, 0.75, 0.99])
def test_intermediate_lam_frac_is_solve_sparse_at_frac_times_lam_max(k: int, d: int, frac: float, cvx: Reference) -> None:
    P, t = outside(k, d, k * 100 + d)
    res = compute_weights("sparse", t, P, lam_frac=frac)
    lam = frac * lambda_max(P, t)
    assert res.params["lam"] == pytest.approx(lam, rel=1e-15) and res.params["lam_frac"] == frac
    direct = solve_sparse(P, t, lam)
    np.testing.assert_array_equal(res.weights, direct.weights)
    ref_obj, ref_w = cvx(P, t, lam)
    assert abs(res.objective - ref_obj) <= 1e-7 * max(ref_obj, 1.0)
    np.testing.assert_allclose(res.weights, ref_w, rtol=0, atol=1e-5)


def test_the_path_moves_from_lin_to_the_hull_monotonically_in_negative_mass() -> None:
    P, t = outside(6, 20, 3)
    neg = [float(-np.minimum(compute_weights("sparse", t, P, lam_frac=f).weights, 0).sum())
           for f in np.linspace(0, 1, 11)]
    assert neg[0] > 0.05 and neg[-1] == 0.0
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(neg))


def test_lam_frac_is_scale_free() -> None:
    P, t = outside(5, 7, 11)
    ref = compute_weights("sparse", t, P, lam_frac=0.4).weights
    for a, b in ((1e-3, 0.0), (1e4, 0.0), (1.0, 50.0)):
        np.testing.assert_allclose(compute_weights("sparse", a * t + b, a * P + b, lam_frac=0.4).weights, ref,
                                   atol=1e-7)


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_lam_max_zero_every_frac_gives_lin(frac: float) -> None:
    """Inside the hull Lin's weights are already ≥ 0: λ_max = 0, λ = 0 for any F, the weights are Lin's."""
    P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = np.array([0.2, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = compute_weights("sparse", t, P, lam_frac=frac)
    assert res.params["lam_max"] == 0.0 and res.params["lam"] == 0.0 and res.params["lam_frac"] == frac
    np.testing.assert_allclose(res.weights, [0.5, 0.2, 0.3], atol=1e-12)
    np.testing.assert_allclose(res.weights, solve_lin(P, t).weights, atol=1e-12)


def test_recorded_lam_frac_reproduces_the_weights_of_lam_rel() -> None:
    """The effective lam_frac = min(1, λ/λ_max) of a lam_rel run gives the same weights when fed back."""
    P, t = outside(5, 9, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LambdaAtHullWarning)
        for lam_rel in (1e-3, 1e-2, 10.0):
            r = compute_weights("sparse", t, P, lam_rel=lam_rel)
            assert r.params["lam_frac"] == pytest.approx(min(1.0, r.params["lam"] / r.params["lam_max"]))
            again = compute_weights("sparse", t, P, lam_frac=r.params["lam_frac"])
            np.testing.assert_allclose(again.weights, r.weights, atol=1e-9)
    assert r.params["lam_frac"] == 1.0  # lam_rel = 10 is past λ_max
    # λ_max = 0: λ = 0 is recorded as 0, any λ > 0 as 1 (both give Lin's weights)
    P0, t0 = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), np.array([0.2, 0.3])
    assert sparse(t0, P0, lam=0.0).params["lam_frac"] == 0.0 and sparse(t0, P0, lam=0.5).params["lam_frac"] == 1.0


def test_warning_only_when_lam_or_lam_rel_reach_lam_max() -> None:
    P, t = outside(4, 6, 8)
    lmax = lambda_max(P, t)
    with pytest.warns(LambdaAtHullWarning, match="lam_frac < 1"):
        compute_weights("sparse", t, P, lam=lmax)
    with pytest.warns(LambdaAtHullWarning):
        compute_weights("sparse", t, P, lam_rel=100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_weights("sparse", t, P, lam_frac=1.0)
        compute_weights("sparse", t, P, lam=0.5 * lmax)


@pytest.mark.parametrize("bad", [-0.1, 1.5, 2, "1.01"])
def test_lam_frac_outside_0_1_is_refused_with_the_house_message(bad: object) -> None:
    P, t = outside(3, 4, 0)
    msg = f"The 'lam_frac' parameter of sparse must be a number in [0, 1]. Got {bad!r} instead."
    with pytest.raises(ParameterError) as e:
        if isinstance(bad, str):
            parse_param_specs([f"lam_frac={bad}"], ["sparse"])
        else:
            compute_weights("sparse", t, P, lam_frac=bad)
    assert str(e.value) == msg
    with pytest.raises(NonFiniteError, match="'lam_frac' parameter of sparse must be finite"):
        compute_weights("sparse", t, P, lam_frac=float("nan"))
    with pytest.raises(ParameterError, match="must be a number in"):
        compute_weights("sparse", t, P, lam_frac=True)


def test_exactly_one_of_lam_lam_rel_lam_frac() -> None:
    P, t = outside(3, 4, 0)
    for kw in ({"lam": 1.0, "lam_frac": 0.5}, {"lam_rel": 0.1, "lam_frac": 0.5}, {"lam": 1.0, "lam_rel": 0.1}):
        with pytest.raises(ParameterError, match="Give only one of 'lam', 'lam_rel', 'lam_frac' to sparse"):
            compute_weights("sparse", t, P, **kw)
    with pytest.raises(ParameterError, match="Got lam=1.0 and lam_rel=0.1 and lam_frac=0.5"):
        sparse(t, P, lam=1.0, lam_rel=0.1, lam_frac=0.5)
    assert parse_param_specs(["lam_frac=0.25"], ["sim", "sparse"]) == {"sparse": {"lam_frac": 0.25}}
    p = get_strategy("sparse").param("lam_frac")
    assert (p.low, p.high, p.default) == (0.0, 1.0, 1.0)
