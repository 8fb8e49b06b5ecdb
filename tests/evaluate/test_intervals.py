"""Paired bootstrap intervals in the evaluation reports: per-item scores carried by the harness, intervals in
results.json / results.md / index.html / the CLI table, old results.json files still load."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adapterbank.bank import Bank
from adapterbank.errors import FormatError, NonFiniteError
from adapterbank.evaluate import EvalResults, evaluate, load_results, write_report
from adapterbank.evaluate.bootstrap import stratified_paired_bootstrap
from adapterbank.evaluate.report import score_rows
from adapterbank.evaluate.results import EvalRecord


def module_errors(adapter: Any, task: Mapping[str, Any]) -> dict[str, Any]:
    """Per item = per module of the true ΔW (sorted by name): −‖ΔW_m − ΔW_true,m‖_F; metric = their mean."""
    true: Mapping[str, torch.Tensor] = task["true"]
    got = adapter.deltas(torch.float64) if adapter is not None else {}
    items = [-float(torch.linalg.norm(got.get(m, torch.zeros_like(t)) - t)) for m, t in sorted(true.items())]
    return {"score": float(np.mean(items)), "n_modules": float(len(items)), "per_item": {"score": items}}


def _run(tb: Any, ev: Any, **kw: Any) -> EvalResults:
    bank = Bank.open(tb.path)
    try:
        kw.setdefault("tasks", tb.tasks)
        return evaluate(bank, ev, k=3, strategies=("avg", "sparse", "nearest"), **kw)
    finally:
        bank.close()


@pytest.fixture(scope="module")
def res_items(toy_bank: Any) -> EvalResults:
    return _run(toy_bank, module_errors)


def test_harness_carries_per_item_scores(res_items: EvalResults, toy_bank: Any) -> None:
    n_mod = len(toy_bank.tasks["t"]["true"])
    assert n_mod >= 2
    for r in res_items.records:
        assert list(r.per_item) == ["score"] and len(r.per_item["score"]) == n_mod
        assert np.mean(r.per_item["score"]) == pytest.approx(r.metrics["score"])
    sft = res_items.main("t", "sft")
    assert sft is not None and max(abs(x) for x in sft.per_item["score"]) < 1e-9  # t's own adapter is its truth


def test_comparisons_over_items_stratified_by_target(res_items: EvalResults) -> None:
    comps = res_items.comparisons("score")
    n_t = len(res_items.targets)
    means = res_items.means("score")
    for m in ("sft", "avg", "sparse", "nearest"):
        c = comps[m]["vs_pretrained"]
        assert c.unit == "item" and c.n_targets == n_t and c.n_units == sum(
            len(res_items.main(t, m).per_item["score"]) for t in res_items.targets)
        assert c.diff == pytest.approx(means[m] - means["pretrained"])  # the Mean row's difference
        # the same numbers from the per-item lists directly (stratified: one group per target)
        a = [res_items.main(t, m).per_item["score"] for t in res_items.targets]
        b = [res_items.main(t, "pretrained").per_item["score"] for t in res_items.targets]
        assert (c.diff, c.lo, c.hi) == stratified_paired_bootstrap(a, b, n_boot=2000, seed=0, ci=0.95)
        assert c.better is (None if c.lo <= 0 <= c.hi else c.diff > 0)
    assert comps["sft"]["vs_pretrained"].better is True  # SFT is exact on every module of every target
    zero = ("avg", "sparse", "nearest")
    best = max(zero, key=lambda m: means[m])
    for m in zero:
        ref = comps[m]["vs_best_other"].reference
        assert ref in zero and ref != m
        assert means[ref] == max(means[o] for o in zero if o != m)
    assert comps["sft"]["vs_best_other"].reference == best
    assert "vs_pretrained" not in comps.get("pretrained", {}) and "vs_best_other" not in comps.get("pretrained", {})


def test_report_shows_intervals_and_old_results_load(res_items: EvalResults, tmp_path: Path) -> None:
    out = write_report(res_items, tmp_path / "rep", plots=False)
    doc = json.loads((out / "results.json").read_text())
    iv = doc["intervals"]
    assert iv["n_boot"] == 2000 and iv["seed"] == 0 and iv["ci"] == 0.95
    c = iv["metrics"]["score"]["sparse"]["vs_pretrained"]
    want = res_items.comparisons("score")["sparse"]["vs_pretrained"]
    assert (c["diff"], c["lo"], c["hi"], c["unit"], c["reference"]) == (want.diff, want.lo, want.hi, "item",
                                                                        "pretrained")
    assert all(len(r["per_item"]["score"]) >= 2 for r in doc["records"])
    cell = f"{want.diff:+.4f} [{want.lo:+.4f}, {want.hi:+.4f}]"
    md = (out / "results.md").read_text()
    assert "| Δ vs Pre-trained [95% CI] |" in md and cell in md and "| Δ vs best other [95% CI] |" in md
    assert "per-item scores, resampled within each target" in md and "B=2000" in md
    page = (out / "index.html").read_text()
    assert '<tr class="ci"><td>Δ vs Pre-trained [95% CI]</td>' in page and cell in page
    # reloaded from the file: the same intervals (deterministic), and the CLI's table rows carry them
    again = load_results(out)
    assert again.comparisons("score") == res_items.comparisons("score")
    _, rows = score_rows(again, "score")
    assert rows[-2][0] == "Δ vs Pre-trained [95% CI]" and any(cell in txt for txt, _ in rows[-2][1])

    # a results.json from before intervals: no per_item, no "intervals" — loads, and gets intervals over targets
    for r in doc["records"]:
        del r["per_item"]
    del doc["intervals"]
    old = tmp_path / "old" / "results.json"
    old.parent.mkdir()
    old.write_text(json.dumps(doc))
    res_old = load_results(old)
    assert all(r.per_item == {} for r in res_old.records)
    assert res_old.table("score") == res_items.table("score")
    c_old = res_old.comparisons("score")["sparse"]["vs_pretrained"]
    assert c_old.unit == "target" and c_old.n_units == len(res_items.targets)
    assert c_old.diff == pytest.approx(want.diff)
    out2 = write_report(res_old, tmp_path / "rep_old", plots=False)
    assert "the 6 targets' scores" in (out2 / "results.md").read_text()


def _rec(t: str, m: str, v: float) -> EvalRecord:
    return EvalRecord(t, m, None if m in ("pretrained", "sft") else 2, {}, {}, [], [], [], "", {"loss": v})


def test_lower_is_better_picks_the_lowest_mean_and_flips_better() -> None:
    vals = {"pretrained": [2.0, 2.1, 1.9, 2.2], "sft": [0.1, 0.2, 0.1, 0.15], "avg": [1.0, 1.2, 0.9, 1.1],
            "sparse": [0.5, 0.6, 0.55, 0.4]}
    targets = ["a", "b", "c", "d"]
    res = EvalResults([_rec(t, m, v[i]) for m, v in vals.items() for i, t in enumerate(targets)], targets)
    low = res.comparisons("loss", lower_is_better=True)
    assert low["avg"]["vs_best_other"].reference == "sparse" and low["sparse"]["vs_best_other"].reference == "avg"
    assert low["avg"]["vs_best_other"].better is False and low["sparse"]["vs_best_other"].better is True
    assert low["sparse"]["vs_pretrained"].better is True and low["sparse"]["vs_pretrained"].diff < 0
    assert low["sparse"]["vs_pretrained"].unit == "target" and low["sparse"]["vs_pretrained"].n_units == 4
    high = res.comparisons("loss", lower_is_better=False)
    assert high["sparse"]["vs_pretrained"].better is False  # the same numbers read the other way
    _, rows = score_rows(res, "loss", True)
    labels = [r[0] for r in rows]
    assert labels == targets + ["Mean", "Δ vs Pre-trained [95% CI]", "Δ vs best other [95% CI]"]
    assert rows[-2][1][0] == ("–", False)  # Pre-trained against itself
    assert rows[-1][1][3][0].endswith("▲ vs Avg")  # Sparse beats Avg on a loss


def test_one_target_without_per_item_has_no_interval_rows() -> None:
    res = EvalResults([_rec("a", "pretrained", 1.0), _rec("a", "avg", 0.5)], ["a"])
    assert res.comparisons("loss") == {}
    _, rows = score_rows(res, "loss")
    assert [r[0] for r in rows] == ["a"]


def test_per_item_lengths_that_differ_fall_back_to_targets() -> None:
    recs = []
    for t, n in (("a", 3), ("b", 4)):
        for m, v in (("pretrained", 0.2), ("avg", 0.6)):
            r = _rec(t, m, v)
            r.per_item = {"loss": [v] * (n if m == "avg" or t == "a" else n + 1)}
            recs.append(r)
    c = EvalResults(recs, ["a", "b"]).comparisons("loss")["avg"]["vs_pretrained"]
    assert c.unit == "target" and c.n_units == 2


@pytest.mark.parametrize(
    ("per_item", "err", "pattern"),
    [
        ({"score": [1.0, 2.0]}, FormatError, r"per_item\['score'\] with mean 1.5 but 'score' = 0.5 .*target 't', "
                                             r"method 'pretrained'"),
        ({"score": [0.5, float("nan")]}, NonFiniteError, r"item 1 in per_item\['score'\]"),
        ({"acc": [0.5]}, FormatError, r"per_item\['acc'\].*no metric 'acc'"),
        ({"score": []}, FormatError, r"shape \(0,\)"),
        ({"score": "0.5"}, FormatError, r"str for per_item\['score'\]"),
        (0.5, FormatError, r"reserved for per-item scores"),
    ],
)
def test_bad_per_item_output_names_target_and_method(toy_bank: Any, per_item: Any, err: type, pattern: str) -> None:
    with pytest.raises(err, match=pattern):
        _run(toy_bank, lambda a, t: {"score": 0.5, "per_item": per_item}, targets=["t"])


def test_cli_table_shows_interval_rows(toy_bank: Any, tmp_path: Path, norm_evaluator: Path) -> None:
    """`adapterbank evaluate` in a real process (a wide terminal, so rich does not wrap the cells)."""
    ev = norm_evaluator
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-c", "from adapterbank.cli import app; app()", "evaluate", str(toy_bank.path),
                        "--evaluator", f"{ev}:score", "-k", "3", "-o", str(out), "--strategies", "avg,sparse",
                        "--no-plots"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"},
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Δ vs Pre-trained [95% CI]" in r.stdout and "Δ vs best other [95% CI]" in r.stdout
    c = json.loads((out / "results.json").read_text())["intervals"]["metrics"]["norm"]["avg"]["vs_pretrained"]
    assert c["unit"] == "target" and f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]" in r.stdout
    assert math.isfinite(c["lo"]) and c["lo"] <= c["diff"] <= c["hi"]


def test_demo_scorer_returns_per_query_scores() -> None:
    """The demo's evaluator (real all-MiniLM-L6-v2) gives per-query scores the harness accepts; opt-in only."""
    from adapterbank.demo import MiniLMRetrieval, load_demo_data
    from adapterbank.evaluate.harness import check_output

    data = load_demo_data()
    cfg = data.manifest["config"]
    task = {"queries": data.test["numpy"]["queries"][:12], "docs": data.test["numpy"]["docs"][:12]}
    scorer = MiniLMRetrieval(q_len=cfg["q_len"], d_len=cfg["d_len"], split=cfg["split"], per_item=True)
    metrics, items = check_output(scorer(None, task), "demo")
    assert set(items) == {"mrr@10", "recall@1"} and all(len(v) == 12 for v in items.values())
    assert set(items["recall@1"]) <= {0.0, 1.0} and np.mean(items["mrr@10"]) == pytest.approx(metrics["mrr@10"])
    ranks = scorer.ranks(None, task)
    assert items["recall@1"] == [float(r == 1) for r in ranks.tolist()]
    plain = MiniLMRetrieval(q_len=cfg["q_len"], d_len=cfg["d_len"], split=cfg["split"])
    assert plain(None, task) == metrics and plain.cache_key != scorer.cache_key
