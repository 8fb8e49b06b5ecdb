"""A separate process for the kill -9 test of bulk ingest (run as ``python ingest_worker.py BANK SRC BATCH``).

Adds every ``*.safetensors`` of SRC with ``Bank.add_many`` in batches of BATCH, reading the items slowly (10 ms
each, like a slow disk or network listing) so the parent can kill it mid-run; prints ``DONE <n>`` after each
committed batch. Importing this module does nothing (pytest's doctest collection imports it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path


def main(argv: list[str]) -> int:
    from adapterbank.bank import Bank
    from adapterbank.bank.ingest import IngestItem

    bank_dir, src, batch = argv[0], Path(argv[1]), int(argv[2])
    bank = Bank.open(bank_dir)
    print("READY", flush=True)
    done = 0

    def items() -> Iterator[IngestItem]:
        for p in sorted(src.glob("*.safetensors")):
            time.sleep(0.01)
            yield IngestItem(p, description=f"adapter {p.stem}")

    def progress(n: int) -> None:
        nonlocal done
        done += n
        print(f"DONE {done}", flush=True)

    rep = bank.add_many(items(), batch_size=batch, workers=4, progress=progress)
    print(f"END {rep.summary()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
