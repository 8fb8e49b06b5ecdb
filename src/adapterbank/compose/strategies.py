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
may be given instead (then scale-dependent). λ also has its natural scale, ``lam_frac`` = λ/λ_max in
[0, 1] (0: Lin, 1: the convex-hull projection), scale-free too. The effective values are returned in
``WeightResult.params``.

:data:`STRATEGIES` is the only list of strategies: each :class:`Strategy` row carries the name, the column
title, the parameters (:class:`Param`: kind, bounds, default, description) and the reference, and the
harness's default list, the score tables' columns, the CLI's ``--param NAME=VALUE`` and ``compose()``'s
lookup (:func:`get_strategy`) all read it. :func:`register_strategy` adds a row at run time::

    register_strategy(Strategy("mine", my_fn, "Mine", "my weighting", "my paper", (Param("alpha", ...),)))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapterbank._validation import Bounds
from adapterbank.compose.solvers import (
    ParameterError,
    SolveResult,
    check_problem,
    hull_projection,
    lambda_max,
    solve_lin,
    solve_sparse,
)
from adapterbank.errors import LambdaAtHullWarning, SolverError, UnknownNameError

__all__ = ["WeightResult", "Param", "Strategy", "STRATEGIES", "get_strategy", "register_strategy",
           "unregister_strategy", "parse_param_specs", "compute_weights", "distances", "distance_scale",
           "DEFAULT_TAU_REL", "DEFAULT_LAM_FRAC"]

DEFAULT_TAU_REL = 1.0
#: Sparse's default λ = λ_max, the convex-hull projection: the best λ fraction on both benchmarks (A: flat,
#: 0.7365 at every fraction; B: 0.7339 at 1 against 0.6548–0.7234 below it — extrapolating with negative
#: weights fails on the sites at the ends of the prototype axis). BENCHMARKS.md, "Composition selection".
DEFAULT_LAM_FRAC = 1.0


@dataclass(frozen=True)
class WeightResult:
    """Weights (k,) summing to 1, the effective parameters used, the solver status and objective."""

    weights: np.ndarray
    params: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    objective: float | None = None


@dataclass(frozen=True)
class Param:
    """One parameter of a strategy, its constraint as data: a ``kind`` (only ``"number"`` for now) in
    ``[low, high]`` (``low`` excluded when ``low_open``), its ``default`` (``None``: derived, see the description).

    >>> Param("tau", "number", 0.0, None, None, "absolute temperature", low_open=True).check("sim", "2")
    2.0
    >>> Param("lam", "number", 0.0, None, None, "absolute λ").check("sparse", -1)
    Traceback (most recent call last):
    ...
    adapterbank.errors.ParameterError: The 'lam' parameter of sparse must be a number ≥ 0. Got -1 instead.
    """

    name: str
    kind: str
    low: float | None
    high: float | None
    default: float | None
    description: str
    low_open: bool = False

    @property
    def bounds(self) -> Bounds:
        """This parameter's constraint as a :class:`~adapterbank._validation.Bounds` record."""
        return Bounds("number", self.low, self.high, low_open=self.low_open)

    def check(self, strategy: str, value: Any) -> float:
        """``value`` (a number, or a string spelling one) as a float within this parameter's bounds; else
        ParameterError/NonFiniteError with the one message template (:mod:`adapterbank._validation`)."""
        return float(self.bounds.check(value, self.name, strategy, parse=True))


