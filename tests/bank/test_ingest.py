"""Bulk ingest (Bank.add_many): the same cards as Bank.add, refusals with reasons, resume, dedup, batched
description encoding, a concurrent writer, and a run killed with SIGKILL then rerun."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterbank.bank import Bank
from adapterbank.bank.ingest import IngestItem, IngestReport, describe_many
from adapterbank.errors import ParameterError
from adapterbank.prototypes import compute_prototype, describe
from adapterbank.prototypes.encoders import CallableEncoder

WORKER = str(Path(__file__).with_name("ingest_worker.py"))
STEMS = ["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]


def kohya_file(path: Path, seed: int, rank: int = 2) -> Path:
    """A small real kohya LoRA file (fp16, kohya key names with .alpha), unique per seed."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for stem in STEMS:
        sd[f"{stem}.lora_down.weight"] = torch.randn(rank, 8, generator=g).half()
        sd[f"{stem}.lora_up.weight"] = torch.randn(8, rank, generator=g).half()
        sd[f"{stem}.alpha"] = torch.tensor(float(rank)).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


@pytest.fixture
def loras(tmp_path: Path) -> list[Path]:
    return [kohya_file(tmp_path / "loras" / f"style-{i}.safetensors", i) for i in range(7)]


def _words(xs: list[str]) -> list[list[float]]:
    return [[float(len(x)), float(len(x.split())), float(sum(map(ord, x)) % 97)] for x in xs]


class CountingEncoder(CallableEncoder):
    """A real deterministic encoder (text statistics) that counts its encode calls."""

    def __init__(self) -> None:
        super().__init__(_words, name="words", dim=3)
        self.calls: list[int] = []

    def encode(self, batch: list[Any]) -> np.ndarray:
        self.calls.append(len(batch))
        return super().encode(batch)


def _card_view(c: Any) -> dict[str, Any]:
    d = c.to_dict()
    d.pop("created")
    return d


def test_add_many_gives_the_cards_of_add(tmp_path: Path, loras: list[Path], peft_dirs: list[Path],
                                         make_proto: Any) -> None:
    sources = [*loras, *peft_dirs[:2]]
    one = Bank.init(tmp_path / "one")
    many = Bank.init(tmp_path / "many")
    for i, s in enumerate(sources):
        one.add(s, tags=["t"], license="mit", prototype=make_proto(i))
    rep = many.add_many([IngestItem(s, tags=["t"], license="mit", prototype=make_proto(i))
                         for i, s in enumerate(sources)], batch_size=3, workers=4)
    assert rep.ok and rep.added == [s.name.removesuffix(".safetensors") for s in sources] and not rep.present
    assert [_card_view(c) for c in many.list()] == [_card_view(c) for c in one.list()]
    for c in many.list():
        assert many.get_prototype(c.id).vector.tobytes() == one.get_prototype(c.id).vector.tobytes()
        assert many.load_adapter(c.id).modules.keys() == one.load_adapter(c.id).modules.keys()
    assert sorted(p.name for p in (tmp_path / "many" / "blobs").rglob("*") if p.is_file()) == \
        sorted(p.name for p in (tmp_path / "one" / "blobs").rglob("*") if p.is_file())
    v = many.verify()
    assert v.ok and v.orphans == [] and not any((tmp_path / "many" / "tmp").iterdir())


