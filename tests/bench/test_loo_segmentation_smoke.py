"""Smoke test of Benchmark B's parts (bench/loo_segmentation.py): sites, ground truth, Dice, the ViT segmenter,
and that a trained PEFT LoRA (conv patch embedding included), read back by adapterbank and merged exactly
(Eq. 6), gives the PEFT model's own output. The full benchmark is run by hand (see the script's docstring)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def seg(load_bench):
    return load_bench("loo_segmentation")


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


@pytest.mark.slow
def test_stages_after_the_data_run_end_to_end(seg, tmp_path):
    """Stages 2b–5 of main() on synthetic images (Fashion-MNIST is not needed): per-site LoRAs into a bank,
    leave-one-out, the include-self ablation through ``evaluate(include_self=True, target_prototypes=...)``,
    the appendix and the reports."""
    import argparse

    from adapterbank.bank import Bank

    torch.manual_seed(0)
    base = seg.build_model().eval()
    seg._freeze(base)
    rng = np.random.default_rng(0)

    def split(site, n, seed):
        clean = rng.random((n, 28, 28)).astype(np.float32) ** 2
        x = clean if site is None else seg.SITES[site].apply(clean, seed)
        return seg.Split(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(seg.foreground(clean)), np.arange(n))

    names = ["inverted", "gamma-dark", "rician-0.30", "blur-1.2"]
    sites = {s: {sp: split(s, 16, i) for i, sp in enumerate(("train", "val", "test"))} for s in names}
    clean = {"test": split(None, 8, 0)}
    cfg = {"lora_steps": 2, "k": 3, "sweep_k": [], "sweep_lam": [], "n_train": 16, "n_val": 16, "n_test": 16,
           "n_pre": 0, "pre_steps": 0, "n_clean_test": 8}
    enc = seg.make_encoder(base, "fp-test")
    train_info = seg.stage_site_adapters(base, enc, sites, cfg, tmp_path, tmp_path / "bank", "tiny")
    assert set(train_info) == set(names)
    trained = seg.Trained(base, enc, "fp-test", "tiny", {"seconds": 0.0}, train_info, True)
    bank = Bank.open(tmp_path / "bank")
    enc2 = seg.stage_ablation_space(bank, trained, sites)
    evaluator = seg.DiceEvaluator(base, "smoke")
    tasks = {n: d["test"] for n, d in sites.items()}
    res, _ = seg.stage_leave_one_out(bank, evaluator, tasks, enc, cfg, tmp_path)
    ablations, _ = seg.stage_ablations(bank, evaluator, tasks, sites, enc, enc2, cfg, tmp_path)
    inc = ablations["include_self"][1]
    assert inc.config["include_self"] is True and not hasattr(seg, "include_self_ablation")
    val_protos = seg.validation_prototypes(enc, sites)
    for t in names:
        assert t not in res.main(t, "avg").ids  # main run: the target is held out
        rec = inc.main(t, "avg")
        assert rec.include_self and t in rec.ids  # the target's own LoRA is in the pool
        # p_T is the validation images' prototype, not the bank's (where the own adapter would sit at distance 0)
        d_own = rec.distances[rec.ids.index(t)]
        assert d_own > 0 and d_own == pytest.approx(
            float(np.sum((val_protos[t].vector.astype(np.float64) - bank.get_prototype(t, enc.space).vector) ** 2)),
            rel=1e-4)
    app = seg.stage_appendix(bank, evaluator, res, tasks, clean, enc, cfg)
    bank.close()
    assert app.names == names and app.cross.shape == (4, 4)
    args = argparse.Namespace(size="small")
    seg.stage_reports(res, ablations, trained, app, args, cfg, "digest", tmp_path, 0.0, 0.0, 0.0)
    md = seg.stage_extra_sections(res, ablations, trained, app, sites, clean, enc, enc2, cfg, tmp_path, 0.0, 0.0)
    text = md.read_text()
    assert "## Ablations" in text and "include-self" in text and "target_prototypes=" in text
    assert (tmp_path / "ablation_include_self" / "results.md").is_file()
    seg.stage_copy_figures(tmp_path, tmp_path / "fig", list(ablations))
    assert (tmp_path / "fig" / "ablation_all_layers" / "results.md").is_file()
