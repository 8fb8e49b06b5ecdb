"""Baselines (full FT, shared adapter, learned-routing MoE) and diagnostics."""

from __future__ import annotations

import pytest
import torch

from adapterbank import grasp
from adapterbank.errors import ParameterError, UnknownNameError


def _fwd(model, x_t, t, batch):
    return model(x_t, timestep=t, class_labels=batch["y"]).sample


def _batch(B: int = 4):
    return [{"x": torch.randn(B, 1, 8, 8), "y": torch.arange(B) % 5, "group": torch.arange(B) % 2,
             "condition": torch.randn(B, 16)}]


@pytest.mark.parametrize("router", ["token", "prompt"])
def test_moe_trains_router_and_experts(tm, router: str) -> None:
    m = tm.tiny_dit()
    h = grasp.moe(m, n_experts=3, rank=2, router=router, top_k=1, seed=0, condition_dim=16 if router == "prompt" else None)
    gate0 = h.sites[0].adapter.gate.weight.detach().clone()
    res = grasp.train(h, _batch(), steps=3, forward=_fwd, lr=1e-2, log_every=1)
    assert "aux" in res.history[-1] and res.history[-1]["aux"] > 0
    assert not torch.equal(gate0, h.sites[0].adapter.gate.weight)
    assert sum(res.group_updates) >= 3
    with torch.no_grad(), h.condition(torch.randn(4, 16)):
        _fwd(m, torch.randn(4, 1, 8, 8), torch.full((4,), 10.0), {"y": torch.arange(4)})
    counts = h.routing_counts()
    per_row = 4 * len(h.sites) if router == "token" else len(h.sites)  # 4 tokens per image at 8×8, patch 4
    assert counts.shape == (4, 3) and counts.sum(1).tolist() == [per_row] * 4
    rec = grasp.RoutingRecorder(5, 3)
    rec.add(torch.arange(4), counts)
    assert rec.matrix().shape == (5, 3)
    with pytest.raises(UnknownNameError, match="Valid routers"):
        grasp.moe(tm.tiny_dit(), n_experts=2, rank=2, router="hash")


def test_shared_and_full_finetune(tm) -> None:
    m = tm.tiny_dit()
    h = grasp.shared_adapter(m, rank=6, seed=0)
    assert h.n_groups == 1 and h.n_params() == 2 * 2 * 16 * 6
    res = grasp.train(h, _batch(), steps=2, forward=_fwd, lr=1e-2)  # group ids are mapped to the one adapter
    assert res.group_updates == [2]
    h.remove()
    full = grasp.full_finetune(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    grasp.train(full, _batch(), steps=2, forward=_fwd, lr=1e-3)
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_gradient_cosine_and_norms(tm) -> None:
    m = tm.tiny_dit()
    for p in m.parameters():
        p.requires_grad_(True)
    b = _batch(6)[0]
    gen = torch.Generator().manual_seed(0)

    def per_sample(_mask):
        return grasp.denoising_loss(m, b["x"], b, objective="flow_matching",
                                    generator=torch.Generator().manual_seed(0), forward=_fwd)

    C, ids = grasp.gradient_cosine(m, per_sample, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert ids == [0, 1, 2] and C.shape == (3, 3)
    assert abs(C[0, 0] - 1) < 1e-9 and (abs(C) <= 1 + 1e-9).all()
    del gen
    h = grasp.inject(tm.tiny_dit(), n_groups=2, rank=2, seed=0)
    tm.randomize(h)
    norms = grasp.adapter_norms(h)
    assert len(norms) == 2 and all(r["up"] > 0 and r["down"] > 0 for r in norms)
    with pytest.raises(ParameterError, match="requires_grad"):
        grasp.gradient_cosine(h.model, per_sample, torch.tensor([0, 1]), params=[])