def test_bad_items_are_refused_with_their_reason_and_the_run_goes_on(tmp_path: Path, loras: list[Path]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.safetensors").write_bytes(loras[0].read_bytes()[:200])
    save_file({"model.embed.weight": torch.zeros(2, 2)}, str(bad / "not-a-lora.safetensors"))
    nan = load_file(str(loras[1]))
    nan[f"{STEMS[0]}.lora_up.weight"][0, 0] = float("nan")
    save_file(nan, str(bad / "nan.safetensors"))
    bank = Bank.init(tmp_path / "bank")
    items = [IngestItem(loras[0]), IngestItem(bad / "truncated.safetensors"), IngestItem(loras[1]),
             IngestItem(bad / "not-a-lora.safetensors"), IngestItem(bad / "nan.safetensors"),
             IngestItem(tmp_path / "missing.safetensors"), IngestItem(loras[2], tags=["bad\ntag"]),
             IngestItem(loras[3], samples=tmp_path / "s.jsonl"), IngestItem(loras[4], id="../x")]
    rep = bank.add_many(items, batch_size=4, workers=3)
    assert rep.added == ["style-0", "style-1"] and not rep.ok
    errors = {Path(r.source).name: r.error for r in rep.refused}
    assert errors == {"truncated.safetensors": "FormatError", "not-a-lora.safetensors": "FormatError",
                      "nan.safetensors": "NonFiniteError", "missing.safetensors": "FileNotFoundError",
                      "style-2.safetensors": "InvalidNameError", "style-3.safetensors": "ParameterError",
                      "style-4.safetensors": "InvalidNameError"}
    for r in rep.refused:
        assert r.source in r.reason, r.reason  # every reason names its file
    assert "no encoder" in next(r.reason for r in rep.refused if r.error == "ParameterError")
    v = bank.verify()
    assert v.ok and v.orphans == [] and len(bank) == 2  # nothing of the refused items is left behind
    with pytest.raises(ParameterError, match="batch_size"):
        bank.add_many([], batch_size=0)
    with pytest.raises(ParameterError, match="IngestItem"):
        bank.add_many([str(loras[0])])  # type: ignore[list-item]


def test_rerun_skips_present_refuses_changed_and_replace_replaces(tmp_path: Path, loras: list[Path]) -> None:
    bank = Bank.init(tmp_path / "bank")
    first = bank.add_many([IngestItem(p) for p in loras], batch_size=3)
    assert len(first.added) == 7
    version = bank.version
    again = bank.add_many([IngestItem(p) for p in loras], batch_size=3)
    assert again.added == [] and again.present == first.added and again.ok
    assert bank.version == version  # a rerun of a finished run writes nothing
    old_sha = bank.get("style-2").files["style-2.safetensors"]
    kohya_file(loras[2], 1000)  # new content under the same name
    rep = bank.add_many([IngestItem(p) for p in loras], batch_size=3)
    assert len(rep.present) == 6 and [r.id for r in rep.refused] == ["style-2"] and rep.refused[0].error == "ConflictError"
    assert "other files" in rep.refused[0].reason and "replace" in rep.refused[0].reason
    assert bank.get("style-2").files["style-2.safetensors"] == old_sha
    rep = bank.add_many([IngestItem(p) for p in loras], batch_size=3, replace=True)
    assert rep.added == rep.replaced == ["style-2"] and len(rep.present) == 6
    assert bank.get("style-2").files["style-2.safetensors"] != old_sha
    assert not (tmp_path / "bank" / "blobs" / old_sha[:2] / old_sha).exists()  # the replaced blob was deleted
    assert bank.verify().ok and bank.verify().orphans == []


def test_identical_bytes_are_stored_once_and_repeated_ids_meet_as_existing(tmp_path: Path, loras: list[Path]) -> None:
    twin = tmp_path / "twin.safetensors"
    shutil.copyfile(loras[0], twin)
    bank = Bank.init(tmp_path / "bank")
    items = [IngestItem(loras[0]), IngestItem(twin), IngestItem(loras[0], id="dup"), IngestItem(loras[0], id="dup"),
             IngestItem(loras[1], id="clash"), IngestItem(loras[2], id="clash")]
    rep = bank.add_many(items, batch_size=10)
    assert rep.added == ["style-0", "twin", "dup", "clash"] and rep.present == ["dup"]
    assert [(r.id, r.error) for r in rep.refused] == [("clash", "ConflictError")]
    shas = {sha for c in bank.list() for sha in c.files.values()}
    assert len(shas) == 2 and bank.verify().checked == 2  # four cards, two distinct contents


def test_descriptions_are_encoded_one_call_per_batch_exactly_as_describe(tmp_path: Path, loras: list[Path],
                                                                         make_proto: Any) -> None:
    enc = CountingEncoder()
    texts = [f"style {i}: {'watercolour ' * i}cats" for i in range(len(loras))]
    items = [IngestItem(p, description=t) for p, t in zip(loras, texts, strict=True)]
    items[1] = IngestItem(loras[1], description=texts[1], prototype=make_proto(1))  # its own prototype wins
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"text": "a b c"}\n{"text": "d e"}\n')
    items[2] = IngestItem(loras[2], samples=samples, description="from samples")
    bank = Bank.init(tmp_path / "bank")
    rep = bank.add_many(items, batch_size=3, encoder=enc)
    assert rep.ok and rep.encoded == 6
    # batch 1: one description (item 1 has its own prototype), then the 2 samples of item 2; then 3 texts, then 1
    assert enc.calls == [1, 2, 3, 1]
    for i, (p, t) in enumerate(zip(loras, texts, strict=True)):
        got = bank.get_prototype(p.stem)
        want = (make_proto(1) if i == 1 else compute_prototype(CountingEncoder(), samples, description="from samples")
                if i == 2 else describe(CountingEncoder(), t))
        assert got.vector.tobytes() == want.vector.tobytes(), i
        assert (got.source, got.n_samples, got.extra) == (want.source, want.n_samples, want.extra), i
        assert bank.get(p.stem).description == (texts[i] if i != 2 else "from samples")


