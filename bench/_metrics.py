"""Image-generation metrics shared by the benchmarks (bench/grasp_longtail.py, bench/loo_synthesis.py)."""

from __future__ import annotations

import numpy as np


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}), via the eigenvalues of √Σ_a Σ_b √Σ_a.

    >>> rng = np.random.default_rng(0); x = rng.standard_normal((500, 3))
    >>> round(frechet(x, x), 9), frechet(x, x + 1.0) > 2.9
    (0.0, True)
    """
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, V = np.linalg.eigh(ca)
    sa = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    m = sa @ cb @ sa
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())
