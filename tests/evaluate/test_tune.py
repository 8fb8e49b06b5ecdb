"""adapterbank tune / compose(strategy="auto"): the setting known by construction is chosen, stored in the bank,
used by a new process; nested leave-one-out checked against a brute-force re-implementation on the cache files;
the untuned fallback warns; the CLI runs end to end."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterbank.bank import Bank
from adapterbank.cli.main import app
from adapterbank.compose import compose
from adapterbank.compose.compose import AUTO_SETTING
from adapterbank.errors import ParameterError, UnknownNameError, UntunedBankWarning
from adapterbank.evaluate.tune import Setting, expand_grid, nested_loo, tune

# The evaluator rewards exactly one setting: it scores −‖ΔW − ΔW_ref‖_F where ΔW_ref is the target's composite by
# Sim (τ_rel = 0.5) over its k = 3 nearest other adapters. That setting scores 0 on every target, any other < 0.
REF_EVAL = """
import torch
from adapterbank.bank import Bank
from adapterbank.compose import compose

BANK = {bank!r}
_REF = {{}}

def _ref(target):
    if target not in _REF:
        b = Bank.open(BANK)
        try:
            c = compose(b, b.get_prototype(target), k=3, strategy="sim", params={{"tau_rel": 0.5}}, exclude=[target])
            _REF[target] = c.adapter.deltas(torch.float64)
        finally:
            b.close()
    return _REF[target]

def score(adapter, card):
    ref = _ref(card.id)
    got = adapter.deltas(torch.float64) if adapter is not None else {{}}
    err2 = sum(float(((got.get(m, torch.zeros_like(t)) - t) ** 2).sum()) for m, t in ref.items())
    err2 += sum(float((d ** 2).sum()) for m, d in got.items() if m not in ref)
    return {{"score": -err2 ** 0.5, "err2": err2}}
