"""Export: exact concatenation of residual group adapters, refusals, grasp_residual format, PEFT load, bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapterbank import formats, grasp
from adapterbank.errors import FormatError, ShapeMismatchError, UnsupportedAdapterError
from adapterbank.lora import LoraAdapter, LoraModule, ResidualModule, combine, merge_into, truncate


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


def test_exact_concatenation_vs_dense_reference(tm) -> None:
    m = Block()
    h = grasp.inject(m, n_groups=3, rank=2, seed=0)
    tm.randomize(h)
    groups = [grasp.group_adapter(h, g) for g in range(3)]
    w = [0.7, -0.4, 1.3]
    comp = combine(groups, w, dtype=torch.float64)
    mod = comp.modules["ff"]
    assert isinstance(mod, ResidualModule) and mod.rank == 6
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    # independent dense reference: Σ_i w_i s_i U_i φ(D_i x), computed from the raw parameters in float64
    site = h.sites[0].adapter
    ref = sum(wi * site.scale * (F.gelu(x @ site.down[i].double().T) @ site.up[i].double().T)
              for i, wi in enumerate(w))
    got = F.gelu(x @ mod.D.double().T) @ mod.U.double().T * mod.scale
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # and through the model: attach the composite as one group
    h.remove()
    base = m.ff(x.float())
    h2 = grasp.attach(m, comp.to(torch.float32))
    with grasp.route(m, 0):
        y = m(x.float())
    torch.testing.assert_close(y, base + ref.float(), rtol=1e-5, atol=1e-5)
    h2.remove()


def test_residual_refused_by_dense_paths(tmp_path) -> None:
    m = Block()
    h = grasp.inject(m, n_groups=2, rank=2, seed=0)
    a = grasp.group_adapter(h, 0)
    assert not hasattr(a.modules["ff"], "delta") and not hasattr(a.modules["ff"], "fro_norm")
    with pytest.raises(UnsupportedAdapterError, match="rank truncation by SVD"):
        truncate(a, 1)
    with pytest.raises(UnsupportedAdapterError, match="dense ΔW"):
        a.deltas()
    with pytest.raises(UnsupportedAdapterError, match="merging into base weights"):
        merge_into({"ff.weight": torch.zeros(6, 6)}, a)
    with pytest.raises(FormatError, match="only be written with format='grasp_residual'"):
        formats.write_adapter(a, tmp_path / "p", format="peft")


def test_residual_refusal_is_one_error_naming_the_module(tmp_path) -> None:
    """Every ΔW operation refuses a residual module with the same message, naming it (from one place)."""
    from safetensors.torch import save_file

    from adapterbank.formats.diffusers import write_diffusers
    from adapterbank.formats.kohya import write_kohya
    from adapterbank.formats.peft import write_peft
    from adapterbank.merge import merge_into_files

    lora = LoraModule(torch.ones(1, 6), torch.ones(6, 1), 1.0, (6, 6))
    res = ResidualModule(torch.ones(1, 6), torch.ones(6, 1), 1.0)
    a = LoraAdapter({"unet.a": lora, "unet.ff": res})
    save_file({"unet.a.weight": torch.zeros(6, 6), "unet.ff.weight": torch.zeros(6, 6)}, tmp_path / "m.safetensors")
    ops = {
        "rank truncation by SVD": lambda: truncate(a, 1),
        "merging into base weights": lambda: merge_into({"unet.a.weight": torch.zeros(6, 6)}, a),
        "deltas() (a dense ΔW)": a.deltas,
        "writing a PEFT adapter": lambda: write_peft(a, tmp_path / "peft"),
        "writing a kohya file": lambda: write_kohya(a, tmp_path / "k.safetensors"),
        "writing a diffusers LoRA": lambda: write_diffusers(a, tmp_path / "diffusers"),
    }
    messages = set()
    for what, op in ops.items():
        with pytest.raises(UnsupportedAdapterError, match="Module 'unet.ff' is a GRASP residual adapter") as ei:
            op()
        assert what in str(ei.value)
        messages.add(str(ei.value).replace(what, "<what>"))
    with pytest.raises(UnsupportedAdapterError, match="'unet.ff'.*merging into base weights"):
        merge_into_files(tmp_path / "m.safetensors", a, tmp_path / "merged")
    assert len(messages) == 1  # one template, produced by LoraAdapter.lora_modules
    assert not (tmp_path / "merged").exists() and not (tmp_path / "peft").exists()
    with pytest.raises(ShapeMismatchError, match="LoRA.*GRASP residual|GRASP residual.*LoRA"):
        combine([LoraAdapter({"ff": lora}), LoraAdapter({"ff": res})], [1.0, 1.0])


def test_grasp_residual_format_roundtrip(tm, tmp_path) -> None:
    m = tm.tiny_sana_block()
    h = grasp.inject(m, n_groups=2, rank=3, seed=0)
    tm.randomize(h)
    files = grasp.export_group(h, 1, tmp_path / "g1")
    assert sorted(p.name for p in files) == ["grasp_residual.json", "grasp_residual.safetensors"]
    assert formats.detect_format(tmp_path / "g1") == "grasp_residual"
    back = formats.read_adapter(tmp_path / "g1")
    mod = back.modules["ff"]
    assert isinstance(mod, ResidualModule) and (mod.channel_dim, mod.activation) == (1, "gelu")
    torch.testing.assert_close(mod.D, h.sites[0].adapter.down[1].detach())
    torch.testing.assert_close(mod.U, h.sites[0].adapter.up[1].detach())
    # a composition of channel-first groups keeps its channel axis on disk
    both = combine([grasp.group_adapter(h, 0), back], [0.5, 0.5])
    formats.write_adapter(both, tmp_path / "both", format="grasp_residual")
    again = formats.read_adapter(tmp_path / "both").modules["ff"]
    assert isinstance(again, ResidualModule) and again.channel_dim == 1 and again.rank == 6
    (tmp_path / "g1" / "grasp_residual.json").write_text('{"format": "grasp_residual"}')
    with pytest.raises(FormatError, match="expected exactly the keys"):
        formats.read_adapter(tmp_path / "g1")


def test_lora_kind_exports_to_peft(tm, tmp_path) -> None:
    from peft import PeftModel

    m = tm.tiny_llama()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    h = grasp.inject(m, n_groups=2, rank=2, kind="lora", lora_alpha=4, seed=0)
    tm.randomize(h, 0.2)
    ids = torch.randint(0, 40, (2, 5))
    with grasp.route(m, 1):
        want = m(ids).logits
    grasp.export_group(h, 1, tmp_path / "peft1")
    fresh = tm.tiny_llama()
    fresh.load_state_dict(sd)
    pm = PeftModel.from_pretrained(fresh, tmp_path / "peft1").eval()
    torch.testing.assert_close(pm(ids).logits, want, rtol=1e-4, atol=1e-5)
    a = formats.read_adapter(tmp_path / "peft1")
    assert sorted(a.modules) == sorted(f"model.layers.{i}.mlp.{p}" for i in range(2)
                                       for p in ("gate_proj", "up_proj", "down_proj"))


def test_add_to_bank_and_compose(tm, tmp_path) -> None:
    from adapterbank.bank import Bank
    from adapterbank.compose import compose
    from adapterbank.prototypes import Prototype, PrototypeSpace

    m = tm.tiny_dit()
    part = grasp.FrequencyTiers().fit(["a"] * 10 + ["b"] * 5 + ["c"] * 2)
    h = grasp.inject(m, n_groups=3, rank=2, seed=0)
    tm.randomize(h)
    ck = h.save(tmp_path / "ck", partitioner=part)
    space = PrototypeSpace("toy", None, "mean", False, 2)
    protos = {"head": Prototype(np.array([1.0, 0.0]), space), "medium": Prototype(np.array([0.0, 1.0]), space),
              2: Prototype(np.array([1.0, 1.0]), space)}
    bank = Bank.init(tmp_path / "bank")
    assert not hasattr(bank, "add_grasp")  # the bank knows no GRASP: grasp.add_to_bank is the one bridge
    cards = grasp.add_to_bank(bank, ck, protos, id_prefix="toy")
    assert [c.id for c in cards] == ["toy-head", "toy-medium", "toy-tail"]
    assert cards[0].format == "grasp_residual"
    loaded = bank.load_adapter("toy-tail")
    assert all(isinstance(mod, ResidualModule) for mod in loaded.modules.values())
    comp = compose(bank, Prototype(np.array([0.5, 0.5]), space), ids=["toy-head", "toy-medium"], strategy="avg")
    ref = combine([grasp.group_adapter(ck, "head"), grasp.group_adapter(ck, "medium")], [0.5, 0.5])
    for k, mod in comp.adapter.modules.items():
        want = ref.modules[k]
        assert isinstance(mod, ResidualModule) and isinstance(want, ResidualModule)
        torch.testing.assert_close(mod.U, want.U)
        torch.testing.assert_close(mod.D, want.D)
    with pytest.raises(UnsupportedAdapterError):
        compose(bank, Prototype(np.array([0.5, 0.5]), space), ids=["toy-head", "toy-medium"], strategy="avg", rank=1)
    out = comp.save(tmp_path / "comp", format="grasp_residual")
    assert isinstance(formats.read_adapter(out), LoraAdapter)
    bank.close()


def test_bank_does_not_import_grasp() -> None:
    """``adapterbank.bank`` imports no ``adapterbank.grasp`` module, at import time or inside a function."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import adapterbank.bank

    code = ("import sys, adapterbank.bank\n"
            "bad = sorted(m for m in sys.modules if m.startswith('adapterbank.grasp'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    files = sorted(Path(adapterbank.bank.__file__).parent.rglob("*.py"))
    assert len(files) >= 4
    for f in files:  # every import statement, module level or lazy inside a function
        text = f.read_text()
        assert "adapterbank.grasp" not in text, f
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module or ''}.{a.name}" for a in node.names] + [node.module or ""]
            else:
                continue
            assert not any("grasp" in n.split(".") for n in names), (f, node.lineno, names)
