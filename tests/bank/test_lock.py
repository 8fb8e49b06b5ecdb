"""A locked catalog (issue 8, item 10): a real second process holds ``BEGIN IMMEDIATE``; a writer waits with
one message, honours ``lock_timeout`` / ``--lock-timeout`` and then fails clearly, changing nothing."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapterbank.bank import Bank
from adapterbank.errors import BankError, ParameterError

_HOLDER = r"""
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
print("LOCKED", flush=True)
sys.stdin.readline()  # hold the write lock until the test writes a line
c.execute("COMMIT")
print("RELEASED", flush=True)
"""


class Holder:
    """Another process in a write transaction on the bank's catalog."""

    def __init__(self, bank: Path) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(bank / "catalog.sqlite")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None and self.p.stdout.readline().strip() == "LOCKED"

    def release(self) -> None:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline().strip() == "RELEASED"
        self.p.wait(timeout=30)


@pytest.fixture
def held(bank: Bank) -> Iterator[Holder]:
    h = Holder(bank.root)
    yield h
    if h.p.poll() is None:
        h.p.kill()
        h.p.wait()


def test_add_gives_up_after_lock_timeout(bank: Bank, held: Holder, make_adapter: Any, snap: Any,
                                         caplog: pytest.LogCaptureFixture) -> None:
    before = snap(bank.root)
    b = Bank.open(bank.root, lock_timeout=1.5)
    with caplog.at_level(logging.WARNING, logger="adapterbank"), pytest.raises(BankError) as ei:
        b.add(make_adapter(0), id="x")
    msg = str(ei.value)
    assert str(bank.root) in msg and "locked by another writer" in msg and "--lock-timeout" in msg
    waited = float(msg.split("waiting ")[1].split(" s")[0])
    assert waited >= 1.5
    waits = [r for r in caplog.records if "waiting for another writer" in r.getMessage()]
    assert len(waits) == 1 and str(bank.root) in waits[0].getMessage()
    held.release()
    assert snap(bank.root)["rows"] == before["rows"] and "x" not in b
    b.add(make_adapter(0), id="x")  # the lock is free again: the same handle writes
    assert "x" in b
    b.close()


def test_writer_waits_for_the_other_writer_then_succeeds(bank: Bank, held: Holder, make_adapter: Any,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    import threading

    b = Bank.open(bank.root, lock_timeout=120)
    done: list[object] = []
    with caplog.at_level(logging.WARNING, logger="adapterbank"):
        t = threading.Thread(target=lambda: done.append(b.add(make_adapter(1), id="y")))
        t.start()
        while not any("waiting for another writer" in r.getMessage() for r in caplog.records):
            t.join(0.05)
            assert t.is_alive(), "the add finished while the other process held the lock"
        held.release()
        t.join(120)
    assert done and "y" in b
    b.close()


def test_cli_lock_timeout_one_message_then_one_error(bank: Bank, make_adapter: Any) -> None:
    bank.add(make_adapter(0), id="a")
    held = Holder(bank.root)
    try:
        res = subprocess.run([sys.executable, "-m", "adapterbank.cli", "remove", str(bank.root), "a", "--lock-timeout",
                              "2"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert res.stderr.count("waiting for another writer") == 1
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and str(bank.root) in errors[0] and "--lock-timeout" in errors[0]
        held.release()
        assert "a" in bank
    finally:
        if held.p.poll() is None:
            held.p.kill()


@pytest.mark.parametrize("bad", [-1, float("nan"), "5", True])
def test_lock_timeout_is_validated(bank: Bank, bad: object) -> None:
    with pytest.raises(ParameterError, match="lock_timeout"):
        Bank.open(bank.root, lock_timeout=bad)  # type: ignore[arg-type]
