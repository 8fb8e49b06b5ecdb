"""Smoke test of Benchmark C (bench/loo_synthesis.py) at its ``tiny`` size on procedurally drawn garments (so it
runs, and does not skip, without Fashion-MNIST): styles, the Stylus-style keyword split, and one whole run — a
PixArt denoiser, kohya style LoRAs in a bank with description and image prototypes, every method through
ComposedLoRA, a loaded composite equal to the dense W + Σ w_i ΔW_i, finite metrics, the report written. The
default size is run by hand (see the script's docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def syn(load_bench):
    return load_bench("loo_synthesis")


def test_library_and_held_out_styles(syn):
    assert len(syn.LIBRARY) >= 60 and len({s.id for s in syn.LIBRARY}) == len(syn.LIBRARY)
    lib = {s.key for s in syn.LIBRARY}
    for h in syn.HELD_OUT:
        assert h.key not in lib and all(a in syn.ATOMS for a in h.atoms)
        assert h.key in syn.HELD_OUT_WHY
    x = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32) ** 2
    for st in [*syn.LIBRARY, *syn.HELD_OUT]:
        a, b = st.apply(x, 1), st.apply(x, 1)
        assert a.dtype == np.float32 and a.shape == x.shape and np.array_equal(a, b), st.key
        assert a.min() >= 0.0 and a.max() <= 1.0, st.key
        assert not np.allclose(a, x, atol=1e-3), f"style {st.key} changes nothing"
        assert "Trigger: " + st.phrase in st.description()
    for size in syn.SIZES.values():
        assert set(size["library"]) <= lib and not set(size["held_out"]) & lib


def test_stylus_keywords(syn):
    assert syn.style_keywords("a photo of a sneaker, inverted colors and blurred") == ["inverted colors", "blurred"]
    assert syn.style_keywords("a photo of a bag, noisy") == ["noisy"]


def test_procedural_garments(syn):
    x, y = syn.procedural_garments(200, 0)
    assert x.shape == (200, 28, 28) and set(np.unique(y)) == set(range(10))
    assert 0.0 <= x.min() and x.max() <= 1.0
    means = np.stack([x[y == c].mean(0) for c in range(10)]).reshape(10, -1)
    d = ((means[:, None] - means[None]) ** 2).sum(-1)
    assert d[~np.eye(10, dtype=bool)].min() > 1.0  # ten different shapes


def test_tiny_run_without_fashion_mnist(syn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(syn, "FMNIST_DIR", tmp_path / "absent")
    out = tmp_path / "run"
    res = syn.run(syn.parse_args(["--size", "tiny", "-o", str(out), "--figures", str(tmp_path / "fig")]))
    cfg = syn.SIZES["tiny"]
    assert res["data"].startswith("procedural")
    # the loaded composite is the dense W + Σ w_i ΔW_i, and it changes the output
    ex = res["exactness"]
    assert ex["max_abs_diff_vs_dense"] < 1e-4 < ex["max_abs_effect_of_composite"]
    assert abs(sum(ex["weights"]) - 1.0) < 1e-9
    # every method on every prompt: finite metrics, sum-to-one weights, Sparse's non-negative
    n = len(cfg["held_out"]) * len(cfg["classes"])
    assert len(res["prompts"]) == n
    for m in [*syn.METHODS, "real"]:
        for key, _, _ in syn.METRICS:
            vals = res["per_prompt"][m][key]
            assert len(vals) == n and np.all(np.isfinite(vals)), (m, key)
        assert all(0.0 <= v <= 1.0 for v in res["per_prompt"][m]["style_acc"])
    assert res["compositions"]["base"] == {}
    for m, comps in res["compositions"].items():
        if m == "base":
            continue
        assert len(comps) == n, m
        for c in comps.values():
            assert abs(sum(c["weights"]) - 1.0) < 1e-3, m
            if m.startswith("sparse"):
                assert min(c["weights"]) >= -1e-6
            if m == "stylus":
                assert set(c["ids"]) <= set(c["stylus"]["candidates"]) and len(c["weights"]) <= cfg["k"]
                assert len(set(np.round(c["weights"], 3))) == 1  # fixed equal weights
    assert set(res["intervals"]) == set(syn.METHODS) - {"sparse"}
    # the bank holds kohya files with description and image prototypes
    from adapterbank.bank import Bank

    bank = Bank.open(out / "bank")
    try:
        assert len(bank.list()) == len(cfg["library"])
        assert len(bank.spaces()) == 2
        assert all(p.suffix == ".safetensors" for p in (out / "civitai_dump").rglob("*.safetensors"))
        from adapterbank.formats import detect_format

        assert {detect_format(p) for p in (out / "civitai_dump").rglob("*.safetensors")} == {"kohya"}
    finally:
        bank.close()
    # the report
    md = (out / "results.md").read_text()
    assert "Sparse − each method" in md and "| Sparse |" in md and "Stylus-style" in md
    assert json.loads((out / "results.json").read_text())["size"] == "tiny"
    for name in ("results.md", "results.json", "grid.png", "library.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 100
