"""Image-generation metrics shared by the benchmarks (bench/grasp_longtail.py, bench/loo_synthesis.py): Fréchet
distance, PRDC and the Vendi score, in numpy (no extra packages)."""

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


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) Euclidean distances between the rows of a (n, d) and b (m, d)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d, 0, None))


def _knn_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row to its k-th nearest other row."""
    d = _sqdist(x, x)
    return np.partition(d, k, axis=1)[:, k]  # column 0 is the row itself (distance 0)


def prdc(real: np.ndarray, fake: np.ndarray, nearest_k: int = 5) -> dict[str, float]:
    """Precision, recall, density, coverage (Naeem et al., ICML 2020, Eq. 1–4; the ``prdc`` package's definitions).

    A sample is inside the k-NN ball of a real (fake) point if its distance is below that point's distance to its
    k-th nearest real (fake) neighbour.

    >>> rng = np.random.default_rng(0); r = rng.standard_normal((300, 4))
    >>> m = prdc(r, rng.standard_normal((300, 4))); all(0.8 < m[k] for k in ("precision", "recall", "coverage"))
    True
    >>> prdc(r, r + 100.0)["precision"], prdc(r, r + 100.0)["coverage"]
    (0.0, 0.0)
    """
    r_rad, f_rad = _knn_radius(real, nearest_k), _knn_radius(fake, nearest_k)
    d = _sqdist(real, fake)  # (n_real, n_fake)
    inside_real = d < r_rad[:, None]  # fake j inside real i's ball
    return {"precision": float(inside_real.any(0).mean()), "recall": float((d < f_rad[None, :]).any(1).mean()),
            "density": float(inside_real.sum(0).mean() / nearest_k),
            "coverage": float((d.min(1) < r_rad).mean())}


def vendi(feats: np.ndarray) -> float:
    """Vendi score with the cosine kernel: exp of the entropy of the eigenvalues of K/n (Friedman & Dieng, 2023).

    Computed in the dual (d × d) form, as ``vendi_score.vendi.score_dual(x, normalize=True)``.

    >>> round(vendi(np.eye(5)), 6), round(vendi(np.ones((7, 3))), 6)
    (5.0, 1.0)
    """
    x = feats / np.clip(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12, None)
    w = np.linalg.eigvalsh(x.T @ x / len(x))
    w = w[w > 1e-12]
    return float(np.exp(-(w * np.log(w)).sum()))
