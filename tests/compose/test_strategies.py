"""The strategy table: one contract test over STRATEGIES itself, then each strategy against its formula."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from adapterbank.compose.solvers import hull_projection, solve_lin, solve_sparse
from adapterbank.compose.strategies import (
    DEFAULT_LAM_FRAC,
    DEFAULT_TAU_REL,
    STRATEGIES,
    Param,
    Strategy,
    WeightResult,
    avg,
    compute_weights,
    distances,
    get_strategy,
    parse_param_specs,
    register_strategy,
    unregister_strategy,
)
from adapterbank.errors import NonFiniteError, ParameterError, ShapeMismatchError, UnknownNameError

# strategies whose weights do not change when target and prototypes are scaled/translated together
SCALE_FREE = {"avg", "sim", "lin", "sparse", "nearest"}


def problem(k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=d) * 1.5, rng.normal(size=(k, d))


def test_registry_is_exactly_the_five_strategies() -> None:
    assert list(STRATEGIES) == ["avg", "sim", "lin", "sparse", "nearest"]
    assert {n: s.display for n, s in STRATEGIES.items()} == {
        "avg": "Avg", "sim": "Sim", "lin": "Lin", "sparse": "Sparse", "nearest": "Nearest"}
    assert get_strategy("sim").param_names == ("tau", "tau_rel")
    assert get_strategy("sparse").param("lam_frac").default == DEFAULT_LAM_FRAC == 1.0
    assert get_strategy("sparse").param("lam_rel").default is None
    assert get_strategy("sim").param("tau_rel").default == DEFAULT_TAU_REL
    assert [n for n, s in STRATEGIES.items() if not s.depends_on_k] == ["nearest"]


@pytest.mark.parametrize("strategy", list(STRATEGIES.values()), ids=list(STRATEGIES))
def test_table_row_contract(strategy: Strategy) -> None:
    """Every row of the registry is complete, and every parameter's default passes its own constraint and runs."""
    assert isinstance(strategy, Strategy) and STRATEGIES[strategy.name] is strategy
    assert strategy.display and strategy.description and strategy.reference and callable(strategy.fn)
    t, P = problem(4, 3, 5)
    for p in strategy.params:
        assert isinstance(p, Param) and p.kind == "number" and p.description
        if p.default is not None:
            assert p.check(strategy.name, p.default) == p.default
            res = compute_weights(strategy.name, t, P, **{p.name: p.default})
            assert res.params[p.name] == pytest.approx(p.default)
        if p.low is not None:  # just below the lower bound is refused with the house message
            with pytest.raises(ParameterError, match=f"The '{p.name}' parameter of {strategy.name} must be"):
                p.check(strategy.name, p.low - 1.0)
        if p.high is not None:  # and just above the upper bound
            with pytest.raises(ParameterError, match=f"The '{p.name}' parameter of {strategy.name} must be"):
                p.check(strategy.name, p.high + 1e-9)
    for group in strategy.exclusive:  # exclusive groups name real parameters
        assert set(group) <= set(strategy.param_names)


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("k,d", [(1, 4), (2, 3), (5, 16), (12, 3), (8, 384)])
def test_strategy_contract(name: str, k: int, d: int) -> None:
    t, P = problem(k, d, seed=k * 31 + d)
    res = compute_weights(name, t, P)
    assert isinstance(res, WeightResult)
    assert res.weights.shape == (k,) and res.weights.dtype == np.float64
    assert np.isfinite(res.weights).all()
    assert abs(res.weights.sum() - 1) < 1e-9
    assert all(isinstance(v, float) for v in res.params.values())
    again = compute_weights(name, t.copy(), P.copy())
    assert np.array_equal(again.weights, res.weights) and again.params == res.params  # deterministic
    if name in SCALE_FREE:
        for a, b in ((1e-3, 0.0), (1e4, 0.0), (1.0, 50.0)):
            scaled = compute_weights(name, a * t + b, a * P + b)
            np.testing.assert_allclose(scaled.weights, res.weights, atol=1e-7, err_msg=f"{name} a={a} b={b}")


def _first(target: np.ndarray, prototypes: np.ndarray, share: float = 1.0) -> WeightResult:
    """All weight on the first retrieved prototype, or ``share`` of it with the rest spread evenly."""
    k = prototypes.shape[0]
    w = np.full(k, (1.0 - share) / max(k - 1, 1)) if k > 1 else np.ones(1)
    w[0] = share if k > 1 else 1.0
    return WeightResult(w, {"share": float(share)})


