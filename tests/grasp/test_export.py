"""Export: exact concatenation of residual group adapters, refusals, grasp_residual format, PEFT load, bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapterbank import formats, grasp
from adapterbank.errors import FormatError, UnsupportedAdapterError
from adapterbank.lora import LoraAdapter, combine, merge_into, truncate


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
    assert mod.kind == "residual" and mod.rank == 6
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    # independent dense reference: Σ_i w_i s_i U_i φ(D_i x), computed from the raw parameters in float64
    site = h.sites[0].adapter
    ref = sum(wi * site.scale * (F.gelu(x @ site.down[i].double().T) @ site.up[i].double().T)
              for i, wi in enumerate(w))
    got = F.gelu(x @ mod.A.double().T) @ mod.B.double().T * mod.scale
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
    with pytest.raises(UnsupportedAdapterError, match="rank truncation by SVD"):
        truncate(a, 1)
    with pytest.raises(UnsupportedAdapterError, match="dense ΔW"):
        a.modules["ff"].delta()
    with pytest.raises(UnsupportedAdapterError, match="merging into base weights"):
        merge_into({"ff.weight": torch.zeros(6, 6)}, a)
    with pytest.raises(FormatError, match="only be written with format='grasp_residual'"):
        formats.write_adapter(a, tmp_path / "p", format="peft")


def test_grasp_residual_format_roundtrip(tm, tmp_path) -> None:
    m = tm.tiny_sana_block()
    h = grasp.inject(m, n_groups=2, rank=3, seed=0)
    tm.randomize(h)
    files = grasp.export_group(h, 1, tmp_path / "g1")
    assert sorted(p.name for p in files) == ["grasp_residual.json", "grasp_residual.safetensors"]
    assert formats.detect_format(tmp_path / "g1") == "grasp_residual"
    back = formats.read_adapter(tmp_path / "g1")
    assert back.metadata["channel_dims"] == {"ff": 1}
    torch.testing.assert_close(back.modules["ff"].A, h.sites[0].adapter.down[1].detach())
    torch.testing.assert_close(back.modules["ff"].B, h.sites[0].adapter.up[1].detach())
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
    cards = bank.add_grasp(ck, protos, id_prefix="toy")  # delegates to grasp.add_to_bank
    assert [c.id for c in cards] == ["toy-head", "toy-medium", "toy-tail"]
    assert cards[0].format == "grasp_residual"
    loaded = bank.load_adapter("toy-tail")
    assert next(iter(loaded.modules.values())).kind == "residual"
    comp = compose(bank, Prototype(np.array([0.5, 0.5]), space), ids=["toy-head", "toy-medium"], strategy="avg")
    ref = combine([grasp.group_adapter(ck, "head"), grasp.group_adapter(ck, "medium")], [0.5, 0.5])
    for k, mod in comp.adapter.modules.items():
        assert mod.kind == "residual"
        torch.testing.assert_close(mod.B, ref.modules[k].B)
        torch.testing.assert_close(mod.A, ref.modules[k].A)
    with pytest.raises(UnsupportedAdapterError):
        compose(bank, Prototype(np.array([0.5, 0.5]), space), ids=["toy-head", "toy-medium"], strategy="avg", rank=1)
    out = comp.save(tmp_path / "comp", format="grasp_residual")
    assert isinstance(formats.read_adapter(out), LoraAdapter)
    bank.close()
