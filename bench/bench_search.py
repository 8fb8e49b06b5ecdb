"""Search at library scale: exact (bare numpy anchor vs NumpyIndex), ANN (AnnIndex, usearch HNSW), memory,
and the cold start of a new process from the persisted index files.

For every (N, d) in ``--configs`` (default 1e5x384,1e5x768; add 1e6x384), each measurement in its own fresh
process so peak RSS is its own:

* exact  — the float32 matrix is loaded into memory, ``NumpyIndex.build`` (no copy) and searches: the anchor
  ``s = X @ q; s = ‖x‖² − 2s``, ``argpartition``, sort the top 10 (with the base-model filter it masks the
  other rows) against ``NumpyIndex.search(q, 10)`` with and without ``where={"base_model": ...}`` (10 base
  models interleaved: the filter gathers 10 % of the rows). Peak RSS / matrix bytes is the memory ratio (goal
  ≤ 1.5).
* ann    — ``AnnIndex.build`` (HNSW graph over the float32 matrix, M=16, ef_add=128, ef = auto_ef(N)) then p50/p99 of ``search(q, 10)`` and
  recall@10 against the exact index; peak RSS of the process.
* cold   — the index is written with :func:`adapterbank.bank.persisted.write_index` (kind exact, and ann),
  then a *new* process imports adapterbank, calls ``load_index`` (a real empty bank whose catalog version the
  files carry, so the files are opened, not rebuilt) and runs the first search: median of 3 (page cache warm).

Data: 1000 Gaussian clusters (σ=0.5 around N(0,1) centres, like task prototypes that cluster by domain);
queries are stored rows plus the same noise. ANN on *unclustered* Gaussian data is the hard case for any
graph (recall@10 ≈ 0.67 at ef=256, d=384): see the report in BENCHMARKS.md.

Writes ``bench/results/search_scale.json`` and prints a Markdown table. Single-threaded BLAS by default
(``--threads``): steadier on a shared machine.

    python bench/bench_search.py [--configs 1e5x384,1e5x768,1e6x384] [--repeats 200] [--out ...]
        [--compare-libs faiss,usearch-f32,usearch-f16]   # the bare libraries too (how usearch was chosen)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

K = 10
N_MODELS = 10
SPACE_KEY = "bench-encoder|r1|mean|raw"
ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which a worker would inherit from the
    parent that generated the data)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # pragma: no cover - not Linux


def rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_data(path: Path, n: int, d: int, seed: int = 0) -> None:
    """Clustered float32 (n, d) written to ``path`` in chunks (no float64 copy of the whole matrix)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, d), dtype=np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        out[s:s + m] = centres[rng.integers(0, 1000, m)] + 0.5 * rng.standard_normal((m, d), dtype=np.float32)
    out.flush()


def queries(X: np.ndarray, nq: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(X), nq, replace=False)
    return (X[np.sort(rows)] + 0.5 * rng.standard_normal((nq, X.shape[1]), dtype=np.float32)).astype(np.float32)


def ids_attrs(n: int, grouped: bool) -> tuple[list[str], list[dict[str, Any]]]:
    ids = [f"adapter-{i:07d}" for i in range(n)]
    model = (lambda i: i * N_MODELS // n) if grouped else (lambda i: i % N_MODELS)
    return ids, [{"base_model": f"base-{model(i)}", "tags": []} for i in range(n)]


def timed(fn: Any, qs: np.ndarray, warmup: int = 3) -> list[float]:
    for q in qs[:warmup]:
        fn(q)
    out = []
    for q in qs:
        t0 = time.perf_counter()
        fn(q)
        out.append(time.perf_counter() - t0)
    return out


def stats(ts: list[float]) -> dict[str, float]:
    ms = np.array(ts) * 1e3
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "min_ms": float(ms.min())}


