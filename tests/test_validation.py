"""One validation module: every public entry point checks its parameters against constraints given as data and
reports a violation with one message template and one error type per kind of violation; λ ≥ λ_max is a warning."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from adapterbank import grasp
from adapterbank._validation import MAX_K, Bounds, K, check_bool, check_choice, message
from adapterbank.bank import Bank
from adapterbank.compose import compose, compute_weights, get_strategy
from adapterbank.errors import LambdaAtHullWarning, NonFiniteError, ParameterError, UnknownNameError
from adapterbank.evaluate import evaluate
from adapterbank.evaluate.bootstrap import paired_bootstrap
from adapterbank.lora import LoraAdapter, LoraModule, truncate
from adapterbank.prototypes import Prototype, PrototypeSpace
from adapterbank.prototypes.compute import compute_prototype
from adapterbank.prototypes.encoders import CallableEncoder
from adapterbank.prototypes.inputs import iter_batches

SPACE = PrototypeSpace("toy-encoder", "r1", "mean", False, 8)
IDS = ("a", "b", "c", "d")


def _adapter(seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter({"fc": LoraModule(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 1.0, (5, 6))},
                       "toy-base", {})


def _proto(seed: int) -> Prototype:
    return Prototype(np.random.default_rng(seed).standard_normal(8), SPACE, n_samples=3, source=f"seed{seed}")


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small adapters with random prototypes in R^8: each is outside the hull of the other three."""
    root = tmp_path_factory.mktemp("validation") / "bank"
    bank = Bank.init(root)
    for i, aid in enumerate(IDS):
        bank.add(_adapter(i), id=aid, base_model="toy-base", prototype=_proto(i))
    bank.close()
    return root


@pytest.fixture
def bank(bank_dir: Path) -> Any:
    b = Bank.open(bank_dir)
    yield b
    b.close()


def _score(adapter: Any, task: Any) -> dict[str, float]:
    return {"score": 0.0}


# (entry point, the parameter, its owner in the message, its constraint, call(bank, value))
ENTRY_POINTS: list[tuple[str, str, str, Bounds, Callable[[Any, Any], Any]]] = [
    ("compose", "k", "compose", K, lambda b, v: compose(b, _proto(9), k=v)),
    ("compose", "rank", "compose", Bounds("int", 1, optional=True), lambda b, v: compose(b, _proto(9), k=2, rank=v)),
    ("compose", "max_rank", "compose", Bounds("int", 1, optional=True),
     lambda b, v: compose(b, _proto(9), k=2, max_rank=v)),
    ("Bank.search", "k", "search", K, lambda b, v: b.search(_proto(9), k=v)),
    ("evaluate", "k", "evaluate", K, lambda b, v: evaluate(b, _score, k=v)),
    ("evaluate", "sweep_k", "evaluate", K, lambda b, v: evaluate(b, _score, k=2, sweep_k=[2, v])),
    ("evaluate", "sweep_lam", "evaluate", Bounds("number", 0.0), lambda b, v: evaluate(b, _score, sweep_lam=[v])),
    ("evaluate", "lam_rel", "sparse", get_strategy("sparse").param("lam_rel").bounds,
     lambda b, v: evaluate(b, _score, params={"sparse": {"lam_rel": v}})),
    ("compute_weights", "tau", "sim", get_strategy("sim").param("tau").bounds,
     lambda b, v: compute_weights("sim", np.zeros(2), np.eye(2), tau=v)),
    ("truncate", "rank", "truncate", Bounds("int", 1), lambda b, v: truncate(_adapter(0), v)),
    ("compute_prototype", "batch_size", "compute_prototype", Bounds("int", 1),
     lambda b, v: compute_prototype(CallableEncoder(lambda xs: [[1.0, 0.0] for _ in xs], name="c"), ["x"],
                                    batch_size=v)),
    ("iter_batches", "limit", "iter_batches", Bounds("int", 0, optional=True),
     lambda b, v: list(iter_batches(["x"], 1, limit=v))),
    ("paired_bootstrap", "ci", "paired_bootstrap", Bounds("number", 0.0, 1.0, low_open=True, high_open=True),
     lambda b, v: paired_bootstrap([1.0, 2.0], [0.0, 1.0], n_boot=10, ci=v)),
    ("paired_bootstrap", "n_boot", "paired_bootstrap", Bounds("int", 1),
     lambda b, v: paired_bootstrap([1.0, 2.0], [0.0, 1.0], n_boot=v)),
    ("grasp.inject", "rank", "inject", Bounds("int", 1), lambda b, v: grasp.inject(nn.Linear(2, 2), 2, v)),
    ("grasp.inject", "n_groups", "inject", Bounds("int", 1), lambda b, v: grasp.inject(nn.Linear(2, 2), v, 2)),
]


