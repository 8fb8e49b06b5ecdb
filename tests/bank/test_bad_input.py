"""Every refused input leaves the bank exactly as it was (catalog rows and files compared before/after)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterbank.bank import Bank
from adapterbank.errors import (
    BaseModelMismatchError,
    ConflictError,
    FormatError,
    InvalidNameError,
    NonFiniteError,
    UnknownNameError,
    UnsafeFileError,
    UnsupportedAdapterError,
)

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def filled(bank: Bank, peft_dirs: list[Path], make_proto: Any, snap: Callable[[Path], Any]) -> Bank:
    bank.add(peft_dirs[0], id="existing", prototype=make_proto(0), tags=["t"])
    return bank


def _refused(bank: Bank, snap: Callable[[Path], Any], exc: type[BaseException], fn: Callable[[], Any],
             match: str | None = None) -> None:
    before = snap(bank.root)
    v = bank.version
    with pytest.raises(exc, match=match):
        fn()
    assert snap(bank.root) == before
    assert bank.version == v
    assert bank.verify().ok and bank.verify().orphans == []


def _rewrite(d: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    sd = load_file(d / WEIGHTS)
    edit(sd)
    save_file(sd, d / WEIGHTS, metadata={"format": "pt"})
    return d


def test_pickle_payload_is_refused_unexecuted(filled: Bank, peft_copy: Any, tmp_path: Path, snap: Any) -> None:
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (open, (str(sentinel), "w"))

    d = peft_copy(1, "evil")
    (d / WEIGHTS).unlink()
    with open(d / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    _refused(filled, snap, UnsafeFileError, lambda: filled.add(d))
    single = tmp_path / "evil.ckpt"
    single.write_bytes((d / "adapter_model.bin").read_bytes())
    _refused(filled, snap, UnsafeFileError, lambda: filled.add(single))
    disguised = tmp_path / "evil.safetensors"  # pickle bytes behind a safetensors name
    disguised.write_bytes((d / "adapter_model.bin").read_bytes())
    _refused(filled, snap, (UnsafeFileError, FormatError), lambda: filled.add(disguised))
    assert not sentinel.exists()


def test_corrupt_safetensors_is_refused(filled: Bank, peft_copy: Any, snap: Any) -> None:
    d = peft_copy(1, "truncated")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    _refused(filled, snap, FormatError, lambda: filled.add(d))
    (d / WEIGHTS).write_bytes(b"\xff" * 64)
    _refused(filled, snap, FormatError, lambda: filled.add(d))
    (d / WEIGHTS).write_bytes(data + b"trailing garbage")
    _refused(filled, snap, FormatError, lambda: filled.add(d))


def test_unknown_key_is_refused(filled: Bank, peft_copy: Any, snap: Any) -> None:
    d = _rewrite(peft_copy(1, "unknown-key"),
                 lambda sd: sd.__setitem__("base_model.model.model.layers.0.mlp.weird.weight", torch.zeros(2, 2)))
    _refused(filled, snap, FormatError, lambda: filled.add(d))


def test_nan_is_refused(filled: Bank, peft_copy: Any, make_adapter: Any, snap: Any) -> None:
    def poison(sd: dict[str, torch.Tensor]) -> None:
        k = sorted(k for k in sd if "lora_B" in k)[0]
        sd[k][0, 0] = float("nan")

    d = _rewrite(peft_copy(1, "nan"), poison)
    _refused(filled, snap, NonFiniteError, lambda: filled.add(d))
    ad = make_adapter(3)
    next(iter(ad.modules.values())).A[0, 0] = float("inf")
    _refused(filled, snap, NonFiniteError, lambda: filled.add(ad, id="inf"))


def test_lora_variant_is_refused(filled: Bank, peft_copy: Any, snap: Any) -> None:
    d = peft_copy(1, "dora")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _refused(filled, snap, UnsupportedAdapterError, lambda: filled.add(d))


@pytest.mark.parametrize("bad", ["../x", "..\\x", "/abs", "C:\\x", "a\x00b", "CON", "", "x" * 1000, ".hidden",
                                 "-dash", "ｆｕｌｌ", "a b"])
def test_bad_id_is_refused(filled: Bank, peft_dirs: list[Path], snap: Any, bad: str) -> None:
    _refused(filled, snap, InvalidNameError, lambda: filled.add(peft_dirs[1], id=bad))


def test_base_model_mismatch_is_refused(filled: Bank, peft_dirs: list[Path], snap: Any, make_adapter: Any) -> None:
    _refused(filled, snap, BaseModelMismatchError, lambda: filled.add(peft_dirs[1], base_model="another-model"),
             match="tiny-llama")
    _refused(filled, snap, BaseModelMismatchError,
             lambda: filled.add(make_adapter(1), id="obj", base_model="another-model"), match="tiny-llama")


def test_duplicate_id_is_refused(filled: Bank, peft_dirs: list[Path], snap: Any) -> None:
    _refused(filled, snap, ConflictError, lambda: filled.add(peft_dirs[1], id="existing"))
    _refused(filled, snap, ConflictError, lambda: filled.add(peft_dirs[0], id="existing"))  # same bytes too


def test_other_bad_arguments_are_refused(filled: Bank, peft_dirs: list[Path], tmp_path: Path, snap: Any,
                                         make_proto: Any) -> None:
    _refused(filled, snap, FileNotFoundError, lambda: filled.add(tmp_path / "missing"))
    _refused(filled, snap, InvalidNameError, lambda: filled.add(peft_dirs[1], tags=["ok", ""]))
    _refused(filled, snap, InvalidNameError, lambda: filled.add(peft_dirs[1], tags=["bad\ntag"]))
    _refused(filled, snap, FormatError, lambda: filled.add(peft_dirs[1], prototype=np.zeros(8)))  # type: ignore[arg-type]
    _refused(filled, snap, UnknownNameError, lambda: filled.add(peft_dirs[1], format="ckpt"))
    _refused(filled, snap, FormatError, lambda: filled.add(peft_dirs[1], format="kohya"))  # wrong format named
    (tmp_path / "notes.txt").write_text("not an adapter")
    _refused(filled, snap, FormatError, lambda: filled.add(tmp_path / "notes.txt"))
    _refused(filled, snap, UnknownNameError, lambda: filled.remove("nobody"))
    _refused(filled, snap, UnknownNameError, lambda: filled.set_prototype("nobody", make_proto(1)))


def test_injection_strings_are_data(filled: Bank, snap: Any, make_proto: Any) -> None:
    before = snap(filled.root)
    for evil in ["x' OR 1=1 --", "'; DROP TABLE adapters; --", '"] or [', "tiny-llama' --"]:
        assert filled.list(base_model=evil) == []
        assert filled.search(make_proto(0), k=5, base_model=evil) == []
        assert filled.list(tags=[evil]) == []
    assert snap(filled.root) == before and len(filled) == 1
