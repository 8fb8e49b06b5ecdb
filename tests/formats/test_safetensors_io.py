"""Strict safetensors header checks: every corrupt-header case gets its own FormatError."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from adapterbank.errors import FormatError, UnsafeFileError
from adapterbank.formats.safetensors_io import check_header, load_file, save_file


def raw_file(path: Path, header: object, data: bytes = b"", *, length: int | None = None,
             header_bytes: bytes | None = None) -> Path:
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    n = len(hb) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


def one(dtype: str = "F32", shape: list[int] | None = None, offs: list[int] | None = None) -> dict:
    return {"dtype": dtype, "shape": shape if shape is not None else [2], "data_offsets": offs or [0, 8]}


def test_round_trip_matches_safetensors_library(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.float16),
        "c": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "d": torch.tensor(3.5),
        "e": torch.arange(5, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    p = save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v", "ü": "ñ"})
    ref = safetensors.torch.load_file(p)  # an independent reader accepts our file
    got, meta = load_file(p)
    assert meta == {"k": "v", "ü": "ñ"}
    for k, t in tensors.items():
        assert torch.equal(ref[k], t) and torch.equal(got[k], t) and got[k].dtype == t.dtype, k
    # and we read what the library writes, including unaligned offsets after an odd-sized fp16 tensor
    p2 = tmp_path / "lib.safetensors"
    safetensors.torch.save_file({"h": torch.ones(3, dtype=torch.float16), "z": torch.arange(4.0)}, p2)
    got2, _ = load_file(p2)
    assert got2["z"].tolist() == [0.0, 1.0, 2.0, 3.0] and got2["h"].dtype == torch.float16


def test_shared_memory_tensors_can_be_saved(tmp_path: Path) -> None:
    base = torch.arange(6.0)
    p = save_file({"x": base[:3], "y": base[3:]}, tmp_path / "s.safetensors")
    got, _ = load_file(p)
    assert got["y"].tolist() == [3.0, 4.0, 5.0]


@pytest.mark.parametrize(
    "case, match",
    [
        ("header_over_cap", "max_header_bytes"),
        ("header_over_file_size", "only"),
        ("header_2_63", "max_header_bytes"),
        ("non_utf8", "not valid UTF-8"),
        ("not_json", "not valid JSON"),
        ("not_object", "JSON object"),
        ("duplicate_key", "more than once"),
        ("duplicate_nested_key", "more than once"),
        ("unknown_dtype", "unknown dtype 'F33'"),
        ("offsets_out_of_bounds", "outside the data section"),
        ("offsets_overlap", "overlaps"),
        ("offsets_gap", "gap"),
        ("offsets_reversed", "outside the data section"),
        ("shape_vs_bytes", "span"),
        ("negative_shape", "non-negative int 'shape'"),
        ("extra_field", "exactly 'dtype'"),
        ("truncated", "truncated"),
        ("trailing_garbage", "trailing garbage"),
        ("huge_metadata", "max_metadata_bytes"),
        ("non_string_metadata", "string value"),
        ("metadata_not_object", "__metadata__"),
        ("too_many_tensors", "max_tensors"),
        ("tiny_file", "at least the 8-byte"),
    ],
)
def test_corrupt_headers_are_refused(tmp_path: Path, case: str, match: str) -> None:
    p = tmp_path / f"{case}.safetensors"
    data8 = bytes(8)
    caps: dict[str, int] = {}
    if case == "header_over_cap":
        raw_file(p, {"a": one()}, data8)
        caps = {"max_header_bytes": 10}
    elif case == "header_over_file_size":
        raw_file(p, {"a": one()}, data8, length=10_000)
    elif case == "header_2_63":
        raw_file(p, {"a": one()}, data8, length=2**63)
    elif case == "non_utf8":
        raw_file(p, None, b"", header_bytes=b'{"a\xff\xfe": 1}')
    elif case == "not_json":
        raw_file(p, None, b"", header_bytes=b'{"a": ')
    elif case == "not_object":
        raw_file(p, None, b"", header_bytes=b"[1, 2]")
    elif case == "duplicate_key":
        hb = b'{"a":' + json.dumps(one()).encode() + b',"a":' + json.dumps(one()).encode() + b"}"
        raw_file(p, None, data8, header_bytes=hb)
    elif case == "duplicate_nested_key":
        hb = b'{"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}}'
        raw_file(p, None, data8, header_bytes=hb)
    elif case == "unknown_dtype":
        raw_file(p, {"a": one("F33")}, data8)
    elif case == "offsets_out_of_bounds":
        raw_file(p, {"a": one(offs=[0, 16], shape=[4])}, data8)
    elif case == "offsets_overlap":
        raw_file(p, {"a": one(offs=[0, 8]), "b": one(offs=[4, 12])}, bytes(12))
    elif case == "offsets_gap":
        raw_file(p, {"a": one(offs=[0, 8]), "b": one(offs=[12, 20])}, bytes(20))
    elif case == "offsets_reversed":
        raw_file(p, {"a": one(offs=[8, 0])}, data8)
    elif case == "shape_vs_bytes":
        raw_file(p, {"a": one(shape=[3])}, data8)
    elif case == "negative_shape":
        raw_file(p, {"a": one(shape=[-2])}, data8)
    elif case == "extra_field":
        raw_file(p, {"a": {**one(), "extra": 1}}, data8)
    elif case == "truncated":
        raw_file(p, {"a": one(offs=[0, 8]), "b": one(offs=[8, 16])}, bytes(12))
    elif case == "trailing_garbage":
        raw_file(p, {"a": one()}, data8 + b"GARBAGE!")
    elif case == "huge_metadata":
        raw_file(p, {"__metadata__": {"k": "x" * 2048}, "a": one()}, data8)
        caps = {"max_metadata_bytes": 1024}
    elif case == "non_string_metadata":
        raw_file(p, {"__metadata__": {"k": 3}, "a": one()}, data8)
    elif case == "metadata_not_object":
        raw_file(p, {"__metadata__": ["k"], "a": one()}, data8)
    elif case == "too_many_tensors":
        hdr = {f"t{i}": one(offs=[8 * i, 8 * i + 8]) for i in range(50)}
        raw_file(p, hdr, bytes(8 * 50))
        caps = {"max_tensors": 10}
    elif case == "tiny_file":
        p.write_bytes(b"\x01\x02")
    with pytest.raises(FormatError, match=match) as ei:
        check_header(p, **caps)
    assert str(p) in str(ei.value)
    with pytest.raises(FormatError):
        load_file(p, **caps)


def test_header_exactly_at_cap_is_accepted(tmp_path: Path) -> None:
    p = save_file({"a": torch.ones(2)}, tmp_path / "ok.safetensors")
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    assert check_header(p, max_header_bytes=n)["a"]["shape"] == [2]
    with pytest.raises(FormatError, match="max_header_bytes"):
        check_header(p, max_header_bytes=n - 1)


def test_file_size_cap(tmp_path: Path) -> None:
    p = save_file({"a": torch.ones(100)}, tmp_path / "big.safetensors")
    with pytest.raises(FormatError, match="max_file_bytes"):
        load_file(p, max_file_bytes=100)


def test_many_tiny_tensors_rejected_fast(tmp_path: Path) -> None:
    """10^5+ tensors: refused by counting before json parsing (safetensors itself takes seconds)."""
    n = 300_000
    parts = [f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n)]
    hb = ("{" + ",".join(parts) + "}").encode()
    p = raw_file(tmp_path / "many.safetensors", None, bytes(n), header_bytes=hb)
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match="max_tensors"):
        check_header(p)
    assert time.perf_counter() - t0 < 1.0


def test_unknown_cap_name_is_a_type_error(tmp_path: Path) -> None:
    p = save_file({"a": torch.ones(1)}, tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="max_tensors"):
        check_header(p, max_tensor=3)


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_pickle_disguised_as_safetensors_is_unsafe(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=(kind == "zip"))
    with pytest.raises(UnsafeFileError, match="allow_pickle=True"):
        check_header(p)


def test_http_error_page_is_a_format_error(tmp_path: Path) -> None:
    p = tmp_path / "lora.safetensors"
    p.write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    with pytest.raises(FormatError, match="declares a header"):
        check_header(p)


def test_save_rejects_non_string_metadata(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="str to str"):
        save_file({"a": torch.ones(1)}, tmp_path / "a.safetensors", metadata={"k": 1})  # type: ignore[dict-item]
    assert not (tmp_path / "a.safetensors").exists()
