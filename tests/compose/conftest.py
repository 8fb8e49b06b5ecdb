"""The independent reference of the solver tests: Eq. 5 (or the simplex-constrained projection) by cvxpy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

Reference = Callable[..., tuple[float, np.ndarray]]


@pytest.fixture(scope="session")
def cvx() -> Reference:
    """``cvx(P, t, lam, nonneg=False) -> (objective, weights)``: Eq. 5 with CLARABEL at tight tolerances (the
    projection onto the convex hull with ``nonneg=True, lam=0``); skips the test where cvxpy is missing."""
    cp = pytest.importorskip("cvxpy")

    def solve(P: np.ndarray, t: np.ndarray, lam: float, nonneg: bool = False) -> tuple[float, np.ndarray]:
        w = cp.Variable(P.shape[0])
        cons = [cp.sum(w) == 1] + ([w >= 0] if nonneg else [])
        prob = cp.Problem(cp.Minimize(cp.sum_squares(t - P.T @ w) + lam * cp.norm1(w)), cons)
        prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        assert prob.status == "optimal", prob.status
        return float(prob.value), np.asarray(w.value)

    return solve
