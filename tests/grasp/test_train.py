"""Training: isolation of absent groups (bit-identical under AdamW + weight decay), save/load, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch

import adapterbank
from adapterbank import grasp
from adapterbank.errors import FormatError, ShapeMismatchError, UnknownNameError


def _dit_forward(model, x_t, t, batch):
    return model(x_t, timestep=t, class_labels=batch["y"]).sample


def _batches(n: int = 3, B: int = 6, groups=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {"x": torch.randn(B, 1, 8, 8, generator=g), "y": torch.randint(0, 5, (B,), generator=g)}
        if groups is not None:
            b["group"] = torch.tensor(groups)
        out.append(b)
    return out


@pytest.mark.parametrize("objective", ["flow_matching", "epsilon"])
def test_absent_groups_bit_identical(tm, objective: str) -> None:
    model = tm.tiny_dit()
    h = grasp.inject(model, n_groups=3, rank=4, seed=0)
    tm.randomize(h, 0.1)
    before = {k: v.clone() for k, v in h.state_dict().items()}
    base = {k: v.clone() for k, v in model.state_dict().items() if "down" not in k and ".up." not in k}
    res = grasp.train(h, _batches(groups=[0, 2, 0, 2, 2, 0]), steps=3, objective=objective, lr=1e-2,
                      weight_decay=0.1, ema=0.9, forward=_dit_forward, log_every=1)
    after = h.state_dict()
    for k, v in before.items():
        g = int(k.rsplit(".", 1)[1])
        if g == 1:
            assert torch.equal(v, after[k]), k  # absent group: no grad, no AdamW step, no decay
        else:
            assert not torch.equal(v, after[k]), k
    assert res.group_updates == [3, 0, 3]
    assert res.group_samples == [9, 0, 9]
    assert set(res.history[-1]["group_loss"]) == {"0", "2"}
    for k, v in model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k  # the base is frozen
    assert all(p.grad is None for p in h.group_parameters(1))
    assert torch.equal(res.ema[next(k for k in before if k.endswith(".1"))], before[next(k for k in before if k.endswith(".1"))])


def test_partitioner_labels_and_step_isolation(tm) -> None:
    model = tm.tiny_dit()
    part = grasp.FrequencyTiers().fit(["a"] * 10 + ["b"] * 5 + ["c"] * 2)
    h = grasp.inject(model, n_groups=part.n_groups, rank=2, seed=0)
    batches = _batches(n=1, B=4)
    batches[0]["labels"] = ["c", "a", "c", "a"]
    res = grasp.train(h, batches, steps=2, partitioner=part, forward=_dit_forward, lr=1e-2)
    assert res.group_updates == [2, 0, 2]
    batches[0]["labels"] = ["zzz", "a", "c", "a"]
    with pytest.raises(UnknownNameError, match="unknown label"):
        grasp.train(h, batches, steps=1, partitioner=part, forward=_dit_forward)


def test_save_load_roundtrip_and_corrupt(tm, tmp_path) -> None:
    model = tm.tiny_dit()
    part = grasp.FrequencyTiers(head=0.5, medium=0.3).fit(["a"] * 10 + ["b"] * 5 + ["c"] * 2)
    h = grasp.inject(model, n_groups=3, rank=4, seed=0)
    tm.randomize(h)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    t = torch.full((3,), 300.0)
    with grasp.route(model, [0, 2, 1]):
        ref = model(x, timestep=t, class_labels=y).sample
    ck = h.save(tmp_path / "ck", partitioner=part)
    cfg = json.loads((ck / "grasp_config.json").read_text())
    assert cfg["partitioner"]["type"] == "frequency_tiers" and "torch" in cfg["versions"]
    assert cfg["versions"] == adapterbank.versions()
    h.remove()
    h2 = grasp.load(model, ck)
    assert h2.partitioner.to_dict() == part.to_dict()
    with grasp.route(model, [0, 2, 1]):
        torch.testing.assert_close(model(x, timestep=t, class_labels=y).sample, ref)
    h2.remove()
    # damaged weights
    w = ck / "grasp_adapters.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="grasp_adapters.safetensors"):
        grasp.load(model, ck)
    assert not hasattr(model, "_grasp_handle")
    w.write_bytes(data)
    # damaged config
    (ck / "grasp_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="grasp_config.json"):
        grasp.load(model, ck)
    cfg["rank"] = 8
    (ck / "grasp_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match="has shape"):
        grasp.load(model, ck)
    assert not any(isinstance(m, grasp.GraspFFN) for m in model.modules())
    cfg["rank"] = 4
    cfg["surprise"] = 1
    (ck / "grasp_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="unexpected keys \\['surprise'\\]"):
        grasp.load(model, ck)
    with pytest.raises(ShapeMismatchError, match="not in LlamaForCausalLM"):
        del cfg["surprise"]
        (ck / "grasp_config.json").write_text(json.dumps(cfg))
        grasp.load(tm.tiny_llama(), ck)


def test_resume_matches_uninterrupted(tm, tmp_path) -> None:
    def run(steps, resume=False, ck=None, every=0):
        torch.manual_seed(0)
        model = tm.tiny_dit()
        h = grasp.inject(model, n_groups=2, rank=2, seed=0)
        b = _batches(n=1, groups=[0, 1, 0, 1, 0, 1])
        grasp.train(h, b, steps=steps, forward=_dit_forward, lr=1e-2, checkpoint_dir=ck, checkpoint_every=every,
                    resume=resume, seed=5, ema=0.5)
        return h.state_dict()

    full = run(4)
    run(2, ck=tmp_path / "c", every=2)
    resumed = run(4, resume=True, ck=tmp_path / "c")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k])
    with pytest.raises(FormatError, match="resume=True needs a checkpoint"):
        run(1, resume=True, ck=tmp_path / "none")
