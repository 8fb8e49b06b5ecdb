"""Damage on disk is found (verify), refused on read (IntegrityError); orphans are waste, gc removes them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from adapterbank.bank import Bank
from adapterbank.bank.blobs import BlobStore
from adapterbank.errors import IntegrityError


def _blob(bank: Bank, card_id: str, name: str = "adapter_model.safetensors") -> Path:
    sha = bank.get(card_id).files[name]
    return bank.root / "blobs" / sha[:2] / sha


def test_corrupted_blob_is_reported_and_refused(bank: Bank, make_adapter: Any, tmp_path: Path) -> None:
    bank.add(make_adapter(0), id="good")
    bank.add(make_adapter(1), id="victim")
    p = _blob(bank, "victim")
    os.chmod(p, 0o644)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight: still a valid safetensors file, wrong content
    p.write_bytes(bytes(data))
    rep = bank.verify()
    assert not rep.ok and rep.checked == 3  # two weight blobs + one shared adapter_config.json
    assert len(rep.problems) == 1 and p.name in rep.problems[0] and "victim/adapter_model.safetensors" in rep.problems[0]
    with pytest.raises(IntegrityError, match=rf"{p.name}.*'victim'|'victim'.*{p.name}"):
        bank.load_adapter("victim")
    with pytest.raises(IntegrityError, match="victim"):
        bank.export("victim", tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    bank.load_adapter("good")  # the rest of the bank is fine
    # re-adding the same content repairs the blob in place (content addressing)
    bank.add(make_adapter(1), id="victim", replace=True)
    assert bank.verify().ok
    bank.load_adapter("victim")


def test_missing_blob_is_reported_and_refused(bank: Bank, make_adapter: Any) -> None:
    bank.add(make_adapter(0), id="a")
    p = _blob(bank, "a")
    p.unlink()
    rep = bank.verify()
    assert not rep.ok and "missing" in rep.problems[0] and "a/adapter_model.safetensors" in rep.problems[0]
    with pytest.raises(IntegrityError, match="missing"):
        bank.load_adapter("a")


def test_orphans_are_not_damage_and_gc_removes_them(bank: Bank, make_adapter: Any) -> None:
    bank.add(make_adapter(0), id="a")
    orphan_sha = "ab" * 32
    (bank.root / "blobs" / "ab").mkdir(exist_ok=True)
    (bank.root / "blobs" / "ab" / orphan_sha).write_bytes(b"left by a crashed add")
    stale = bank.root / "tmp" / ("0" * 32)  # staging of a dead writer: no lock held
    (stale / "files").mkdir(parents=True)
    (stale / "files" / "x.safetensors").write_bytes(b"partial")
    (bank.root / "tmp" / ("0" * 32 + ".lock")).write_bytes(b"")
    blob_tmp = bank.root / "blobs" / "ab" / f".{orphan_sha}.{'0' * 32}.tmp"
    blob_tmp.write_bytes(b"partial")
    store = BlobStore(bank.root / "blobs", bank.root / "tmp")
    with store.staging() as live:  # a live writer's staging: must survive gc
        (live.dir / "f").write_bytes(b"in progress")
        rep = bank.verify()
        assert rep.ok and rep.problems == []
        assert any(orphan_sha in o for o in rep.orphans) and any(str(stale) == o for o in rep.orphans)
        assert any(o.endswith(".tmp") for o in rep.orphans)
        assert not any(live.token in o for o in rep.orphans)
        assert bank.gc() == 4  # orphan blob, stale staging dir, its lock file, blob temp
        assert (live.dir / "f").exists()
        assert bank.verify().orphans == []
    assert not live.dir.exists()
    bank.load_adapter("a")
    assert bank.gc() == 0


def test_gc_racing_an_add_cannot_break_it(bank: Bank, make_adapter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gc between 'blob placed' and 'row committed' deletes the (still orphan) blob; the add re-places it
    under the write lock, so the committed row never points at a missing blob."""
    other = Bank.open(bank.root)
    real_place = bank._blobs.place
    calls = []

    def place_then_gc(*a: Any, **kw: Any) -> None:
        real_place(*a, **kw)
        calls.append(a[1])
        if len(calls) == 2:  # both files of the adapter placed, nothing committed yet
            assert other.gc() >= 1

    monkeypatch.setattr(bank._blobs, "place", place_then_gc)
    bank.add(make_adapter(0), id="a")
    assert len(calls) >= 3  # the re-check placed at least one blob again
    rep = bank.verify()
    assert rep.ok and rep.orphans == []
    bank.load_adapter("a")
    other.close()


def test_disk_full_while_placing_a_blob(bank: Bank, make_adapter: Any, monkeypatch: pytest.MonkeyPatch,
                                        snap: Any) -> None:
    import errno

    import adapterbank.bank.blobs as blobs_mod

    bank.add(make_adapter(0), id="a")
    before = snap(bank.root)
    real = os.replace
    n = {"calls": 0}

    def replace_then_fail(src: Any, dst: Any) -> None:
        n["calls"] += 1
        if n["calls"] == 2:  # the second blob of the add
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(blobs_mod.os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="No space left"):
        bank.add(make_adapter(1), id="b")
    monkeypatch.setattr(blobs_mod.os, "replace", real)
    with Bank.open(bank.root) as again:  # the bank stays openable and consistent
        rep = again.verify()
        assert rep.ok and "b" not in again
        assert all("/blobs/" in o for o in rep.orphans) and len(rep.orphans) <= 1  # at most the first placed blob
        again.gc()
    assert snap(bank.root) == before
