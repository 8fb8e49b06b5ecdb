"""λ relative to λ_max in the harness, the λ-path plot, and the CLI (``--lam-frac``, ``--sweep-lam-frac``), on the
toy bank whose target t = 1.4a − 0.6b + 0.2c lies outside the hull (λ_max > 0)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterbank.bank import Bank
from adapterbank.cli import app
from adapterbank.compose.solvers import lambda_max, solve_lin
from adapterbank.errors import LambdaAtHullWarning, ParameterError
from adapterbank.evaluate import EvalResults, evaluate, load_results
from adapterbank.evaluate.plots import lambda_path_data, plot_lambda_path
from adapterbank.evaluate.results import LambdaPath
from adapterbank.prototypes.space import Prototype, PrototypeSpace

SPACE = PrototypeSpace("toy-encoder", "r1", "mean", False, 8)  # the toy bank's space (conftest)
FRACS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _run(tb: Any, ev: Any, **kw: Any) -> EvalResults:
    bank = Bank.open(tb.path)
    try:
        return evaluate(bank, ev, targets=["t"], tasks=tb.tasks, **kw)
    finally:
        bank.close()


def _pool(tb: Any, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    P = np.stack([tb.protos[i].astype(np.float32).astype(np.float64) for i in ids])
    return P, tb.protos["t"].astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def res_frac(toy_bank_affine: Any, delta_eval: Any) -> EvalResults:
    with warnings.catch_warnings():
        warnings.simplefilter("error", LambdaAtHullWarning)  # lam_frac = 1 asks for the hull: no warning
        return _run(toy_bank_affine, delta_eval, strategies=("lin", "sparse"), baselines=(), k=5,
                    params={"sparse": {"lam_frac": 0.25}}, sweep_lam_frac=[1.0, 0.5, 0.0, 0.25, 0.75, 0.5])


def test_sweep_lam_frac_scores_sparse_from_lin_to_the_hull(res_frac: EvalResults, toy_bank_affine: Any) -> None:
    assert res_frac.config["sweep_lam_frac"] == FRACS
    series = res_frac.series("rel_error", "lam_frac")
    assert list(series) == ["sparse"] and [x for x, _ in series["sparse"]["t"]] == FRACS
    recs = {r.params["lam_frac"]: r for r in res_frac.records if r.sweep == "lam_frac"}
    lin = res_frac.main("t", "lin")
    assert lin is not None
    P, t = _pool(toy_bank_affine, lin.ids)
    lmax = lambda_max(P, t)
    assert lmax > 0
    for f, r in recs.items():
        assert r.effective_params["lam"] == pytest.approx(f * lmax, rel=1e-6)
        assert r.effective_params["lam_max"] == pytest.approx(lmax, rel=1e-6)
    np.testing.assert_allclose(recs[0.0].weights, lin.weights, atol=1e-9)  # F = 0 is Lin
    np.testing.assert_allclose(recs[0.0].weights, solve_lin(P, t).weights, atol=1e-6)
    assert min(recs[1.0].weights) >= 0.0 and min(recs[0.0].weights) < -0.5  # F = 1 is the hull projection
    # the truth is Lin's affine combination: the score worsens from F = 0 towards the hull
    err = dict(series["sparse"]["t"])
    assert err[0.0] < 1e-4 < err[0.5] < err[1.0]
    main = res_frac.main("t", "sparse")
    assert main is not None and main.params == {"lam_frac": 0.25}
    assert main.weights == recs[0.25].weights


def test_lambda_path_on_the_lam_frac_axis(res_frac: EvalResults, toy_bank_affine: Any, tmp_path: Path) -> None:
    lp = res_frac.lambda_paths["t"]
    P, t = _pool(toy_bank_affine, lp.ids)
    assert lp.lam_max == pytest.approx(lambda_max(P, t), rel=1e-6)
    main = res_frac.main("t", "sparse")
    assert main is not None and lp.chosen_lam == main.effective_params["lam"]
    data = lambda_path_data(lp)
    assert data is not None and not data["flat"] and not data["approx"] and not data["past_hull"]
    x, W = data["x"], data["weights"]
    assert x[0] == 0.0 and x[-1] == 1.0 and (np.diff(x) > 0).all() and len(x) >= 41
    assert W.shape == (len(x), 5)
    np.testing.assert_allclose(W[0], solve_lin(P, t).weights, atol=1e-6)  # x = 0: Lin
    assert W[-1].min() >= 0.0 and W[0].min() < -0.5  # x = 1: the hull
    assert data["chosen"] == pytest.approx(0.25) and data["lam_max"] == lp.lam_max
    out = plot_lambda_path(res_frac, "t", tmp_path / "lp.png")
    assert out is not None and out.stat().st_size > 1000
    again = load_results(_write(res_frac, tmp_path)).lambda_paths["t"]  # lam_max survives results.json
    assert again.lam_max == lp.lam_max


def _write(res: EvalResults, tmp_path: Path) -> Path:
    p = tmp_path / "results.json"
    p.write_text(json.dumps(res.to_dict()))
    return p


def test_lambda_path_data_edge_cases() -> None:
    # past λ_max: the marker sits at 1 and says so; grid points past λ_max are dropped
    lp = LambdaPath("t", ["a", "b"], [0.0, 1.0, 2.0, 4.0], [[-1, 2], [0, 1], [0, 1], [0, 1]], 3.0, 2.0)
    d = lambda_path_data(lp)
    assert d is not None and d["x"].tolist() == [0.0, 0.5, 1.0] and d["chosen"] == 1.0 and d["past_hull"]
    # λ_max = 0 (Lin already ≥ 0): constant weights over [0, 1]
    lp0 = LambdaPath("t", ["a", "b"], [0.0], [[0.3, 0.7]], 0.1, 0.0)
    d0 = lambda_path_data(lp0)
    assert d0 is not None and d0["flat"] and d0["x"].tolist() == [0.0, 1.0]
    assert d0["weights"].tolist() == [[0.3, 0.7], [0.3, 0.7]] and not d0["past_hull"]
    # results written before λ_max was stored: the first grid λ whose weights are all ≥ 0
    old = LambdaPath("t", ["a", "b"], [4.0, 0.0, 1.0, 2.0], [[0, 1], [-1, 2], [-0.5, 1.5], [0, 1]], 0.5)
    d1 = lambda_path_data(old)
    assert d1 is not None and d1["approx"] and d1["lam_max"] == 2.0 and d1["x"].tolist() == [0.0, 0.5, 1.0]
    assert LambdaPath.from_dict({k: v for k, v in old.to_dict().items() if k != "lam_max"}).lam_max is None


def test_bad_lam_frac_settings_fail_before_any_evaluator_call(toy_bank_affine: Any) -> None:
    calls: list[Any] = []

    def ev(adapter: Any, task: Any) -> dict[str, float]:
        calls.append(adapter)
        return {"x": 0.0}

    with pytest.raises(ParameterError, match=r"The 'sweep_lam_frac' parameter of evaluate must be a number in "
                       r"\[0, 1\]. Got 1.5 instead."):
        _run(toy_bank_affine, ev, sweep_lam_frac=[0.5, 1.5])
    with pytest.raises(ParameterError, match="Give only one of 'lam', 'lam_rel', 'lam_frac' to sparse"):
        _run(toy_bank_affine, ev, params={"sparse": {"lam_rel": 0.1, "lam_frac": 0.5}})
    assert calls == []


def test_sweep_lam_frac_beside_a_main_lam_rel(toy_bank_affine: Any, delta_eval: Any) -> None:
    """The sweep replaces the main table's λ setting (lam_rel here) instead of clashing with it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LambdaAtHullWarning)
        res = _run(toy_bank_affine, delta_eval, strategies=("sparse",), baselines=(),
                   params={"sparse": {"lam_rel": 0.5}}, sweep_lam_frac=[0.5], sweep_lam=[0.01])
    assert [r.params for r in res.records if r.sweep == "lam_frac"] == [{"lam_frac": 0.5}]
    assert [r.params for r in res.records if r.sweep == "lam"] == [{"lam_rel": 0.01}]