def test_register_and_unregister_a_strategy() -> None:
    row = Strategy("first", _first, "First", "weight on the first hit", "a test",
                   (Param("share", "number", 0.0, 1.0, 1.0, "weight of the first hit"),))
    assert register_strategy(row) is row
    try:
        assert list(STRATEGIES)[-1] == "first" and get_strategy("first") is row
        t, P = problem(4, 3, 0)
        assert compute_weights("first", t, P, share=0.7).weights.tolist()[0] == pytest.approx(0.7)
        with pytest.raises(ParameterError, match="already registered"):
            register_strategy(row)
        register_strategy(row, replace=True)
        assert parse_param_specs(["share=0.5"], ["avg", "first"]) == {"first": {"share": 0.5}}
        with pytest.raises(ParameterError, match=r"The 'share' parameter of first must be a number in \[0, 1\]. Got '2' instead."):
            parse_param_specs(["first.share=2"], ["first"])
    finally:
        unregister_strategy("first")
    assert "first" not in STRATEGIES
    with pytest.raises(UnknownNameError, match="Valid strategies: avg, sim, lin, sparse, nearest"):
        get_strategy("first")


def test_registration_refuses_builtins_reserved_names_and_bad_rows() -> None:
    with pytest.raises(ParameterError, match="built-in"):
        register_strategy(Strategy("avg", avg, "Avg", "again", "x"), replace=True)
    with pytest.raises(ParameterError, match="built-in"):
        unregister_strategy("sparse")
    for bad in ("all", "sft", "pretrained", "my.strategy", "a,b", ""):
        with pytest.raises(ParameterError, match="must be a Python identifier"):
            register_strategy(Strategy(bad, avg, "X", "x", "x"))
    with pytest.raises(ParameterError, match="kind 'number'"):
        register_strategy(Strategy("mine", avg, "Mine", "x", "x", (Param("p", "text", None, None, None, "x"),)))
    with pytest.raises(ParameterError, match="The 'p' parameter of mine must be a number > 0"):
        register_strategy(Strategy("mine", avg, "Mine", "x", "x", (Param("p", "number", 0.0, None, 0.0, "x", True),)))
    with pytest.raises(TypeError):
        register_strategy("mine")  # type: ignore[arg-type]
    assert "mine" not in STRATEGIES


def test_parse_param_specs() -> None:
    assert parse_param_specs([], ["avg"]) == {}
    assert parse_param_specs(["lam_rel=0.5", "sim.tau_rel=2", "tau=3"], ["sim", "sparse"]) == {
        "sparse": {"lam_rel": 0.5}, "sim": {"tau_rel": 2.0, "tau": 3.0}}
    with pytest.raises(UnknownNameError, match="no strategy among avg, lin has a parameter 'lam_rel'. Valid "
                                               "parameters: none"):
        parse_param_specs(["lam_rel=0.5"], ["avg", "lin"])
    with pytest.raises(UnknownNameError, match="Valid parameters: lam, lam_rel"):
        parse_param_specs(["sparse.lambda=0.5"], ["sparse"])
    with pytest.raises(UnknownNameError, match="Valid strategies"):
        parse_param_specs(["magic.x=1"], ["sparse"])
    with pytest.raises(ParameterError, match="not among the strategies run"):
        parse_param_specs(["sim.tau=1"], ["sparse"])
    for bad in ("lam_rel", "lam_rel=", "=3"):
        with pytest.raises(ParameterError, match="NAME=VALUE"):
            parse_param_specs([bad], ["sparse"])
    with pytest.raises(ParameterError, match="must be a number ≥ 0. Got 'big' instead"):
        parse_param_specs(["lam_rel=big"], ["sparse"])
    with pytest.raises(NonFiniteError):
        parse_param_specs(["tau=nan"], ["sim"])


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="avg, sim, lin, sparse, nearest"):
        get_strategy("magic")
    with pytest.raises(KeyError):
        compute_weights("magic", np.zeros(2), np.eye(2))


def test_unknown_parameter_lists_valid_ones() -> None:
    t, P = problem(3, 4, 0)
    with pytest.raises(UnknownNameError, match="'lam'.*Valid parameters: tau, tau_rel"):
        compute_weights("sim", t, P, lam=1.0)
    with pytest.raises(UnknownNameError, match="Valid parameters: none"):
        compute_weights("avg", t, P, tau=1.0)


