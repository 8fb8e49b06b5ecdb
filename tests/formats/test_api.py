"""The public API: format detection, dispatch, names and paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterbank.errors import FormatError, InvalidNameError, UnknownNameError, UnsafeFileError
from adapterbank.formats import FORMATS, Format, adapter_files, detect_format, read_adapter, write_adapter
from adapterbank.formats.safetensors_io import save_file
from adapterbank.lora import LoraAdapter, LoraModule, ResidualModule


def small(prefix: str = "unet.") -> LoraAdapter:
    g = torch.Generator().manual_seed(0)
    m = LoraModule(torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), 0.5, (4, 3))
    return LoraAdapter({f"{prefix}mid_block.attentions.0.proj_in": m}, "base-x")


def test_formats_table() -> None:
    assert tuple(FORMATS) == ("peft", "kohya", "diffusers", "grasp_residual")  # also the detection order
    assert all(isinstance(f, Format) and f.name == name for name, f in FORMATS.items())


def sample(fmt: Format) -> LoraAdapter:
    """A small adapter the format can hold: GRASP residual modules for residual formats, ΔW otherwise."""
    if not fmt.residual:
        return small()
    g = torch.Generator().manual_seed(0)
    m = ResidualModule(torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g), 0.5)
    return LoraAdapter({"blocks.0.ff": m}, "base-x")


@pytest.mark.parametrize("call", [
    lambda p: read_adapter(p, format="lycoris"),
    lambda p: write_adapter(small(), p, format="safetensors"),
    lambda p: adapter_files(p, format="PEFT"),
])
def test_unknown_format_name_lists_valid_ones(tmp_path: Path, call) -> None:  # noqa: ANN001
    with pytest.raises(UnknownNameError, match="peft, kohya, diffusers"):
        call(tmp_path)
    with pytest.raises(KeyError):  # also a KeyError for callers that do not know adapterbank
        call(tmp_path)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_detect_and_dispatch(tmp_path: Path, fmt: str) -> None:
    files = write_adapter(sample(FORMATS[fmt]), tmp_path / "a", format=fmt)
    assert detect_format(tmp_path / "a") == fmt
    a = read_adapter(tmp_path / "a")
    assert a.metadata["format"] == fmt and a.base_model == "base-x"
    assert sorted(adapter_files(tmp_path / "a").values()) == sorted(files)
    assert read_adapter(tmp_path / "a", format=fmt).metadata["format"] == fmt
    if fmt == "peft":
        assert read_adapter(tmp_path / "a" / "adapter_config.json").metadata["format"] == "peft"


def test_diffusers_file_with_any_name_and_kohya_file_path(tmp_path: Path) -> None:
    (f,) = write_adapter(small(), tmp_path / "my_style.safetensors", format="diffusers")
    assert f.name == "my_style.safetensors" and detect_format(f) == "diffusers"
    (k,) = write_adapter(small(), tmp_path / "k" / "style.safetensors", format="kohya")
    assert detect_format(k) == "kohya" == detect_format(k.parent)


def test_undetectable_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="0 weight files"):
        detect_format(tmp_path / "empty")
    with pytest.raises(FormatError, match="No adapter"):
        read_adapter(tmp_path / "missing")
    save_file({"encoder.weight": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(FormatError, match="Cannot tell the adapter format"):
        read_adapter(tmp_path / "other.safetensors")
    write_adapter(small(""), tmp_path / "p")
    with pytest.raises(FormatError, match="PEFT keys"):
        detect_format(tmp_path / "p" / "adapter_model.safetensors")


@pytest.mark.parametrize("bad", ["a..b.safetensors", "tab\there.safetensors", "nl\nx.safetensors"])
def test_unsafe_file_names_refused(tmp_path: Path, bad: str) -> None:
    d = tmp_path / "d"
    write_adapter(small(), d / bad, format="kohya")
    with pytest.raises(InvalidNameError):
        adapter_files(d)


@pytest.mark.parametrize("name", ["lora name.safetensors", "-x.safetensors", "Aquarell (v2) [sdxl].safetensors"])
def test_ordinary_file_names_with_spaces_are_accepted(tmp_path: Path, name: str) -> None:
    d = tmp_path / "d"
    write_adapter(small(), d / name, format="kohya")
    assert list(adapter_files(d)) == [name]


def test_symlink_out_of_a_kohya_dir_refused(tmp_path: Path) -> None:
    (f,) = write_adapter(small(), tmp_path / "outside.safetensors", format="kohya")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "lora.safetensors").symlink_to(f)
    with pytest.raises(UnsafeFileError, match="outside the adapter directory"):
        read_adapter(tmp_path / "d")


def test_extra_metadata_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="str to str"):
        write_adapter(small(), tmp_path / "x", extra_metadata={"n": 3})  # type: ignore[dict-item]
    with pytest.raises(FormatError, match="no modules"):
        write_adapter(LoraAdapter({}), tmp_path / "y")


def test_safetensors_whose_length_bytes_look_like_pickle(tmp_path: Path) -> None:
    """A header of 0x0280 bytes starts the file with b'\\x80\\x02' — the protocol-2 pickle magic."""
    import json
    import struct

    from adapterbank.formats.safetensors_io import pickle_kind

    stem = "lora_unet_conv_in"
    hdr = {f"{stem}.lora_down.weight": {"dtype": "F32", "shape": [1, 4, 1, 1], "data_offsets": [0, 16]},
           f"{stem}.lora_up.weight": {"dtype": "F32", "shape": [32, 1, 1, 1], "data_offsets": [16, 144]}}
    hb = json.dumps(hdr).encode()
    hb += b" " * (0x280 - len(hb))
    p = tmp_path / "edge.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + torch.arange(36, dtype=torch.float32).numpy().tobytes())
    assert p.read_bytes()[:2] == b"\x80\x02" and pickle_kind(p) is None
    a = read_adapter(p)
    assert a.modules["unet.conv_in"].weight_shape == (32, 4, 1, 1)


def test_large_finite_values_are_not_called_non_finite(tmp_path: Path) -> None:
    """The fast finite check sums in fp32; an overflowing sum must fall back to the exact check."""
    from adapterbank.errors import NonFiniteError

    stem = "lora_unet_conv_in"
    up = torch.full((4, 2), 3e38)
    p = save_file({f"{stem}.lora_down.weight": torch.ones(2, 3), f"{stem}.lora_up.weight": up},
                  tmp_path / "big.safetensors")
    assert read_adapter(p).modules["unet.conv_in"].B.max().item() == pytest.approx(3e38)
    up[0, 0] = float("-inf")
    save_file({f"{stem}.lora_down.weight": torch.ones(2, 3), f"{stem}.lora_up.weight": up}, p)
    with pytest.raises(NonFiniteError, match="lora_up"):
        read_adapter(p)