def _target_npy(tb: Any, tmp_path: Path) -> Path:
    path = tmp_path / "t.npy"
    Prototype(tb.protos["t"].astype(np.float32), SPACE, 10, "toy:t").save(path)
    return path


@pytest.mark.parametrize("how", [["--lam-frac", "0.5"], ["--param", "lam_frac=0.5"]])
def test_compose_lam_frac_option_is_recorded(toy_bank_affine: Any, tmp_path: Path, how: list[str]) -> None:
    out = tmp_path / "comp"
    r = CliRunner().invoke(app, ["compose", str(toy_bank_affine.path), "--prototype",
                                 str(_target_npy(toy_bank_affine, tmp_path)), "--exclude", "t", "-k", "5", "-o",
                                 str(out), *how])
    assert r.exit_code == 0, r.output
    assert "lam_frac=0.5" in r.output
    params = json.loads((out / "composition.json").read_text())["params"]
    assert params["lam_frac"] == 0.5 and params["lam_max"] > 0
    assert params["lam"] == pytest.approx(0.5 * params["lam_max"], rel=1e-12)
    recipe = json.loads((out / "composition.json").read_text())
    P, t = _pool(toy_bank_affine, recipe["retrieval"]["ids"])
    assert params["lam_max"] == pytest.approx(lambda_max(P, t), rel=1e-6)


