"""Diagnostics: adapter norms, per-group update counts, gradient conflict between groups, MoE routing matrix.

Gradient conflict (the quantity GRASP's partition is meant to reduce): for groups a, b and the shared
parameters θ of full fine-tuning, cos(a, b) = ⟨∇_θ L_a, ∇_θ L_b⟩ / (‖∇_θ L_a‖ ‖∇_θ L_b‖), where L_a is the
mean loss of the batch rows of group a. Negative cosine = conflicting updates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterbank.errors import ParameterError

logger = logging.getLogger(__name__)

__all__ = ["RoutingRecorder", "adapter_norms", "gradient_cosine", "routing_matrix"]


def adapter_norms(handle: Any) -> list[dict[str, float]]:
    """Per group: ‖U‖_F and ‖D‖_F summed in quadrature over sites (residual), or ‖A‖, ‖B‖ (lora).

    >>> from adapterbank.grasp import inject
    >>> class B(nn.Module):
    ...     def __init__(self): super().__init__(); self.ff = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    >>> [round(r["up"], 3) for r in adapter_norms(inject(B(), n_groups=2, rank=2, seed=0))]
    [0.0, 0.0]
    """
    out = []
    for g in range(handle.n_groups):
        sq = {"up": 0.0, "down": 0.0}
        for name, p in handle.named_adapter_parameters().items():
            parts = name.rsplit(".", 2)
            if int(parts[-1]) != g:
                continue
            key = "up" if parts[-2] in ("up", "lora_B") else "down"
            sq[key] += float(p.detach().double().pow(2).sum())
        out.append({"group": g, "up": sq["up"] ** 0.5, "down": sq["down"] ** 0.5})
    return out


def gradient_cosine(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    groups: torch.Tensor,
    *,
    params: Sequence[nn.Parameter] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Cosine between the gradients of each group's mean loss on shared ``params`` (default: all trainable).

    ``loss_fn(mask)`` returns the per-sample losses (B,) of one forward pass (``mask`` is unused by most
    callers; it is the row selection of the group being differentiated). Returns (C (G, G), group ids).

    >>> lin = nn.Linear(2, 1, bias=False)
    >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]); y = torch.tensor([1.0, 1.0])
    >>> C, ids = gradient_cosine(lin, lambda m: (lin(x).squeeze(1) - y) ** 2, torch.tensor([0, 1]))
    >>> ids
    [0, 1]
    """
    ps = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not ps:
        raise ParameterError("gradient_cosine needs parameters with requires_grad=True.")
    ids = sorted(int(v) for v in torch.unique(groups).tolist() if v >= 0)
    grads = []
    for g in ids:
        m = groups == g
        per = loss_fn(m)
        gs = torch.autograd.grad(per[m.to(per.device)].mean(), ps, allow_unused=True)
        grads.append(torch.cat([(t if t is not None else torch.zeros_like(p)).flatten().double()
                                for t, p in zip(gs, ps, strict=True)]))
    G = torch.stack(grads)  # (G, P)
    n = G.norm(dim=1).clamp_min(1e-30)
    C = (G @ G.T) / (n[:, None] * n[None, :])
    return C.numpy(), ids


class RoutingRecorder:
    """Accumulates a class × expert matrix from a :class:`MoEHandle`'s ``routing_counts()`` after each forward.

    >>> r = RoutingRecorder(n_classes=2, n_experts=3)
    >>> r.add(torch.tensor([0, 1]), torch.tensor([[4, 0, 0], [1, 1, 2]]))
    >>> r.matrix(normalize=True)[1].tolist()
    [0.25, 0.25, 0.5]
    """

    def __init__(self, n_classes: int, n_experts: int) -> None:
        self.counts = np.zeros((n_classes, n_experts), dtype=np.float64)

    def add(self, classes: torch.Tensor, counts: torch.Tensor | None) -> None:
        if counts is None:
            return
        c = counts.detach().cpu().double().numpy()  # (B, K)
        for i, cls in enumerate(classes.tolist()):
            self.counts[int(cls)] += c[i]

    def matrix(self, normalize: bool = True) -> np.ndarray:
        if not normalize:
            return self.counts.copy()
        s = self.counts.sum(1, keepdims=True)
        return np.divide(self.counts, s, out=np.zeros_like(self.counts), where=s > 0)


def routing_matrix(handle: Any, batches: Sequence[Mapping[str, Any]], run: Callable[[Mapping[str, Any]], Any],
                   n_classes: int) -> np.ndarray:
    """Class × expert routing fractions of a learned-routing handle over ``batches`` (``run`` does a forward)."""
    rec = RoutingRecorder(n_classes, handle.n_groups)
    with torch.no_grad():
        for b in batches:
            run(b)
            rec.add(torch.as_tensor(b["class"]), handle.routing_counts())
    return rec.matrix()
