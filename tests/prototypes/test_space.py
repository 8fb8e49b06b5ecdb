"""Prototype files that are not what they claim, and the max_length field of a prototype space."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from adapterbank.errors import FormatError, NonFiniteError, PrototypeSpaceError, ShapeMismatchError
from adapterbank.prototypes import Prototype, PrototypeSpace, check_same_space

SPACE = PrototypeSpace("toy", "r1", "mean", True, 3)
OLD_SPACE_JSON = {"encoder": "toy", "revision": "r1", "pooling": "mean", "normalize": True, "dim": 3}  # before max_length


def write_npy(path: Path, arr: np.ndarray, sidecar: object | None = None) -> Path:
    np.save(path, arr, allow_pickle=False)
    if sidecar is not None:
        Path(f"{path}.json").write_text(json.dumps(sidecar))
    return path


@pytest.mark.parametrize("sidecar, key", [
    (["space", "n_samples"], "JSON object"),                                        # a JSON list
    ({"space": OLD_SPACE_JSON, "n_samples": "many"}, "'n_samples'"),                  # non-numeric
    ({"space": OLD_SPACE_JSON, "n_samples": 2.5}, "'n_samples'"),
    ({"space": OLD_SPACE_JSON, "n_samples": -1}, "'n_samples'"),
    ({"space": [1, 2], "n_samples": 1}, "'space'"),
    ({"space": {"encoder": "toy"}, "n_samples": 1}, "'space'"),                       # missing keys
    ({"space": {**OLD_SPACE_JSON, "dim": "three"}, "n_samples": 1}, "'space'"),
    ({"space": {**OLD_SPACE_JSON, "max_length": "long"}, "n_samples": 1}, "'space'"),
    ({"space": OLD_SPACE_JSON, "n_samples": 1, "extra": [1]}, "'extra'"),
])
def test_bad_sidecar_names_the_sidecar_and_key(tmp_path: Path, sidecar: object, key: str) -> None:
    p = write_npy(tmp_path / "t.npy", np.ones(3, dtype=np.float32), sidecar)
    with pytest.raises(FormatError) as ei:
        Prototype.load(p)
    assert str(ei.value).startswith(f"{p}.json: ") and key in str(ei.value)


@pytest.mark.parametrize("arr", [np.array([1 + 2j, 3, 4]), np.array([True, False, True]),
                                 np.array(["a", "b", "c"]), np.zeros(3, dtype=[("x", "f4")])],
                         ids=["complex", "bool", "str", "structured"])
def test_non_real_vectors_are_refused(tmp_path: Path, arr: np.ndarray) -> None:
    p = write_npy(tmp_path / "t.npy", arr, {"space": OLD_SPACE_JSON, "n_samples": 1, "source": "x"})
    dtype = re.escape(str(arr.dtype))
    with pytest.raises(FormatError, match=rf"^{p}: .*Got dtype {dtype}") as ei:
        Prototype.load(p)
    assert "float" in str(ei.value)
    with pytest.raises(FormatError, match=f"Got dtype {dtype}"):
        Prototype(arr, SPACE)  # the same in Python, not only from files
    bare = write_npy(tmp_path / "bare.npy", arr)
    with pytest.raises(FormatError, match=rf"^{bare}: .*Got dtype {dtype}"):
        Prototype.load(bare, space=SPACE)


def test_real_integer_and_float64_vectors_load(tmp_path: Path) -> None:
    p = write_npy(tmp_path / "t.npy", np.array([1, 2, 3], dtype=np.int64), {"space": OLD_SPACE_JSON, "n_samples": 4})
    got = Prototype.load(p)
    assert got.vector.dtype == np.float32 and got.vector.tolist() == [1.0, 2.0, 3.0] and got.n_samples == 4


def test_nan_and_shape_errors_name_the_file_given_not_the_recorded_source(tmp_path: Path) -> None:
    meta = {"space": OLD_SPACE_JSON, "n_samples": 2, "source": "/elsewhere/train.jsonl"}
    p = write_npy(tmp_path / "given.npy", np.array([1.0, np.nan, 3.0], dtype=np.float32), meta)
    with pytest.raises(NonFiniteError) as ei:
        Prototype.load(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: ") and "index 1" in msg and "/elsewhere/train.jsonl" not in msg
    p = write_npy(tmp_path / "big.npy", np.array([1.0, 1e300, 3.0]), meta)  # finite float64, Inf in float32
    with pytest.raises(NonFiniteError, match=rf"^{p}: "):
        Prototype.load(p)
    p = write_npy(tmp_path / "shape.npy", np.ones((3, 1), dtype=np.float32), meta)
    with pytest.raises(ShapeMismatchError, match=rf"^{p}: .*1-D"):
        Prototype.load(p)
    p = write_npy(tmp_path / "bare.npy", np.array([np.inf, 0, 0], dtype=np.float32))
    with pytest.raises(NonFiniteError, match=rf"^{p}: "):
        Prototype.load(p, space=SPACE)


def test_max_length_is_part_of_the_space_and_old_spaces_read_as_the_default(tmp_path: Path) -> None:
    old = PrototypeSpace.from_dict(OLD_SPACE_JSON)
    d256 = PrototypeSpace("toy", "r1", "mean", True, 3, max_length=256)
    d512 = PrototypeSpace("toy", "r1", "mean", True, 3, max_length=512)
    assert old.max_length is None and old == d256 and hash(old) == hash(d256) and old.key == d256.key
    assert d512 != d256 and d512.key == d256.key + "|max512"
    assert PrototypeSpace.from_dict(d512.to_dict()) == d512 and d512.to_dict()["max_length"] == 512
    with pytest.raises(PrototypeSpaceError, match=r"\|max512"):
        check_same_space(d256, d512)
    # an old sidecar (no max_length) still loads, in the default space
    p = write_npy(tmp_path / "old.npy", np.ones(3, dtype=np.float32), {"space": OLD_SPACE_JSON, "n_samples": 1})
    assert Prototype.load(p, space=d256).space == d256
    with pytest.raises(PrototypeSpaceError):
        Prototype.load(p, space=d512)
    # a new file records it
    saved = Prototype(np.ones(3), d512, n_samples=1).save(tmp_path / "new.npy")
    assert json.loads(Path(f"{saved}.json").read_text())["space"]["max_length"] == 512
    with pytest.raises(FormatError, match="max_length"):
        PrototypeSpace("toy", None, "mean", True, 3, max_length=0)


def test_an_old_bank_row_without_max_length_is_found_in_the_default_space(tmp_path: Path, tiny_llama, peft_adapter) -> None:
    from adapterbank.bank import Bank

    bank = Bank.init(tmp_path / "bank")
    ad = peft_adapter(tiny_llama(), tmp_path / "ad", seed=0)
    bank.add(ad, id="old", prototype=Prototype(np.array([1.0, 0.0, 0.0]), PrototypeSpace("toy", "r1", "mean", True, 3)))
    with sqlite3.connect(tmp_path / "bank" / "catalog.sqlite") as con:  # rewrite the row as an old version wrote it
        con.execute("UPDATE prototypes SET space = ?", (json.dumps(OLD_SPACE_JSON, sort_keys=True),))
    bank = Bank.open(tmp_path / "bank")
    target = Prototype(np.array([0.0, 1.0, 0.0]), PrototypeSpace("toy", "r1", "mean", True, 3, max_length=256))
    assert [h.id for h in bank.search(target, k=5)] == ["old"]
    assert bank.spaces() == [target.space]
    other = Prototype(target.vector, PrototypeSpace("toy", "r1", "mean", True, 3, max_length=512))
    assert bank.search(other, k=5) == []