def invalid_values(c: Bounds, parses: bool) -> list[tuple[Any, type[Exception], str]]:
    """Values that break ``c``, each with the error type and the "must be" part the message must carry
    (``parses``: the entry point takes strings that spell a number, as strategy parameters do)."""
    out: list[tuple[Any, type[Exception], str]] = [(True, ParameterError, c.describe()),
                                                    ("x" if parses else "3", ParameterError, c.describe())]
    if not c.optional and not parses:  # a strategy parameter given as None takes its default
        out.append((None, ParameterError, c.describe()))
    if c.low is not None:
        out.append((c.low if c.low_open else c.low - 1, ParameterError, c.describe()))
    if c.high is not None:
        out.append((c.high if c.high_open else c.high + 1, ParameterError, c.describe()))
    if c.kind == "int":
        inside = c.low if c.low is not None else 0
        out.append((inside + 0.5, ParameterError, c.describe()))  # in range, not an int
        out.append((np.float64(inside), ParameterError, c.describe()))
    else:
        out += [(math.nan, NonFiniteError, "finite"), (-math.inf, NonFiniteError, "finite")]
    return out


NONE_IS_DEFAULT = {("compose", "k")}  # compose(k=None): the tuned k of strategy="auto", else 5

CASES = [pytest.param(call, name, owner, value, err, what, id=f"{entry}-{name}-{value!r}")
         for entry, name, owner, bounds, call in ENTRY_POINTS
         for value, err, what in invalid_values(bounds, parses=entry == "compute_weights")
         if not (value is None and (entry, name) in NONE_IS_DEFAULT)]


@pytest.mark.parametrize(("call", "name", "owner", "value", "err", "what"), CASES)
def test_every_entry_point_rejects_with_one_template(bank: Any, call: Callable[[Any, Any], Any], name: str,
                                                     owner: str, value: Any, err: type[Exception], what: str) -> None:
    with pytest.raises(err) as ei:
        call(bank, value)
    assert type(ei.value) is err  # not a subclass, not ShapeMismatchError/FormatError/EncoderError
    assert str(ei.value) == f"The '{name}' parameter of {owner} must be {what}. Got {value!r} instead."


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "3", MAX_K + 1])
def test_an_invalid_k_is_the_same_error_everywhere(bank: Any, value: Any) -> None:
    got = {}
    for owner, call in (("compose", lambda: compose(bank, _proto(9), k=value)),
                        ("search", lambda: bank.search(_proto(9), k=value)),
                        ("evaluate", lambda: evaluate(bank, _score, k=value))):
        with pytest.raises(ParameterError) as ei:
            call()
        got[owner] = str(ei.value)
    assert got == {o: message("k", o, f"an int in [1, {MAX_K}]", value) for o in got}


def test_valid_values_pass_and_come_back_normalised(bank: Any) -> None:
    assert K.check(np.int64(3), "k", "search") == 3 and type(K.check(np.int64(3), "k", "search")) is int
    assert Bounds("number", 0.0).check(2, "lam", "sparse") == 2.0
    assert Bounds("int", 1, optional=True).check(None, "rank", "compose") is None
    assert get_strategy("sparse").param("lam_rel").check("sparse", "0.5") == 0.5  # command-line strings parse
    assert [h.id for h in bank.search(_proto(0), k=np.int64(1))] == ["a"]


