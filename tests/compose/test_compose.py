"""compose(): retrieval + weights + exact merge, end to end through a real bank and real PEFT files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import adapterbank
from adapterbank.bank import Bank
from adapterbank.compose import RECIPE_FILE, STRATEGIES, compose
from adapterbank.errors import PrototypeSpaceError, UnknownNameError
from adapterbank.formats import read_adapter
from adapterbank.prototypes import Prototype, PrototypeSpace

SPACE = PrototypeSpace("toy-encoder", "r1", "mean", False, 8)
OTHER = PrototypeSpace("other-encoder", "r1", "mean", False, 8)


@pytest.fixture(scope="module")
def bank_and_adapters(tmp_path_factory, tiny_llama, peft_adapter):
    root = tmp_path_factory.mktemp("compose")
    base = tiny_llama()
    rng = np.random.default_rng(0)
    variants = [
        dict(),
        dict(r=8, lora_alpha=4, use_rslora=True),
        dict(r=2, target_modules=["q_proj", "v_proj", "up_proj"]),
        dict(r=4, rank_pattern={"model.layers.0.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3.0}),
        dict(r=3, target_modules=["k_proj"]),
    ]
    bank = Bank.init(root / "bank")
    paths = {}
    for i, v in enumerate(variants):
        aid = f"task{i}"
        paths[aid] = peft_adapter(base, root / aid, seed=i + 10, **v)
        proto = Prototype(rng.normal(size=8), SPACE, n_samples=10, source=aid)
        bank.add(paths[aid], id=aid, prototype=proto, tags=["t"])
    return bank, paths, root


def _dense_reference(paths: dict[str, Path], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, w in weights.items():
        for m, mod in read_adapter(paths[i]).modules.items():
            out[m] = out.get(m, 0) + w * mod.delta(torch.float64)
    return out


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_composite_equals_dense_weighted_sum(bank_and_adapters, strategy, tmp_path):
    bank, paths, _ = bank_and_adapters
    target = Prototype(np.linspace(-1, 1, 8), SPACE, source="target")
    comp = compose(bank, target, k=4, strategy=strategy)
    assert len(comp.ids) == 4 and abs(comp.weights.sum() - 1) < 1e-9
    want = _dense_reference(paths, dict(zip(comp.ids, comp.weights.tolist(), strict=True)))
    got = comp.adapter.deltas(torch.float64)
    for m, d in want.items():
        if float(d.abs().max()) == 0:
            continue
        rel = float((got[m] - d).norm() / d.norm())
        assert rel < 1e-5, (m, rel)
    # written composite reads back to the same ΔW, and composition.json holds the recipe
    out = comp.save(tmp_path / "c")
    back = read_adapter(out)
    for m, d in got.items():
        assert torch.allclose(back.modules[m].delta(torch.float64), d, rtol=1e-5, atol=1e-7)
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["strategy"] == strategy
    assert recipe["retrieval"]["ids"] == comp.ids
    assert recipe["weights"] == pytest.approx(dict(zip(comp.ids, comp.weights.tolist(), strict=True)))
    assert recipe["target"]["space"]["encoder"] == "toy-encoder"
    assert "adapterbank" in recipe["versions"]
    assert recipe["versions"] == adapterbank.versions()


def test_peft_loads_composite_and_matches_dense(bank_and_adapters, tmp_path, tiny_llama):
    from peft import PeftModel

    bank, paths, _ = bank_and_adapters
    target = Prototype(np.ones(8), SPACE)
    comp = compose(bank, target, k=5, strategy="lin")  # lin gives negative weights
    out = comp.save(tmp_path / "c")
    ref = tiny_llama()
    sd = ref.state_dict()
    for m, d in _dense_reference(paths, dict(zip(comp.ids, comp.weights.tolist(), strict=True))).items():
        sd[f"{m}.weight"] = sd[f"{m}.weight"] + d.float()
    ref.load_state_dict(sd)
    model = PeftModel.from_pretrained(tiny_llama(), out).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_retrieval_order_filters_and_ids(bank_and_adapters):
    bank, _, _ = bank_and_adapters
    target = Prototype(bank.get_prototype("task3", SPACE).vector + 1e-3, SPACE)
    comp = compose(bank, target, k=2, strategy="nearest")
    assert comp.ids[0] == "task3" and comp.weights.tolist() == [1.0, 0.0]
    assert comp.distances == sorted(comp.distances)
    comp = compose(bank, target, k=2, strategy="avg", exclude=["task3"])
    assert "task3" not in comp.ids
    comp = compose(bank, target, strategy="avg", ids=["task0", "task4"])
    assert sorted(comp.ids) == ["task0", "task4"] and comp.k == 2


def test_rank_truncation_reports_error(bank_and_adapters):
    bank, paths, _ = bank_and_adapters
    target = Prototype(np.zeros(8), SPACE)
    full = compose(bank, target, k=5, strategy="avg")
    cut = compose(bank, target, k=5, strategy="avg", rank=2)
    assert max(cut.adapter.ranks.values()) <= 2
    for m, err in cut.truncation_error.items():
        d = full.adapter.modules[m].delta(torch.float64)
        rel = float((cut.adapter.modules[m].delta(torch.float64) - d).norm() / d.norm())
        assert rel == pytest.approx(err, rel=1e-3, abs=1e-6)
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
        assert rel == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-3, abs=1e-6)  # Eckart–Young


def test_bad_inputs(bank_and_adapters):
    bank, _, _ = bank_and_adapters
    with pytest.raises(UnknownNameError, match="avg, sim, lin, sparse, nearest"):
        compose(bank, Prototype(np.zeros(8), SPACE), strategy="magic")
    with pytest.raises(PrototypeSpaceError):
        compose(bank, Prototype(np.zeros(8), OTHER))
