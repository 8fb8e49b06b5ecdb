"""Persisted search indexes (adapterbank.bank.persisted) over the real SQLite catalog of a bank."""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterbank.bank import Bank, NumpyIndex
from adapterbank.bank.ann import AnnIndex, ann_available
from adapterbank.bank.backend import CARD_COLUMNS, Entry
from adapterbank.bank.catalog import Catalog
from adapterbank.bank.persisted import load_index, space_dir_name
from adapterbank.errors import UnknownNameError
from adapterbank.prototypes.space import Prototype, PrototypeSpace

D = 16
SPACE = PrototypeSpace("persist-encoder", "r1", "mean", False, D)


def entry(i: str, vec: np.ndarray, base_model: str | None, tags: list[str]) -> Entry:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    row: dict[str, Any] = dict.fromkeys(CARD_COLUMNS)
    row.update(id=i, base_model=base_model, format="peft", rank=4, ranks="{}", targets="[]", tags=json.dumps(tags),
               created=now, versions="{}", extra="{}")
    return Entry(row, [], [Prototype(vec.astype(np.float32), SPACE)])


def add(cat: Catalog, ids: list[str], X: np.ndarray, *, replace: bool = False) -> None:
    cat.commit([entry(i, x, f"m{n % 3}", ["even"] if n % 2 == 0 else []) for n, (i, x) in enumerate(zip(ids, X))],
               replace=replace)


def reference(cat: Catalog, q: np.ndarray, k: int, where: dict[str, Any] | None = None) -> list[Any]:
    m = cat.space_matrix(SPACE.key)
    ref = NumpyIndex()
    ref.build(m.ids, m.vectors.copy(), m.attrs)
    return ref.search(q, k, where=where)


@pytest.fixture
def bank(tmp_path: Path) -> Bank:
    b = Bank.init(tmp_path / "bank")
    rng = np.random.default_rng(0)
    add(b._cat, [f"a{i:04d}" for i in range(400)], rng.standard_normal((400, D)))
    yield b
    b.close()


def folder(bank: Bank) -> Path:
    return bank.root / "index" / space_dir_name(SPACE.key)


def meta(bank: Bank) -> dict[str, Any]:
    return json.loads((folder(bank) / "meta.json").read_text())


QUERIES = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)


def same_answers(idx: Any, cat: Catalog) -> None:
    for q in QUERIES:
        for where in (None, {"base_model": "m1"}, {"tags": ["even"]}):
            assert idx.search(q, 7, where=where) == reference(cat, q, 7, where)


def test_first_load_writes_files_and_a_new_process_maps_them(bank: Bank) -> None:
    cat = bank._cat
    idx = load_index(bank.root / "index", SPACE.key, cat)
    m = meta(bank)
    assert m["catalog_version"] == cat.version() and m["n"] == 400 and m["d"] == D and m["kind"] == "exact"
    assert m["delta"] is None and (folder(bank) / m["base"] / "vectors.npy").is_file()
    assert isinstance(idx._X, np.memmap) and not idx._X.flags.writeable
    same_answers(idx, cat)
    again = load_index(bank.root / "index", SPACE.key, cat)  # as a new process would: from the files
    assert again is not idx and again.origin == m["base"] and meta(bank) == m  # nothing rewritten
    same_answers(again, cat)
    # rows are grouped by base model on disk: the filter is a slice
    assert sorted(again._groups) == [0, 1, 2]


def test_stale_index_is_updated_from_the_change_log(bank: Bank) -> None:
    cat = bank._cat
    load_index(bank.root / "index", SPACE.key, cat)
    base = meta(bank)["base"]
    rng = np.random.default_rng(2)
    add(cat, [f"new{i}" for i in range(5)], rng.standard_normal((5, D)))
    add(cat, ["a0003", "a0004"], rng.standard_normal((2, D)) * 0.01, replace=True)  # moved near the origin
    for i in ("a0010", "a0011", "new2"):
        cat.remove(i)
    idx = load_index(bank.root / "index", SPACE.key, cat)
    m = meta(bank)
    assert m["base"] == base and m["delta"] and m["catalog_version"] == cat.version() and m["n"] == 400 + 5 - 3
    assert len(idx) == 402 and "a0010" not in idx and "new4" in idx
    same_answers(idx, cat)
    assert {h.id for h in idx.search(np.zeros(D), 2)} == {"a0003", "a0004"}
    fresh = load_index(bank.root / "index", SPACE.key, cat)  # base mapped + delta replayed
    same_answers(fresh, cat)
    # the in-process path: `current` is updated in place, no files read
    add(cat, ["late"], np.zeros((1, D)))
    same = load_index(bank.root / "index", SPACE.key, cat, current=fresh)
    assert same is fresh and same.search(np.zeros(D), 1)[0].id == "late"
    assert meta(bank)["catalog_version"] == cat.version()


def test_many_changes_or_a_log_that_does_not_reach_back_rebuild(bank: Bank) -> None:
    cat = bank._cat
    load_index(bank.root / "index", SPACE.key, cat)
    first = meta(bank)["base"]
    m = meta(bank)
    m["catalog_version"] = 10**9  # ahead of the catalog: changes_since says None
    (folder(bank) / "meta.json").write_text(json.dumps(m))
    idx = load_index(bank.root / "index", SPACE.key, cat)
    assert meta(bank)["base"] != first and not (folder(bank) / first).exists()  # replaced, old base removed
    same_answers(idx, cat)
    add(cat, [f"b{i}" for i in range(4100)], np.random.default_rng(3).standard_normal((4100, D)))
    idx = load_index(bank.root / "index", SPACE.key, cat)
    assert meta(bank)["delta"] is None and len(idx) == 4500  # too many changes for a delta: a new base
    same_answers(idx, cat)


