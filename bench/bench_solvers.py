"""Benchmark the exact Eq. 5 solver (sparse projection) against cvxpy on the same fresh problems.

For every (k, d): median time of ``solve_sparse`` on a fresh random problem per repetition, measured
"from P" (validation + centring + Gram + solve + objective) and "Gram only" (the k×k solve alone);
cvxpy (CLARABEL, problem built and solved fresh each time, fewer repetitions) on the first problems
of the same sequence, the ratio, the largest objective gap to cvxpy, and the batched path's µs per
target (one P, many targets). Prints a Markdown table and writes JSON (machine, date, settings, rows).

    python bench/bench_solvers.py                                  # full grid (several minutes)
    python bench/bench_solvers.py --ks 5 10 --ds 384 768 --reps 50 --cvx-reps 5 --batch 500
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy is imported:
    os.environ.setdefault(_var, "1")  # one thread beats two for small ops on shared cores (measured for the design, see BENCHMARKS.md)

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from adapterbank.compose import solvers as S  # noqa: E402
from adapterbank.compose.solvers import gram, solve_sparse, solve_sparse_batch  # noqa: E402


def make_problem(rng: np.random.Generator, k: int, d: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Prototypes around a shared centre (like task means of one encoder), a target near them, and
    λ = λ_rel·median(d_i) as the ``sparse`` strategy sets it."""
    centre = rng.normal(size=d)
    P = centre + 0.3 * rng.normal(size=(k, d))  # (k, d)
    t = centre + 0.3 * rng.normal(size=d) + 0.1 * rng.normal() * (P[0] - centre)  # (d,)
    return P, t, float(np.median(((P - t) ** 2).sum(axis=1)))


def cvx_solve(P: np.ndarray, t: np.ndarray, lam: float) -> float:
    import cvxpy as cp

    w = cp.Variable(P.shape[0])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(t - P.T @ w) + lam * cp.norm1(w)), [cp.sum(w) == 1])
    prob.solve(solver="CLARABEL")
    return float(prob.value)


def bench_one(k: int, d: int, args: argparse.Namespace, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    probs = [make_problem(rng, k, d) for _ in range(args.reps)]
    lams = [args.lam_rel * s for _, _, s in probs]
    solve_sparse(probs[0][0], probs[0][1], lams[0])  # warm-up (imports, LAPACK init)
    t_from_p, t_gram, iters = [], [], []
    for (P, t, _), lam in zip(probs, lams, strict=True):
        a = time.perf_counter()
        res = solve_sparse(P, t, lam)
        t_from_p.append(time.perf_counter() - a)
        iters.append(res.iterations)
        G, c, _ = gram(P, t)
        a = time.perf_counter()
        S._solve_sparse_gram(G, c, lam)
        t_gram.append(time.perf_counter() - a)
    t_cvx, gaps = [], []
    if args.cvx_reps > 0:
        cvx_solve(probs[0][0], probs[0][1], lams[0])  # warm-up (cvxpy's first canonicalisation)
        for (P, t, _), lam in list(zip(probs, lams, strict=True))[: args.cvx_reps]:
            a = time.perf_counter()
            ref = cvx_solve(P, t, lam)
            t_cvx.append(time.perf_counter() - a)
            ours = solve_sparse(P, t, lam).objective
            gaps.append((ours - ref) / max(abs(ref), 1e-300))
    P, t, scale = probs[0]
    T = t + 0.3 * rng.normal(size=(args.batch, d))  # many targets around the same prototypes
    solve_sparse_batch(P, T[:8], args.lam_rel * scale)
    a = time.perf_counter()
    solve_sparse_batch(P, T, args.lam_rel * scale)
    t_batch = (time.perf_counter() - a) / args.batch
    row = {
        "k": k, "d": d,
        "from_P_us": 1e6 * statistics.median(t_from_p),
        "gram_only_us": 1e6 * statistics.median(t_gram),
        "mean_iterations": float(np.mean(iters)),
        "cvxpy_us": 1e6 * statistics.median(t_cvx) if t_cvx else float("nan"),
        "batch_us_per_target": 1e6 * t_batch,
        "max_rel_objective_gap_vs_cvxpy": float(max(gaps, key=abs)) if gaps else float("nan"),
    }
    row["cvxpy_over_ours"] = row["cvxpy_us"] / row["from_P_us"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 10, 50, 200])
    ap.add_argument("--ds", type=int, nargs="+", default=[384, 768, 4096])
    ap.add_argument("--reps", type=int, default=200, help="fresh problems per (k, d) for our solver")
    ap.add_argument("--cvx-reps", type=int, default=20, help="of those, how many cvxpy also solves")
    ap.add_argument("--batch", type=int, default=2000, help="targets in the batched measurement")
    ap.add_argument("--lam-rel", type=float, default=0.1, help="λ = lam_rel · median squared distance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "solvers.json")
    args = ap.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(1)
    except ImportError:  # pragma: no cover - the environment variables above still apply
        limiter = None
    rows = [bench_one(k, d, args, args.seed + 1000 * k + d) for k in args.ks for d in args.ds]
    if limiter is not None:
        limiter.restore_original_limits()
    head = ("| k | d | from P (µs) | Gram only (µs) | iters | cvxpy (µs) | cvxpy/ours | batch (µs/target) "
            "| max rel. obj. gap |")
    print(head)
    print("|" + "---|" * 9)
    for r in rows:
        print(f"| {r['k']} | {r['d']} | {r['from_P_us']:.0f} | {r['gram_only_us']:.0f} | {r['mean_iterations']:.1f} "
              f"| {r['cvxpy_us']:.0f} | {r['cvxpy_over_ours']:.0f}× | {r['batch_us_per_target']:.1f} "
              f"| {r['max_rel_objective_gap_vs_cvxpy']:.1e} |")
    out = {
        "benchmark": "solvers",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "load_average": list(os.getloadavg())},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
