"""Leave-one-out harness against the real Bank and compose(), on a bank where the right weights are known."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adapterbank.bank import Bank
from adapterbank.errors import AdapterbankError, FormatError, NonFiniteError, ParameterError, UnknownNameError
from adapterbank.evaluate import EvalResults, evaluate, load_evaluator, load_results, write_report
from adapterbank.cli.evaluate import run_evaluate
from adapterbank.evaluate.results import RESULTS_SCHEMA

STRATS = ("avg", "sim", "lin", "sparse", "nearest")


def _weights(rec: Any) -> dict[str, float]:
    return dict(zip(rec.ids, rec.weights, strict=True))


def _run(tb: Any, ev: Any, **kw: Any) -> EvalResults:
    bank = Bank.open(tb.path)
    try:
        kw.setdefault("targets", ["t"])
        kw.setdefault("tasks", tb.tasks)
        return evaluate(bank, ev, **kw)
    finally:
        bank.close()


@pytest.fixture(scope="module")
def res_in(toy_bank: Any, delta_eval: Any) -> EvalResults:
    return _run(toy_bank, delta_eval, params={"sparse": {"lam_rel": 1e-3}})


def test_lin_and_sparse_recover_the_true_weights_inside_hull(res_in: EvalResults, toy_bank: Any) -> None:
    truth = {**{i: 0.0 for i in "abcde"}, **toy_bank.true_weights}
    for method in ("lin", "sparse"):
        rec = res_in.main("t", method)
        assert rec is not None and rec.ids and "t" not in rec.ids  # leave-one-out: own adapter excluded
        w = _weights(rec)
        assert set(w) == set("abcde")
        np.testing.assert_allclose([w[i] for i in "abcde"], [truth[i] for i in "abcde"], atol=2e-5)
        # the composite's ΔW is then the true ΔW: relative error at float32 round-off
        assert rec.metrics["rel_error"] < 1e-4
    avg = res_in.main("t", "avg")
    assert avg is not None and avg.metrics["rel_error"] > 0.3
    assert res_in.main("t", "sparse").metrics["score"] > avg.metrics["score"]  # type: ignore[union-attr]
    assert res_in.main("t", "sparse").effective_params["lam_rel"] == pytest.approx(1e-3)  # type: ignore[union-attr]


def test_baselines_and_nearest(res_in: EvalResults, toy_bank: Any) -> None:
    sft = res_in.main("t", "sft")
    pre = res_in.main("t", "pretrained")
    assert sft is not None and pre is not None
    assert sft.metrics["rel_error"] < 1e-5  # the target's own adapter is the truth
    assert pre.metrics["rel_error"] == pytest.approx(1.0)  # ΔW = 0
    near = res_in.main("t", "nearest")
    d = {i: float(((toy_bank.protos[i].astype(np.float64) - toy_bank.protos["t"]) ** 2).sum()) for i in "abcde"}
    assert near is not None and near.ids[0] == min(d, key=d.get)  # type: ignore[arg-type]
    assert near.weights[0] == 1.0 and sum(abs(w) for w in near.weights[1:]) == 0.0
    np.testing.assert_allclose(near.distances, sorted(d.values()), rtol=1e-5)


def test_lin_recovers_affine_weights_outside_hull(toy_bank_affine: Any, delta_eval: Any) -> None:
    res = _run(toy_bank_affine, delta_eval, strategies=("avg", "lin", "sparse"), baselines=())
    lin, avg, sp = (res.main("t", m) for m in ("lin", "avg", "sparse"))
    assert lin is not None and avg is not None and sp is not None
    w = _weights(lin)
    np.testing.assert_allclose([w[i] for i in "abcde"], [1.4, -0.6, 0.2, 0.0, 0.0], atol=2e-5)
    assert lin.metrics["rel_error"] < 1e-4 and lin.metrics["score"] > avg.metrics["score"]
    # the default sparse λ penalises the negative weight: no longer exact, but Σw = 1 and less negative mass
    ws = np.array(sp.weights)
    assert ws.sum() == pytest.approx(1.0) and ws[ws < 0].sum() > -0.6 + 1e-6


def test_include_self_keeps_the_target_in_the_pool(toy_bank: Any, delta_eval: Any) -> None:
    res = _run(toy_bank, delta_eval, strategies=("nearest", "avg"), baselines=(), include_self=True)
    near = res.main("t", "nearest")
    assert near is not None and near.ids[0] == "t" and near.distances[0] == pytest.approx(0.0, abs=1e-9)
    assert near.include_self and near.metrics["rel_error"] < 1e-5
    assert res.config["include_self"] is True


def test_target_prototypes_replace_the_bank_prototype(toy_bank: Any, delta_eval: Any) -> None:
    """With the bank prototype the target's own adapter sits at distance 0 (the degenerate Table-6 setting); a
    target prototype from other data (here: the exact mixture 0.5a + 0.3b + 0.2c, shifted a little) is retrieved
    with, and its distances and digest are what the record and the cache key use."""
    from adapterbank.errors import PrototypeSpaceError
    from adapterbank.prototypes.space import Prototype, PrototypeSpace

    SPACE = PrototypeSpace("toy-encoder", "r1", "mean", False, 8)  # the toy bank's space (conftest)
    v = toy_bank.protos["t"].astype(np.float64) + 0.05
    p = Prototype(v.astype(np.float32), SPACE, 5, "held-out data")
    res = _run(toy_bank, delta_eval, strategies=("nearest",), baselines=(), include_self=True,
               target_prototypes={"t": p})
    near = res.main("t", "nearest")
    assert near is not None and near.distances[0] == pytest.approx(float(np.sum((v - toy_bank.protos[near.ids[0]]) ** 2)),
                                                                   rel=1e-5)
    assert near.distances[0] > 1e-4  # not the degenerate distance 0 of the bank prototype
    other = Prototype(v.astype(np.float32), PrototypeSpace("other", "r", "mean", False, 8))
    with pytest.raises(PrototypeSpaceError, match="other"):
        _run(toy_bank, delta_eval, strategies=("nearest",), baselines=(), target_prototypes={"t": other})


def test_sweeps_produce_series(toy_bank: Any, delta_eval: Any) -> None:
    res = _run(toy_bank, delta_eval, strategies=("avg", "sparse", "nearest"), baselines=("pretrained",),
               sweep_k=[1, 3, 5], sweep_lam=[1e-3, 10.0])
    sk = res.series("score", "k")
    assert set(sk) == {"avg", "sparse"}  # nearest does not depend on k
    assert [x for x, _ in sk["sparse"]["t"]] == [1.0, 3.0, 5.0]
    # with k=5 sparse is exact; with k=1 it is the nearest adapter alone
    vals = dict(sk["sparse"]["t"])
    assert vals[5.0] > vals[1.0] and vals[5.0] == pytest.approx(res.main("t", "sparse").metrics["score"])  # type: ignore[union-attr]
    sl = res.series("score", "lam")
    assert list(sl) == ["sparse"] and [x for x, _ in sl["sparse"]["t"]] == [1e-3, 10.0]
    lams = [r.effective_params["lam"] for r in res.records if r.sweep == "lam"]
    assert lams[1] == pytest.approx(lams[0] * 1e4)  # lam_rel scales the absolute λ
    path = res.lambda_paths["t"]
    assert len(path.ids) == 5 and len(path.lams) == len(path.weights)
    assert all(abs(sum(row) - 1.0) < 1e-9 for row in path.weights)


def test_cache_skips_work_and_notices_changes(toy_bank: Any, delta_eval: Any, tmp_path: Path) -> None:
    calls: list[tuple[str | None, int]] = []

    def counting(adapter: Any, task: Any) -> dict[str, float]:
        calls.append((None if adapter is None else "x", len(calls)))
        return delta_eval(adapter, task)

    counting.cache_key = "counting:v1"  # type: ignore[attr-defined]
    cache = tmp_path / "cache"
    first = _run(toy_bank, counting, cache_dir=cache, sweep_k=[2, 5])
    n_first = len(calls)
    # 2 baselines + 5 strategies + 4 strategies × 2 k-values, the k=5 ones shared with the main table — minus
    # strategies that produced exactly the same composite (same ids and weights), which are scored once
    comps = {(r.k, tuple((i, w) for i, w in zip(r.ids, r.weights) if w != 0.0))
             for r in first.records if r.method not in ("pretrained", "sft")}
    assert len(comps) < 5 + 4  # here at least Lin and Sparse agree (the target is inside the hull: λ_max = 0)
    assert n_first == 2 + len(comps)
    by_comp: dict[Any, Any] = {}
    for r in first.records:
        if r.method not in ("pretrained", "sft"):
            key = (r.k, tuple((i, w) for i, w in zip(r.ids, r.weights) if w != 0.0))
            assert by_comp.setdefault(key, r.metrics) == r.metrics
    assert first.meta["evaluator_calls"] == n_first and not any(r.cached for r in first.records if r.sweep is None)
    again = _run(toy_bank, counting, cache_dir=cache, sweep_k=[2, 5])
    assert len(calls) == n_first  # nothing recomputed
    assert all(r.cached for r in again.records)
    assert [r.metrics for r in again.records] == [r.metrics for r in first.records]
    assert [r.weights for r in again.records] == [r.weights for r in first.records]
    # a different λ for sparse: only sparse is recomputed (main table; the k-sweep keeps its own params)
    _run(toy_bank, counting, cache_dir=cache, sweep_k=[2, 5], params={"sparse": {"lam_rel": 0.5}})
    assert len(calls) == n_first + 2  # sparse at k=5 and k=2 (the others come from the disk cache, not re-scored)
    # a new evaluator version invalidates everything
    counting.cache_key = "counting:v2"  # type: ignore[attr-defined]
    _run(toy_bank, counting, cache_dir=cache, strategies=("avg",), baselines=())
    assert len(calls) == n_first + 3


def test_cache_notices_changed_adapter_content(tmp_path: Path, tiny_llama: Any, peft_adapter: Any,
                                               delta_eval: Any) -> None:
    from adapterbank.lora import LoraModule

    bank = Bank.init(tmp_path / "bank")
    from adapterbank.prototypes.space import Prototype, PrototypeSpace

    sp = PrototypeSpace("toy", None, "mean", False, 2)

    def ad(v: float) -> Any:
        from adapterbank.lora import LoraAdapter

        return LoraAdapter({"fc": LoraModule(torch.full((1, 3), v), torch.ones(2, 1), 1.0, (2, 3))})

    for i, (v, p) in enumerate([(1.0, [0.0, 0.0]), (2.0, [1.0, 0.0]), (3.0, [0.0, 1.0])]):
        bank.add(ad(v), id=f"s{i}", base_model="toy", prototype=Prototype(np.array(p), sp))
    calls: list[str] = []

    def ev(adapter: Any, task: Any) -> dict[str, float]:
        calls.append(task.id)
        return {"n": 0.0 if adapter is None else float(adapter.deltas()["fc"].sum())}

    cache = tmp_path / "cache"
    evaluate(bank, ev, strategies=("avg",), k=2, baselines=("sft",), cache_dir=cache)
    assert len(calls) == 6
    evaluate(bank, ev, strategies=("avg",), k=2, baselines=("sft",), cache_dir=cache)
    assert len(calls) == 6
    bank.add(ad(5.0), id="s2", base_model="toy", prototype=Prototype(np.array([0.0, 1.0]), sp), replace=True)
    res = evaluate(bank, ev, strategies=("avg",), k=2, baselines=("sft",), cache_dir=cache)
    # s2's own SFT, and every composition that retrieved s2, are recomputed; the rest come from the cache
    recomputed = [(r.target, r.method) for r in res.records if not r.cached]
    expected = [(r.target, r.method) for r in res.records if "s2" in r.ids]
    assert sorted(recomputed) == sorted(expected) and ("s2", "sft") in recomputed
    assert len(calls) == 6 + len(recomputed)
    bank.close()


@pytest.mark.parametrize(
    ("bad", "err", "pattern"),
    [
        (lambda a, t: {"score": float("nan")}, NonFiniteError, r"non-finite.*'score'.*target 't', method 'pretrained'"),
        (lambda a, t: [0.5], FormatError, r"must return a dict.*target 't', method 'pretrained'"),
        (lambda a, t: {}, FormatError, r"empty dict.*target 't'"),
        (lambda a, t: {"score": "high"}, FormatError, r"str 'high' for metric 'score'"),
        (lambda a, t: {"ok": True}, FormatError, r"bool True for metric 'ok'"),
        (lambda a, t: 1 / 0, AdapterbankError, r"raised ZeroDivisionError on target 't', method 'pretrained'"),
    ],
)
def test_bad_evaluator_output_names_target_and_method(toy_bank: Any, bad: Any, err: type, pattern: str) -> None:
    with pytest.raises(err, match=pattern):
        _run(toy_bank, bad)


def test_bad_evaluator_output_in_a_strategy(toy_bank: Any, delta_eval: Any) -> None:
    def ev(adapter: Any, task: Any) -> dict[str, float]:
        out = delta_eval(adapter, task)
        return {**out, "score": math.inf} if adapter is not None and adapter.metadata.get("format") == "composite" else out

    with pytest.raises(NonFiniteError, match=r"target 't', method 'avg'"):
        _run(toy_bank, ev, strategies=("avg",))


def test_bad_arguments(toy_bank: Any, delta_eval: Any) -> None:
    with pytest.raises(UnknownNameError, match="Unknown strategy 'median'.*sparse"):
        _run(toy_bank, delta_eval, strategies=("median",))
    with pytest.raises(UnknownNameError, match="Target 'zz' is not in the bank"):
        _run(toy_bank, delta_eval, targets=["zz"])
    with pytest.raises(FormatError, match="'params' parameter"):
        _run(toy_bank, delta_eval, params={"lam_rel": 0.1})
    with pytest.raises(ParameterError, match="'k' parameter"):
        _run(toy_bank, delta_eval, k=0)
    with pytest.raises(UnknownNameError, match="no entry in 'tasks'"):
        _run(toy_bank, delta_eval, targets=["t"], tasks={"a": {}})


def test_default_targets_are_all_adapters_with_a_task(toy_bank: Any, delta_eval: Any) -> None:
    res = _run(toy_bank, delta_eval, targets=None, strategies=("lin",), baselines=())
    assert res.targets == ["a", "b", "c", "d", "e", "t"]
    for t in res.targets:  # leave-one-out everywhere
        rec = res.main(t, "lin")
        assert rec is not None and t not in rec.ids and len(rec.ids) == 5


# ----- evaluator by name -----------------------------------------------------------------------

EVAL_MODULE = """
import math

