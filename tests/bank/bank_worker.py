"""A separate process for the concurrency and crash tests (run as ``python bank_worker.py CMD ...``).

Commands:
  add BANK PREFIX N SEED          add N random adapters (with prototypes), print "ACK <id>" after each
  read BANK STOPFILE              until STOPFILE exists: list cards, check every blob of every card exists and
                                  that the newest card loads; print a JSON summary
  crash-before-commit BANK ID     place the blobs of one add, then die (os._exit) before the transaction
Importing this module does nothing (pytest's doctest collection imports it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _adapter(seed: int):  # type: ignore[no-untyped-def]
    import torch

    from adapterbank.lora import LoraAdapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    mods = {f"model.layers.{i}.self_attn.q_proj": LoraModule(torch.randn(4, 32, generator=g),
                                                            torch.randn(32, 4, generator=g), 2.0, (32, 32))
            for i in range(2)}
    return LoraAdapter(mods, "tiny-llama", {})


def _proto(seed: int):  # type: ignore[no-untyped-def]
    import numpy as np

    from adapterbank.prototypes.space import Prototype, PrototypeSpace

    space = PrototypeSpace("toy-encoder", "r1", "mean", True, 8)
    return Prototype(np.random.default_rng(seed).standard_normal(8), space)


def cmd_add(bank_dir: str, prefix: str, n: int, seed: int) -> None:
    from adapterbank.bank import Bank

    bank = Bank.open(bank_dir)
    print("READY", flush=True)
    for i in range(n):
        aid = f"{prefix}-{i:04d}"
        bank.add(_adapter(seed + i), id=aid, prototype=_proto(seed + i))
        print(f"ACK {aid}", flush=True)


def cmd_read(bank_dir: str, stopfile: str) -> None:
    from adapterbank.bank import Bank

    bank = Bank.open(bank_dir)
    loops, loads, max_seen, bad = 0, 0, 0, []
    while True:
        stop = os.path.exists(stopfile)  # read once more after the writers have finished
        cards = bank.list()
        max_seen = max(max_seen, len(cards))
        for c in cards:
            if not c.files or not c.prototype_spaces:
                bad.append(f"{c.id}: half an entry (files {list(c.files)}, spaces {c.prototype_spaces})")
            for name, sha in c.files.items():
                if not (Path(bank_dir) / "blobs" / sha[:2] / sha).is_file():
                    bad.append(f"{c.id}: blob of {name} missing")
        if cards:
            bank.load_adapter(cards[-1].id)
            loads += 1
            bank.search(_proto(0), k=3)
        loops += 1
        if stop:
            break
        time.sleep(0.01)
    print(json.dumps({"loops": loops, "loads": loads, "max_seen": max_seen, "bad": bad}), flush=True)


def cmd_crash_before_commit(bank_dir: str, aid: str) -> None:
    from adapterbank.bank import Bank

    bank = Bank.open(bank_dir)

    def die() -> None:
        os._exit(9)

    bank._cat.write = die  # type: ignore[method-assign]  # the transaction never starts
    bank.add(_adapter(12345), id=aid, prototype=_proto(1))


def main(argv: list[str]) -> int:
    cmd, *args = argv
    if cmd == "add":
        cmd_add(args[0], args[1], int(args[2]), int(args[3]))
    elif cmd == "read":
        cmd_read(args[0], args[1])
    elif cmd == "crash-before-commit":
        cmd_crash_before_commit(args[0], args[1])
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
