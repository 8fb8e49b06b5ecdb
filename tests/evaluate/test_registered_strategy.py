"""A strategy registered outside the package (a plugin file in the test's tmp dir) is composed, evaluated by
``evaluate()`` with its default strategy list, shown in results.md, and reachable from the CLI — with no
other edit. Plus: the harness retrieves once per target, and ``--param`` on the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterbank.bank import Bank
from adapterbank.cli import app
from adapterbank.compose import STRATEGIES, compose, unregister_strategy
from adapterbank.errors import AdapterbankError
from adapterbank.evaluate import evaluate, write_report
from adapterbank.evaluate.evaluator import load_callable
from adapterbank.prototypes.space import Prototype

PLUGIN = '''
import numpy as np
from adapterbank.compose.strategies import Param, Strategy, WeightResult, distances, register_strategy


def invdist(target, prototypes, power=None):
    """w_i ∝ 1 / (d_i + ε)^power."""
    p = 1.0 if power is None else float(power)
    d = distances(target, prototypes)  # (k,)
    w = (d + 1e-12) ** -p
    return WeightResult(w / w.sum(), {"power": p})


def register():
    register_strategy(Strategy("invdist", invdist, "InvDist", "inverse squared distance weights", "a test plugin",
                               (Param("power", "number", 0.0, None, 1.0, "exponent of 1/d"),)), replace=True)
'''


def _invdist(target: np.ndarray, P: np.ndarray, power: float) -> np.ndarray:
    d = ((P.astype(np.float64) - target.astype(np.float64)) ** 2).sum(axis=1)
    w = (d + 1e-12) ** -power
    return w / w.sum()


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[str]:
    """``<tmp>/ab_invdist_plugin.py:register``, registered in this process for the test, removed after it."""
    f = tmp_path / "ab_invdist_plugin.py"
    f.write_text(PLUGIN)
    spec = f"{f}:register"
    load_callable(spec, "strategy plugin")()
    try:
        yield spec
    finally:
        if "invdist" in STRATEGIES:
            unregister_strategy("invdist")


def test_registered_strategy_is_composed_evaluated_and_reported(plugin: str, toy_bank: Any, delta_eval: Any,
                                                                tmp_path: Path) -> None:
    bank = Bank.open(toy_bank.path)
    try:
        p_t = bank.get_prototype("t")
        comp = compose(bank, p_t, k=3, strategy="invdist", params={"power": 2.0}, exclude=["t"])
        P = np.stack([bank.get_prototype(i).vector for i in comp.ids])
        np.testing.assert_allclose(comp.weights, _invdist(p_t.vector, P, 2.0), rtol=1e-9)
        assert comp.params == {"power": 2.0} and comp.strategy == "invdist"
        res = evaluate(bank, delta_eval, targets=["t"], tasks=toy_bank.tasks, k=3)  # default strategies
    finally:
        bank.close()
    assert res.config["strategies"] == ["avg", "sim", "lin", "sparse", "nearest", "invdist"]
    rec = res.main("t", "invdist")
    assert rec is not None and rec.effective_params == {"power": 1.0} and "t" not in rec.ids
    assert res.methods == ["pretrained", "sft", "nearest", "avg", "sim", "lin", "sparse", "invdist"]
    out = write_report(res, tmp_path / "report", plots=False)
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| target"))
    assert header.split("|")[-2].strip() == "InvDist"  # the last column, titled from the table


def test_registered_strategy_from_the_cli(plugin: str, toy_bank: Any, tmp_path: Path, norm_evaluator: Path) -> None:
    # a real subprocess: nothing is registered there but what --strategy-plugin registers
    proto = tmp_path / "t.npy"
    Prototype(toy_bank.protos["t"], Bank.open(toy_bank.path).get_prototype("t").space).save(proto)
    out = tmp_path / "composite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-m", "adapterbank.cli", "compose", str(toy_bank.path), "--prototype", str(proto),
            "-k", "3", "--exclude", "t", "--strategy", "invdist", "--param", "power=2", "-o", str(out)]
    r = subprocess.run([*args, "--strategy-plugin", plugin], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    recipe = json.loads((out / "composition.json").read_text())
    assert recipe["strategy"] == "invdist" and recipe["params"] == {"power": 2.0}
    ids = list(recipe["weights"])
    bank = Bank.open(toy_bank.path)
    P = np.stack([bank.get_prototype(i).vector for i in ids])
    bank.close()
    np.testing.assert_allclose(list(recipe["weights"].values()), _invdist(toy_bank.protos["t"], P, 2.0), rtol=1e-6)
    r = subprocess.run([*args[:-2], "-o", str(tmp_path / "c2")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Unknown strategy 'invdist'" in r.stderr  # without the hook: unknown

    # evaluate in-process (the strategy is registered here), with a per-strategy --param
    rep = tmp_path / "report"
    r2 = CliRunner().invoke(app, ["evaluate", str(toy_bank.path), "--evaluator", f"{norm_evaluator}:score", "-k", "3",
                                  "-o", str(rep), "--strategies", "avg,invdist", "--param", "invdist.power=3",
                                  "--no-plots"])
    assert r2.exit_code == 0, r2.output
    assert "InvDist" in r2.output and "InvDist" in (rep / "results.md").read_text()
    recs = json.loads((rep / "results.json").read_text())["records"]
    assert {r["params"].get("power") for r in recs if r["method"] == "invdist"} == {3.0}


def test_cli_param_is_checked_against_the_table(toy_bank: Any, tmp_path: Path, norm_evaluator: Path) -> None:
    base = ["evaluate", str(toy_bank.path), "--evaluator", f"{norm_evaluator}:score", "-k", "3", "-o",
            str(tmp_path / "r"), "--no-plots", "--strategies", "avg,sparse"]
    r = CliRunner().invoke(app, [*base, "--param", "tau_rel=2"])
    assert isinstance(r.exception, AdapterbankError) and "Valid parameters: sparse.lam, sparse.lam_frac, sparse.lam_rel." in str(r.exception)
    r = CliRunner().invoke(app, [*base, "--param", "lam_rel=-1"])
    assert "The 'lam_rel' parameter of sparse must be a number ≥ 0" in str(r.exception)
    r = CliRunner().invoke(app, [*base, "--param", "lam_rel=0.5", "--lam-rel", "0.5"])
    assert "given twice" in str(r.exception)
    r = CliRunner().invoke(app, [*base, "--param", "lam_rel=0.25"])
    assert r.exit_code == 0, r.output
    recs = json.loads((tmp_path / "r" / "results.json").read_text())["records"]
    assert {x["effective_params"]["lam_rel"] for x in recs if x["method"] == "sparse"} == {0.25}


def test_one_retrieval_per_target(toy_bank: Any, delta_eval: Any) -> None:
    bank = Bank.open(toy_bank.path)
    try:
        res = evaluate(bank, delta_eval, tasks=toy_bank.tasks, k=3, sweep_k=[2, 4], sweep_lam=[0.01, 1.0])
    finally:
        bank.close()
    assert res.meta["retrievals"] == len(res.targets) == 6
    by_k = {r.k: r.ids for r in res.records if r.target == "t" and r.method == "avg"}
    assert by_k[2] == by_k[4][:2] and by_k[3] == by_k[4][:3]  # the k nearest: a prefix of the one search
    assert "t" in res.lambda_paths and res.lambda_paths["t"].ids == by_k[3]
