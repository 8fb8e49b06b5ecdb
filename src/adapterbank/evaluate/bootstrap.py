"""Paired bootstrap intervals of a difference of means (Efron & Tibshirani 1993, ch. 13; percentile method).

Two methods scored on the same units (the same test items, or the same targets) give paired scores
``a_i`` and ``b_i``. The statistic is the mean difference

    Δ = (1/G) Σ_g mean_i∈g (a_i − b_i)

over groups g (strata: the targets; one group when the units are the targets themselves). One bootstrap
replicate resamples, within each group, n_g units with replacement — the *same* draws for ``a`` and
``b``, so the pairing is kept — and recomputes Δ. The interval is the ((1−ci)/2, (1+ci)/2) quantiles of
the B replicates (numpy's default linear interpolation). The generator is
``numpy.random.default_rng(seed)``: same inputs and seed, same interval.

=========  ==========================================
symbol     here
=========  ==========================================
a_i, b_i   ``a[i]``, ``b[i]`` (one group) or ``a_groups[g][i]``
G, n_g     number of groups, units in group g
B          ``n_boot``
=========  ==========================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from adapterbank._validation import check_int, check_number
from adapterbank.errors import FormatError, NonFiniteError

__all__ = ["Interval", "paired_bootstrap", "stratified_paired_bootstrap", "bootstrap_replicates"]

_CHUNK_CELLS = 4_000_000  # resampled indices held at once (32 MB of int64), whatever the sample size


class Interval(NamedTuple):
    """A mean difference and its bootstrap percentile interval; unpacks as ``(diff, lo, hi)``."""

    diff: float
    lo: float
    hi: float

    @property
    def excludes_zero(self) -> bool:
        """Whether 0 lies outside [lo, hi]."""
        return self.lo > 0.0 or self.hi < 0.0


def _diff_groups(a_groups: Sequence[Sequence[float]], b_groups: Sequence[Sequence[float]]) -> list[np.ndarray]:
    if len(a_groups) != len(b_groups) or not a_groups:
        raise FormatError(f"Paired bootstrap: both samples must have the same, non-zero number of groups. "
                          f"Got {len(a_groups)} and {len(b_groups)} instead.")
    out = []
    for g, (a, b) in enumerate(zip(a_groups, b_groups)):
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or x.size == 0:
            raise FormatError(f"Paired bootstrap: group {g} must hold two 1-D samples of the same, non-zero length "
                              f"(the same units scored twice). Got shapes {x.shape} and {y.shape} instead.")
        d = x - y  # (n_g,)
        if not np.all(np.isfinite(d)):
            raise NonFiniteError(f"Paired bootstrap: group {g} holds a non-finite score.")
        out.append(d)
    return out


def _check_args(n_boot: int, ci: float) -> None:
    check_int(n_boot, "n_boot", "paired_bootstrap", low=1)
    check_number(ci, "ci", "paired_bootstrap", low=0.0, high=1.0, low_open=True, high_open=True)


def bootstrap_replicates(a_groups: Sequence[Sequence[float]], b_groups: Sequence[Sequence[float]],
                         n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """The B replicates of Δ (see the module docstring), resampling within each group. -> (n_boot,) float64.

    >>> bootstrap_replicates([[1.0, 1.0]], [[0.0, 0.0]], n_boot=3).tolist()
    [1.0, 1.0, 1.0]
    """
    _check_args(n_boot, 0.5)
    diffs = _diff_groups(a_groups, b_groups)
    rng = np.random.default_rng(seed)
    n_total = sum(d.size for d in diffs)
    chunk = max(1, _CHUNK_CELLS // max(1, n_total))
    reps = np.zeros(int(n_boot))  # (B,)
    for start in range(0, int(n_boot), chunk):
        c = min(chunk, int(n_boot) - start)
        for d in diffs:  # the same group order in every chunk: deterministic for a seed
            idx = rng.integers(0, d.size, size=(c, d.size))  # (c, n_g) draws with replacement
            reps[start:start + c] += d[idx].mean(axis=1)
    return reps / len(diffs)


def stratified_paired_bootstrap(a_groups: Sequence[Sequence[float]], b_groups: Sequence[Sequence[float]],
                                n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> Interval:
    """Δ = mean over groups of the within-group mean of ``a − b``, with its paired, stratified bootstrap interval.

    Groups are strata (e.g. the targets; units are that target's test items); each is resampled on its own.

    >>> stratified_paired_bootstrap([[1.0, 2.0], [0.0, 0.0, 3.0]], [[1.0, 1.0], [0.0, 0.0, 0.0]]).diff
    0.75
    """
    _check_args(n_boot, ci)
    diffs = _diff_groups(a_groups, b_groups)
    point = float(np.mean([d.mean() for d in diffs]))
    reps = bootstrap_replicates(a_groups, b_groups, n_boot, seed)
    lo, hi = np.quantile(reps, [(1.0 - float(ci)) / 2.0, (1.0 + float(ci)) / 2.0])
    return Interval(point, float(lo), float(hi))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     ci: float = 0.95) -> Interval:
    """Mean of ``a − b`` over paired units and its bootstrap percentile interval: ``(mean_diff, lo, hi)``.

    ``a[i]`` and ``b[i]`` are the scores of the same unit; units are resampled with replacement, B = ``n_boot``
    times, with ``numpy.random.default_rng(seed)``.

    >>> d, lo, hi = paired_bootstrap([0.9, 0.8, 0.7, 0.95], [0.5, 0.6, 0.7, 0.5])
    >>> round(d, 4), lo <= d <= hi, Interval(d, lo, hi).excludes_zero
    (0.2625, True, True)
    """
    return stratified_paired_bootstrap([a], [b], n_boot, seed, ci)
