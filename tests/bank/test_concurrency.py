"""Several processes on one bank; a writer killed with SIGKILL (crash and concurrency cases of docs/design.md §5.1)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from adapterbank.bank import Bank

WORKER = str(Path(__file__).with_name("bank_worker.py"))
N_ADDS = 10
pytestmark = [pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and flock"), pytest.mark.slow]


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_two_writers_and_a_reader(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    Bank.init(root).close()
    stop = tmp_path / "stop"
    reader = _spawn("read", str(root), str(stop))
    writers = [_spawn("add", str(root), p, str(N_ADDS), str(s)) for p, s in (("w1", 0), ("w2", 1000))]
    outs = [w.communicate(timeout=300) for w in writers]
    stop.touch()
    r_out, r_err = reader.communicate(timeout=120)
    for w, (out, err) in zip(writers, outs, strict=True):
        assert w.returncode == 0, err
        assert out.count("ACK") == N_ADDS
    assert reader.returncode == 0, r_err
    summary = json.loads(r_out.strip().splitlines()[-1])
    assert summary["bad"] == [], summary["bad"]  # never half an entry
    assert summary["loops"] >= 2 and summary["max_seen"] == 2 * N_ADDS
    with Bank.open(root) as bank:
        assert sorted(c.id for c in bank.list()) == sorted(f"{p}-{i:04d}" for p in ("w1", "w2") for i in range(N_ADDS))
        rep = bank.verify()
        assert rep.ok and rep.orphans == [] and rep.checked == 2 * N_ADDS + 1  # the PEFT config is the same bytes for all
        assert len(bank.search(np.zeros(8), k=100)) == 2 * N_ADDS


def test_kill_9_during_adds(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    Bank.init(root).close()
    rng = random.Random(0)
    acked: list[str] = []
    for round_ in range(3):
        w = _spawn("add", str(root), f"r{round_}", "500", str(10_000 * round_))
        assert w.stdout is not None
        assert w.stdout.readline().strip() == "READY"
        want = rng.randint(2, 6)
        got = 0
        while got < want:
            line = w.stdout.readline()
            assert line.startswith("ACK"), (line, w.stderr.read() if w.stderr else "")
            acked.append(line.split()[1])
            got += 1
        time.sleep(rng.uniform(0.0, 0.05))  # land somewhere inside the next add
        os.kill(w.pid, signal.SIGKILL)
        rest, _ = w.communicate(timeout=60)
        acked += [ln.split()[1] for ln in rest.splitlines() if ln.startswith("ACK")]  # printed before the kill
        assert w.returncode == -signal.SIGKILL
        with Bank.open(root) as bank:  # opens after every crash
            rep = bank.verify()
            assert rep.ok, rep.problems  # orphans allowed, damage not
            ids = {c.id for c in bank.list()}
            assert set(acked) <= ids  # every acknowledged add survived
            assert all(c.prototype_spaces for c in bank.list())
            for aid in sorted(ids)[-2:]:
                bank.load_adapter(aid)
    with Bank.open(root) as bank:
        bank.gc()
        rep = bank.verify()
        assert rep.ok and rep.orphans == []


def test_crash_between_blobs_and_commit_leaves_only_orphans(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    Bank.init(root).close()
    w = _spawn("crash-before-commit", str(root), "ghost")
    _, err = w.communicate(timeout=120)
    assert w.returncode == 9, err
    with Bank.open(root) as bank:
        assert "ghost" not in bank and len(bank) == 0
        rep = bank.verify()
        assert rep.ok and rep.problems == []
        assert len([o for o in rep.orphans if "/blobs/" in o]) == 2  # config + weights, no row points at them
        assert any("/tmp/" in o for o in rep.orphans)  # the dead writer's staging folder
        assert bank.gc() >= 3
        assert bank.verify().orphans == [] and list((root / "tmp").iterdir()) == []
