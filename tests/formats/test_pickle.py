"""Pickle files are never unpickled in-process; the opt-in converter uses weights_only=True in a subprocess."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from adapterbank.errors import UnsafeFileError
from adapterbank.formats import detect_format, read_adapter, write_adapter
from adapterbank.formats.pickle_convert import convert_pickle
from adapterbank.formats.safetensors_io import load_file
from adapterbank.lora import LoraAdapter, LoraModule

EXTENSIONS = (".bin", ".pt", ".ckpt", ".pth", ".pkl", ".safetensors")


class Evil:
    """Unpickling this creates a directory at ``sentinel`` (stands in for arbitrary code execution)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.sentinel,))


def write_evil(path: Path, sentinel: Path, container: str) -> Path:
    if container == "zip":
        torch.save({"lora_unet_conv_in.lora_down.weight": Evil(sentinel)}, path)
    else:
        path.write_bytes(pickle.dumps({"lora_unet_conv_in.lora_down.weight": Evil(sentinel)}, protocol=4))
    return path


@pytest.mark.parametrize("container", ["zip", "raw"])
def test_payload_is_live(tmp_path: Path, container: str) -> None:
    """The crafted files really run code when unpickled normally (so the other tests mean something)."""
    sentinel = tmp_path / "pwned"
    p = write_evil(tmp_path / "x.pt", sentinel, container)
    if container == "zip":
        torch.load(p, weights_only=False)
    else:
        pickle.loads(p.read_bytes())  # noqa: S301 - deliberate, in a test
    assert sentinel.exists()


@pytest.mark.parametrize("container", ["zip", "raw"])
@pytest.mark.parametrize("ext", EXTENSIONS)
def test_pickle_refused_without_opt_in(tmp_path: Path, ext: str, container: str) -> None:
    sentinel = tmp_path / "pwned"
    p = write_evil(tmp_path / f"lora{ext}", sentinel, container)
    with pytest.raises(UnsafeFileError, match="allow_pickle=True"):
        read_adapter(p)
    with pytest.raises(UnsafeFileError):
        detect_format(p)
    with pytest.raises(UnsafeFileError):
        read_adapter(p, format="kohya")
    assert not sentinel.exists()


@pytest.mark.slow  # one subprocess (torch import) per conversion
def test_malicious_pickle_refused_with_opt_in(tmp_path: Path) -> None:
    """Every extension, zip and raw pickles alternating; conversions run concurrently (one subprocess each)."""
    from concurrent.futures import ThreadPoolExecutor

    sentinel = tmp_path / "pwned"
    paths = [write_evil(tmp_path / f"lora{ext}", sentinel, "zip" if i % 2 == 0 else "raw")
             for i, ext in enumerate(EXTENSIONS)]

    def attempt(p: Path) -> BaseException | None:
        try:
            read_adapter(p, allow_pickle=True)
        except BaseException as e:  # noqa: BLE001 - collected and checked below
            return e
        return None

    with ThreadPoolExecutor(3) as pool:
        errors = list(pool.map(attempt, paths))
    for p, e in zip(paths, errors, strict=True):
        assert isinstance(e, UnsafeFileError), (p.name, e)
        assert "weights_only=True" in str(e) and "never loaded with weights_only=False" in str(e), str(e)
    assert not sentinel.exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow  # one subprocess (torch import) per conversion
def test_peft_legacy_bin(tmp_path: Path, tiny_llama, peft_adapter) -> None:  # noqa: ANN001
    base = tiny_llama(0)
    d = peft_adapter(base, tmp_path / "a", seed=3)
    ref = read_adapter(d)
    tensors, _ = load_file(d / "adapter_model.safetensors")
    torch.save(dict(tensors), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(UnsafeFileError, match="adapter_model.bin"):
        read_adapter(d)
    got = read_adapter(d, allow_pickle=True)
    for k, m in ref.modules.items():
        assert torch.equal(got.modules[k].delta(), m.delta())
    # an evil adapter_model.bin is refused with and without opt-in
    sentinel = tmp_path / "pwned"
    write_evil(d / "adapter_model.bin", sentinel, "zip")
    for allow in (False, True):
        with pytest.raises(UnsafeFileError):
            read_adapter(d, allow_pickle=allow)
    assert not sentinel.exists()


@pytest.mark.slow  # one subprocess (torch import) per conversion
def test_kohya_ckpt_converted_with_state_dict_wrapper(tmp_path: Path) -> None:
    m = LoraModule(torch.randn(2, 3), torch.randn(4, 2), 0.75, (4, 3))
    write_adapter(LoraAdapter({"unet.mid_block.attentions.0.proj_in": m}), tmp_path / "k.safetensors",
                  format="kohya")
    tensors, _ = load_file(tmp_path / "k.safetensors")
    torch.save({"state_dict": dict(tensors)}, tmp_path / "k.ckpt")
    got = read_adapter(tmp_path / "k.ckpt", allow_pickle=True)
    assert got.metadata["format"] == "kohya"
    torch.testing.assert_close(got.modules["unet.mid_block.attentions.0.proj_in"].delta(), m.delta())


@pytest.mark.slow  # one subprocess (torch import) per conversion
def test_converter_refuses_non_tensor_content(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "x.bin")
    with pytest.raises(UnsafeFileError, match="flat dict"):
        convert_pickle(tmp_path / "x.bin", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
