"""Combination-weight strategies: one table of pure functions ``(p_T (d,), P (k, d), **params) -> weights (k,)``.

All strategies share the retrieval step (the k nearest prototypes); they differ only in how w is
computed (seed paper, "Comparison methods"):

=========  ===========================================  ==============================================
name       weights                                      reference
=========  ===========================================  ==============================================
avg        w_i = 1/k                                    AdapterSoup (Chronopoulou et al., 2023)
sim        w = softmax(−d/τ), d_i = ‖p_T − p_i‖² (2–3)  LoRA-Retriever (Zhao et al., 2024)
lin        argmin ‖p_T − Pᵀw‖², 1ᵀw = 1 (4)            least squares with sum-to-one
sparse     argmin ‖p_T − Pᵀw‖² + λ‖w‖₁, 1ᵀw = 1 (5)    sparse projection, the seed paper's method
nearest    all weight on argmin_i d_i                   k = 1 retrieval
=========  ===========================================  ==============================================

Scale-free defaults: τ and λ are squared distances, so both are set relative to the median squared
distance d_med = median_i d_i of the retrieved prototypes (the mean if the median is 0, 1 if all
distances are 0): τ = τ_rel·d_med, λ = λ_rel·d_med. Scaling the target and the prototypes by the same
factor, or translating them together, then leaves every weight unchanged. An absolute ``tau``/``lam``
may be given instead (then scale-dependent). The effective values are returned in
``WeightResult.params``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from adapterbank.compose.solvers import ParameterError, check_problem, lambda_max, solve_lin, solve_sparse
from adapterbank.errors import NonFiniteError, SolverError, UnknownNameError

__all__ = ["WeightResult", "Strategy", "STRATEGIES", "get_strategy", "compute_weights", "distances",
           "distance_scale", "DEFAULT_TAU_REL", "DEFAULT_LAM_REL"]

DEFAULT_TAU_REL = 1.0
DEFAULT_LAM_REL = 0.1


@dataclass(frozen=True)
class WeightResult:
    """Weights (k,) summing to 1, the effective parameters used, the solver status and objective."""

    weights: np.ndarray
    params: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    objective: float | None = None


@dataclass(frozen=True)
class Strategy:
    """One row of :data:`STRATEGIES`: a name, the pure function, what it does and where it is from."""

    name: str
    fn: Callable[..., WeightResult]
    description: str
    reference: str
    params: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------


def distances(target: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Eq. 2: ``d_i = ‖p_T − p_i‖²`` for every row of ``prototypes`` (k,).

    >>> distances(np.array([0.0, 0.0]), np.array([[3.0, 4.0], [1.0, 0.0]])).tolist()
    [25.0, 1.0]
    """
    diff = prototypes - target[None, :]  # (k, d)
    return np.einsum("kd,kd->k", diff, diff)


def distance_scale(d: np.ndarray) -> float:
    """The squared-distance scale of τ and λ: median(d), else mean(d) if the median is 0, else 1.

    >>> distance_scale(np.array([0.0, 0.0, 3.0])), distance_scale(np.array([1.0, 2.0, 9.0]))
    (1.0, 2.0)
    """
    med = float(np.median(d))
    if med > 0:
        return med
    mean = float(np.mean(d))
    return mean if mean > 0 else 1.0


def _positive(name: str, strategy: str, value: float, allow_zero: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"The '{name}' parameter of {strategy} must be a number. Got {value!r} instead.") from None
    if not math.isfinite(v):
        raise NonFiniteError(f"The '{name}' parameter of {strategy} must be finite. Got {value!r} instead.")
    if v < 0 or (v == 0 and not allow_zero):
        rel = "≥ 0" if allow_zero else "> 0"
        raise ParameterError(f"The '{name}' parameter of {strategy} must be {rel}. Got {value!r} instead.")
    return v


def _resolve(strategy: str, abs_name: str, rel_name: str, abs_value: float | None, rel_value: float | None,
             default_rel: float, scale: float, allow_zero: bool) -> tuple[float, float]:
    """(absolute, relative) value of τ or λ from whichever of the two was given."""
    if abs_value is not None and rel_value is not None:
        raise ParameterError(f"Give either '{abs_name}' or '{rel_name}' to {strategy}, not both. "
                             f"Got {abs_name}={abs_value!r} and {rel_name}={rel_value!r}.")
    if abs_value is not None:
        a = _positive(abs_name, strategy, abs_value, allow_zero)
        return a, a / scale
    r = _positive(rel_name, strategy, default_rel if rel_value is None else rel_value, allow_zero)
    return r * scale, r


# ----------------------------------------------------------------------------------------------
# the strategies
# ----------------------------------------------------------------------------------------------


def avg(target: np.ndarray, prototypes: np.ndarray) -> WeightResult:
    """Uniform weights ``w_i = 1/k`` (AdapterSoup).

    >>> avg(np.zeros(2), np.eye(2)).weights.tolist()
    [0.5, 0.5]
    """
    k = prototypes.shape[0]
    return WeightResult(np.full(k, 1.0 / k), {}, "ok")