@pytest.mark.parametrize("args,pattern", [
    (["--lam-frac", "1.5"], r"The 'lam_frac' parameter of sparse must be a number in \[0, 1\]. Got 1.5 instead."),
    (["--lam-frac", "0.5", "--lam-rel", "0.1"], "Give only one of 'lam', 'lam_rel', 'lam_frac' to sparse"),
    (["--lam-frac", "0.5", "--param", "lam_frac=0.2"], "given twice"),
])
def test_compose_bad_lam_frac_is_refused(toy_bank_affine: Any, tmp_path: Path, args: list[str], pattern: str) -> None:
    r = CliRunner().invoke(app, ["compose", str(toy_bank_affine.path), "--prototype",
                                 str(_target_npy(toy_bank_affine, tmp_path)), "--exclude", "t", "-o",
                                 str(tmp_path / "bad"), *args])
    assert r.exit_code != 0 and isinstance(r.exception, ParameterError)
    assert re.search(pattern, str(r.exception)), str(r.exception)
    assert not (tmp_path / "bad").exists()


def test_evaluate_cli_lam_frac_and_sweep(toy_bank_affine: Any, tmp_path: Path, norm_evaluator: Path) -> None:
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["evaluate", str(toy_bank_affine.path), "--evaluator", f"{norm_evaluator}:score",
                                 "-k", "3", "-o", str(out), "--strategies", "sparse", "--lam-frac", "0.25",
                                 "--sweep-lam-frac", "0,0.5,1"])
    assert r.exit_code == 0, r.output
    res = load_results(out / "results.json")
    assert res.config["params"] == {"sparse": {"lam_frac": 0.25}} and res.config["sweep_lam_frac"] == [0.0, 0.5, 1.0]
    assert all(r.effective_params["lam_frac"] == 0.25 for r in res.records if r.method == "sparse" and not r.sweep)
    assert sorted({x for per in res.series("norm", "lam_frac").values() for pts in per.values()
                   for x, _ in pts}) == [0.0, 0.5, 1.0]
    md = (out / "results.md").read_text()
    assert "norm vs lam_frac" in md and "lam_frac=0.5" in md
    assert (out / "plots" / "sweep_lam_frac_norm.png").is_file()
    assert list((out / "plots").glob("lambda_path_*.png"))
