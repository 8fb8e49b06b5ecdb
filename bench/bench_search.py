"""Exact top-10 search: adapterbank's NumpyIndex (and Bank.search) against bare numpy, same data, same run.

For every N (default 1e4 and 1e5; add 1e6 with ``--sizes 1e4,1e5,1e6``) at d=768 with 10 base models:

* anchor  — bare numpy: ``s = X @ q; s = ‖x‖² − 2s`` (norms precomputed), ``argpartition``, sort the top 10;
  with the base-model filter the anchor masks the other rows to +inf (what the original design note measured).
* ours    — ``NumpyIndex.search(q, 10)`` and ``search(q, 10, where={"base_model": ...})``: exact float64
  re-ranking, ties by id, filter as a row slice.
* bank    — ``Bank.search`` end to end (catalog version check + cached index) at N = 1e4, and the cold
  first search that builds the index from SQLite.

Median of repeats over distinct queries (after warm-up); ratio = ours / anchor (goal ≤ 1.2); peak RSS.
Writes ``bench/results/search.json`` and prints a Markdown table.

    python bench/bench_search.py [--sizes 1e4,1e5] [--repeats 15] [--threads 1] [--out bench/results/search.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

D = 768
K = 10
N_MODELS = 10


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def median_times(fns: dict[str, Callable[[np.ndarray], Any]], queries: np.ndarray, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function; the functions run interleaved on every query, so drift
    of the shared machine's speed hits them alike."""
    for q in queries[:warmup]:
        for fn in fns.values():
            fn(q)
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for q in queries:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(q)
            ts[name].append(time.perf_counter() - t0)
    out = {name: statistics.median(v) for name, v in ts.items()}
    out.update({f"{name}@min": min(v) for name, v in ts.items()})  # least disturbed by other load
    return out


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    X = np.empty((n, D), dtype=np.float32)
    step = 50_000
    for s in range(0, n, step):  # chunked: no float64 copy of the whole matrix
        X[s:s + step] = rng.standard_normal((min(step, n - s), D), dtype=np.float32)
    ids = [f"adapter-{i:07d}" for i in range(n)]
    attrs = [{"base_model": f"base-{i % N_MODELS}", "tags": []} for i in range(n)]  # interleaved, not pre-grouped
    return X, ids, attrs


def bare_numpy(X: np.ndarray, sqn: np.ndarray, mask: np.ndarray | None) -> Callable[[np.ndarray], np.ndarray]:
    def run(q: np.ndarray) -> np.ndarray:
        s = X @ q
        s *= -2.0
        s += sqn
        if mask is not None:
            s[~mask] = np.inf
        top = np.argpartition(s, K)[:K]
        return top[np.argsort(s[top])]

    return run