def sim(target: np.ndarray, prototypes: np.ndarray, tau: float | None = None,
        tau_rel: float | None = None) -> WeightResult:
    """Eq. 3: ``w = softmax(−d/τ)`` with ``d_i = ‖p_T − p_i‖²`` (LoRA-Retriever style).

    ``τ = tau_rel · median(d)`` (``tau_rel`` default 1: the nearest prototype outweighs one at the
    median distance by a factor e^(1 − d_min/d_med) ≤ e), or an absolute ``tau``.

    >>> r = sim(np.zeros(2), np.array([[1.0, 0.0], [2.0, 0.0]]), tau=1.0)
    >>> np.round(r.weights, 4).tolist(), r.params["tau"]
    ([0.9526, 0.0474], 1.0)
    """
    d = distances(target, prototypes)
    scale = distance_scale(d)
    t_abs, t_rel = _resolve("sim", "tau", "tau_rel", tau, tau_rel, DEFAULT_TAU_REL, scale, allow_zero=False)
    z = -(d - d.min()) / t_abs  # (k,) ≤ 0, the max is 0: no overflow
    e = np.exp(z)
    return WeightResult(e / e.sum(), {"tau": t_abs, "tau_rel": t_rel, "scale": scale}, "ok")


def lin(target: np.ndarray, prototypes: np.ndarray) -> WeightResult:
    """Eq. 4: ``argmin_w ‖p_T − Pᵀw‖²  s.t. 1ᵀw = 1``; negative weights allowed; min-norm if not unique.

    >>> r = lin(np.array([2.0, 1.0]), np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    >>> np.round(r.weights, 6).tolist(), r.status
    ([-2.0, 2.0, 1.0], 'optimal')
    """
    res = solve_lin(prototypes, target)
    return WeightResult(res.weights, {}, res.status, res.objective)


def sparse(target: np.ndarray, prototypes: np.ndarray, lam: float | None = None,
           lam_rel: float | None = None) -> WeightResult:
    """Eq. 5 ("ours"): ``argmin_w ‖p_T − Pᵀw‖² + λ‖w‖₁  s.t. 1ᵀw = 1``, solved exactly.

    ``λ = lam_rel · median(d)`` with ``lam_rel`` default 0.1. Since Σw = 1, ``λ‖w‖₁ = λ + 2λ·(negative
    mass)``: a unit of negative weight must reduce the squared residual by 2λ = 0.2·d_med to be kept,
    i.e. by a fifth of a typical squared distance. That removes negative weights that only fit noise
    (Lin's extrapolation) yet keeps them when the target lies far outside the hull; for
    ``λ ≥ lam_max`` (returned in ``params``) the weights are the projection onto the convex hull.
    ``lam_rel = 0`` is Lin.

    >>> P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> r = sparse(np.array([0.2, 0.3]), P)                    # inside the hull: barycentric weights
    >>> np.round(r.weights, 6).tolist(), r.status
    ([0.5, 0.2, 0.3], 'optimal')
    """
    d = distances(target, prototypes)
    scale = distance_scale(d)
    l_abs, l_rel = _resolve("sparse", "lam", "lam_rel", lam, lam_rel, DEFAULT_LAM_REL, scale, allow_zero=True)
    res = solve_sparse(prototypes, target, l_abs)
    lmax = lambda_max(prototypes, target)
    return WeightResult(res.weights, {"lam": l_abs, "lam_rel": l_rel, "scale": scale, "lam_max": lmax},
                        res.status, res.objective)


def nearest(target: np.ndarray, prototypes: np.ndarray) -> WeightResult:
    """All weight on the nearest prototype (ties → the lowest index).

    >>> nearest(np.zeros(2), np.array([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])).weights.tolist()
    [0.0, 1.0, 0.0]
    """
    d = distances(target, prototypes)
    w = np.zeros(prototypes.shape[0])
    w[int(np.argmin(d))] = 1.0
    return WeightResult(w, {}, "ok")


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("avg", avg, "uniform weights 1/k", "AdapterSoup (Chronopoulou et al., 2023)"),
        Strategy("sim", sim, "softmax of negative squared distances, τ relative to their median (Eq. 3)",
                 "LoRA-Retriever (Zhao et al., 2024)", ("tau", "tau_rel")),
        Strategy("lin", lin, "sum-to-one least squares, negative weights allowed, min-norm (Eq. 4)",
                 "Beyond adapter retrieval, Eq. 4"),
        Strategy("sparse", sparse, "sum-to-one least squares + λ‖w‖₁, exact active set (Eq. 5)",
                 "Beyond adapter retrieval, Eq. 5 (ours)", ("lam", "lam_rel")),
        Strategy("nearest", nearest, "all weight on the nearest prototype", "k = 1 retrieval"),
    )
}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; an unknown name raises an error listing the valid ones.

    >>> get_strategy("sparse").params
    ('lam', 'lam_rel')
    """
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise UnknownNameError(f"Unknown strategy {name!r}. Valid strategies: {', '.join(STRATEGIES)}.") from None


def compute_weights(name: str, target: np.ndarray, prototypes: np.ndarray, **params: float) -> WeightResult:
    """Validate the inputs and parameters, run strategy ``name``, check its weights.

    >>> P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> r = compute_weights("sim", np.array([0.1, 0.1]), P, tau_rel=0.5)
    >>> r.params["tau_rel"], round(float(r.weights.sum()), 12)
    (0.5, 1.0)
    """
    strat = get_strategy(name)
    P, t = check_problem(prototypes, target, name)
    unknown = sorted(set(params) - set(strat.params))
    if unknown:
        valid = ", ".join(strat.params) if strat.params else "none"
        raise UnknownNameError(f"Unknown parameter(s) {', '.join(map(repr, unknown))} for strategy {name!r}. "
                               f"Valid parameters: {valid}.")
    res = strat.fn(t, P, **params)
    w = np.asarray(res.weights, dtype=np.float64)
    if w.shape != (P.shape[0],) or not np.isfinite(w).all() or abs(float(w.sum()) - 1.0) > 1e-8:
        raise SolverError(f"Strategy {name!r} returned invalid weights {w!r} for k={P.shape[0]} (expected "
                          "finite weights summing to 1).")
    return res