# -- workers (each in its own process) -------------------------------------------------------------
def worker_exact(path: Path, repeats: int) -> dict[str, Any]:
    from adapterbank.bank import NumpyIndex

    n, d = np.load(path, mmap_mode="r").shape
    ids, attrs = ids_attrs(n, grouped=False)
    base_rss = rss_now_mb()  # interpreter, numpy, adapterbank and the ids/attrs lists the caller holds anyway
    X = np.load(path)  # (n, d) float32 in memory
    t0 = time.perf_counter()
    idx = NumpyIndex()
    idx.build(ids, X, attrs)
    build_s = time.perf_counter() - t0
    assert idx._X is X
    sqn = np.asarray(idx._sqn)
    mask = idx._codes == idx._bm_code["base-3"]
    qs = queries(X, repeats)

    def anchor(q: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        s = X @ q
        s *= -2.0
        s += sqn
        if mask is not None:
            s[~mask] = np.inf
        top = np.argpartition(s, K)[:K]
        return top[np.argsort(s[top])]

    for q in qs[:3]:
        assert [h.id for h in idx.search(q, K)] == [ids[i] for i in anchor(q)], "top-10 differs from the anchor"
    t = {
        "anchor": timed(anchor, qs), "ours": timed(lambda q: idx.search(q, K), qs),
        "anchor_filter": timed(lambda q: anchor(q, mask), qs),
        "ours_filter": timed(lambda q: idx.search(q, K, where={"base_model": "base-3"}), qs),
    }
    row: dict[str, Any] = {"n": n, "d": d, "build_s": build_s, "matrix_mb": X.nbytes / 2**20, "base_rss_mb": base_rss,
                           **{f"{k}_{s}": v for k, ts in t.items() for s, v in stats(ts).items()}}
    row["ratio"] = row["ours_p50_ms"] / row["anchor_p50_ms"]
    row["ratio_filter"] = row["ours_filter_p50_ms"] / row["anchor_filter_p50_ms"]
    row["peak_rss_mb"] = peak_rss_mb()
    row["memory_ratio"] = (row["peak_rss_mb"] - base_rss) / row["matrix_mb"]  # goal ≤ 1.5
    return row


def worker_ann(path: Path, repeats: int, persist: Path | None) -> dict[str, Any]:
    from adapterbank.bank import NumpyIndex
    from adapterbank.bank.ann import AnnIndex
    from adapterbank.bank.persisted import space_dir_name, write_index

    n, d = np.load(path, mmap_mode="r").shape
    ids, attrs = ids_attrs(n, grouped=True)  # grouped: the persisted files keep the graph's row numbers
    base_rss = rss_now_mb()
    X = np.load(path)
    t0 = time.perf_counter()
    ann = AnnIndex()
    ann.build(ids, X, attrs)
    build_s = time.perf_counter() - t0
    rss_built = peak_rss_mb()
    qs = queries(X, repeats)
    exact = NumpyIndex()
    exact.build(ids, X, attrs)
    t = {"ann": timed(lambda q: ann.search(q, K), qs),
         "ann_filter": timed(lambda q: ann.search(q, K, where={"base_model": "base-3"}), qs)}
    truth = [{h.id for h in exact.search(q, K)} for q in qs]
    found = sum(len({h.id for h in ann.search(q, K)} & tr) for q, tr in zip(qs, truth, strict=True))
    sweep = {}  # the graph's search breadth (HNSW ef) against recall and latency
    default_ef = ann._graph.expansion_search
    for ef in (64, 128, 256, 512, 1024):
        ann._graph.expansion_search = ef
        ts = timed(lambda q: ann.search(q, K), qs)
        rec = sum(len({h.id for h in ann.search(q, K)} & tr) for q, tr in zip(qs, truth, strict=True))
        sweep[ef] = {**stats(ts), "recall10": rec / (K * len(qs))}
    ann._graph.expansion_search = default_ef
    row: dict[str, Any] = {"ef": default_ef, "ef_sweep": sweep,
                           "n": n, "d": d, "build_s": build_s, "matrix_mb": X.nbytes / 2**20, "base_rss_mb": base_rss,
                           "recall10": found / (K * len(qs)), "peak_rss_mb": rss_built,
                           "memory_ratio": (rss_built - base_rss) / (X.nbytes / 2**20),
                           **{f"{k}_{s}": v for k, ts in t.items() for s, v in stats(ts).items()}}
    if persist is not None:  # write both kinds for the cold-start runs
        for kind in ("exact", "ann"):
            idx = ann if kind == "ann" else exact
            idx.catalog_version = 1
            t0 = time.perf_counter()
            write_index(persist / f"{kind}-index" / space_dir_name(SPACE_KEY), SPACE_KEY, idx, kind=kind)
            row[f"write_{kind}_s"] = time.perf_counter() - t0
    return row


def worker_libs(path: Path, repeats: int, lib: str) -> dict[str, Any]:
    """The bare libraries on the same data and HNSW parameters (M=16, ef_add=128): build on all cores, then
    the top-c candidates (c = 64) re-ranked exactly in float64, at several ef. ``lib``: faiss | usearch-f32 |
    usearch-f16."""
    base_rss = rss_now_mb()
    X = np.load(path)
    n, d = X.shape
    qs = queries(X, repeats)
    sqn = np.einsum("ij,ij->i", X, X)
    truth = [set(np.argpartition(sqn - 2 * (X @ q), K)[:K].tolist()) for q in qs]
    threads = os.cpu_count() or 1
    t0 = time.perf_counter()
    if lib == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        ix = faiss.IndexHNSWFlat(d, 16)
        ix.hnsw.efConstruction = 128
        ix.add(X)
        faiss.omp_set_num_threads(1)

        def cand(q: np.ndarray, c: int, ef: int) -> np.ndarray:
            ix.hnsw.efSearch = ef
            return ix.search(q[None, :], c)[1][0]
    else:
        from usearch.index import Index

        ix = Index(ndim=d, metric="l2sq", dtype=lib.split("-")[1], connectivity=16, expansion_add=128)
        ix.add(np.arange(n, dtype=np.uint64), X, threads=threads)

        def cand(q: np.ndarray, c: int, ef: int) -> np.ndarray:
            ix.expansion_search = ef
            return ix.search(q, c, threads=1).keys.astype(np.int64)
    row: dict[str, Any] = {"lib": lib, "n": n, "d": d, "build_s": time.perf_counter() - t0,
                           "memory_ratio": (peak_rss_mb() - base_rss) / (X.nbytes / 2**20)}
    for ef in (64, 128, 256, 512):
        def run(q: np.ndarray, ef: int = ef) -> np.ndarray:
            ids = cand(q, 64, ef)
            ids = ids[ids >= 0]
            dd = ((X[ids].astype(np.float64) - q) ** 2).sum(1)
            return ids[np.argsort(dd, kind="stable")[:K]]

        ts = timed(run, qs)
        rec = sum(len(set(run(q).tolist()) & tr) for q, tr in zip(qs, truth, strict=True)) / (K * len(qs))
        row[f"ef{ef}"] = {**stats(ts), "recall10": rec}
    return row


COLD = """
import sys, time, json
t0 = time.perf_counter()
import numpy as np
from pathlib import Path
from adapterbank.bank import Bank
from adapterbank.bank.persisted import load_index
t1 = time.perf_counter()
bank = Bank.open(sys.argv[1])
idx = load_index(bank.root / "index", sys.argv[2], bank._cat, kind=sys.argv[3])
t2 = time.perf_counter()
q = np.load(sys.argv[4])[0]
hits = idx.search(q, 10)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "open_s": t2 - t1, "first_search_s": t3 - t2, "load_and_search_s": t3 - t1,
                  "type": type(idx).__name__, "top": hits[0].id}))
"""


def cold_start(bank_dir: Path, kind: str, qpath: Path, runs: int = 3) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", COLD, str(bank_dir), SPACE_KEY, kind, str(qpath)],
                             capture_output=True, text=True, env=env, check=True)
        wall = time.perf_counter() - t0
        res.append({**json.loads(out.stdout.strip().splitlines()[-1]), "process_wall_s": wall})
    keys = [k for k in res[0] if k.endswith("_s")]
    return {"kind": kind, "type": res[0]["type"], **{k: statistics.median(r[k] for r in res) for k in keys}}


