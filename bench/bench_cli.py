"""Cold-start latency of the command line, each next to its anchor in the same run.

Goals (issue 8): ``adapterbank --help`` ≤ 0.5 s; ``compose --prototype`` on a small bank ≤ 1.5 s end to end;
``compose --target`` loads one encoder. Anchors: ``python -c pass`` (interpreter start) and
``python -c "import torch"`` (what any merge needs). Each command runs in a fresh process, ``--repeats`` times,
alternating with its anchors; medians are reported.

    python bench/bench_cli.py --repeats 7 --out bench/results/cli.json
    python bench/bench_cli.py --search-n 1e6 --repeats 5     # + cold ``search --prototype`` on a 1e6 bank

``--search-n N`` (issue 10; goal ≤ 1 s at N = 1e6) also builds an embedded bank of N cards with one 384-d prototype
each, committed through the catalog in batches (the rows ``Bank.add`` writes, without weight files: ``search``
reads none), runs ``adapterbank search --prototype -k 10`` once (that process builds and persists the index:
reported as "first search after ingest"), then times it cold, alternating with ``python -c pass``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import load_test_servers, machine  # noqa: E402


def make_bank(root: Path, n: int = 10, d: int = 384) -> tuple[Path, Path]:
    """``n`` rank-8 PEFT-style adapters on two 384×384 modules with random prototypes; a target prototype."""
    import numpy as np
    import torch

    from adapterbank.bank import Bank
    from adapterbank.lora import LoraAdapter, LoraModule
    from adapterbank.prototypes.space import Prototype, PrototypeSpace

    b = Bank.init(root / "bank")
    space = PrototypeSpace("bench-enc", "r1", "mean", False, d)
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for i in range(n):
        mods = {f"layers.{j}.q_proj": LoraModule(torch.randn(8, 384, generator=g), torch.randn(384, 8, generator=g),
                                                 2.0, (384, 384)) for j in range(2)}
        b.add(LoraAdapter(mods), id=f"a{i}", base_model="bench-base",
              prototype=Prototype(rng.standard_normal(d).astype(np.float32), space))
    target = Prototype(rng.standard_normal(d).astype(np.float32), space, 1, "bench target").save(root / "t.npy")
    return root / "bank", target


def make_search_bank(root: Path, n: int, d: int = 384, batch: int = 20_000) -> tuple[Path, Path, float]:
    """An embedded bank of ``n`` cards with clustered unit prototypes (2 000 centres, 10 base models), written
    through the catalog in batches of ``batch``; a target prototype file. Returns (bank, target, ingest seconds)."""
    import numpy as np

    from adapterbank.bank import Bank
    from adapterbank.prototypes.space import Prototype, PrototypeSpace

    make_entry = load_test_servers().make_entry
    space = PrototypeSpace("bench-enc", "r1", "mean", True, d)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, d)).astype(np.float32)
    bank = Bank.init(root / "big-bank")
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        m = min(batch, n - s)
        X = centres[rng.integers(0, 2000, m)] + 0.6 * rng.standard_normal((m, d)).astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        bank._cat.commit([make_entry(f"ad-{s + i:07d}", X[i], space=space, base_model=f"base-{(s + i) % 10}")
                          for i in range(m)])
    ingest_s = time.perf_counter() - t0
    bank.close()
    q = centres[7] + 0.6 * rng.standard_normal(d).astype(np.float32)
    target = Prototype(q / np.linalg.norm(q), space, 1, "bench target").save(root / "q.npy")
    return root / "big-bank", target, ingest_s


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed: {r.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--search-n", type=float, default=0,
                    help="also time a cold `search --prototype` on a bank of this many prototypes (e.g. 1e6)")
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        bank, target = make_bank(Path(tmp))
        cases = {
            "python -c pass": [py, "-c", "pass"],
            "python -c 'import torch'": [py, "-c", "import torch"],
            "adapterbank --help": [py, "-m", "adapterbank.cli", "--help"],
            "adapterbank compose --prototype (10 adapters)": [
                py, "-m", "adapterbank.cli", "compose", str(bank), "--prototype", str(target), "-k", "5",
                "-o", str(Path(tmp) / "out"), "--overwrite"],
        }
        extra: dict[str, float] = {}
        if args.search_n:
            n = int(args.search_n)
            big, q, extra["ingest_s"] = make_search_bank(Path(tmp), n)
            search = [py, "-m", "adapterbank.cli", "search", str(big), "--prototype", str(q), "-k", "10"]
            extra["first_search_after_ingest_s"] = timed(search)
            cases[f"adapterbank search --prototype ({n:.0e} prototypes)"] = search
            print(f"bank of {n} built in {extra['ingest_s']:.0f} s; first search (builds the persisted index) "
                  f"{extra['first_search_after_ingest_s']:.2f} s", flush=True)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):
            for name, cmd in cases.items():
                times[name].append(timed(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "repeats": args.repeats,
           "median_s": med, "all_s": times, **extra,
           "ratios": {"--help / python -c pass": med["adapterbank --help"] / med["python -c pass"],
                      "compose / import torch": med["adapterbank compose --prototype (10 adapters)"]
                      / med["python -c 'import torch'"]}}
    for k, v in med.items():
        print(f"{k:48s} median {v:6.3f} s  (min {min(times[k]):.3f}, max {max(times[k]):.3f})")
    print(json.dumps(res["ratios"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
