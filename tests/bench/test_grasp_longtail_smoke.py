"""Smoke test of the GRASP long-tail benchmark (bench/grasp_longtail.py) at its ``small`` size: the data splits, the
new label vocabulary, the pre-training cache, the metrics, and one whole run (every method × 2 seeds in 2 worker
processes) whose results.json / results.md / samples.png must be complete. Needs Debian's Fashion-MNIST
(skips without it). The default size is run by hand (see the script's docstring and BENCHMARKS.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def gl(load_bench):
    mod = load_bench("grasp_longtail")
    if not (mod.FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not found at {mod.FASHION}")
    return mod


@pytest.fixture(scope="module")
def small_data(gl):
    return gl.load_fashion(dict(gl.SIZES["small"]))


def test_splits_are_disjoint_and_long_tailed(gl, small_data):
    cfg = gl.SIZES["small"]
    d = small_data
    assert len(d["pre_x"]) == 10 * cfg["pre_per_class"] and len(d["eval_x"]) == 10 * cfg["eval_per_class"]
    # pre-training sees coarse labels only (slots 10..12), never a fine label
    assert set(d["pre_y"].unique().tolist()) == {gl.COARSE_SLOT + k for k in range(gl.N_COARSE)}
    # no image of the LT pool is in the pre-training or evaluator parts
    flat = lambda x: {bytes(r) for r in (x.reshape(len(x), -1).numpy() * 127).astype(np.int8)}  # noqa: E731
    pool = set().union(*(flat(v) for v in d["pool_x"].values()))
    assert not pool & flat(d["pre_x"]) and not pool & flat(d["eval_x"])
    a, b = gl.lt_split(d, cfg, 0), gl.lt_split(d, cfg, 1)
    counts = sorted(a["counts"].values(), reverse=True)
    assert counts[0] == cfg["n_max"] and counts[0] / counts[-1] == pytest.approx(100, rel=0.05)
    assert a["order"] != b["order"]  # a seed changes the class order
    assert len(a["x"]) == sum(counts) == len(a["y"])


def test_new_vocabulary_starts_at_the_coarse_parent(gl):
    cfg = dict(gl.SIZES["small"])
    sd = gl.make_dit(cfg).state_dict()
    new = gl.new_vocabulary(sd, 0)
    keys = [k for k in sd if k.endswith("class_embedder.embedding_table.weight")]
    assert len(keys) == cfg["depth"]
    for k in keys:
        w = new[k]
        coarse = sd[k][gl.COARSE_SLOT:gl.COARSE_SLOT + gl.N_COARSE]
        assert torch.equal(w[gl.COARSE_SLOT:], sd[k][gl.COARSE_SLOT:])  # coarse rows and the null row unchanged
        off = torch.stack([w[c] - coarse[gl.COARSE_OF[c]] for c in range(10)])
        assert off.norm(dim=1).min() > 0 and torch.cdist(w[:10], w[:10]).fill_diagonal_(1).min() > 0
    assert not torch.equal(gl.new_vocabulary(sd, 1)[keys[0]], new[keys[0]])


def test_pretrain_cache_roundtrip(gl, small_data, tmp_path: Path):
    cfg = dict(gl.SIZES["small"], pre_steps=2)
    sd1, m1 = gl.pretrain(cfg, small_data, "cpu", tmp_path)
    sd2, m2 = gl.pretrain(cfg, small_data, "cpu", tmp_path)
    assert not m1["cached"] and m2["cached"] and m1["key"] == m2["key"]
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    _, m3 = gl.pretrain(dict(cfg, pre_steps=3), small_data, "cpu", tmp_path)
    assert not m3["cached"] and m3["key"] != m1["key"]


def test_f1_and_intervals(gl):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 500)
    pred = np.where(rng.random(500) < 0.7, y, rng.integers(0, 10, 500))
    pred[pred == 3] = 4  # class 3 never predicted
    assert np.allclose(gl.per_class_f1(y, pred), f1_score(y, pred, average=None, labels=list(range(10)),
                                                          zero_division=0))
    lo, hi = gl.hier_interval([0.2, 0.4, 0.9], [[0.2] * 5, [0.4] * 5, [0.9] * 5], 400)
    assert 0.2 <= lo < hi <= 0.9
    assert gl.hier_interval([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]], 50) == [0.5, 0.5]


def _intervals(node, path=""):
    """Every {"value", "ci"} summary in a nested results dict."""
    if isinstance(node, dict):
        if "value" in node and "ci" in node:
            yield path, node
        for k, v in node.items():
            yield from _intervals(v, f"{path}/{k}")


def test_small_run_is_complete(gl, tmp_path: Path):
    out = tmp_path / "run"
    res = gl.run(gl.parse_args(["--size", "small", "--out", str(out), "--figures", str(tmp_path / "fig"),
                                "--cache", str(tmp_path / "cache"), "--workers", "2"]))
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == set(gl.METHODS)
    for m in gl.METHODS:
        assert saved["methods"][m]["seeds"] == [0, 1], m
        assert len(saved["methods"][m]["gen"]["tail"]["fd_cls"]["per_seed"]) == 2
    real = saved["real_only"]
    assert {"macro_f1", "f1_head", "f1_medium", "f1_tail"} <= set(real)
    n_checked = 0
    for path, s in _intervals(saved):
        lo, hi = s["ci"]
        assert math.isfinite(s["value"]) and lo <= hi, path
        if not path.split("/")[-1].startswith("fd"):  # means; FD is biased upward under resampling
            assert lo - 1e-9 <= s["value"] <= hi + 1e-9, path
        n_checked += 1
    assert n_checked > 8 * 4 * 7
    M = saved["methods"]
    # budgets: GRASP (K groups of rank r) is parameter-matched to the rank-K·r shared adapter; full FT trains most
    assert M["grasp_tiers"]["n_trainable"] == M["shared_Kr"]["n_trainable"] > M["shared_r"]["n_trainable"]
    assert M["grasp_kmeans"]["n_trainable"] == M["grasp_random"]["n_trainable"] == M["grasp_tiers"]["n_trainable"]
    assert M["full_ft"]["n_trainable"] > 10 * M["shared_Kr"]["n_trainable"]
    # gradient-conflict curve: every checkpoint of full FT has the three tier pairs; other methods have losses only
    for curve in M["full_ft"]["curve"].values():
        assert [r["step"] for r in curve] == [0, gl.SIZES["small"]["ft_steps"]]
        assert all(set(r["grad_cos"]["pairs"]) == {"head-medium", "head-tail", "medium-tail"} for r in curve)
    assert all("grad_cos" not in r for c in M["grasp_tiers"]["curve"].values() for r in c)
    # every GRASP group was trained
    for seed_updates in M["grasp_tiers"]["group_updates"].values():
        assert min(seed_updates) > 0
    assert saved["kmeans_encoder"]
    for s, p in saved["per_seed"].items():
        assert sorted(c for v in p["tiers"].values() for c in v) == sorted(gl.FASHION_NAMES), s
        assert sorted(c for v in p["partitions"]["kmeans"].values() for c in v) == sorted(gl.FASHION_NAMES), s
    md = (out / "results.md").read_text()
    assert "real LT data only" in md and all(f"| {m} |" in md for m in gl.METHODS)
    assert (tmp_path / "fig" / "samples.png").stat().st_size > 10_000
    assert res["markdown"] == md