def bench_index(n: int, repeats: int) -> dict[str, Any]:
    from adapterbank.bank import NumpyIndex

    X, ids, attrs = make_data(n)
    t0 = time.perf_counter()
    idx = NumpyIndex()
    idx.build(ids, X, attrs)
    build_s = time.perf_counter() - t0
    del X  # the index holds its own (grouped) copy; the anchor runs on that same matrix
    Xg = idx._X  # noqa: SLF001 - the benchmark compares on the very same memory
    sqn = idx._sqn  # noqa: SLF001
    target = "base-3"
    mask = np.array([a["base_model"] == target for a in (idx._attrs)])  # noqa: SLF001
    queries = np.random.default_rng(1).standard_normal((repeats, D), dtype=np.float32)

    # correctness on the bench data: same top-10 ids as the anchor
    for q in queries[:3]:
        a = [idx.ids[i] for i in bare_numpy(Xg, sqn, None)(q)]
        assert [h.id for h in idx.search(q, K)] == a, "top-10 differs from the numpy anchor"

    row: dict[str, Any] = {"n": n, "d": D, "k": K, "build_s": build_s, "index_mb": (Xg.nbytes + sqn.nbytes) / 2**20}
    t = median_times({
        "anchor_nofilter_ms": bare_numpy(Xg, sqn, None),
        "ours_nofilter_ms": lambda q: idx.search(q, K),
        "anchor_filter_ms": bare_numpy(Xg, sqn, mask),
        "ours_filter_ms": lambda q: idx.search(q, K, where={"base_model": target}),
    }, queries)
    row.update({name.replace("_ms@min", "_min_ms"): 1e3 * v for name, v in t.items()})
    row["ratio_nofilter_min"] = row["ours_nofilter_min_ms"] / row["anchor_nofilter_min_ms"]
    row["ratio_filter_min"] = row["ours_filter_min_ms"] / row["anchor_filter_min_ms"]
    row["ratio_nofilter"] = row["ours_nofilter_ms"] / row["anchor_nofilter_ms"]
    row["ratio_filter"] = row["ours_filter_ms"] / row["anchor_filter_ms"]
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def bench_bank(n: int, repeats: int) -> dict[str, Any]:
    """Bank.search end to end on a bank whose catalog holds n adapters with prototypes.

    The rows are inserted in one transaction straight into the catalog (no adapter files: search never
    reads blobs), which is what n calls of ``Bank.add`` would leave there, minus hours of fsyncs.
    """
    from adapterbank.bank import Bank
    from adapterbank.prototypes.space import Prototype, PrototypeSpace

    X, ids, attrs = make_data(n, seed=2)
    space = PrototypeSpace("bench-encoder", "r1", "mean", False, D)
    with tempfile.TemporaryDirectory(prefix="bench-bank-") as tmp:
        bank = Bank.init(Path(tmp) / "bank")
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        sp = json.dumps(space.to_dict(), sort_keys=True)
        with bank._cat.write() as c:  # noqa: SLF001 - bulk load for the benchmark only
            c.executemany(
                "INSERT INTO adapters(id, base_model, format, rank, ranks, targets, source, description, license, "
                "tags, created, versions, extra) VALUES (?, ?, 'peft', 4, '{}', '[]', NULL, NULL, NULL, '[]', ?, '{}', '{}')",
                [(i, a["base_model"], now) for i, a in zip(ids, attrs, strict=True)])
            c.executemany(
                "INSERT INTO prototypes(adapter_id, space_key, space, dim, vector, n_samples, source, extra) "
                "VALUES (?, ?, ?, ?, ?, 0, '', '{}')",
                [(i, space.key, sp, D, X[r].tobytes()) for r, i in enumerate(ids)])
            bank._cat.bump(c)  # noqa: SLF001
        queries = np.random.default_rng(3).standard_normal((repeats, D), dtype=np.float32)
        t0 = time.perf_counter()
        bank.search(Prototype(queries[0], space), k=K)
        cold_s = time.perf_counter() - t0
        idx = bank.index(space)
        Xg, sqn = idx._X, idx._sqn  # noqa: SLF001
        mask = np.array([a["base_model"] == "base-3" for a in idx._attrs])  # noqa: SLF001
        t = median_times({
            "anchor_nofilter_ms": bare_numpy(Xg, sqn, None),
            "bank_nofilter_ms": lambda q: bank.search(q, K),
            "anchor_filter_ms": bare_numpy(Xg, sqn, mask),
            "bank_filter_ms": lambda q: bank.search(q, K, base_model="base-3"),
            "bank_prototype_query_ms": lambda q: bank.search(Prototype(q, space), K),
        }, queries)
        row: dict[str, Any] = {"n": n, "cold_first_search_s": cold_s,
                               **{name.replace("_ms@min", "_min_ms"): 1e3 * v for name, v in t.items()}}
        row["ratio_nofilter"] = row["bank_nofilter_ms"] / row["anchor_nofilter_ms"]
        row["ratio_filter"] = row["bank_filter_ms"] / row["anchor_filter_ms"]
        bank.close()
    return row


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"### Exact top-{K} search, d={D}, {N_MODELS} base models ({res['machine']}, "
        f"BLAS threads: {res['blas_threads']})",
        "",
        "Median of interleaved repeats (ratio of medians; in brackets the ratio of the minima, least disturbed "
        "by other load on the machine). Filter: one base model of 10 (10 % of the rows); the anchor masks.",
        "",
        "| N | anchor (numpy) | NumpyIndex | ratio | anchor, filter | NumpyIndex, filter | ratio | build | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["index"]:
        lines.append(
            f"| {r['n']:.0e} | {r['anchor_nofilter_ms']:.2f} ms | {r['ours_nofilter_ms']:.2f} ms | "
            f"{r['ratio_nofilter']:.2f}× ({r['ratio_nofilter_min']:.2f}×) | {r['anchor_filter_ms']:.2f} ms | "
            f"{r['ours_filter_ms']:.2f} ms | {r['ratio_filter']:.2f}× ({r['ratio_filter_min']:.2f}×) | "
            f"{r['build_s']:.2f} s | {r['peak_rss_mb']:.0f} MB |"
        )
    if res.get("bank"):
        b = res["bank"]
        lines += [
            "",
            f"Bank.search end to end at N={b['n']:.0e}: {b['bank_nofilter_ms']:.2f} ms vs numpy "
            f"{b['anchor_nofilter_ms']:.2f} ms ({b['ratio_nofilter']:.2f}×); with base-model filter "
            f"{b['bank_filter_ms']:.2f} ms vs {b['anchor_filter_ms']:.2f} ms ({b['ratio_filter']:.2f}×); "
            f"Prototype query {b['bank_prototype_query_ms']:.2f} ms; cold first search (index built from SQLite) "
            f"{b['cold_first_search_s']:.2f} s.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e4,1e5", help="comma-separated N values (e.g. 1e4,1e5,1e6)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--bank-n", type=float, default=1e4, help="N for the Bank.search end-to-end run (0: skip)")
    ap.add_argument("--threads", type=int, default=0,
                    help="BLAS threads for both sides (0: leave the default); 1 is steadier on loaded machines")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "search.json"))
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"numpy {np.__version__}",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "repeats": args.repeats,
        "index": [],
    }
    limit: Any = contextlib.nullcontext()
    if args.threads:
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(limits=args.threads, user_api="blas")
    res["blas_threads"] = args.threads or "default"
    with limit:
        for n in sizes:
            print(f"N={n:.0e} ...", file=sys.stderr, flush=True)
            res["index"].append(bench_index(n, args.repeats if n < 1_000_000 else max(5, args.repeats // 3)))
        if args.bank_n:
            print(f"Bank.search at N={args.bank_n:.0e} ...", file=sys.stderr, flush=True)
            res["bank"] = bench_bank(int(args.bank_n), args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
