"""Exact solvers for the combination weights of Eq. 4 (Lin) and Eq. 5 (sparse projection, "ours").

Notation (seed paper, docs/design.md §1–2):

=============  ==========  ====================================================================
code           symbol      meaning
=============  ==========  ====================================================================
``t``          p_T         target prototype, shape (d,)
``P``          P           retrieved prototypes, one per row p_1..p_k, shape (k, d)
``w``          w           combination weights, shape (k,), Σ w_i = 1
``G``          G = P̃P̃ᵀ    Gram matrix of the *centred* prototypes P̃ = P − p̄, shape (k, k)
``c``          c = P̃ t̃     inner products with the centred target t̃ = t − p̄, shape (k,)
``tt``         t̃ᵀt̃        squared norm of the centred target
``lam``        λ           ℓ1 weight of Eq. 5 (absolute, in squared-distance units)
=============  ==========  ====================================================================

Because Σ w_i = 1, ``t − Pᵀw = t̃ − P̃ᵀw``: both problems are invariant to translating the target and
the prototypes together, so we centre before forming the Gram (this removes the cancellation a large
common offset would cause). The objectives are then ``tt − 2cᵀw + wᵀGw (+ λ‖w‖₁)`` and everything
after :func:`gram` works on k×k quantities only, never on d.

* Eq. 4, :func:`solve_lin` — ``min_w ‖p_T − Pᵀw‖²  s.t. 1ᵀw = 1`` (negative weights allowed). Solved in
  the affine subspace ``w = 1/k + Zy`` (Z an orthonormal basis of 1⊥) by an eigendecomposition of the
  reduced Gram; when k > d + 1 or the prototypes are affinely dependent the minimum-norm minimiser is
  returned (deterministic, never fails).
* Eq. 5, :func:`solve_sparse` — ``min_w ‖p_T − Pᵀw‖² + λ‖w‖₁  s.t. 1ᵀw = 1``. With Σw = 1,
  ``‖w‖₁ = 1 + 2·(negative mass)``, so λ only penalises negative weights; for λ ≥ λ_max (see
  :func:`sparse_path`) the answer is the projection onto the convex hull of the prototypes.
  Solved exactly by a primal active-set method over sign patterns (each weight is fixed at 0 or free
  with a sign), started at Lin's solution and its signs (the nearest prototype when Lin is not
  unique); each step is one LU solve of the face's KKT system. Optimality (KKT, with h = 2(Gw − c) + ν):
  h_i = −λ where w_i > 0, h_i = +λ where w_i < 0, |h_i| ≤ λ where w_i = 0.
  When the optimum is not unique (duplicate prototypes, k > d + 1 with affinely dependent rows, zero
  vectors) the minimum-norm point of the optimal face is returned, which splits weight equally between
  duplicates; the status then says ``"optimal (min-norm, degenerate)"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.linalg.lapack import dgesv as _dgesv

from adapterbank._validation import message
from adapterbank.errors import NonFiniteError, ParameterError, ShapeMismatchError, SolverError

log = logging.getLogger(__name__)

__all__ = ["SolveResult", "gram", "solve_lin", "solve_sparse", "sparse_path", "check_problem", "lambda_max",
           "hull_projection"]

_EPS = np.finfo(np.float64).eps
_RTOL_EIG = 1e-10  # eigenvalues of a Gram below this × its largest diagonal entry count as zero
_RTOL_KKT = 1e-9  # KKT violations below this × the gradient scale count as satisfied
_RTOL_PIVOT = 1e-11  # an LU pivot below this × the largest flags a (near-)singular KKT face
_COMPACT_K = 64  # above this many prototypes each face's KKT system is extracted, not masked


@dataclass(frozen=True)
class SolveResult:
    """Weights of Eq. 4 or Eq. 5 and how they were found.

    ``objective`` is the problem's objective at ``weights`` (``‖p_T − Pᵀw‖²``, plus ``λ‖w‖₁`` for
    Eq. 5); ``status`` is ``"optimal"`` or ``"optimal (min-norm, degenerate)"`` (several optimal
    weight vectors exist; the minimum-norm one is returned) or ``"optimal (degenerate)"`` (several
    exist; a deterministic optimal vertex is returned).
    """

    weights: np.ndarray
    objective: float
    status: str
    iterations: int


# ----------------------------------------------------------------------------------------------
# validation and the Gram matrix
# ----------------------------------------------------------------------------------------------


def check_problem(P: np.ndarray, t: np.ndarray, what: str = "solver") -> tuple[np.ndarray, np.ndarray]:
    """Validate a prototype matrix and a target; return them as float64 arrays.

    >>> P, t = check_problem([[0.0, 1.0], [1.0, 0.0]], [0.5, 0.5])
    >>> P.shape, t.dtype
    ((2, 2), dtype('float64'))
    """
    P = np.asarray(P, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] < 1 or P.shape[1] < 1:
        raise ShapeMismatchError(
            f"The prototypes given to {what} must be a non-empty 2-D array (k, d). Got shape {P.shape} instead.")
    if t.ndim != 1 or t.shape[0] != P.shape[1]:
        raise ShapeMismatchError(
            f"The target given to {what} must be a 1-D vector of the prototypes' dim {P.shape[1]}. "
            f"Got shape {t.shape} instead.")
    if not np.isfinite(P).all():
        bad = sorted(set(np.argwhere(~np.isfinite(P))[:, 0].tolist()))
        raise NonFiniteError(f"The prototypes given to {what} contain NaN or Inf (rows {bad[:10]}).")
    if not np.isfinite(t).all():
        raise NonFiniteError(f"The target given to {what} contains NaN or Inf.")
    return P, t


def _check_lam(lam: float | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(lam, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise NonFiniteError(message("lam", what, "finite", lam))
    if (arr < 0).any():
        raise ParameterError(message("lam", what, "a number ≥ 0" if arr.ndim == 0 else "numbers ≥ 0", lam))
    return arr


def gram(P: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The k×k problem data of Eq. 4–5: ``(G, c, tt)`` of the prototypes centred at their mean.

    ``‖t − Pᵀw‖² = tt − 2cᵀw + wᵀGw`` for every w with Σw = 1.

    >>> P = np.array([[1.0, 0.0], [0.0, 1.0]]); t = np.array([1.0, 1.0])
    >>> G, c, tt = gram(P, t)
    >>> w = np.array([0.3, 0.7])
    >>> bool(np.isclose(tt - 2 * c @ w + w @ G @ w, np.sum((t - P.T @ w) ** 2)))
    True
    """
    P, t = check_problem(P, t, "gram")
    return _gram(P, t)


