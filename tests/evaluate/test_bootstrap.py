"""The paired bootstrap against independent references: exact enumeration of every resample, and scipy."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from adapterbank.errors import FormatError, NonFiniteError, ParameterError
from adapterbank.evaluate.bootstrap import (
    Interval,
    bootstrap_replicates,
    paired_bootstrap,
    stratified_paired_bootstrap,
)

# paired scores of 4 units; a − b = [0.3, −0.1, 0.5, 0.05]; resampling a and b independently (a pairing bug)
# produces means outside the exact support below
A = [0.9, 0.4, 1.0, 0.55]
B = [0.6, 0.5, 0.5, 0.5]
N_MC = 40_000


def _exact(groups_a: list[list[float]], groups_b: list[list[float]]) -> dict[float, float]:
    """Every stratified resample enumerated: {Δ (rounded): probability}. Π n_g^n_g equally likely resamples."""
    diffs = [np.asarray(a) - np.asarray(b) for a, b in zip(groups_a, groups_b)]
    per_group = [[float(np.mean(d[list(idx)])) for idx in itertools.product(range(d.size), repeat=d.size)]
                 for d in diffs]
    total = 1
    for g in per_group:
        total *= len(g)
    dist: Counter[float] = Counter()
    for combo in itertools.product(*per_group):
        dist[round(float(np.mean(combo)), 10)] += 1
    return {v: c / total for v, c in dist.items()}


def _exact_quantile(dist: dict[float, float], q: float) -> float:
    """The smallest atom whose cumulative probability reaches q."""
    acc = 0.0
    for v in sorted(dist):
        acc += dist[v]
        if acc >= q - 1e-12:
            return v
    return max(dist)


def _check_against_exact(reps: np.ndarray, dist: dict[float, float]) -> None:
    got = Counter(round(float(x), 10) for x in reps)
    assert set(got) <= set(dist), f"replicates outside the exact support: {sorted(set(got) - set(dist))[:5]}"
    for v, p in dist.items():
        sd = np.sqrt(p * (1 - p) / reps.size)
        assert abs(got.get(v, 0) / reps.size - p) <= 5 * sd + 1e-9, (v, got.get(v, 0) / reps.size, p)


def test_replicates_follow_the_exact_bootstrap_distribution_n4() -> None:
    """All 4^4 = 256 resamples enumerated: the Monte-Carlo replicates hit exactly those means, at their frequencies."""
    dist = _exact([A], [B])
    assert len(dist) > 20  # a rich support: a without-replacement or unpaired resampler could not match it
    _check_against_exact(bootstrap_replicates([A], [B], n_boot=N_MC, seed=3), dist)


def test_interval_matches_exact_percentiles_n4() -> None:
    dist = _exact([A], [B])
    d, lo, hi = paired_bootstrap(A, B, n_boot=N_MC, seed=5)
    assert d == pytest.approx(np.mean(np.subtract(A, B)), abs=1e-15)
    eps = 1e-9  # the atoms are rounded to 10 decimals
    assert _exact_quantile(dist, 0.02) - eps <= lo <= _exact_quantile(dist, 0.03) + eps
    assert _exact_quantile(dist, 0.97) - eps <= hi <= _exact_quantile(dist, 0.98) + eps
    assert lo < d < hi


def test_stratified_replicates_follow_the_exact_distribution() -> None:
    """Two strata (2 and 3 units): 2^2 · 3^3 = 108 resamples; no unit ever moves to the other stratum."""
    ga, gb = [[1.0, 0.2], [0.3, 0.9, 0.4]], [[0.5, 0.5], [0.0, 0.1, 0.6]]
    dist = _exact(ga, gb)
    _check_against_exact(bootstrap_replicates(ga, gb, n_boot=N_MC, seed=11), dist)
    d, _, _ = stratified_paired_bootstrap(ga, gb)
    assert d == pytest.approx(np.mean([np.mean(np.subtract(a, b)) for a, b in zip(ga, gb)]))


def test_agrees_with_scipy_paired_percentile_bootstrap() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.normal(0.6, 0.2, size=30)
    b = a - rng.normal(0.05, 0.1, size=30)  # correlated: pairing matters
    ref = scipy_stats.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True,
                                vectorized=True, method="percentile", n_resamples=20_000, confidence_level=0.95,
                                random_state=1).confidence_interval
    d, lo, hi = paired_bootstrap(a, b, n_boot=20_000, seed=2)
    width = ref.high - ref.low
    assert abs(lo - ref.low) < 0.03 * width and abs(hi - ref.high) < 0.03 * width
    unpaired = np.std(a) ** 2 / 30 + np.std(b) ** 2 / 30  # had the pairing been lost, the interval would be wider
    assert hi - lo < 0.5 * 3.92 * np.sqrt(unpaired)
    assert d == pytest.approx(float(np.mean(a - b)))


def test_deterministic_for_a_seed_and_chunk_independent_of_size() -> None:
    a, b = np.linspace(0, 1, 50), np.linspace(0, 1, 50) ** 2
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7) != paired_bootstrap(a, b, seed=8)
    assert isinstance(paired_bootstrap(a, b), Interval) and paired_bootstrap(a, b).excludes_zero


def test_constant_and_zero_differences() -> None:
    c = paired_bootstrap([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert c.excludes_zero and c == pytest.approx((0.5, 0.5, 0.5))
    z = paired_bootstrap([1.0, 2.0], [1.0, 2.0])
    assert z == (0.0, 0.0, 0.0) and not z.excludes_zero


@pytest.mark.parametrize(
    ("args", "kw", "err", "pattern"),
    [
        (([1.0, 2.0], [1.0]), {}, FormatError, "same, non-zero length"),
        (([], []), {}, FormatError, "same, non-zero length"),
        (([1.0, float("nan")], [1.0, 2.0]), {}, NonFiniteError, "non-finite"),
        (([1.0, 2.0], [1.0, 2.0]), {"n_boot": 0}, ParameterError, "'n_boot'"),
        (([1.0, 2.0], [1.0, 2.0]), {"ci": 1.0}, ParameterError, "'ci'"),
    ],
)
def test_bad_inputs(args: tuple, kw: dict, err: type, pattern: str) -> None:
    with pytest.raises(err, match=pattern):
        paired_bootstrap(*args, **kw)
