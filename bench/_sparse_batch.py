"""Eq. 5 for many targets that share one set of prototypes: the batched sparse solver of Benchmark
``bench_solvers.py`` (its "batch µs/target" column). Only the benchmark uses it, so it lives here, next to
it, on top of the library's single-target solver (:mod:`adapterbank.compose.solvers`): the Gram is formed
once, the active-set iterations run in lockstep over the batch, and every row equals
:func:`~adapterbank.compose.solvers.solve_sparse` on that target (tests/bench/test_sparse_batch.py).
"""

from __future__ import annotations

import numpy as np

from adapterbank.compose.solvers import (
    _RTOL_EIG,
    _RTOL_KKT,
    _centre,
    _check_lam,
    _lin_from_gram,
    _min_norm_polish,
    _nearest_start,
    _solve_sparse_gram,
    check_problem,
)
from adapterbank.errors import NonFiniteError, ShapeMismatchError

__all__ = ["solve_sparse_batch"]

_BATCH_CHUNK = 2048  # targets per lockstep batch (fewer for larger k: ≤ 4e6 KKT entries)
_BATCH_MAX_K = 24  # above this many prototypes the batch loops over single solves


def solve_sparse_batch(P: np.ndarray, T: np.ndarray, lam: float | np.ndarray) -> np.ndarray:
    """Eq. 5 for many targets sharing the prototypes: ``T (n, d) -> W (n, k)``; ``lam`` scalar or (n,).

    One Gram for all targets; for k ≤ 24 the active-set iterations run in lockstep over the batch
    (stacked LU solves of the masked KKT systems, started at each target's Lin solution), every row's
    KKT conditions are verified at the end, and rows whose face turned singular (degenerate
    prototypes) are finished by the single-target solver; for larger k the rows are solved one by
    one on the shared Gram. Every row equals
    :func:`~adapterbank.compose.solvers.solve_sparse` on that target.

    >>> from adapterbank.compose.solvers import solve_sparse
    >>> rng = np.random.default_rng(0)
    >>> P, T = rng.normal(size=(4, 8)), rng.normal(size=(3, 8))
    >>> W = solve_sparse_batch(P, T, 0.5)
    >>> bool(np.allclose(W, [solve_sparse(P, t, 0.5).weights for t in T]))
    True
    """
    T = np.asarray(T, dtype=np.float64)
    if T.ndim != 2:
        raise ShapeMismatchError(f"The targets given to sparse (batch) must be a 2-D array (n, d). "
                                 f"Got shape {T.shape} instead.")
    P, _ = check_problem(P, T[0] if T.shape[0] else np.zeros(np.asarray(P).shape[-1]), "sparse (batch)")
    if T.shape[1] != P.shape[1]:
        raise ShapeMismatchError(f"The targets given to sparse (batch) must have the prototypes' dim {P.shape[1]}. "
                                 f"Got shape {T.shape} instead.")
    if not np.isfinite(T).all():
        raise NonFiniteError(f"The targets given to sparse (batch) contain NaN or Inf (rows "
                             f"{np.flatnonzero(~np.isfinite(T).all(axis=1))[:10].tolist()}).")
    n, k = T.shape[0], P.shape[0]
    lam_a = np.broadcast_to(_check_lam(lam, "sparse (batch)"), (n,)).astype(np.float64)
    mean, Pc = _centre(P)  # (d,), (k, d)
    G = Pc @ Pc.T
    G = 0.5 * (G + G.T)  # (k, k)
    C = (T - mean) @ Pc.T  # (n, k)
    out = np.empty((n, k))
    if k == 1:
        out[:] = 1.0
        return out
    zero = lam_a == 0
    if zero.any():
        out[zero], _ = _lin_from_gram(G, C[zero])
    rest = np.flatnonzero(~zero)
    sig = float(np.max(np.diag(G))) or 1.0
    # affinely independent prototypes: every optimum is unique, no min-norm polish needed
    independent = bool(np.linalg.eigvalsh(G + sig * np.ones((k, k)) / k)[0] > _RTOL_EIG * sig * k)
    if k > _BATCH_MAX_K:  # lockstep KKT stacks grow as k²: solve one by one on the shared Gram
        for j in rest:
            out[j], _, _ = _solve_sparse_gram(G, C[j], float(lam_a[j]))
        return out
    chunk = max(1, min(_BATCH_CHUNK, int(4e6 // (k + 1) ** 2)))
    for a in range(0, rest.size, chunk):
        rows = rest[a:a + chunk]
        Cr, lr = C[rows], lam_a[rows]
        tol = _tolerance(G, Cr, lr)
        W0 = _lin_from_gram(G, Cr)[0] if independent else _nearest_start(G, Cr)  # start: Lin and its signs
        W, _, ok = _active_set_batch(G, Cr, lr, tol, W0, 10 * k + 50)
        ok &= _kkt_holds(G, Cr, lr, tol, W)
        for j in np.flatnonzero(~ok):
            W[j], _, _ = _solve_sparse_gram(G, Cr[j], float(lr[j]), polish=False, robust=True)
        if not independent:  # min-norm among optima (only degenerate rows change)
            for j in range(rows.size):
                W[j], _ = _min_norm_polish(G, Cr[j], float(lr[j]), float(tol[j]), W[j])
        out[rows] = W
    return out


def _tolerance(G: np.ndarray, C: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Per-problem KKT tolerance, proportional to the size of the gradient 2(Gw − c) and to λ."""
    gscale = 2.0 * (float(np.max(np.abs(G))) + np.max(np.abs(C), axis=1)) + lam  # (n,)
    return _RTOL_KKT * np.maximum(gscale, 1e-300)


def _active_set_batch(G: np.ndarray, C: np.ndarray, lam: np.ndarray, tol: np.ndarray, W0: np.ndarray,
                      max_iter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The active-set iteration for n problems sharing G, in lockstep (LU solves of masked KKT systems).

    Each row keeps a free mask f and signs s; fixed weights are 0. One iteration solves, for all
    unfinished rows at once, ``2G_FF w_F + ν1 = 2c_F − λs_F, 1ᵀw_F = 1`` (fixed rows replaced by
    identity rows), then either steps to that minimiser (and releases the most violated fixed weight)
    or stops at the first free weight that would change sign (and fixes it at 0).
    Returns ``(W, iterations, ok)``; rows with ok False hit a singular system or the iteration cap.
    """
    n, k = C.shape
    W = W0.copy()  # (n, k)
    s = np.sign(W)  # (n, k) in {−1, 0, +1}
    f = s != 0  # (n, k) free mask
    iters = np.zeros(n, dtype=np.int64)
    ok = np.ones(n, dtype=bool)
    todo = np.arange(n)
    G2 = 2.0 * G
    sig = float(np.max(np.diag(G2))) or 1.0  # scale of the border and of fixed rows (see _active_set_single)
    eye = sig * np.eye(k)
    for _ in range(max_iter):
        if todo.size == 0:
            break
        ff = f[todo].astype(np.float64)  # (m, k)
        st = s[todo]
        lt = lam[todo]
        K = np.zeros((todo.size, k + 1, k + 1))
        K[:, :k, :k] = G2[None] * ff[:, :, None] * ff[:, None, :] + eye[None] * (1.0 - ff)[:, :, None]
        K[:, :k, k] = sig * ff
        K[:, k, :k] = sig * ff
        rhs = np.empty((todo.size, k + 1))
        rhs[:, :k] = ff * (2.0 * C[todo] - lt[:, None] * st)
        rhs[:, k] = sig
        try:
            X = np.linalg.solve(K, rhs[:, :, None])[:, :, 0]  # (m, k+1)
        except np.linalg.LinAlgError:
            X = np.full((todo.size, k + 1), np.nan)
            for j in range(todo.size):  # find the singular ones, keep the rest
                try:
                    X[j] = np.linalg.solve(K[j], rhs[j])
                except np.linalg.LinAlgError:
                    pass
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            ok[todo[bad]] = False
            keep = ~bad
            todo, X, st, lt, ff = todo[keep], X[keep], st[keep], lt[keep], ff[keep]
            if todo.size == 0:
                break
        iters[todo] += 1
        Wt = W[todo]  # (m, k)
        Pstep = X[:, :k] * ff - Wt  # (m, k) step to the face's minimiser
        # ratio test: free weights moving towards zero (s·p < 0) block at α_i = s·w / (−s·p)
        sp = st * Pstep
        sw = st * Wt
        moving = (sp < 0) & (ff > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha_i = np.where(moving, sw / np.where(moving, -sp, 1.0), np.inf)  # (m, k)
        j_block = np.argmin(alpha_i, axis=1)  # (m,)
        alpha = np.minimum(alpha_i[np.arange(todo.size), j_block], 1.0)  # (m,)
        Wt = Wt + alpha[:, None] * Pstep
        blocked = alpha < 1.0
        if blocked.any():
            rows = todo[blocked]
            Wt[blocked, j_block[blocked]] = 0.0
            f[rows, j_block[blocked]] = False
            s[rows, j_block[blocked]] = 0.0
        W[todo] = Wt
        full = ~blocked
        if full.any():
            rows = todo[full]
            Wr = W[rows]  # (q, k)
            fr = f[rows]
            sr = s[rows]
            lr = lam[rows]
            g2 = Wr @ G2 - 2.0 * C[rows]  # (q, k) = 2(Gw − c)
            nu = -np.sum(np.where(fr, g2 + lr[:, None] * sr, 0.0), axis=1) / fr.sum(axis=1)  # (q,)
            h = g2 + nu[:, None]  # (q, k)
            viol = np.where(fr, -np.inf, np.abs(h) - lr[:, None])  # (q, k)
            j_rel = np.argmax(viol, axis=1)
            vmax = viol[np.arange(rows.size), j_rel]
            rel = vmax > tol[rows]
            if rel.any():
                rr = rows[rel]
                jj = j_rel[rel]
                f[rr, jj] = True
                s[rr, jj] = -np.sign(h[rel, jj])
            done = rows[~rel]
            todo = np.setdiff1d(todo, done, assume_unique=True)
    if todo.size:
        ok[todo] = False
    return W, iters, ok


def _kkt_holds(G: np.ndarray, C: np.ndarray, lam: np.ndarray, tol: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Row-wise check of Eq. 5's optimality conditions (sufficient: the problem is convex).

    Σw = 1; with h = 2(Gw − c) + ν (ν fitted on the nonzero weights): h_i = −λ·sign(w_i) where
    w_i ≠ 0 and |h_i| ≤ λ where w_i = 0, all within ``tol``.
    """
    S = np.sign(W)  # (n, k)
    F = S != 0
    g2 = W @ (2.0 * G) - 2.0 * C  # (n, k)
    nfree = np.maximum(F.sum(axis=1), 1)
    nu = -np.sum(np.where(F, g2 + lam[:, None] * S, 0.0), axis=1) / nfree
    h = g2 + nu[:, None]
    err_free = np.where(F, np.abs(h + lam[:, None] * S), 0.0).max(axis=1)
    err_zero = np.where(F, -np.inf, np.abs(h) - lam[:, None]).max(axis=1)
    return (np.abs(W.sum(axis=1) - 1.0) <= 1e-9) & (err_free <= 10 * tol) & (err_zero <= 10 * tol)