def test_describe_many_matches_describe() -> None:
    enc = CountingEncoder()
    texts = ["legal contract summaries", "x" * 300, "  ", "pixel art"]
    out = describe_many(enc, texts)
    assert enc.calls == [3] and isinstance(out[2], Exception) and "non-empty" in str(out[2])
    for t, p in zip(texts, out, strict=True):
        if t.strip():
            q = describe(enc, t)
            assert p.vector.tobytes() == q.vector.tobytes() and p.to_dict() == q.to_dict()
    nan = describe_many(CallableEncoder(lambda xs: [[float("nan") if "bad" in x else 1.0] for x in xs], name="n"),
                        ["good", "bad"])
    assert nan[0].vector.tolist() == [1.0] and "NaN" in str(nan[1])


def test_a_concurrent_writer_costs_only_its_conflicting_item(tmp_path: Path, loras: list[Path]) -> None:
    root = tmp_path / "bank"
    bank = Bank.init(root)
    other = Bank.open(root)  # a second connection: another writer
    batches = 0

    def progress(n: int) -> None:  # after batch 1 commits, batch 2 is already staged with its ids looked up
        nonlocal batches
        batches += 1
        if batches == 1:
            other.add(loras[0], id="style-4")
            other.add(loras[5])  # the same bytes as the item of batch 2: already present

    rep = bank.add_many([IngestItem(p) for p in loras], batch_size=3, progress=progress)
    assert rep.added == ["style-0", "style-1", "style-2", "style-3", "style-6"]
    assert rep.present == ["style-5"] and [(r.id, r.error) for r in rep.refused] == [("style-4", "ConflictError")]
    assert "added concurrently" in rep.refused[0].reason
    v = bank.verify()
    assert v.ok and v.orphans == []  # the refused item's blob, placed before the conflict, was deleted
    other.close()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_kill_9_mid_run_then_rerun_resumes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    n = 60
    for i in range(n):
        kohya_file(src / f"a-{i:03d}.safetensors", i % 50)  # 10 files repeat earlier bytes
    root = tmp_path / "bank"
    Bank.init(root).close()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, WORKER, str(root), str(src), "8"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("DONE") and int(line.split()[1]) >= 16:
            break
        assert line, proc.stderr.read() if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not any(ln.startswith("END") for ln in lines)
    with Bank.open(root) as bank:
        committed = sorted(c.id for c in bank.list())
        assert 16 <= len(committed) < n  # whole batches only, and not all of them
        assert len(committed) % 8 == 0
        assert bank.verify().ok  # orphans of the killed batch at most: not damage
        rep = bank.add_many([IngestItem(p, description=f"adapter {p.stem}") for p in sorted(src.glob("*"))],
                            batch_size=8)
        assert sorted(rep.present) == committed and len(rep.added) == n - len(committed) and rep.ok
        assert len(bank) == n and len({c.id for c in bank.list()}) == n
        bank.gc()
        v = bank.verify()
        assert v.ok and v.orphans == [] and v.checked == 50  # 60 cards, 50 distinct contents, each stored once
        assert not any((root / "tmp").iterdir())