@dataclass(frozen=True)
class Strategy:
    """One row of :data:`STRATEGIES`: a name, the pure function, its column title, what it does, where it is
    from, its parameters, its place among the score tables' columns (``order``; ties: registration order) and
    whether its weights depend on k (``False``: left out of the score-vs-k sweep)."""

    name: str
    fn: Callable[..., WeightResult]
    display: str
    description: str
    reference: str
    params: tuple[Param, ...] = ()
    order: int = 100
    depends_on_k: bool = True
    exclusive: tuple[tuple[str, ...], ...] = ()

    def check_exclusive(self, params: Mapping[str, Any]) -> None:
        """Refuse ``params`` that give more than one parameter of a group in :attr:`exclusive` (e.g. ``lam`` and
        ``lam_frac``: two settings of the same λ) with a ParameterError naming them.

        >>> get_strategy("sparse").check_exclusive({"lam_rel": 0.1, "lam_frac": 0.5})
        Traceback (most recent call last):
        ...
        adapterbank.errors.ParameterError: Give only one of 'lam', 'lam_rel', 'lam_frac' to sparse. Got lam_rel=0.1 and lam_frac=0.5.
        """
        for group in self.exclusive:
            given = [n for n in group if params.get(n) is not None]
            if len(given) > 1:
                names = ", ".join(repr(n) for n in group)
                got = " and ".join(f"{n}={params[n]!r}" for n in given)
                raise ParameterError(f"Give only one of {names} to {self.name}. Got {got}.")

    @property
    def param_names(self) -> tuple[str, ...]:
        """The names of :attr:`params`, in table order."""
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        """The parameter called ``name``; an unknown name raises an error listing the valid ones."""
        for p in self.params:
            if p.name == name:
                return p
        valid = ", ".join(self.param_names) if self.params else "none"
        raise UnknownNameError(f"Unknown parameter {name!r} for strategy {self.name!r}. Valid parameters: {valid}.")


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


def _resolve(strategy: str, abs_param: Param, rel_param: Param, abs_value: float | None, rel_value: float | None,
             scale: float) -> tuple[float, float]:
    """(absolute, relative) value of τ or λ from whichever of the two was given (else the relative default)."""
    STRATEGIES[strategy].check_exclusive({abs_param.name: abs_value, rel_param.name: rel_value})
    if abs_value is not None:
        a = abs_param.check(strategy, abs_value)
        return a, a / scale
    r = rel_param.check(strategy, rel_param.default if rel_value is None else rel_value)
    return r * scale, r


_TAU = Param("tau", "number", 0.0, None, None, "Sim: absolute temperature τ (default: tau_rel · median distance).",
             low_open=True)
_TAU_REL = Param("tau_rel", "number", 0.0, None, DEFAULT_TAU_REL, "Sim: τ relative to the median squared distance.",
                 low_open=True)
_LAM = Param("lam", "number", 0.0, None, None, "Sparse: absolute λ (instead of lam_frac).")
_LAM_REL = Param("lam_rel", "number", 0.0, None, None,
                 "Sparse: λ relative to the median squared distance (0: Lin; instead of lam_frac).")
_LAM_FRAC = Param("lam_frac", "number", 0.0, 1.0, DEFAULT_LAM_FRAC,
                  "Sparse: λ as a fraction of λ_max, λ = lam_frac · λ_max (0: Lin, 1: the convex-hull projection, "
                  "the default).")