def _gram(P: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`gram` on already-checked float64 arrays."""
    mean, Pc = _centre(P)
    tc = t - mean  # t̃ (d,)
    G = Pc @ Pc.T  # (k, k)
    G = 0.5 * (G + G.T)
    return G, Pc @ tc, float(tc @ tc)


def _centre(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p̄, P̃ = P − p̄) with rounding noise snapped to 0, so equal prototypes give exactly equal rows."""
    mean = P.mean(axis=0)  # p̄ (d,)
    Pc = P - mean  # P̃ (k, d)
    Pc[np.abs(Pc) <= 4 * P.shape[0] * _EPS * np.abs(P).max(axis=0)] = 0.0
    return mean, Pc


def _objective(P: np.ndarray, t: np.ndarray, w: np.ndarray, lam: float = 0.0) -> float:
    r = t - P.T @ w  # (d,)
    return float(r @ r + lam * np.abs(w).sum())


# ----------------------------------------------------------------------------------------------
# Eq. 4 — Lin
# ----------------------------------------------------------------------------------------------


def _null_basis_of_ones(m: int) -> np.ndarray:
    """An orthonormal basis Z (m, m−1) of {z : 1ᵀz = 0} (a Householder reflector, deterministic)."""
    v = np.full(m, 1.0 / np.sqrt(m))
    v[0] += 1.0  # Householder vector mapping 1/√m to −e1
    H = np.eye(m) - np.outer(v, v) / v[0]
    return H[:, 1:]


def _lin_from_gram(G: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, bool]:
    """Min-norm solutions of Eq. 4 for one Gram and many ``c`` rows; C (n, k) -> (W (n, k), degenerate)."""
    k = G.shape[0]
    if k == 1:
        return np.ones((C.shape[0], 1)), False
    Z = _null_basis_of_ones(k)  # (k, k−1)
    w0 = np.full(k, 1.0 / k)  # (k,) the min-norm point of {1ᵀw = 1}
    M = Z.T @ G @ Z  # (k−1, k−1) reduced Gram
    ev, V = np.linalg.eigh(0.5 * (M + M.T))
    cut = _RTOL_EIG * max(float(np.max(np.diag(G))), 0.0) + 10 * k * _EPS * max(float(ev[-1]), 0.0)
    keep = ev > cut
    B = (C - (G @ w0)[None, :]) @ Z  # (n, k−1)
    Y = ((B @ V[:, keep]) / ev[keep]) @ V[:, keep].T  # (n, k−1) = M⁺ b
    return w0[None, :] + Y @ Z.T, bool((~keep).any())


def solve_lin(P: np.ndarray, t: np.ndarray) -> SolveResult:
    """Eq. 4: ``min_w ‖p_T − Pᵀw‖²  s.t. 1ᵀw = 1`` (weights may be negative); min-norm if not unique.

    >>> P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> r = solve_lin(P, np.array([2.0, 1.0]))      # outside the hull: w_0 < 0
    >>> np.round(r.weights, 6).tolist(), r.status
    ([-2.0, 2.0, 1.0], 'optimal')
    """
    P, t = check_problem(P, t, "lin")
    G, c, _ = _gram(P, t)
    W, degenerate = _lin_from_gram(G, c[None, :])
    w = W[0]
    return SolveResult(w, _objective(P, t, w), "optimal (min-norm, degenerate)" if degenerate else "optimal", 1)


# ----------------------------------------------------------------------------------------------
# Eq. 5 — sparse projection: a primal active-set method over sign patterns
# ----------------------------------------------------------------------------------------------


def _active_set_single(G: np.ndarray, c: np.ndarray, lam: float, tol: float, w0: np.ndarray | None,
                       max_iter: int) -> tuple[np.ndarray, int, bool] | None:
    """The active-set iteration for one problem.

    The iterate keeps a free mask F and signs s; fixed weights are 0. One iteration solves
    ``2G_FF w_F + ν1 = 2c_F − λs_F, 1ᵀw_F = 1`` (fixed rows replaced by identity rows), then either steps
    to that minimiser (and releases the most violated fixed weight) or stops at the first free weight
    that would change sign (and fixes it at 0). Lean: the masked KKT matrix and right-hand side are
    updated in place when one weight is fixed or released, and each iteration is one LAPACK ``dgesv``
    plus about 15 small array operations.

    The KKT system is scaled by σ = max(2·diag G) so that all its entries are O(σ) (fixed weights get
    the diagonal σ): a tiny pivot then flags a (near-)singular face. ``w0 = None`` starts
    from Lin's solution and its signs. Returns ``(w, iterations, maybe_degenerate)``, or None on a
    singular face or at the iteration cap (the caller then uses the robust iteration).
    """
    k = c.shape[0]
    sig = 2.0 * float(np.max(np.diag(G))) or 1.0
    K0 = np.empty((k + 1, k + 1))  # [[2G, σ1], [σ1ᵀ, 0]]
    K0[:k, :k] = 2.0 * G
    K0[:k, k] = sig
    K0[k, :k] = sig
    K0[k, k] = 0.0
    r0 = np.empty(k + 1)  # [2c; σ]
    r0[:k] = 2.0 * c
    r0[k] = sig
    it = 0
    if w0 is None:
        lu, _, x, info = _dgesv(K0, r0)  # Eq. 4 with all weights free
        it = 1
        piv = np.abs(np.diag(lu))
        if info != 0 or not np.isfinite(x).all() or piv.min() <= _RTOL_PIVOT * piv.max():
            w0 = _nearest_start(G, c[None, :])[0]  # k > d + 1 or affinely dependent: no unique Lin start
        else:
            w0 = x[:k]
    w = np.array(w0, dtype=np.float64)
    s = np.zeros(k + 1)  # signs of the free weights, 0 for fixed ones and for ν's slot
    s[:k] = np.sign(w)
    m = (s != 0).astype(np.float64)  # 1 on free rows
    m[k] = 1.0
    K = K0 * m[:, None] * m[None, :]
    rhs = (r0 - lam * s) * m
    for j in np.flatnonzero(m == 0):
        K[j, j] = sig
    nfree = int(m.sum()) - 1
    compact = k > _COMPACT_K  # large k: factor only the face's own (|F|+1)² system
    while it < max_iter:
        it += 1
        if compact:
            idx = np.flatnonzero(m)
            lu, _, xc, info = _dgesv(K0[np.ix_(idx, idx)], (r0 - lam * s)[idx])
            x = np.zeros(k + 1)
            x[idx] = xc
        else:
            lu, _, x, info = _dgesv(K, rhs)
        if info != 0 or not np.isfinite(x).all():
            return None
        p = x[:k] - w  # step to the face's minimiser
        sp = s[:k] * p
        idx = np.flatnonzero(sp < 0)  # free weights moving towards 0
        if idx.size:
            alpha_i = (s[idx] * w[idx]) / -sp[idx]
            a = int(np.argmin(alpha_i))
            if alpha_i[a] < 1.0:  # one reaches 0 before the minimiser: fix it there
                j = int(idx[a])
                w += alpha_i[a] * p
                w[j] = 0.0
                s[j] = 0.0
                m[j] = 0.0
                K[j, :] = 0.0
                K[:, j] = 0.0
                K[j, j] = sig
                rhs[j] = 0.0
                nfree -= 1
                continue
        w = x[:k]
        g2 = 2.0 * (G @ w - c)  # (k,) gradient of the smooth part
        nu = -(float(g2 @ m[:k]) + lam * float(s.sum())) / nfree
        h = np.abs(g2 + nu) - lam  # (k,) > 0 on a fixed weight: the KKT condition fails there
        h[m[:k] > 0] = -np.inf
        j = int(np.argmax(h))
        if h[j] <= tol:
            piv = np.abs(np.diag(lu))
            if piv.min() <= _RTOL_PIVOT * piv.max() or abs(float(w.sum()) - 1.0) > 1e-9:
                return None  # a (near-)singular final face: let the robust iteration decide
            return w, it, bool(h[j] >= -tol or piv.min() <= 1e3 * _RTOL_PIVOT * piv.max())
        s[j] = -np.sign(g2[j] + nu)  # release the most violated fixed weight, moving it against h_j
        m[j] = 1.0
        K[j, :] = K0[j, :] * m
        K[:, j] = K0[:, j] * m
        rhs[j] = r0[j] - lam * s[j]
        nfree += 1
    return None


def _eqp_step_robust(Gff: np.ndarray, grad: np.ndarray, scale: float) -> tuple[np.ndarray, bool]:
    """Step p (1ᵀp = 0) minimising pᵀGp + gradᵀp on a face; a descent ray if the face is unbounded."""
    m = Gff.shape[0]
    if m == 1:
        return np.zeros(1), False
    Z = _null_basis_of_ones(m)  # (m, m−1)
    M = Z.T @ Gff @ Z
    ev, V = np.linalg.eigh(0.5 * (M + M.T))
    b = V.T @ (Z.T @ grad)  # reduced gradient in the eigenbasis (m−1,)
    null = ev <= _RTOL_EIG * max(scale, 1e-300)
    gtol = _RTOL_KKT * (np.abs(grad).max() + 1e-300)
    if (np.abs(b[null]) > gtol).any():  # linear descent along zero curvature: unbounded until a sign flips
        y = np.where(null, -b, 0.0)
        return Z @ (V @ y), True
    y = np.where(null, 0.0, -b / np.where(null, 1.0, 2.0 * ev))
    return Z @ (V @ y), False


def _active_set_robust(G: np.ndarray, c: np.ndarray, lam: float, tol: float, w0: np.ndarray,
                       max_iter: int) -> tuple[np.ndarray, int]:
    """The same active-set method for one problem, with eigendecomposition steps (singular faces,
    rays of zero curvature) and Bland's rule (release the lowest violating index) against cycling."""
    k = G.shape[0]
    w = w0.copy()
    s = np.sign(w)
    scale = float(np.max(np.diag(G))) if k else 1.0
    for it in range(1, max_iter + 1):
        F = np.flatnonzero(s)
        grad = 2.0 * (G[np.ix_(F, np.arange(k))] @ w - c[F]) + lam * s[F]  # (|F|,)
        p, ray = _eqp_step_robust(G[np.ix_(F, F)], grad, scale)
        if np.abs(p).max(initial=0.0) > 0:
            sp = s[F] * p
            sw = s[F] * w[F]
            moving = sp < 0
            alpha_i = np.full(F.size, np.inf)
            alpha_i[moving] = sw[moving] / -sp[moving]
            j = int(np.argmin(alpha_i))
            alpha = float(alpha_i[j])
            if ray and not np.isfinite(alpha):
                raise SolverError("sparse: the objective is unbounded below on a face; this cannot happen for "
                                  "finite inputs (please report).")
            if ray or alpha < 1.0:
                w[F] += alpha * p
                w[F[j]] = 0.0
                s[F[j]] = 0.0
                continue
            w[F] += p
        g2 = 2.0 * (G @ w - c)
        nu = -float(np.mean(g2[F] + lam * s[F]))
        h = g2 + nu
        viol = np.where(s != 0, -np.inf, np.abs(h) - lam)
        cand = np.flatnonzero(viol > tol)
        if cand.size == 0:
            return w, it
        j = int(cand[0])  # Bland's rule
        s[j] = -np.sign(h[j])
    raise SolverError(f"sparse: the active-set method did not converge in {max_iter} iterations (k={k}).")


def _min_norm_polish(G: np.ndarray, c: np.ndarray, lam: float, tol: float, w: np.ndarray) -> tuple[np.ndarray, str]:
    """Among the optimal weights (same Pᵀw, same signs/zeros by the KKT conditions), the min-norm one.

    All optima share the gradient 2(Gw − c) and the multiplier ν (convexity), so the optimal set is
    ``{w* + z : Pᵀz = 0, 1ᵀz = 0, z_i = 0 where |h_i| < λ, sign(w_i) allowed by h_i}``. If the
    orthogonal projection of w* onto it keeps those signs it is the min-norm optimum; otherwise w*
    (an optimal vertex) is kept and reported as ``"optimal (degenerate)"``.
    """
    k = G.shape[0]
    s = np.sign(w)
    F = s != 0
    if not F.any():  # pragma: no cover - Σw = 1 keeps one weight free
        return w, "optimal (degenerate)"
    g2 = 2.0 * (G @ w - c)
    nu = -float(np.mean(g2[F] + lam * s[F]))
    h = g2 + nu
    A = F | (np.abs(h) >= lam - tol)
    allowed = np.where(F, s, -np.sign(h))  # sign each weight of the optimal face may take
    idx = np.flatnonzero(A)
    if idx.size <= 1:
        return w, "optimal"
    Gaa = G[np.ix_(idx, idx)]
    sig = float(np.max(np.diag(Gaa))) or 1.0
    ev, V = np.linalg.eigh(Gaa + sig * np.ones((idx.size, idx.size)) / idx.size)
    N = V[:, ev <= _RTOL_EIG * sig * idx.size]  # basis of {z on A : Gz = 0, 1ᵀz = 0}
    if N.shape[1] == 0:
        return w, "optimal"
    wa = w[idx] - N @ (N.T @ w[idx])
    if (allowed[idx] * wa >= -1e-12 * max(1.0, float(np.abs(wa).max()))).all():
        out = np.zeros(k)
        out[idx] = np.where(allowed[idx] * wa < 0, 0.0, wa)
        out /= out.sum()
        return out, "optimal (min-norm, degenerate)"
    return w, "optimal (degenerate)"


def _nearest_start(G: np.ndarray, C: np.ndarray) -> np.ndarray:
    """e_j for j = argmin_i ‖t − p_i‖² (ties → lowest index), one row per target."""
    d = np.diag(G)[None, :] - 2.0 * C  # (n, k) = d_i − tt
    W0 = np.zeros_like(C)
    W0[np.arange(C.shape[0]), np.argmin(d, axis=1)] = 1.0
    return W0


def _solve_sparse_gram(G: np.ndarray, c: np.ndarray, lam: float, w0: np.ndarray | None = None,
                       polish: bool = True, robust: bool = False, start: str = "lin") -> tuple[np.ndarray, str, int]:
    """Eq. 5 on the Gram: (weights, status, iterations). Start: ``w0``, else Lin's solution with its
    signs (``start="lin"`` and k ≤ 64; few steps when λ is small or Lin is nearly in the hull), else
    the nearest prototype (large k: supports are small, faces are solved compactly). The lean LU iteration runs first; a singular face or the iteration cap hands over to
    the eigendecomposition-based iteration with Bland's rule."""
    k = G.shape[0]
    if k == 1:
        return np.ones(1), "optimal", 0
    if lam == 0.0:
        W, degenerate = _lin_from_gram(G, c[None, :])
        return W[0], ("optimal (min-norm, degenerate)" if degenerate else "optimal"), 1
    tol = _RTOL_KKT * (2.0 * (float(np.max(np.abs(G))) + float(np.max(np.abs(c)))) + lam)
    if w0 is None and (start != "lin" or k > _COMPACT_K):  # large k: grow the support from the nearest
        w0 = _nearest_start(G, c[None, :])[0]
    it = 0
    out = None if robust else _active_set_single(G, c, lam, tol, w0, 10 * k + 50)
    if out is None:
        w, it = _active_set_robust(G, c, lam, tol, _nearest_start(G, c[None, :])[0], 20 * k + 100)
        suspicious = True
    else:
        w, it, suspicious = out
    if not polish or not suspicious:
        return w, "optimal", it
    w, status = _min_norm_polish(G, c, lam, tol, w)
    return w, status, it


def solve_sparse(P: np.ndarray, t: np.ndarray, lam: float) -> SolveResult:
    """Eq. 5: ``min_w ‖p_T − Pᵀw‖² + λ‖w‖₁  s.t. 1ᵀw = 1``, exact (active set on the k×k Gram).

    ``lam`` is absolute (squared-distance units); the strategy ``sparse`` turns a scale-free
    ``lam_rel`` into it. λ = 0 is Eq. 4 (min-norm); λ ≥ :func:`lambda_max` gives the projection onto
    the convex hull (all weights ≥ 0).

    >>> P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> t = np.array([2.0, 1.0])                        # outside the hull
    >>> np.round(solve_sparse(P, t, 0.5).weights, 6).tolist()     # some negative mass left
    [-1.0, 1.5, 0.5]
    >>> np.round(solve_sparse(P, t, 10.0).weights, 6).tolist()    # λ large: projection onto the hull
    [0.0, 1.0, 0.0]
    """
    P, t = check_problem(P, t, "sparse")
    lam = float(_check_lam(lam, "sparse"))
    G, c, _ = _gram(P, t)
    w, status, it = _solve_sparse_gram(G, c, lam)
    return SolveResult(w, _objective(P, t, w, lam), status, it)


def lambda_max(P: np.ndarray, t: np.ndarray) -> float:
    """The smallest λ from which Eq. 5 returns the projection onto the convex hull (no negative weight).

    From the KKT conditions at the simplex-constrained solution w_s: λ_max = max over the zero weights
    of ``(Gw_s − c)_i + μ`` with μ = −(Gw_s − c)_j on the support (0 when the target's Lin solution is
    already in the hull).

    >>> P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> round(lambda_max(P, np.array([2.0, 1.0])), 6)
    1.0
    """
    P, t = check_problem(P, t, "lambda_max")
    G, c, tt = _gram(P, t)
    return _lambda_max_gram(G, c, tt)


def hull_projection(P: np.ndarray, t: np.ndarray) -> SolveResult:
    """The projection of the target onto the convex hull of the prototypes: ``min_w ‖p_T − Pᵀw‖²  s.t.
    1ᵀw = 1, w ≥ 0`` — Eq. 5 for every λ ≥ λ_max, with weights exactly ≥ 0 (``objective`` is the squared
    residual alone).

    >>> P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> r = hull_projection(P, np.array([2.0, 1.0]))
    >>> np.round(r.weights, 6).tolist(), round(r.objective, 6)
    ([0.0, 1.0, 0.0], 2.0)
    """
    P, t = check_problem(P, t, "hull_projection")
    G, c, _ = _gram(P, t)
    w, status, it = _solve_sparse_gram(G, c, _hull_lam(G, c))
    return SolveResult(w, _objective(P, t, w), status, it)


def _hull_lam(G: np.ndarray, c: np.ndarray) -> float:
    """A λ above λ_max: on the simplex |g_i| ≤ max|G| + max|c|, so λ_max ≤ max g − min g ≤ 2(max|G| + max|c|)."""
    return 4.0 * (float(np.max(np.abs(G))) + float(np.max(np.abs(c)))) or 1.0


def _lambda_max_gram(G: np.ndarray, c: np.ndarray, tt: float) -> float:
    k = G.shape[0]
    if k == 1:
        return 0.0
    w, _, _ = _solve_sparse_gram(G, c, _hull_lam(G, c), polish=False)
    g = G @ w - c  # (k,)
    pos = w > 0
    mu = -float(np.mean(g[pos]))
    return max(0.0, float(np.max(np.where(pos, 0.0, g + mu))))


def sparse_path(P: np.ndarray, t: np.ndarray, lams: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The regularisation path of Eq. 5: ``(lams (m,), W (m, k))``, each row exact at its λ.

    Default grid (m = 42): 0, then 40 geometric steps from 10⁻³·λ_max to λ_max, then 2·λ_max (past
    λ_max the weights no longer change: the projection onto the hull). If λ_max = 0 (Lin is already
    in the hull) the grid is relative to the median squared distance instead. Solved from large λ to
    small, each warm-started from the previous solution; every λ ≥ λ_max gets the hull projection
    (:func:`hull_projection`'s weights, exactly ≥ 0).

    >>> P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> lams, W = sparse_path(P, np.array([2.0, 1.0]))
    >>> lams.shape, W.shape, bool(np.allclose(W.sum(axis=1), 1))
    ((42,), (42, 3), True)
    >>> np.round(W[0], 6).tolist(), np.round(W[-1], 6).tolist()      # λ = 0 is Lin, λ ≥ λ_max the hull
    ([-2.0, 2.0, 1.0], [0.0, 1.0, 0.0])
    """
    P, t = check_problem(P, t, "sparse_path")
    G, c, tt = _gram(P, t)
    k = G.shape[0]
    lmax_true = _lambda_max_gram(G, c, tt)
    if lams is None:
        lmax = lmax_true
        if lmax <= 0:
            d = np.diag(G) - 2 * c + tt
            lmax = float(np.median(d)) or float(np.mean(d)) or 1.0
        lams = np.concatenate([[0.0], lmax * np.geomspace(1e-3, 1.0, 40), [2.0 * lmax]])
    else:
        lams = _check_lam(lams, "sparse_path").astype(np.float64).reshape(-1)
    W = np.zeros((lams.size, k))
    order = np.argsort(-lams, kind="stable")
    w_prev: np.ndarray | None = None
    w_hull: np.ndarray | None = None
    for i in order:
        if 0 < lmax_true <= lams[i]:  # from λ_max on: the hull projection, its weights exactly ≥ 0
            if w_hull is None:
                w_hull = _solve_sparse_gram(G, c, _hull_lam(G, c))[0]
            w = w_hull
        else:
            w, _, _ = _solve_sparse_gram(G, c, float(lams[i]), w0=w_prev)
        W[i] = w
        if lams[i] > 0:
            w_prev = w
    return lams, W