def score(adapter, task):
    if adapter is None:
        return {"norm": 0.0}
    return {"norm": math.sqrt(sum(float((d.double() ** 2).sum()) for d in adapter.deltas().values()))}

NOT_CALLABLE = 3
"""


def test_evaluator_loaded_by_name(toy_bank: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = tmp_path / "evalmods"
    mod.mkdir()
    (mod / "ab_test_evals.py").write_text(textwrap.dedent(EVAL_MODULE))
    monkeypatch.syspath_prepend(str(mod))
    fn = load_evaluator("ab_test_evals:score")
    assert fn(None, None) == {"norm": 0.0}
    assert load_evaluator(f"{mod / 'ab_test_evals.py'}:score")(None, None) == {"norm": 0.0}
    with pytest.raises(UnknownNameError, match="cannot be imported"):
        load_evaluator("ab_no_such_module_xyz:score")
    with pytest.raises(UnknownNameError, match="does not define.*score"):
        load_evaluator("ab_test_evals:scor")
    with pytest.raises(UnknownNameError, match="not callable: it is a int"):
        load_evaluator("ab_test_evals:NOT_CALLABLE")
    with pytest.raises(FormatError, match="'module:function'"):
        load_evaluator("ab_test_evals")
    with pytest.raises(FileNotFoundError):
        load_evaluator(f"{tmp_path / 'nope.py'}:score")

    out = run_evaluate(toy_bank.path, "ab_test_evals:score", "all", 3, tmp_path / "report",
                       sweep_k="1-2", cache_dir=tmp_path / "cache", plots=False)
    res = load_results(out)
    assert res.config["evaluator"] == "ab_test_evals:score"
    assert set(res.targets) == {"a", "b", "c", "d", "e", "t"} and res.config["k"] == 3
    assert res.metrics == ["norm"] and res.methods == ["pretrained", "sft", "nearest", "avg", "sim", "lin", "sparse"]
    sft = res.main("a", "sft")
    assert sft is not None and sft.metrics["norm"] > 0


# ----- reports ---------------------------------------------------------------------------------

def test_report_files_and_schema(toy_bank: Any, delta_eval: Any, tmp_path: Path) -> None:
    res = _run(toy_bank, delta_eval, targets=["t"], sweep_k=[2, 5], sweep_lam=[1e-3, 1.0],
               params={"sparse": {"lam_rel": 1e-3}})
    out = write_report(res, tmp_path / "rep", lower_is_better=["rel_error"])
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == RESULTS_SCHEMA == 1
    assert {"meta", "config", "targets", "metrics", "methods", "records", "lambda_paths", "prototype_map"} <= set(doc)
    assert doc["targets"] == ["t"] and doc["metrics"] == ["score", "rel_error"]
    assert doc["config"]["k"] == 5 and doc["config"]["params"] == {"sparse": {"lam_rel": 1e-3}}
    assert isinstance(doc["meta"]["versions"]["torch"], str)
    for r in doc["records"]:
        assert {"target", "method", "k", "params", "effective_params", "ids", "distances", "weights", "metrics",
                "status", "sweep", "include_self"} <= set(r)
        assert isinstance(r["ids"], list) and len(r["ids"]) == len(r["weights"]) == len(r["distances"])
        assert all(isinstance(v, float) and math.isfinite(v) for v in r["metrics"].values())
        assert r["k"] is None if r["method"] in ("pretrained", "sft") else isinstance(r["k"], int)
    main = [r for r in doc["records"] if r["sweep"] is None]
    assert len(main) == 7
    pm = doc["prototype_map"]
    assert sorted(pm["ids"]) == ["a", "b", "c", "d", "e", "t"] and all(len(c) == 2 for c in pm["coords"])
    assert set(doc["lambda_paths"]) == {"t"}
    assert load_results(out).table("score") == res.table("score")  # round trip

    md = (out / "results.md").read_text()
    assert "| target | Pre-trained | SFT | Nearest | Avg | Sim | Lin | Sparse |" in md
    row_t = next(line for line in md.splitlines() if line.startswith("| t |"))
    cells = [c.strip() for c in row_t.strip("|").split("|")]
    # score of t: lin and sparse are exact (≈ −1e-7): the bold cells are among them, never SFT or Pre-trained
    assert not cells[1].startswith("**") and not cells[2].startswith("**")
    assert cells[6].startswith("**") or cells[7].startswith("**")
    assert "### target t" in md and "| a (d=" in md and "(lower is better)" in md
    assert "score vs k" in md and "score vs lam_rel" in md

    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    for name in ("weights_t.png", "lambda_path_t.png", "map_t.png", "scores_score.png", "sweep_k_score.png",
                 "sweep_lam_rel_error.png"):
        assert name in pngs
    from PIL import Image

    for p in (out / "plots").glob("*.png"):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    html = (out / "index.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html
    for name in pngs:
        assert f'src="plots/{name}"' in html
    assert '<td class="best">' in html and "results.json" in html


def test_write_report_refuses_unknown_metric(res_in: EvalResults, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="unknown metrics \\['loss'\\]"):
        write_report(res_in, tmp_path, lower_is_better=["loss"], plots=False)


def test_load_results_refuses_other_schema(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"schema": 2, "records": []}))
    with pytest.raises(FormatError, match="schema 1. Got schema 2"):
        load_results(tmp_path)