_SPARSE_LAMS = ("lam", "lam_rel", "lam_frac")


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
    t_abs, t_rel = _resolve("sim", _TAU, _TAU_REL, tau, tau_rel, scale)
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
           lam_rel: float | None = None, lam_frac: float | None = None) -> WeightResult:
    """Eq. 5 ("ours"): ``argmin_w ‖p_T − Pᵀw‖² + λ‖w‖₁  s.t. 1ᵀw = 1``, solved exactly.

    λ is given one of three ways (at most one): ``lam`` (absolute), ``lam_rel`` (× the median squared
    distance) or ``lam_frac`` (× λ_max, in [0, 1]; the default, 1).

    Since Σw = 1, ``λ‖w‖₁ = λ + 2λ·(negative mass)``: a unit of negative weight must reduce the squared
    residual by 2λ to be kept. The default ``lam_frac`` = 1 (λ = λ_max) keeps none: the weights are the
    projection of the target onto the convex hull of the retrieved prototypes — sparse (a face of the hull),
    never extrapolating. It was chosen from the benchmarks (BENCHMARKS.md, "Composition selection"): on A every
    fraction scores the same; on B the hull projection is Sparse's best (0.734 mean Dice against 0.655 for
    Lin and 0.69–0.72 in between), because negative weights fail on the sites at the ends of the prototype
    axis. Give a smaller ``lam_frac`` (or tune the bank: ``adapterbank tune``) to let Sparse extrapolate.

    ``lam_frac`` = F is Eq. 5's natural scale: λ = F·λ_max, where λ_max (returned in ``params``) is the
    smallest λ whose solution is the projection onto the convex hull of the prototypes. F = 0 is Lin,
    F = 1 the hull projection, and in between the path from one to the other. When λ_max = 0 (Lin's
    weights are already ≥ 0, so Lin *is* the hull projection) every F gives Lin's weights (λ = 0).

    For ``λ ≥ λ_max`` arising from ``lam`` or ``lam_rel`` a :class:`~adapterbank.errors.LambdaAtHullWarning`
    says that the weights are the hull projection (once per call); ``lam_frac = 1`` asks for the hull, so
    it does not warn. ``params`` holds the effective ``lam``, ``lam_rel``, ``lam_frac`` (= min(1, λ/λ_max);
    when λ_max = 0: the F given, else 0 for λ = 0 and 1 for λ > 0 — every λ gives the same weights),
    ``scale`` and ``lam_max``. Re-running with the recorded ``lam_frac`` gives the same weights.

    >>> P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> r = sparse(np.array([0.2, 0.3]), P)                    # inside the hull: barycentric weights
    >>> np.round(r.weights, 6).tolist(), r.status
    ([0.5, 0.2, 0.3], 'optimal')
    >>> r = sparse(np.array([2.0, 1.0]), P, lam_frac=0.5)      # outside: half way from Lin to the hull
    >>> np.round(r.weights, 6).tolist(), r.params["lam"], r.params["lam_max"]
    ([-1.0, 1.5, 0.5], 0.5, 1.0)
    """
    STRATEGIES["sparse"].check_exclusive({"lam": lam, "lam_rel": lam_rel, "lam_frac": lam_frac})
    d = distances(target, prototypes)
    scale = distance_scale(d)
    lmax = lambda_max(prototypes, target)
    if lam_frac is not None or (lam is None and lam_rel is None):
        frac = _LAM_FRAC.check("sparse", DEFAULT_LAM_FRAC if lam_frac is None else lam_frac)
        l_abs = frac * lmax  # λ_max = 0: λ = 0, Lin (which is then the hull projection) for every F
        l_rel = l_abs / scale
    else:
        l_abs, l_rel = _resolve("sparse", _LAM, _LAM_REL, lam, lam_rel, scale)
        frac = min(1.0, l_abs / lmax) if lmax > 0 else (1.0 if l_abs > 0 else 0.0)
        if 0.0 < lmax <= l_abs:
            warnings.warn(f"sparse: λ = {l_abs:.4g} (lam_rel = {l_rel:.4g}) is ≥ λ_max = {lmax:.4g}, so the weights are "
                          "the projection onto the convex hull of the retrieved prototypes (no negative weight). Give "
                          f"lam_frac < 1 (λ = lam_frac·λ_max) or lam_rel < {lmax / scale:.4g} to keep the negative "
                          "weights that bring the target closer.", LambdaAtHullWarning, stacklevel=3)
    if 0.0 < lmax <= l_abs:  # from λ_max on (lam_frac = 1 included): the hull projection, weights exactly ≥ 0
        hull = hull_projection(prototypes, target)
        res = SolveResult(hull.weights, hull.objective + l_abs * float(np.abs(hull.weights).sum()), hull.status,
                          hull.iterations)
    else:
        res = solve_sparse(prototypes, target, l_abs)
    return WeightResult(res.weights, {"lam": l_abs, "lam_rel": l_rel, "lam_frac": frac, "scale": scale,
                                      "lam_max": lmax}, res.status, res.objective)


