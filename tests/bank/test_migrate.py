"""`adapterbank migrate SRC DST` between embedded banks (the server directions run in test_server_bank.py):
everything arrives, bit for bit, a rerun copies nothing, other content under the same id is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adapterbank.bank import Bank
from adapterbank.bank.migrate import migrate
from adapterbank.cli import app
from adapterbank.errors import BankError, ParameterError
from adapterbank.lora import LoraAdapter, LoraModule
from adapterbank.prototypes.space import Prototype, PrototypeSpace

SPACE = PrototypeSpace("toy-encoder", "r1", "mean", True, 4)


def _fill(bank: Bank, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        ad = LoraAdapter({"fc": LoraModule(torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), 2.0, (4, 3))})
        v = np.random.default_rng(seed * 100 + i).normal(size=4)
        bank.add(ad, id=f"a{i:02d}", base_model="toy", tags=["t", f"n{i % 2}"], description=f"adapter {i}",
                 prototype=Prototype(v / np.linalg.norm(v), SPACE, n_samples=i + 1))


def test_migrate_copies_everything_and_resumes(tmp_path: Path) -> None:
    src = Bank.init(tmp_path / "src")
    _fill(src, 7)
    src.remember_encoder(SPACE.key, "default")
    src.set_setting("compose.auto", {"strategy": "sim", "k": 3})
    dst = Bank.init(tmp_path / "dst")
    rep = migrate(src, dst, batch_size=3)
    assert rep.ok and rep.copied == [f"a{i:02d}" for i in range(7)] and rep.blobs_copied >= 7
    for c in src.list():
        d = dst.get(c.id)
        assert (d.files, d.tags, d.description, d.ranks, d.base_model) == (c.files, c.tags, c.description, c.ranks,
                                                                           c.base_model)
        np.testing.assert_array_equal(dst.get_prototype(c.id).vector, src.get_prototype(c.id).vector)
        assert dst.get_prototype(c.id).n_samples == src.get_prototype(c.id).n_samples
        for name, m in src.load_adapter(c.id).modules.items():
            assert torch.equal(dst.load_adapter(c.id).modules[name].B, m.B)
    assert dst.encoders() == {SPACE.key: "default"} and dst.get_setting("compose.auto") == {"strategy": "sim", "k": 3}
    q = np.ones(4) / 2
    assert [h.id for h in dst.search(q, k=3)] == [h.id for h in src.search(q, k=3)]
    again = migrate(src, dst)
    assert again.ok and again.copied == [] and len(again.present) == 7 and again.blobs_copied == 0


def test_migrate_refuses_other_content_under_the_same_id(tmp_path: Path) -> None:
    src = Bank.init(tmp_path / "src")
    _fill(src, 2, seed=1)
    dst = Bank.init(tmp_path / "dst")
    _fill(dst, 1, seed=2)  # a00 with other weights
    rep = migrate(src, dst)
    assert not rep.ok and rep.copied == ["a01"]
    assert rep.refused and rep.refused[0][0] == "a00" and "with other files" in rep.refused[0][1]
    assert dst.get("a00").files != src.get("a00").files  # nothing overwritten


def test_migrate_cli_creates_a_folder_destination(tmp_path: Path) -> None:
    src = Bank.init(tmp_path / "src")
    _fill(src, 3)
    r = CliRunner().invoke(app, ["migrate", str(tmp_path / "src"), str(tmp_path / "new"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["copied"] == 3 and out["verified"] and out["problems"] == []
    assert Bank.open(tmp_path / "new").verify().ok and len(Bank.open(tmp_path / "new")) == 3


def test_bank_urls_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BankError, match="Unknown bank URL scheme 'mysql' in mysql://me@db/x:") as e:
        Bank.open("mysql://me:pw@db/x")
    assert "pw" not in str(e.value)
    with pytest.raises(ParameterError, match="blobs= is for the server backend"):
        Bank.init(tmp_path / "b", blobs="s3://x/y")
    monkeypatch.delenv("ADAPTERBANK_BLOBS", raising=False)
    with pytest.raises(BankError, match="Set ADAPTERBANK_BLOBS"):  # asked before anything connects
        Bank.init("postgresql://me@localhost:1/none")