def make_cold_bank(dir: Path, index: Path) -> None:
    """A real (empty) bank at ``dir`` with the bench's index files (``index``) moved in, stamped with its
    catalog version: load_index opens them (what a bank whose catalog holds these rows would do)."""
    from adapterbank.bank import Bank

    bank = Bank.init(dir)
    index.rename(dir / "index")
    for m in (dir / "index").rglob("meta.json"):
        data = json.loads(m.read_text())
        data["catalog_version"] = bank.version
        m.write_text(json.dumps(data))
    bank.close()


# -- orchestration --------------------------------------------------------------------------------------
def run_worker(kind: str, path: Path, repeats: int, threads: int, persist: Path | None = None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(path), "--repeats", str(repeats)]
    if persist is not None:
        cmd += ["--persist", str(persist)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"worker {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(res: dict[str, Any]) -> str:
    lines = [f"### Search at scale ({res['machine']}, {res['date']}, load {res['load_avg']})", "",
             "Exact top-10 (p50 over distinct queries; filter = one base model of 10, interleaved rows):", "",
             "| N × d | anchor | NumpyIndex | ratio | anchor, filter | NumpyIndex, filter | ratio | build | peak RSS / matrix |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["exact"]:
        lines.append(f"| {r['n']:.0e} × {r['d']} | {r['anchor_p50_ms']:.2f} ms | {r['ours_p50_ms']:.2f} ms | "
                     f"{r['ratio']:.2f}× | {r['anchor_filter_p50_ms']:.2f} ms | {r['ours_filter_p50_ms']:.2f} ms | "
                     f"{r['ratio_filter']:.2f}× | {r['build_s']:.2f} s | {r['memory_ratio']:.2f} |")
    lines += ["", ("ANN (AnnIndex: usearch HNSW M=16, float32 graph over the matrix, exact float64 re-rank of max(4k, 64) candidates; "
                   "sweep: p50 / recall@10 at the graph's search breadth ef):"), "",
              "| N × d | build | ef | p50 | p99 | p50, filter 10 % | recall@10 | peak RSS / matrix | sweep |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["ann"]:
        sweep = ", ".join(f"{ef}: {v['p50_ms']:.2f} ms / {v['recall10']:.3f}" for ef, v in r["ef_sweep"].items())
        lines.append(f"| {r['n']:.0e} × {r['d']} | {r['build_s']:.0f} s | {r['ef']} | {r['ann_p50_ms']:.2f} ms | "
                     f"{r['ann_p99_ms']:.2f} ms | {r['ann_filter_p50_ms']:.2f} ms | {r['recall10']:.4f} | "
                     f"{r['memory_ratio']:.2f} | {sweep} |")
    lines += ["", "Cold start of a new process from the persisted files (median of 3, page cache warm):", "",
              "| N × d | kind | import adapterbank | load_index | first search | load + first search | process wall |",
              "|---|---|---|---|---|---|---|"]
    for r in res["cold"]:
        lines.append(f"| {r['n']:.0e} × {r['d']} | {r['kind']} | {r['import_s']:.2f} s | {r['open_s'] * 1e3:.0f} ms | "
                     f"{r['first_search_s'] * 1e3:.0f} ms | {r['load_and_search_s'] * 1e3:.0f} ms | "
                     f"{r['process_wall_s']:.2f} s |")
    if res.get("libs"):
        lines += ["", "Bare libraries, same data, M=16, ef_add=128, top-64 candidates re-ranked exactly (p50 / recall@10):",
                  "", "| lib | N × d | build | peak RSS / matrix | ef 64 | ef 128 | ef 256 | ef 512 |", "|---|---|---|---|---|---|---|---|"]
        for r in res["libs"]:
            cells = " | ".join(f"{r[f'ef{ef}']['p50_ms']:.2f} ms / {r[f'ef{ef}']['recall10']:.3f}" for ef in (64, 128, 256, 512))
            lines.append(f"| {r['lib']} | {r['n']:.0e} × {r['d']} | {r['build_s']:.0f} s | {r['memory_ratio']:.2f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="1e5x384,1e5x768", help="comma-separated NxD (e.g. 1e5x384,1e6x384)")
    ap.add_argument("--repeats", type=int, default=200, help="queries per measurement")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads of the search (0: default)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: exact, ann, cold")
    ap.add_argument("--compare-libs", default="",
                    help="also run the bare libraries, e.g. faiss,usearch-f32,usearch-f16 (faiss-cpu must be installed)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "search_scale.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--persist", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if args.worker.startswith("lib:"):
            print(json.dumps(worker_libs(Path(args.data), args.repeats, args.worker[4:])))
            return 0
        fn = {"exact": lambda: worker_exact(Path(args.data), args.repeats),
              "ann": lambda: worker_ann(Path(args.data), args.repeats, Path(args.persist) if args.persist else None)}
        print(json.dumps(fn[args.worker]()))
        return 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"numpy {np.__version__}",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_avg": [round(x, 2) for x in os.getloadavg()], "repeats": args.repeats, "threads": args.threads,
        "exact": [], "ann": [], "cold": [], "libs": [],
    }
    try:
        import usearch

        res["usearch"] = usearch.__version__
    except ImportError:
        skip |= {"ann", "cold"}
    for cfg in args.configs.split(","):
        n_s, d_s = cfg.lower().split("x")
        n, d = int(float(n_s)), int(d_s)
        with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
            path = Path(tmp) / "X.npy"
            make_data(path, n, d)
            for lib in [x.strip() for x in args.compare_libs.split(",") if x.strip()]:
                print(f"bare {lib} N={n:.0e} d={d} ...", file=sys.stderr, flush=True)
                res["libs"].append(run_worker(f"lib:{lib}", path, args.repeats, args.threads))
            if "exact" not in skip:
                print(f"exact N={n:.0e} d={d} ...", file=sys.stderr, flush=True)
                res["exact"].append(run_worker("exact", path, args.repeats, args.threads))
            if "ann" not in skip:
                print(f"ann N={n:.0e} d={d} (graph build) ...", file=sys.stderr, flush=True)
                persist = Path(tmp) / "banks" if "cold" not in skip else None
                res["ann"].append(run_worker("ann", path, args.repeats, args.threads, persist))
                if persist is not None:
                    qpath = Path(tmp) / "q.npy"
                    np.save(qpath, queries(np.load(path, mmap_mode="r"), 2, seed=7))
                    for kind in ("exact", "ann"):
                        make_cold_bank(persist / kind, persist / f"{kind}-index")
                        print(f"cold start {kind} N={n:.0e} d={d} ...", file=sys.stderr, flush=True)
                        res["cold"].append({"n": n, "d": d, **cold_start(persist / kind, kind, qpath)})
        out = Path(args.out)  # written after every config: a long run keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