def test_damaged_or_half_written_files_are_never_used(bank: Bank) -> None:
    cat = bank._cat
    load_index(bank.root / "index", SPACE.key, cat)
    f = folder(bank)
    (f / "tmp-crashed").mkdir()
    (f / "tmp-crashed" / "vectors.npy").write_bytes(b"half")
    (f / "meta.json").write_text('{"format": 1, "space_key"')  # torn write (cannot happen via os.replace)
    idx = load_index(bank.root / "index", SPACE.key, cat)
    same_answers(idx, cat)
    assert not (f / "tmp-crashed").exists() and meta(bank)["n"] == 400
    (f / meta(bank)["base"] / "sqn.npy").unlink()  # a file gone from under the meta
    same_answers(load_index(bank.root / "index", SPACE.key, cat), cat)
    m = meta(bank)
    m["format"] = 99  # written by a newer adapterbank
    (f / "meta.json").write_text(json.dumps(m))
    same_answers(load_index(bank.root / "index", SPACE.key, cat), cat)
    assert meta(bank)["format"] == 1
    assert [p.name for p in f.iterdir() if p.name.startswith("g-")] == [meta(bank)["base"]]


def test_unwritable_folder_keeps_the_index_in_memory(bank: Bank, caplog: pytest.LogCaptureFixture) -> None:
    (bank.root / "index").write_text("not a folder")
    idx = load_index(bank.root / "index", SPACE.key, bank._cat)
    same_answers(idx, bank._cat)
    assert "not writable" in caplog.text


def test_bad_kind_and_unknown_space(bank: Bank) -> None:
    with pytest.raises(UnknownNameError, match="'kind'.*auto, exact, ann"):
        load_index(bank.root / "index", SPACE.key, bank._cat, kind="hnsw")
    assert len(load_index(bank.root / "index", "no-such-space", bank._cat)) == 0


RACER = """
import sys, numpy as np
from pathlib import Path
from adapterbank.bank import Bank
from adapterbank.bank.persisted import load_index
bank = Bank.open(sys.argv[1])
for _ in range(int(sys.argv[3])):
    idx = load_index(bank.root / "index", sys.argv[2], bank._cat)
    hits = idx.search(np.zeros(idx.dim), 3)
    assert len(hits) == 3, hits
print("ok")
"""


def test_processes_racing_to_read_and_write_are_safe(bank: Bank) -> None:
    cat = bank._cat
    env_path = str(Path(__file__).resolve().parents[2] / "src")
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(bank.root), SPACE.key, "15"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}) for _ in range(3)]
    rng = np.random.default_rng(4)
    for r in range(15):  # writes interleave with the racers' loads and persists
        add(cat, [f"race{r}"], rng.standard_normal((1, D)))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    idx = load_index(bank.root / "index", SPACE.key, cat)
    same_answers(idx, cat)
    f = folder(bank)
    assert not [p for p in f.iterdir() if p.name.startswith("tmp-")]
    assert [p.name for p in f.iterdir() if p.name.startswith("g-")] == [meta(bank)["base"]]


@pytest.mark.skipif(not ann_available(), reason="usearch (the 'ann' extra) is not installed")
def test_ann_kind_persists_its_graph_and_maps_it(tmp_path: Path) -> None:
    b = Bank.init(tmp_path / "bank")
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((40, D))
    X = centres[rng.integers(0, 40, 21_000)] + 0.3 * rng.standard_normal((21_000, D))
    add(b._cat, [f"v{i:05d}" for i in range(21_000)], X)
    idx = load_index(b.root / "index", SPACE.key, b._cat, kind="ann")
    assert isinstance(idx, AnnIndex) and idx._graph is not None
    m = meta(b)
    assert m["kind"] == "ann" and (folder(b) / m["base"] / "graph.usearch").is_file()
    again = load_index(b.root / "index", SPACE.key, b._cat)
    assert isinstance(again, AnnIndex) and again._graph is not None
    sm = b._cat.space_matrix(SPACE.key)
    ref_idx = NumpyIndex()
    ref_idx.build(sm.ids, sm.vectors.copy(), sm.attrs)
    found = 0
    for r in rng.choice(21_000, 30, replace=False):
        q = (X[r] + 0.3 * rng.standard_normal(D)).astype(np.float32)
        found += len({h.id for h in ref_idx.search(q, 10)} & {h.id for h in again.search(q, 10)})
    assert found >= 0.99 * 300
    exact = load_index(b.root / "index", SPACE.key, b._cat, kind="exact")
    assert type(exact) is NumpyIndex and exact.search(X[0], 5) == ref_idx.search(X[0], 5)
    add(b._cat, ["late"], np.full((1, D), 9.0))
    load_index(b.root / "index", SPACE.key, b._cat, kind="exact", current=exact)
    m2 = meta(b)
    assert m2["kind"] == "ann" and m2["base"] == m["base"] and m2["delta"]  # an exact reader keeps the graph
    ann = load_index(b.root / "index", SPACE.key, b._cat)
    assert isinstance(ann, AnnIndex) and ann.search(np.full(D, 9.0), 1)[0].id == "late"
    b.close()