"""
KNOWN = Setting("sim", 3, (("tau_rel", 0.5),))
GRID = {"nearest": {}, "avg": {}, "sim": {"tau_rel": [2.0, 0.5]}, "sparse": {"lam_rel": [0.1, 1.0]}}


def _copy_bank(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _ref_evaluator(folder: Path, bank: Path) -> Path:
    ev = folder / "ref_eval.py"
    ev.write_text(REF_EVAL.format(bank=str(bank)))
    return ev


@pytest.fixture(scope="module")
def tuned(toy_bank: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Path]:
    d = tmp_path_factory.mktemp("tune")
    path = _copy_bank(toy_bank.path, d / "bank")
    ev = _ref_evaluator(d, path)
    bank = Bank.open(path)
    try:
        res = tune(bank, f"{ev}:score", grid=GRID, k_values=[3, 2], cache_dir=d / "cache")
    finally:
        bank.close()
    return path, res, d / "cache"


def test_tune_picks_the_setting_rewarded_by_construction(tuned: tuple[Path, Any, Path]) -> None:
    _, res, _ = tuned
    assert res.metric == "score" and len(res.targets) == 6
    assert [s.label for s in res.settings] == [s.label for s in expand_grid(GRID, [2, 3])]
    assert res.best == KNOWN
    assert abs(res.in_sample) < 1e-9 and all(abs(v) < 1e-9 for v in res.scores[KNOWN.label].values())
    others = [m for l, m in res.means.items() if l != KNOWN.label]
    assert res.runner_up is not None and res.means[res.runner_up.label] == max(others) < -1e-6
    # every target's choice made without it is the same setting: nested = in-sample here
    assert set(res.nested_choice.values()) == {KNOWN.label} and res.nested == pytest.approx(res.in_sample, abs=1e-9)
    assert res.baselines["pretrained"] < 0 and res.baselines["sft"] < 0
    iv = res.intervals["best_vs_pretrained"]
    assert iv.diff > 0 and iv.lo > 0 and res.interval_units["best_vs_pretrained"] == "target"
    assert res.intervals["best_vs_runner_up"].diff == pytest.approx(-res.means[res.runner_up.label])


def test_setting_persisted_and_used_by_auto_in_a_new_process(tuned: tuple[Path, Any, Path]) -> None:
    path, res, _ = tuned
    with Bank.open(path) as bank:
        s = bank.get_setting(AUTO_SETTING)
        want = compose(bank, bank.get_prototype("t"), k=3, strategy="sim", params={"tau_rel": 0.5}, exclude=["t"])
    assert (s["strategy"], s["k"], s["params"]) == ("sim", 3, {"tau_rel": 0.5})
    assert s["metric"] == "score" and s["runner_up"]["label"] == res.runner_up.label
    assert s["nested"] == pytest.approx(res.nested) and s["in_sample"] == pytest.approx(res.in_sample)
    assert s["evaluator"].endswith("ref_eval.py:score") and s["date"] and s["n_targets"] == 6
    code = ("import json, sys, warnings\nfrom adapterbank.bank import Bank\nfrom adapterbank.compose import compose\n"
            "warnings.simplefilter('error')\n"
            f"b = Bank.open({str(path)!r})\n"
            "c = compose(b, b.get_prototype('t'), strategy='auto', exclude=['t'])\n"
            "c2 = compose(b, b.get_prototype('t'), strategy='auto', exclude=['t'], k=2)\n"
            "print(json.dumps([c.recipe(), c2.recipe()]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rec, rec2 = json.loads(out.stdout)
    assert rec["strategy"] == "sim" and rec["retrieval"]["k"] == 3 and rec["params"]["tau_rel"] == 0.5
    assert rec["retrieval"]["ids"] == want.ids
    np.testing.assert_allclose([rec["weights"][i] for i in want.ids], want.weights, rtol=0, atol=1e-12)
    assert rec["auto"]["source"] == f"bank setting {AUTO_SETTING!r}" and rec["auto"]["k_from"] == "the setting"
    assert rec["auto"]["tuned"]["metric"] == "score"
    assert rec2["retrieval"]["k"] == 2 and rec2["strategy"] == "sim" and rec2["auto"]["k_from"] == "explicit k"


def test_nested_loo_matches_brute_force_on_the_cache_files(toy_bank_affine: Any, delta_eval: Any,
                                                           tmp_path: Path) -> None:
    path = _copy_bank(toy_bank_affine.path, tmp_path / "bank")
    grid = {"avg": {}, "lin": {}, "sim": {"tau_rel": [0.5, 2.0]}, "sparse": {"lam_rel": [0.01, 1.0]}}
    with Bank.open(path) as bank:
        res = tune(bank, delta_eval, grid=grid, k_values=[2, 4], cache_dir=tmp_path / "cache", tasks=toy_bank_affine.tasks,
                   save=False)
        assert bank.get_setting(AUTO_SETTING) is None  # save=False writes nothing
    # per-target scores straight from the harness's cache files
    scores: dict[str, dict[str, float]] = {}
    for f in (tmp_path / "cache").glob("*.json"):
        doc = json.loads(f.read_text())
        key, rec = doc["key"], doc["record"]
        if key["method"] in ("pretrained", "sft"):
            continue
        label = Setting(key["method"], key["k"], tuple(key["params"].items())).label
        scores.setdefault(label, {})[key["target"]] = rec["metrics"]["score"]
    labels = [s.label for s in res.settings]
    assert sorted(scores) == sorted(labels) and scores == res.scores
    targets = sorted(toy_bank_affine.tasks)
    # brute force: for each held-out target, the earliest setting with the highest mean over the others
    choice, vals = {}, {}
    for t in targets:
        best_l, best_v = None, -math.inf
        for lab in labels:
            v = np.mean([scores[lab][u] for u in targets if u != t])
            if v > best_v + 1e-12 * max(1.0, abs(v)):
                best_l, best_v = lab, v
        choice[t], vals[t] = best_l, scores[best_l][t]
    assert res.nested_choice == choice
    assert res.nested == pytest.approx(np.mean(list(vals.values())), abs=1e-12)
    in_sample = max(np.mean(list(scores[lab].values())) for lab in labels)
    assert res.in_sample == pytest.approx(in_sample) and res.nested <= res.in_sample + 1e-12
    nested_rows = res.results.table("score")
    assert all(nested_rows[t]["auto_nested"] == vals[t] for t in targets)
    assert "nested_vs_pretrained" in res.intervals and "# adapterbank tune" in res.markdown()


def test_nested_loo_differs_from_in_sample_and_ties_go_to_the_earlier() -> None:
    s = {"x": {"a": 1.0, "b": 0.0, "c": 0.0}, "y": {"a": 0.0, "b": 0.4, "c": 0.4}, "z": {"a": 0.0, "b": 0.4, "c": 0.4}}
    # in-sample x wins (mean 1/3 vs 0.8/3), but without target a, y (and z) win: nested differs on a
    assert nested_loo(s, ["x", "y", "z"], ["a", "b", "c"]) == {"a": "y", "b": "x", "c": "x"}
    assert nested_loo(s, ["x", "z", "y"], ["a", "b", "c"])["a"] == "z"  # y and z tie: the earlier wins
    assert nested_loo(s, ["x", "y"], ["a", "b", "c"], lower_is_better=True) == {"a": "x", "b": "y", "c": "y"}
    with pytest.raises(ParameterError):
        nested_loo(s, ["x"], ["a"])


def test_grid_is_data_and_checked() -> None:
    labels = [s.label for s in expand_grid({"sparse": {"lam_rel": [1, 0.1]}, "nearest": {}}, [5, 3])]
    assert labels == ["sparse(k=3, lam_rel=1)", "sparse(k=3, lam_rel=0.1)", "sparse(k=5, lam_rel=1)",
                      "sparse(k=5, lam_rel=0.1)", "nearest(k=3)"]
    with pytest.raises(UnknownNameError, match="lam_rel"):
        expand_grid({"sparse": {"lambda": [0.1]}})
    with pytest.raises(ParameterError):
        expand_grid({"sparse": {"lam_rel": [-1]}})
    with pytest.raises(UnknownNameError):
        expand_grid({"best": {}})


def test_untuned_bank_auto_falls_back_with_a_warning(toy_bank: Any, tmp_path: Path) -> None:
    path = _copy_bank(toy_bank.path, tmp_path / "bank")
    with Bank.open(path) as bank:
        p = bank.get_prototype("t")
        with pytest.warns(UntunedBankWarning, match="not been tuned"):
            comp = compose(bank, p, strategy="auto", exclude=["t"])
        want = compose(bank, p, strategy="sim", exclude=["t"])
        with pytest.raises(ParameterError, match="auto"):
            compose(bank, p, strategy="auto", params={"tau_rel": 2.0})
    assert comp.strategy == "sim" and comp.k == 5 and comp.ids == want.ids
    np.testing.assert_array_equal(comp.weights, want.weights)
    assert comp.recipe()["auto"]["source"] == "fallback (untuned bank)"
    assert want.auto is None and "auto" not in want.recipe()


def test_settings_table_migrates_an_old_catalog(toy_bank: Any, tmp_path: Path) -> None:
    import sqlite3

    path = _copy_bank(toy_bank.path, tmp_path / "bank")
    with sqlite3.connect(path / "catalog.sqlite") as c:  # a bank from before the settings table
        c.execute("DROP TABLE IF EXISTS settings")
    with Bank.open(path) as bank:
        v0 = bank.version
        assert bank.get_setting(AUTO_SETTING) is None
        bank.set_setting(AUTO_SETTING, {"strategy": "avg", "params": {}, "k": 2})
        assert bank.version == v0 + 1
    with Bank.open(path) as bank:
        assert bank.get_setting(AUTO_SETTING) == {"strategy": "avg", "params": {}, "k": 2}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert compose(bank, bank.get_prototype("t"), strategy="auto", exclude=["t"]).k == 2
        bank.set_setting(AUTO_SETTING, None)
        assert bank.get_setting(AUTO_SETTING) is None
        with pytest.raises(ValueError, match="JSON"):
            bank.set_setting("x", {"v": math.nan})


def test_cli_tune_then_compose_auto(toy_bank: Any, tmp_path: Path) -> None:
    path = _copy_bank(toy_bank.path, tmp_path / "bank")
    ev = _ref_evaluator(tmp_path, path)
    r = CliRunner().invoke(app, ["tune", str(path), "--evaluator", f"{ev}:score", "--strategies", "avg,sim",
                                 "--grid-k", "2,3", "--grid-tau-rel", "2,0.5", "--report", str(tmp_path / "rep"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["strategy"], doc["k"], doc["params"], doc["saved"]) == ("sim", 3, {"tau_rel": 0.5}, True)
    tj = json.loads((tmp_path / "rep" / "tune.json").read_text())
    assert tj["setting"]["label"] == KNOWN.label and len(tj["settings"]) == 6
    assert (tmp_path / "rep" / "results.json").is_file() and "Nested" in (tmp_path / "rep" / "tune.md").read_text()
    r = CliRunner().invoke(app, ["tune", str(path), "--evaluator", f"{ev}:score", "--strategies", "avg",
                                 "--grid-k", "3", "--cache", str(tmp_path / "rep" / ".cache"), "--dry-run"])
    assert r.exit_code == 0 and "avg(k=3)" in r.output and "--dry-run" in r.output
    with Bank.open(path) as bank:
        assert bank.get_setting(AUTO_SETTING)["strategy"] == "sim"  # the dry run wrote nothing
        bank.get_prototype("t").save(tmp_path / "t.npy")
    out = subprocess.run([sys.executable, "-m", "adapterbank.cli", "compose", str(path), "--prototype",
                          str(tmp_path / "t.npy"), "--strategy", "auto", "--exclude", "t", "-o", str(tmp_path / "c")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "auto -> sim, k=3" in out.stdout
    rec = json.loads((tmp_path / "c" / "composition.json").read_text())
    assert rec["strategy"] == "sim" and rec["retrieval"]["k"] == 3 and rec["auto"]["source"].startswith("bank setting")
    bad = CliRunner().invoke(app, ["compose", str(path), "--prototype", str(tmp_path / "t.npy"), "--strategy", "auto",
                                   "--lam-rel", "0.5", "-o", str(tmp_path / "c2")])
    assert isinstance(bad.exception, ParameterError) and "--strategy auto" in str(bad.exception)
