"""`adapterbank evaluate` end to end on the toy bank: tables printed, report written, cache reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from adapterbank.cli import app

def test_evaluate_command_prints_tables_writes_report_and_caches(toy_bank: Any, tmp_path: Path,
                                                                 norm_evaluator: Path) -> None:
    ev = norm_evaluator
    out = tmp_path / "report"
    args = ["evaluate", str(toy_bank.path), "--evaluator", f"{ev}:score", "-k", "3", "-o", str(out),
            "--strategies", "avg,sparse", "--no-plots"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "norm" in r.output and "Sparse" in r.output and "Pre-trained" in r.output
    res = json.loads((out / "results.json").read_text())
    methods = {rec["method"] for rec in res["records"]}
    assert {"pretrained", "sft", "avg", "sparse"} <= methods
    assert (out / "index.html").is_file() and (out / "results.md").is_file()
    calls = ev.with_suffix(".calls").read_text().splitlines()
    n_targets = len(res["targets"])
    assert len(calls) == 4 * n_targets  # pretrained, sft, avg, sparse per target
    r2 = CliRunner().invoke(app, args)  # everything cached: the evaluator is not called again
    assert r2.exit_code == 0, r2.output
    assert ev.with_suffix(".calls").read_text().splitlines() == calls


def test_evaluate_command_refuses_unknown_strategy_and_evaluator(toy_bank: Any, tmp_path: Path) -> None:
    from adapterbank.errors import AdapterbankError

    r = CliRunner().invoke(app, ["evaluate", str(toy_bank.path), "--evaluator", "no_such_mod_xyz:score"])
    assert r.exit_code != 0 and isinstance(r.exception, AdapterbankError) and "no_such_mod_xyz" in str(r.exception)
    ev = tmp_path / "e.py"
    ev.write_text("def score(a, t):\n    return {'x': 1.0}\n")
    r = CliRunner().invoke(app, ["evaluate", str(toy_bank.path), "--evaluator", f"{ev}:score", "--strategies", "best"])
    assert r.exit_code != 0 and isinstance(r.exception, AdapterbankError) and "best" in str(r.exception)


def test_evaluate_command_with_target_prototypes(toy_bank: Any, tmp_path: Path, norm_evaluator: Path) -> None:
    """--include-self with held-out target prototypes: the own adapter is no longer at distance 0."""
    import numpy as np

    from adapterbank.prototypes.space import Prototype, PrototypeSpace

    ev = norm_evaluator
    tp = tmp_path / "targets"
    tp.mkdir()
    v = toy_bank.protos["t"].astype(np.float32) + 0.05
    Prototype(v, PrototypeSpace("toy-encoder", "r1", "mean", False, 8), 5, "held out").save(tp / "t.npy")
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["evaluate", str(toy_bank.path), "--evaluator", f"{ev}:score", "-k", "3",
                                 "-o", str(out), "--strategies", "nearest", "--include-self",
                                 "--target-prototypes", str(tp), "--no-plots"])
    assert r.exit_code == 0, r.output
    recs = json.loads((out / "results.json").read_text())["records"]
    near_t = next(x for x in recs if x["target"] == "t" and x["method"] == "nearest")
    assert near_t["ids"][0] == "t" and near_t["distances"][0] > 1e-4
    near_a = next(x for x in recs if x["target"] == "a" and x["method"] == "nearest")
    assert near_a["ids"][0] == "a" and near_a["distances"][0] < 1e-9  # no held-out prototype: the degenerate case
