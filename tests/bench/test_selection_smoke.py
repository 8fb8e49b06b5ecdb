"""Smoke test of the composition-selection stage of Benchmark B (bench/loo_segmentation.py --selection-only,
bench/_selection.py; issue 11 item 4) at a tiny size, as a real subprocess on the installed Fashion-MNIST: the
tune grid, auto (nested leave-one-out), the λ-fraction sweep and the merge methods, their table, and that a
rerun takes every score from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _run(out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "loo_segmentation.py"), "--size", "tiny", "--selection-only",
                           "-o", str(out)], check=False, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "selection" / "selection.json").read_text())


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST (Debian dataset-fashion-mnist) is not installed")
def test_selection_stage_scores_grid_auto_sweep_and_merges_then_reuses_the_cache(tmp_path: Path) -> None:
    sel = _run(tmp_path / "run")
    targets, settings, sc = sel["targets"], sel["settings"], sel["scores"]
    assert len(targets) == 4
    # the default grid at k ∈ {2, 3}: nearest once, avg 2, sim 3 τ × 2, lin 2, sparse 4 fractions × 2
    assert len(settings) == 19 and sum(s.startswith("sparse(") for s in settings) == 8
    means = {s: float(np.mean([sc[s][t] for t in targets])) for s in settings}
    assert sel["best"] == max(settings, key=lambda s: (means[s], -settings.index(s)))
    for t in targets:  # nested: the choice for t maximises the mean over the other targets, and is scored on t
        rest = [u for u in targets if u != t]
        want = max(settings, key=lambda s: (np.mean([sc[s][u] for u in rest]), -settings.index(s)))
        assert sel["nested_choice"][t] == want
        assert sc["auto (nested LOO)"][t] == sc[want][t]
        # λ = 0·λ_max is Lin, and the sweep's other points are the grid's sparse settings at the main k
        assert sc["sparse(lam_frac=0) sweep"][t] == pytest.approx(sc["lin(k=3)"][t], abs=1e-6)
        assert sc["sparse(lam_frac=0.5) sweep"][t] == sc["sparse(k=3, lam_frac=0.5)"][t]
    assert len(sel["merges"]) == 4 and all(sel["merge_source"] in m for m in sel["merges"])
    assert all(0.0 <= sc[m][t] <= 1.0 for m in sel["merges"] for t in targets)
    assert sel["calls"]["merge_evaluator_calls"] == 16
    md = (tmp_path / "run" / "selection" / "selection.md").read_text()
    for row in ("| Pre-trained |", "best fixed in hindsight", "auto (nested LOO)", "dare_ties [", "SFT (oracle)",
                "gap closed", "falls below Pre-trained"):
        assert row in md

    again = _run(tmp_path / "run")  # same bank: every score comes from the harness's cache
    assert again["calls"]["tune_evaluator_calls"] == 0 and again["calls"]["merge_evaluator_calls"] == 0
    assert again["calls"]["sweep_evaluator_calls"] == 0 and again["scores"] == sc