def nearest(target: np.ndarray, prototypes: np.ndarray) -> WeightResult:
    """All weight on the nearest prototype (ties → the lowest index).

    >>> nearest(np.zeros(2), np.array([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])).weights.tolist()
    [0.0, 1.0, 0.0]
    """
    d = distances(target, prototypes)
    w = np.zeros(prototypes.shape[0])
    w[int(np.argmin(d))] = 1.0
    return WeightResult(w, {}, "ok")


# The table. Its order is registration order (``--strategies all``, error messages); ``order`` places the
# columns of the score tables as in Table 1 of the seed paper (Nearest, Avg, Sim, Lin, Sparse).
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("avg", avg, "Avg", "uniform weights 1/k", "AdapterSoup (Chronopoulou et al., 2023)", order=20),
        Strategy("sim", sim, "Sim", "softmax of negative squared distances, τ relative to their median (Eq. 3)",
                 "LoRA-Retriever (Zhao et al., 2024)", (_TAU, _TAU_REL), order=30,
                 exclusive=(("tau", "tau_rel"),)),
        Strategy("lin", lin, "Lin", "sum-to-one least squares, negative weights allowed, min-norm (Eq. 4)",
                 "Beyond adapter retrieval, Eq. 4", order=40),
        Strategy("sparse", sparse, "Sparse", "sum-to-one least squares + λ‖w‖₁, exact active set (Eq. 5)",
                 "Beyond adapter retrieval, Eq. 5 (ours)", (_LAM, _LAM_REL, _LAM_FRAC), order=50,
                 exclusive=(_SPARSE_LAMS,)),
        Strategy("nearest", nearest, "Nearest", "all weight on the nearest prototype", "k = 1 retrieval", order=10,
                 depends_on_k=False),
    )
}
_BUILTIN = frozenset(STRATEGIES)
_RESERVED = frozenset({"all", "pretrained", "sft"})  # "--strategies all" and the evaluation's baselines


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; an unknown name raises an error listing the valid ones.

    >>> get_strategy("sparse").param_names
    ('lam', 'lam_rel', 'lam_frac')
    """
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise UnknownNameError(f"Unknown strategy {name!r}. Valid strategies: {', '.join(STRATEGIES)}.") from None


def register_strategy(strategy: Strategy, *, replace: bool = False) -> Strategy:
    """Add ``strategy`` to :data:`STRATEGIES` at run time; from then on compose, evaluate (``"all"``), the score
    tables and the CLI's ``--strategy``/``--param`` know it. A name already taken is refused unless ``replace``
    (built-ins are never replaced). Returns ``strategy``.

    >>> def half(target, prototypes):
    ...     return WeightResult(np.full(prototypes.shape[0], 1.0 / prototypes.shape[0]))
    >>> _ = register_strategy(Strategy("half", half, "Half", "uniform, again", "a doctest"))
    >>> compute_weights("half", np.zeros(2), np.eye(2)).weights.tolist()
    [0.5, 0.5]
    >>> unregister_strategy("half")
    """
    if not isinstance(strategy, Strategy):
        raise TypeError(f"register_strategy() needs a Strategy. Got {type(strategy).__name__} instead.")
    name = strategy.name
    if (not isinstance(name, str) or not name.isidentifier() or name in _RESERVED):
        raise ParameterError(f"The 'name' of a strategy must be a Python identifier other than "
                             f"{', '.join(sorted(_RESERVED))}. Got {name!r} instead.")
    if not callable(strategy.fn):
        raise ParameterError(f"The 'fn' of strategy {name!r} must be callable. Got {type(strategy.fn).__name__} instead.")
    for p in strategy.params:
        if p.kind != "number":
            raise ParameterError(f"Parameter {p.name!r} of strategy {name!r} must be of kind 'number'. "
                                 f"Got {p.kind!r} instead.")
        if p.default is not None:
            p.check(name, p.default)
    if name in STRATEGIES and (name in _BUILTIN or not replace):
        why = "a built-in" if name in _BUILTIN else "already registered (pass replace=True)"
        raise ParameterError(f"Cannot register strategy {name!r}: the name is {why}.")
    STRATEGIES[name] = strategy
    return strategy


def unregister_strategy(name: str) -> None:
    """Remove a strategy added by :func:`register_strategy` (built-ins cannot be removed)."""
    if name in _BUILTIN:
        raise ParameterError(f"Cannot unregister {name!r}: it is a built-in strategy.")
    get_strategy(name)
    del STRATEGIES[name]


def parse_param_specs(specs: Sequence[str], strategies: Sequence[str], flag: str = "--param"
                      ) -> dict[str, dict[str, float]]:
    """``["lam_rel=0.5", "sim.tau_rel=2"]`` → ``{strategy: {param: value}}``, validated against the table.

    ``STRATEGY.NAME=VALUE`` sets one strategy's parameter; a bare ``NAME=VALUE`` sets it for every strategy
    in ``strategies`` that has a parameter called ``NAME`` (at least one must).

    >>> parse_param_specs(["lam_rel=0.5", "sim.tau_rel=2"], ["avg", "sim", "sparse"])
    {'sparse': {'lam_rel': 0.5}, 'sim': {'tau_rel': 2.0}}
    >>> parse_param_specs(["lam_rel=-1"], ["sparse"])
    Traceback (most recent call last):
    ...
    adapterbank.errors.ParameterError: The 'lam_rel' parameter of sparse must be a number ≥ 0. Got '-1' instead.
    """
    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        key, eq, value = spec.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ParameterError(f"{flag} takes NAME=VALUE or STRATEGY.NAME=VALUE (e.g. {flag} lam_rel=0.5). "
                                 f"Got {spec!r} instead.")
        if "." in key:
            sname, _, pname = key.partition(".")
            owners = [get_strategy(sname)]
            if sname not in strategies:
                raise ParameterError(f"{flag} {spec!r} sets a parameter of {sname!r}, which is not among the "
                                     f"strategies run ({', '.join(strategies)}).")
            owners[0].param(pname)
        else:
            pname = key
            owners = [s for s in map(get_strategy, strategies) if pname in s.param_names]
            if not owners:
                known = sorted({f"{s.name}.{n}" for s in map(get_strategy, strategies) for n in s.param_names})
                raise UnknownNameError(f"{flag} {spec!r}: no strategy among {', '.join(strategies)} has a parameter "
                                       f"{pname!r}. Valid parameters: {', '.join(known) or 'none'}.")
        for s in owners:
            out.setdefault(s.name, {})[pname] = s.param(pname).check(s.name, value)
    return out


def compute_weights(name: str, target: np.ndarray, prototypes: np.ndarray, **params: float) -> WeightResult:
    """Validate the inputs and parameters, run strategy ``name``, check its weights.

    >>> P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> r = compute_weights("sim", np.array([0.1, 0.1]), P, tau_rel=0.5)
    >>> r.params["tau_rel"], round(float(r.weights.sum()), 12)
    (0.5, 1.0)
    """
    strat = get_strategy(name)
    P, t = check_problem(prototypes, target, name)
    unknown = sorted(set(params) - set(strat.param_names))
    if unknown:
        valid = ", ".join(strat.param_names) if strat.params else "none"
        raise UnknownNameError(f"Unknown parameter(s) {', '.join(map(repr, unknown))} for strategy {name!r}. "
                               f"Valid parameters: {valid}.")
    strat.check_exclusive(params)
    res = strat.fn(t, P, **params)
    w = np.asarray(res.weights, dtype=np.float64)
    if w.shape != (P.shape[0],) or not np.isfinite(w).all() or abs(float(w.sum()) - 1.0) > 1e-8:
        raise SolverError(f"Strategy {name!r} returned invalid weights {w!r} for k={P.shape[0]} (expected "
                          "finite weights summing to 1).")
    return res