def test_report_to_dict_and_summary() -> None:
    r = IngestReport(added=["a"], elapsed_s=0.5)
    d = r.to_dict()
    assert d["ok"] and d["total"] == 1 and d["rate"] == 2.0 and d["refused"] == []
    assert r.summary() == "added 1, already present 0, refused 0 in 0.5 s (2.0 adapters/s)"



def test_a_batch_is_made_durable_once_before_any_blob_is_placed(tmp_path: Path, loras: list[Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Bulk staging skips the per-file fsync: one barrier per batch for the staged bytes comes before the first
    blob gets its final name, and one for the blob folders before the catalog commit; the committed blobs are
    the staged bytes."""
    from adapterbank.bank import blobs, catalog

    events: list[str] = []
    real_sync, real_place, real_commit = blobs.Staging.sync, blobs.BlobStore.place, catalog.Catalog.commit
    fsynced: list[int] = []
    real_fsync = os.fsync

    def sync(self: blobs.Staging, dirs: Any = ()) -> None:
        dirs = list(dirs)
        events.append(f"sync:{len(self._unsynced)}+{len(dirs)}")
        real_sync(self, dirs)

    def place(self: blobs.BlobStore, *a: Any, **kw: Any) -> Path:
        events.append("place")
        return real_place(self, *a, **kw)

    def commit(self: catalog.Catalog, *a: Any, **kw: Any) -> Any:
        events.append("commit")
        return real_commit(self, *a, **kw)

    monkeypatch.setattr(blobs.Staging, "sync", sync)
    monkeypatch.setattr(blobs.BlobStore, "place", place)
    monkeypatch.setattr(catalog.Catalog, "commit", commit)
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd))[1])
    bank = Bank.init(tmp_path / "bank")
    fsynced.clear()
    rep = bank.add_many([IngestItem(p) for p in loras], batch_size=4, workers=3)
    assert rep.ok and len(rep.added) == 7
    # two batches (4 + 3): the staged files' barrier, the blobs placed, a barrier for their folders, the commit
    folders = [len({bank._blobs.path(sha).parent for p in batch for sha in bank.get(p.stem).files.values()})
               for batch in (loras[:4], loras[4:])]
    assert events == (["sync:4+0"] + ["place"] * 4 + [f"sync:0+{folders[0]}", "commit"]
                      + ["sync:3+0"] + ["place"] * 3 + [f"sync:0+{folders[1]}", "commit"])
    assert bank.verify().ok
    assert all(bank.load_adapter(p.stem).n_params > 0 for p in loras)
    # neither the staged files nor the blob folders were fsynced one by one
    assert fsynced == []


def test_without_syncfs_the_barrier_fsyncs_each_staged_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterbank.bank import blobs

    monkeypatch.setattr(blobs, "_syncfs", lambda path: False)  # e.g. macOS: no syncfs(2)
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights")
    with blobs.BlobStore(tmp_path / "blobs", tmp_path / "tmp").staging(bulk=True) as st:
        a, _, _ = st.stage_file(src, "a.bin")
        b, _, _ = st.stage_file(src, "b.bin")
        assert synced == []
        st.sync()
        assert synced == [str(a), str(b)]
        st.sync()  # nothing pending
        assert synced == [str(a), str(b)]
    with pytest.raises(ValueError, match="sync must be one of"):
        blobs.Staging(tmp_path / "tmp", sync="later")
