"""Bank: layout, cards, round trips (bit for bit), prototypes, search semantics, invalidation."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import adapterbank
from adapterbank.bank import FORMAT_VERSION, Bank, Card, Hit
from adapterbank.errors import (
    BankError,
    ConflictError,
    NonFiniteError,
    ParameterError,
    PrototypeSpaceError,
    ShapeMismatchError,
    UnknownNameError,
)
from adapterbank.formats import read_adapter


def assert_same_adapter(a: Any, b: Any) -> None:
    assert sorted(a.modules) == sorted(b.modules)
    for name in a.modules:
        torch.testing.assert_close(a.modules[name].delta(), b.modules[name].delta(), rtol=0, atol=0)


# -- layout and lifecycle --------------------------------------------------------------------------
def test_init_creates_layout_and_open_reopens(tmp_path: Path) -> None:
    b = Bank.init(tmp_path / "bank")
    assert (tmp_path / "bank" / "catalog.sqlite").is_file() and (tmp_path / "bank" / "blobs").is_dir()
    con = sqlite3.connect(tmp_path / "bank" / "catalog.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION
    con.close()
    b.close()
    with Bank.open(tmp_path / "bank") as b2:
        assert b2.list() == [] and len(b2) == 0 and b2.version == 0
    with pytest.raises(BankError, match="already a bank"):
        Bank.init(tmp_path / "bank")


def test_open_refuses_missing_foreign_and_newer(tmp_path: Path) -> None:
    with pytest.raises(BankError, match="does not exist"):
        Bank.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankError, match="no catalog.sqlite"):
        Bank.open(tmp_path / "empty")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "catalog.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(BankError, match="not an adapterbank catalog"):
        Bank.open(tmp_path / "garbage")
    (tmp_path / "other").mkdir()
    con = sqlite3.connect(tmp_path / "other" / "catalog.sqlite")
    con.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    con.commit()
    con.close()
    with pytest.raises(BankError, match="format_version"):
        Bank.open(tmp_path / "other")
    Bank.init(tmp_path / "new").close()
    con = sqlite3.connect(tmp_path / "new" / "catalog.sqlite")
    con.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION + 1),))
    con.commit()
    con.close()
    with pytest.raises(BankError, match=f"format_version {FORMAT_VERSION + 1}, newer"):
        Bank.open(tmp_path / "new")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(BankError, match="not an empty directory"):
        Bank.init(tmp_path / "full")


# -- add / export / load -------------------------------------------------------------------------
def test_add_peft_card_and_bit_for_bit_export(bank: Bank, peft_dirs: list[Path], tmp_path: Path,
                                              make_proto: Any) -> None:
    src = peft_dirs[0]
    card = bank.add(src, prototype=make_proto(0), description="task zero", tags=["nlp", "toy"], license="mit",
                    source_url="https://example.org/task-0")
    assert isinstance(card, Card)
    assert card.id == "task-0"  # slug of the folder name
    assert card.base_model == "tiny-llama" and card.format == "peft" and card.rank == 4
    assert card.targets == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert set(card.ranks.values()) == {4}
    assert card.tags == ["nlp", "toy"] and card.license == "mit" and card.source == "https://example.org/task-0"
    assert {"adapterbank", "torch", "safetensors", "peft"} <= set(card.versions)
    assert card.versions == adapterbank.versions()
    assert card.prototype_spaces == [make_proto(0).space.key]
    assert set(card.files) == {"adapter_model.safetensors", "adapter_config.json"}
    assert json.loads(json.dumps(card.to_dict()))["id"] == "task-0"
    # blobs are content addressed and read-only
    for name, sha in card.files.items():
        blob = bank.root / "blobs" / sha[:2] / sha
        assert blob.read_bytes() == (src / name).read_bytes()
        assert not blob.stat().st_mode & 0o222
    out = bank.export("task-0", tmp_path / "exported")
    for name in card.files:
        assert (out / name).read_bytes() == (src / name).read_bytes()  # bit for bit
    assert_same_adapter(bank.load_adapter("task-0"), read_adapter(src))
    assert bank.load_adapter("task-0").base_model == "tiny-llama"


def _unet_adapter(seed: int) -> Any:
    from adapterbank.lora import LoraAdapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    mods = {f"unet.down_blocks.0.attentions.0.proj_{n}": LoraModule(torch.randn(2, 8, generator=g),
                                                                   torch.randn(6, 2, generator=g), 0.5, (6, 8))
            for n in ("in", "out")}
    return LoraAdapter(mods, "tiny-unet", {})


def test_single_file_kohya_round_trips(bank: Bank, tmp_path: Path) -> None:
    from adapterbank.formats import write_adapter

    (src,) = write_adapter(_unet_adapter(0), tmp_path / "in" / "My_Style.v1.safetensors", format="kohya")
    card = bank.add(src, base_model="tiny-unet")
    assert card.id == "My_Style.v1" and card.format == "kohya" and list(card.files) == ["My_Style.v1.safetensors"]
    assert_same_adapter(bank.load_adapter(card.id), read_adapter(src))
    f = bank.export(card.id, tmp_path / "out" / "x.safetensors")  # a file path: written there
    assert f == tmp_path / "out" / "x.safetensors" and f.read_bytes() == src.read_bytes()
    f2 = bank.export(card.id, tmp_path / "outdir")  # a folder: the original name inside
    assert f2 == tmp_path / "outdir" / "My_Style.v1.safetensors" and f2.read_bytes() == src.read_bytes()
    out = bank.export(card.id, tmp_path / "as-diffusers", format="diffusers")  # converted
    assert_same_adapter(read_adapter(out), read_adapter(src))
    with pytest.raises(UnknownNameError, match="valid formats"):
        bank.export(card.id, tmp_path / "bad", format="ckpt")


def test_file_name_with_spaces_is_kept(bank: Bank, tmp_path: Path) -> None:
    """Civitai-style names ("Watercolor Style (v2).safetensors") are stored and exported under their own name."""
    from adapterbank.formats import write_adapter

    (src,) = write_adapter(_unet_adapter(1), tmp_path / "in" / "Watercolor Style (v2).safetensors", format="kohya")
    card = bank.add(src, base_model="tiny-unet")
    assert card.id == "Watercolor-Style-v2-" and list(card.files) == ["Watercolor Style (v2).safetensors"]
    out = bank.export(card.id, tmp_path / "outdir")
    assert out.name == "Watercolor Style (v2).safetensors" and out.read_bytes() == src.read_bytes()
    assert bank.verify().ok


@pytest.mark.slow  # the conversion runs in a sandboxed subprocess
def test_single_pickle_file_is_detected_after_conversion(bank: Bank, tmp_path: Path) -> None:
    """A bare kohya .pt file: its format is unknown until converted, so detection happens after conversion."""
    from safetensors.torch import load_file

    from adapterbank.errors import UnsafeFileError
    from adapterbank.formats import write_adapter

    (st,) = write_adapter(_unet_adapter(2), tmp_path / "in" / "style.safetensors", format="kohya")
    pt = tmp_path / "in" / "style.pt"
    torch.save(load_file(st), pt)
    with pytest.raises(UnsafeFileError):
        bank.add(pt, base_model="tiny-unet")
    assert len(bank) == 0
    card = bank.add(pt, base_model="tiny-unet", allow_pickle=True)
    assert card.format == "peft" and card.extra["converted_from"] == "kohya"
    assert not any(f.endswith(".pt") for f in card.files)
    assert_same_adapter(bank.load_adapter(card.id), read_adapter(st))


@pytest.mark.slow  # the conversion runs in a sandboxed subprocess
def test_legacy_pickle_is_converted_only_on_opt_in(bank: Bank, peft_copy: Any) -> None:
    from safetensors.torch import load_file

    from adapterbank.errors import UnsafeFileError

    d = peft_copy(2, "legacy")
    torch.save(load_file(d / "adapter_model.safetensors"), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(UnsafeFileError):
        bank.add(d)
    card = bank.add(d, allow_pickle=True)
    assert card.format == "peft" and card.extra["converted_from"] == "peft"
    assert set(card.files) == {"adapter_config.json", "adapter_model.safetensors"}  # no pickle in the bank
    assert_same_adapter(bank.load_adapter(card.id), read_adapter(d, allow_pickle=True))


def test_add_loraadapter_object(bank: Bank, make_adapter: Any, make_proto: Any) -> None:
    ad = make_adapter(5)
    card = bank.add(ad, id="obj", prototype=make_proto(5))
    assert card.format == "peft" and card.base_model == "tiny-llama"
    assert_same_adapter(bank.load_adapter("obj"), ad)
    with pytest.raises(Exception, match="'id' is required"):
        bank.add(make_adapter(6))


def test_duplicate_content_shares_blobs(bank: Bank, peft_dirs: list[Path]) -> None:
    a = bank.add(peft_dirs[2], id="a")
    b = bank.add(peft_dirs[2], id="b")
    assert a.files == b.files
    assert len(list((bank.root / "blobs").rglob("*"))) - len(list((bank.root / "blobs").iterdir())) == 2
    bank.remove("a")
    assert bank.load_adapter("b") is not None  # shared blobs survive the removal of one user
    bank.remove("b")
    assert [p for p in (bank.root / "blobs").rglob("*") if p.is_file()] == []  # unreferenced blobs deleted
    assert bank.verify().ok


def test_replace_and_conflict(bank: Bank, peft_dirs: list[Path], make_proto: Any) -> None:
    bank.add(peft_dirs[0], id="x", prototype=make_proto(0))
    with pytest.raises(ConflictError, match="replace=True"):
        bank.add(peft_dirs[1], id="x")
    card = bank.add(peft_dirs[1], id="x", replace=True, tags=["v2"])
    assert card.tags == ["v2"] and card.prototype_spaces == []  # a replaced entry is replaced whole
    assert_same_adapter(bank.load_adapter("x"), read_adapter(peft_dirs[1]))
    assert len(bank) == 1 and bank.verify().ok and bank.verify().orphans == []


def test_get_list_remove(bank: Bank, make_adapter: Any, make_proto: Any, spaces: Any) -> None:
    bank.add(make_adapter(0), id="a", tags=["x", "y"], prototype=make_proto(0))
    bank.add(make_adapter(1, base_model="other-base"), id="b", tags=["x"])
    bank.add(make_adapter(2), id="c", prototype=make_proto(2, spaces[1]))
    assert [c.id for c in bank.list()] == ["a", "b", "c"]
    assert [c.id for c in bank.list(base_model="tiny-llama")] == ["a", "c"]
    assert [c.id for c in bank.list(tags=["x"])] == ["a", "b"]
    assert [c.id for c in bank.list(tags=["x", "y"])] == ["a"]
    assert [c.id for c in bank.list(space=spaces[1])] == ["c"]
    assert [c.id for c in bank.list(space=spaces[0].key)] == ["a"]
    assert bank.list(base_model="tiny-llama' OR '1'='1") == []  # parameterised, not formatted
    assert "a" in bank and "zz" not in bank
    with pytest.raises(UnknownNameError, match="'zz'.*'a', 'b', 'c'"):
        bank.get("zz")
    with pytest.raises(KeyError):  # UnknownNameError is a KeyError too
        bank.remove("zz")
    v = bank.version
    bank.remove("b")
    assert bank.version == v + 1 and [c.id for c in bank.list()] == ["a", "c"]


def test_ids_differing_in_case_are_distinct(bank: Bank, make_adapter: Any) -> None:
    """Ids never become file names (blobs are named by hash), so case-insensitive file systems are no issue."""
    bank.add(make_adapter(0), id="Task")
    bank.add(make_adapter(1), id="task")
    assert_same_adapter(bank.load_adapter("Task"), make_adapter(0))
    assert_same_adapter(bank.load_adapter("task"), make_adapter(1))


def test_base_model_from_argument(bank: Bank, make_adapter: Any) -> None:
    card = bank.add(make_adapter(0, base_model=None), id="nb", base_model="given-base")
    assert card.base_model == "given-base"
    assert bank.load_adapter("nb").base_model == "given-base"


# -- prototypes ------------------------------------------------------------------------------------
def test_prototypes_set_get_replace(bank: Bank, make_adapter: Any, make_proto: Any, spaces: Any) -> None:
    bank.add(make_adapter(0), id="a")
    with pytest.raises(UnknownNameError, match="no prototype"):
        bank.get_prototype("a")
    p = make_proto(1)
    bank.set_prototype("a", p)
    got = bank.get_prototype("a")
    np.testing.assert_array_equal(got.vector, p.vector)
    assert got.space == p.space and got.n_samples == 10 and got.source == "seed1"
    bank.set_prototype("a", make_proto(2))  # same space: replaces
    np.testing.assert_array_equal(bank.get_prototype("a", spaces[0]).vector, make_proto(2).vector)
    bank.set_prototype("a", make_proto(3, spaces[1]))
    assert bank.get("a").prototype_spaces == sorted([spaces[0].key, spaces[1].key])
    with pytest.raises(PrototypeSpaceError, match="several spaces"):
        bank.get_prototype("a")
    np.testing.assert_array_equal(bank.get_prototype("a", spaces[1].key).vector, make_proto(3, spaces[1]).vector)
    assert [s.key for s in bank.spaces()] == sorted([spaces[0].key, spaces[1].key])
    with pytest.raises(UnknownNameError):
        bank.set_prototype("missing", p)


# -- search ----------------------------------------------------------------------------------------
def _fill(bank: Bank, make_adapter: Any, make_proto: Any, n: int = 6) -> None:
    for i in range(n):
        bank.add(make_adapter(i, base_model="tiny-llama" if i % 2 == 0 else "other"), id=f"a{i}",
                 prototype=make_proto(i), tags=["even"] if i % 2 == 0 else ["odd"])


def test_search_matches_reference_and_filters(bank: Bank, make_adapter: Any, make_proto: Any) -> None:
    _fill(bank, make_adapter, make_proto)
    q = make_proto(100)
    P = np.stack([make_proto(i).vector for i in range(6)]).astype(np.float64)
    d = ((P - q.vector.astype(np.float64)) ** 2).sum(1)
    ref = sorted((float(d[i]), f"a{i}") for i in range(6))
    hits = bank.search(q, k=3)
    assert all(isinstance(h, Hit) for h in hits)
    assert [h.id for h in hits] == [i for _, i in ref[:3]]
    np.testing.assert_allclose([h.distance for h in hits], [d for d, _ in ref[:3]], rtol=1e-12)
    assert [h.id for h in bank.search(q.vector, k=10)] == [i for _, i in ref]  # ndarray query, k > n
    even = [i for _, i in ref if int(i[1]) % 2 == 0]
    assert [h.id for h in bank.search(q, k=10, base_model="tiny-llama")] == even
    assert [h.id for h in bank.search(q, k=10, tags=["odd"])] == [i for _, i in ref if int(i[1]) % 2]
    assert [h.id for h in bank.search(q, k=2, exclude=[ref[0][1]])] == [ref[1][1], ref[2][1]]
    assert bank.search(q, k=5, base_model="x' OR 1=1; DROP TABLE adapters; --") == []
    assert len(bank) == 6  # still there
    assert bank.search(q, k=5, base_model="nobody") == []


def test_search_argument_errors(bank: Bank, make_adapter: Any, make_proto: Any, spaces: Any) -> None:
    assert bank.search(make_proto(0), k=3) == []  # empty bank
    _fill(bank, make_adapter, make_proto, 3)
    with pytest.raises(PrototypeSpaceError, match="space"):
        bank.search(make_proto(0), space=spaces[1])
    with pytest.raises(ShapeMismatchError, match="dim 5"):
        bank.search(np.zeros(5), k=2)
    with pytest.raises(NonFiniteError):
        bank.search(np.full(8, np.nan), k=2)
    for k in (0, -3, 10_001):
        with pytest.raises(ParameterError, match="'k'"):
            bank.search(make_proto(0), k=k)
    with pytest.raises(UnknownNameError, match="No prototypes in space"):
        bank.search(np.zeros(8), space="nope")
    bank.set_prototype("a0", make_proto(9, spaces[1]))
    with pytest.raises(PrototypeSpaceError, match="pass space="):
        bank.search(np.zeros(8), k=2)
    assert [h.id for h in bank.search(np.zeros(4), k=5, space=spaces[1])] == ["a0"]
    assert [h.id for h in bank.search(make_proto(9, spaces[1]), k=5)] == ["a0"]
    assert bank.search(make_proto(0, type(spaces[0])("unseen", None, "mean", False, 8)), k=2) == []


def test_index_follows_writes_of_another_process(tmp_path: Path, make_adapter: Any, make_proto: Any) -> None:
    """The cached index is rebuilt when the catalog version moves, whoever wrote (a second connection)."""
    b1 = Bank.init(tmp_path / "bank")
    b1.add(make_adapter(0), id="a", prototype=make_proto(0))
    q = make_proto(1)
    assert [h.id for h in b1.search(q)] == ["a"]
    b2 = Bank.open(tmp_path / "bank")
    b2.add(make_adapter(1), id="b", prototype=make_proto(1))
    assert [h.id for h in b1.search(q)][0] == "b"  # the exact match, seen through b1's cached index
    b2.set_prototype("b", make_proto(50))  # update of a vector: the search reflects the new one
    hits = {h.id: h.distance for h in b1.search(q, k=2)}
    want = float(((make_proto(50).vector.astype(np.float64) - q.vector.astype(np.float64)) ** 2).sum())
    assert hits["b"] == pytest.approx(want, rel=1e-12) and hits["b"] > 0
    b2.remove("b")
    assert [h.id for h in b1.search(q)] == ["a"]
    b1.close()
    b2.close()
