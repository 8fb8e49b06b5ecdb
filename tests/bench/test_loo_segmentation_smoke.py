"""Smoke test of Benchmark B's parts (bench/loo_segmentation.py): sites, ground truth, Dice, the ViT segmenter,
and that a trained PEFT LoRA (conv patch embedding included), read back by adapterbank and merged exactly
(Eq. 6), gives the PEFT model's own output. The full benchmark is run by hand (see the script's docstring)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "loo_segmentation.py"


@pytest.fixture(scope="module")
def seg():
    spec = importlib.util.spec_from_file_location("loo_segmentation_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_sites_are_deterministic_and_in_range(seg):
    x = np.random.default_rng(0).random((4, 28, 28)).astype(np.float32) ** 3
    for site in seg.SITES.values():
        a, b = site.apply(x, 1), site.apply(x, 1)
        assert a.shape == x.shape and a.dtype == np.float32
        assert np.array_equal(a, b), site.name
        assert a.min() >= 0.0 and a.max() <= 1.0, site.name
        assert not np.allclose(a, x), f"site {site.name} changes nothing"
    assert len(seg.SITES) >= 6 and set(seg.SIZES["full"]["sites"]) == set(seg.SITES)


def test_foreground_and_dice(seg):
    clean = np.array([[0.0, 0.05, 0.11, 1.0]], dtype=np.float32)
    assert seg.foreground(clean).tolist() == [[False, False, True, True]]
    y = torch.tensor([[[True, True], [False, False]]])
    assert seg.dice_per_image(y, y).tolist() == [1.0]
    assert seg.dice_per_image(~y, y).tolist() == [0.0]
    assert seg.dice_per_image(torch.zeros_like(y), torch.zeros_like(y)).tolist() == [1.0]


def test_lora_roundtrip_merge_is_exact(seg, tmp_path):
    from adapterbank.formats import read_adapter

    torch.manual_seed(0)
    base = seg.build_model().eval()
    for p in base.parameters():
        p.requires_grad_(False)
    x = torch.rand(32, 1, 28, 28)
    data = seg.Split(x, x[:, 0] > 0.5, np.arange(32))
    info = seg.train_lora(base, data, steps=3, out=tmp_path / "lora", seed=1, base_id="tiny")
    assert info["trainable_params"] > 0
    ad = read_adapter(tmp_path / "lora")
    assert len(ad.modules) == seg.N_LORA_MODULES
    assert any(len(m.weight_shape) == 4 for m in ad.modules.values())  # the conv patch embedding

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).eval()
    ev = seg.DiceEvaluator(base, "test")
    with torch.inference_mode():
        merged = ev.model(ad)(x)
        ref = peft_model(x)
        plain = base(x)
    assert not torch.allclose(merged, plain)
    torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-4)
