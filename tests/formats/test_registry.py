"""The format table: a contract every registered format meets, and a format registered in a test (not in the
package) that works end to end — detect, read, write, add to a bank, compose, export — with no other edit."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from adapterbank.bank import Bank
from adapterbank.compose import compose
from adapterbank.compose.compose import default_output_format
from adapterbank.errors import FormatError, InvalidNameError, UnknownNameError
from adapterbank.formats import (
    FORMATS,
    Format,
    adapter_files,
    detect_format,
    get_format,
    read_adapter,
    register_format,
    unregister_format,
    write_adapter,
)
from adapterbank.formats.peft import member
from adapterbank.formats.safetensors_io import load_file, save_file
from adapterbank.lora import AdapterModule, LoraAdapter, LoraModule, ResidualModule
from adapterbank.prototypes import Prototype, PrototypeSpace

SPACE = PrototypeSpace("toy-encoder", "r1", "mean", False, 4)


def adapter(seed: int, *, residual: bool = False, base: str = "toy-base") -> LoraAdapter:
    """Random non-identity modules on two sites (scale ≠ 1, so a lost scale shows)."""
    g = torch.Generator().manual_seed(seed)
    mods: dict[str, AdapterModule] = {}
    for j, name in enumerate(("proj_in", "proj_out")):
        A, B = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
        mods[f"unet.mid_block.attentions.0.{name}"] = (
            ResidualModule(A, B, 0.5 + j, channel_dim=1 - 2 * j) if residual else LoraModule(A, B, 0.5 + j, (5, 6)))
    return LoraAdapter(mods, base)


def assert_same(a: LoraAdapter, b: LoraAdapter) -> None:
    assert sorted(a.modules) == sorted(b.modules)
    for k, m in a.modules.items():
        n = b.modules[k]
        if isinstance(m, ResidualModule):  # no ΔW: the factors, the scale and the channel axis themselves
            assert isinstance(n, ResidualModule), k
            assert torch.equal(m.D, n.D) and torch.equal(m.U, n.U), k
            assert (m.scale, m.activation, m.channel_dim) == (n.scale, n.activation, n.channel_dim), k
        else:
            assert isinstance(n, LoraModule), k
            assert torch.allclose(m.delta(torch.float64), n.delta(torch.float64), atol=1e-6), k


# -- the contract, for every format in the table ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_every_format_meets_the_contract(tmp_path: Path, fmt: Format) -> None:
    a = adapter(1, residual=fmt.residual)
    written = write_adapter(a, tmp_path / "out", format=fmt.name)
    assert written and all(p.is_file() for p in written)
    where = tmp_path / "out"
    assert sorted(adapter_files(where, fmt.name).values()) == sorted(written)  # files lists what write wrote
    assert detect_format(where) == fmt.name
    back = read_adapter(where)
    assert back.metadata["format"] == fmt.name and back.base_model == "toy-base"
    assert_same(a, back)
    assert fmt.family in FORMATS and get_format(fmt.name) is fmt
    if not fmt.residual:  # residual modules are refused by ΔW formats, naming the formats that hold them
        holders = [f.name for f in FORMATS.values() if f.residual]
        with pytest.raises(FormatError, match=repr(holders[0])):
            write_adapter(adapter(2, residual=True), tmp_path / "res", format=fmt.name)


def test_registration_is_checked() -> None:
    with pytest.raises(InvalidNameError, match="already registered"):
        register_format(Format("peft", "a second peft", detect=lambda p: False, read=FORMATS["peft"].read,
                               write=FORMATS["peft"].write, files=FORMATS["peft"].files))
    assert FORMATS["peft"].description.startswith("folder with adapter_config.json")  # not overwritten
    with pytest.raises(InvalidNameError):
        Format("../x", "", detect=lambda p: False, read=FORMATS["peft"].read, write=FORMATS["peft"].write,
               files=FORMATS["peft"].files)
    with pytest.raises(InvalidNameError, match="reserved"):
        Format("auto", "", detect=lambda p: False, read=FORMATS["peft"].read, write=FORMATS["peft"].write,
               files=FORMATS["peft"].files)
    with pytest.raises(FormatError, match="'write' field of Format 'x' must be callable. Got str instead"):
        Format("x", "", detect=lambda p: False, read=FORMATS["peft"].read, write="peft",  # type: ignore[arg-type]
               files=FORMATS["peft"].files)
    with pytest.raises(FormatError, match="takes a Format"):
        register_format("toy")  # type: ignore[arg-type]
    with pytest.raises(UnknownNameError, match="peft, kohya, diffusers, grasp_residual"):
        unregister_format("never-registered")
    with pytest.raises(InvalidNameError, match="built in"):
        unregister_format("kohya")
    assert list(FORMATS) == ["peft", "kohya", "diffusers", "grasp_residual"]


# -- a format from outside the package ----------------------------------------------------------------------

TOY_CONFIG, TOY_WEIGHTS = "toy.json", "toy.safetensors"


def is_toy(p: Path) -> bool:
    return p.is_dir() and member(p, TOY_CONFIG).is_file()


def toy_files(p: Path) -> dict[str, Path]:
    if not is_toy(p):
        raise FormatError(f"A toy adapter is a folder with {TOY_CONFIG}; {p} is not one.")
    return {TOY_CONFIG: member(p, TOY_CONFIG), TOY_WEIGHTS: member(p, TOY_WEIGHTS)}


def read_toy(p: Path, *, allow_pickle: bool, module_names: Iterable[str] | None,
             caps: Mapping[str, int]) -> LoraAdapter:
    cfg = json.loads(member(p, TOY_CONFIG).read_text())
    tensors, _ = load_file(member(p, TOY_WEIGHTS), **caps)
    mods = {n: LoraModule(tensors[f"{n}.down"], tensors[f"{n}.up"], m["scale"], tuple(m["shape"]))
            for n, m in cfg["modules"].items()}
    return LoraAdapter(mods, cfg["base_model"], {"format": "toy"})


def write_toy(a: LoraAdapter, out: Path, *, base_model: str | None,
              extra_metadata: Mapping[str, str] | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}.{k}": t.contiguous() for n, m in a.modules.items() for k, t in (("down", m.A), ("up", m.B))}
    w = save_file(tensors, out / TOY_WEIGHTS, metadata=dict(extra_metadata or {}))
    cfg = {"base_model": base_model or a.base_model,
           "modules": {n: {"scale": m.scale, "shape": list(m.weight_shape)} for n, m in a.modules.items()}}
    (out / TOY_CONFIG).write_text(json.dumps(cfg))
    return [out / TOY_CONFIG, w]


@pytest.fixture
def toy() -> Iterator[Format]:
    fmt = register_format(Format("toy", "folder with toy.json + toy.safetensors", detect=is_toy, read=read_toy,
                                 write=write_toy, files=toy_files))
    try:
        yield fmt
    finally:
        unregister_format("toy")


def test_registered_format_works_end_to_end(toy: Format, tmp_path: Path) -> None:
    # detect, read, write, files
    srcs = {f"t{i}": tmp_path / "src" / f"t{i}" for i in range(3)}
    for i, d in enumerate(srcs.values()):
        write_adapter(adapter(10 + i), d, format="toy")
    assert detect_format(srcs["t0"]) == "toy" and sorted(adapter_files(srcs["t0"])) == [TOY_CONFIG, TOY_WEIGHTS]
    assert_same(read_adapter(srcs["t0"]), adapter(10))
    # add to a bank (the original files, bit for bit), load back
    bank = Bank.init(tmp_path / "bank")
    rng = np.random.default_rng(0)
    for aid, d in srcs.items():
        card = bank.add(d, id=aid, prototype=Prototype(rng.normal(size=4), SPACE, n_samples=3, source=aid))
        assert card.format == "toy" and sorted(card.files) == [TOY_CONFIG, TOY_WEIGHTS]
    assert_same(bank.load_adapter("t1"), adapter(11))
    # compose: the composite is written in the sources' format, and is the weighted sum of their ΔW
    comp = compose(bank, Prototype(np.ones(4), SPACE, source="target"), k=2, strategy="avg")
    out = comp.save(tmp_path / "composite")
    assert json.loads((out / "composition.json").read_text())["output"]["format"] == "toy"
    got = read_adapter(out)
    assert got.metadata["format"] == "toy"
    for m, mod in got.modules.items():
        want = sum(0.5 * read_adapter(srcs[i]).modules[m].delta(torch.float64) for i in comp.ids)
        assert torch.allclose(mod.delta(torch.float64), want, atol=1e-6)
    # export: bit for bit as added, and converted both ways
    exported = bank.export("t2", tmp_path / "exp")
    assert (exported / TOY_WEIGHTS).read_bytes() == (srcs["t2"] / TOY_WEIGHTS).read_bytes()
    assert_same(read_adapter(bank.export("t2", tmp_path / "as-peft", format="peft")), adapter(12))
    peft_card = bank.add(write_adapter(adapter(20), tmp_path / "p")[0].parent, id="p")
    assert peft_card.format == "peft"
    assert_same(read_adapter(bank.export("p", tmp_path / "p-as-toy", format="toy"), format="toy"), adapter(20))
    # mixed toy and peft sources: two families, so compose asks for a format
    with pytest.raises(FormatError, match="pass --format"):
        default_output_format(["toy", "peft"])


def test_unknown_names_list_the_registered_formats(toy: Format, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="peft, kohya, diffusers, grasp_residual, toy"):
        read_adapter(tmp_path, format="lycoris")
    bank = Bank.init(tmp_path / "bank")
    with pytest.raises(UnknownNameError, match="grasp_residual, toy"):
        bank.add(tmp_path, id="x", format="TOY")


def test_unregistered_format_is_gone(tmp_path: Path) -> None:
    fmt = register_format(Format("toy", "", detect=is_toy, read=read_toy, write=write_toy, files=toy_files))
    write_adapter(adapter(1), tmp_path / "a", format="toy")
    assert unregister_format("toy") is fmt and "toy" not in FORMATS
    with pytest.raises(UnknownNameError, match="valid formats are peft, kohya, diffusers, grasp_residual."):
        read_adapter(tmp_path / "a", format="toy")
    with pytest.raises(FormatError, match="Cannot tell the adapter format"):
        detect_format(tmp_path / "a")  # toy.json is no format's marker any more; toy.safetensors has toy keys


def test_a_registered_formats_nan_weights_are_refused_on_read_and_add(toy: Format, tmp_path: Path) -> None:
    """The built-in readers check finiteness as they parse; a plugin's reader need not: read_adapter checks."""
    from adapterbank.errors import NonFiniteError

    bad = adapter(3)
    name = next(iter(bad.modules))
    bad.modules[name].B[0, 0] = float("nan")
    src = tmp_path / "nan-toy"
    write_adapter(bad, src, format="toy")
    with pytest.raises(NonFiniteError, match=f"module {name}"):
        read_adapter(src)
    bank = Bank.init(tmp_path / "bank")
    with pytest.raises(NonFiniteError):
        bank.add(src, id="nan-toy")
    assert bank.list() == []