def test_choice_and_bool() -> None:
    with pytest.raises(UnknownNameError, match=re.escape("must be one of avg, sim. Got 'x' instead.")):
        check_choice("x", "strategy", "compose", ["avg", "sim"])
    assert check_bool(np.bool_(True), "overwrite", "save") is True
    for bad in (1, "yes", None):
        with pytest.raises(ParameterError, match="must be a bool"):
            check_bool(bad, "overwrite", "save")


def _cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "adapterbank.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=600)


def test_cli_k_errors_are_the_library_message(bank_dir: Path, tmp_path: Path) -> None:
    target = _proto(9).save(tmp_path / "target.npy")
    for k in (0, -1, MAX_K + 1):
        for cmd, owner, extra in (("compose", "compose", ["-o", tmp_path / "out"]), ("search", "search", [])):
            r = _cli(cmd, bank_dir, "--prototype", target, "-k", k, *extra)
            assert r.returncode == 2, (cmd, k, r.stdout, r.stderr)
            assert r.stderr.strip() == f"error: {message('k', owner, f'an int in [1, {MAX_K}]', k)}", r.stderr
    assert not (tmp_path / "out").exists()


# --- λ ≥ λ_max --------------------------------------------------------------------------------------------


def test_sparse_warns_when_lambda_reaches_the_hull() -> None:
    P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    outside = np.array([2.0, 1.0])  # Lin puts negative weight on the origin: λ_max = 1 (solvers' doctest)
    with pytest.warns(LambdaAtHullWarning, match=r"λ = 1\.5 .*≥ λ_max = 1\b") as rec:
        r = compute_weights("sparse", outside, P, lam=1.5)
    assert len(rec) == 1 and min(r.weights) >= 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", LambdaAtHullWarning)
        compute_weights("sparse", outside, P, lam=0.5)  # below λ_max: negative weight kept, no warning
        assert min(compute_weights("sparse", outside, P, lam=0.5).weights) < 0
        compute_weights("sparse", np.array([0.2, 0.3]), P, lam=5.0)  # inside the hull: λ_max = 0, nothing to say


def test_compose_warns_once_per_call(bank: Any) -> None:
    p = [_proto(i).vector for i in range(3)]
    target = Prototype(1.6 * p[0] - 0.8 * p[1] + 0.2 * p[2], SPACE, 3, "affine")  # Lin: a negative weight on b
    with warnings.catch_warnings():
        warnings.simplefilter("error", LambdaAtHullWarning)
        assert min(compose(bank, target, ids=["a", "b", "c"], params={"lam_rel": 1e-3}).weights) < 0
    with pytest.warns(LambdaAtHullWarning) as rec:
        comp = compose(bank, target, ids=["a", "b", "c"], params={"lam_rel": 1e6})
    assert len([w for w in rec if w.category is LambdaAtHullWarning]) == 1 and min(comp.weights) >= 0


def test_evaluate_tells_lambda_at_hull_once(bank: Any) -> None:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = evaluate(bank, _score, strategies=["sparse"], k=3, sweep_lam=[1e3, 1e6], baselines=())
    hull = [w for w in rec if w.category is LambdaAtHullWarning]
    e = [r.effective_params for r in res.records if r.method == "sparse"]
    # the main table uses the default lam_frac = 1 (the hull, asked for: no warning); the λ sweep gives absolute λ
    at_hull = [r.effective_params for r in res.records if r.method == "sparse" and r.sweep == "lam"
               and r.effective_params["lam"] >= r.effective_params["lam_max"] > 0]
    assert len(e) == 3 * len(IDS) and len(at_hull) >= 2  # at least the two large λ of the sweep for one target
    assert len(hull) == 1 and f"in {len(at_hull)} composition(s)" in str(hull[0].message)