def test_bad_parameter_values() -> None:
    t, P = problem(3, 4, 0)
    with pytest.raises(ValueError, match="The 'lam' parameter of sparse must be a number ≥ 0. Got -1 instead."):
        compute_weights("sparse", t, P, lam=-1)
    with pytest.raises(ValueError, match="The 'tau' parameter of sim must be a number > 0. Got 0 instead."):
        compute_weights("sim", t, P, tau=0)
    with pytest.raises(ValueError, match="'tau_rel'"):
        compute_weights("sim", t, P, tau_rel=-2.0)
    with pytest.raises(ParameterError, match="Give only one of 'lam', 'lam_rel', 'lam_frac' to sparse. Got lam=1.0 "
                       "and lam_rel=0.1."):
        compute_weights("sparse", t, P, lam=1.0, lam_rel=0.1)
    with pytest.raises(ParameterError, match="Got lam_rel=0.1 and lam_frac=0.5"):
        compute_weights("sparse", t, P, lam_rel=0.1, lam_frac=0.5)
    with pytest.raises(ParameterError, match="Give only one of 'tau', 'tau_rel' to sim"):
        compute_weights("sim", t, P, tau=1.0, tau_rel=0.1)
    with pytest.raises(ValueError, match="must be a number"):
        compute_weights("sparse", t, P, lam_rel="big")
    with pytest.raises(NonFiniteError):
        compute_weights("sparse", t, P, lam=float("nan"))


def test_bad_inputs() -> None:
    t, P = problem(3, 4, 0)
    with pytest.raises(ShapeMismatchError, match="dim 4"):
        compute_weights("avg", t[:2], P)
    with pytest.raises(ShapeMismatchError):
        compute_weights("avg", t, P[0])
    P2 = P.copy()
    P2[2, 0] = np.inf
    for name in STRATEGIES:
        with pytest.raises(NonFiniteError):
            compute_weights(name, t, P2)
        with pytest.raises(NonFiniteError):
            compute_weights(name, np.full(4, np.nan), P)


def test_avg_and_nearest() -> None:
    t, P = problem(4, 3, 1)
    np.testing.assert_array_equal(compute_weights("avg", t, P).weights, np.full(4, 0.25))
    d = ((P - t) ** 2).sum(axis=1)
    assert compute_weights("nearest", t, P).weights.tolist() == np.eye(4)[np.argmin(d)].tolist()
    P_tie = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # all at distance 1: lowest index wins
    assert compute_weights("nearest", np.zeros(2), P_tie).weights.tolist() == [1.0, 0.0, 0.0]


def test_sim_is_softmax_of_negative_distances() -> None:
    t, P = problem(6, 5, 2)
    d = ((P - t) ** 2).sum(axis=1)
    res = compute_weights("sim", t, P, tau=2.0)
    want = np.exp(-d / 2.0) / np.exp(-d / 2.0).sum()
    np.testing.assert_allclose(res.weights, want, rtol=1e-12)
    res = compute_weights("sim", t, P)  # default: τ = 1 · median(d)
    assert res.params["tau"] == pytest.approx(np.median(d)) and res.params["tau_rel"] == 1.0
    res = compute_weights("sim", t, P, tau_rel=0.25)
    assert res.params["tau"] == pytest.approx(0.25 * np.median(d))
    # far-away prototypes underflow to 0 weight, never NaN
    far = compute_weights("sim", np.zeros(2), np.array([[0.0, 0.0], [1e6, 0.0]]), tau=1.0)
    assert far.weights.tolist() == [1.0, 0.0]
    # all distances 0: uniform
    same = compute_weights("sim", np.ones(3), np.ones((4, 3)))
    np.testing.assert_allclose(same.weights, 0.25)


def test_lin_and_sparse_use_the_solvers() -> None:
    t, P = problem(7, 5, 3)
    d = distances(t, P)
    lin = compute_weights("lin", t, P)
    np.testing.assert_array_equal(lin.weights, solve_lin(P, t).weights)
    assert lin.objective == pytest.approx(solve_lin(P, t).objective)
    sp = compute_weights("sparse", t, P, lam_rel=0.1)
    lam = 0.1 * float(np.median(d))
    assert sp.params["lam"] == pytest.approx(lam) and sp.params["lam_rel"] == 0.1
    assert sp.params["scale"] == pytest.approx(float(np.median(d)))
    np.testing.assert_array_equal(sp.weights, solve_sparse(P, t, lam).weights)
    assert sp.status.startswith("optimal") and sp.objective is not None
    # the default: λ = λ_max, the hull projection (no LambdaAtHullWarning: it is asked for)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = compute_weights("sparse", t, P)
    assert default.params["lam_frac"] == 1.0 and default.params["lam"] == pytest.approx(default.params["lam_max"])
    np.testing.assert_array_equal(default.weights, hull_projection(P, t).weights)
    np.testing.assert_allclose(compute_weights("sparse", t, P, lam_rel=0.0).weights, lin.weights, atol=1e-10)
    # above λ_max: the projection onto the hull (no negative weight)
    hull = compute_weights("sparse", t, P, lam=1.01 * sp.params["lam_max"] + 1e-12)
    assert (hull.weights >= 0).all()
    assert compute_weights("sparse", t, P, lam=2.0).params["lam_rel"] == pytest.approx(2.0 / np.median(d))
