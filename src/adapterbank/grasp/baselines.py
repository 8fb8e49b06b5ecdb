"""Baselines under the same budget as GRASP (arXiv:2512.01675; docs/design.md §3).

| baseline | function | what is trained |
|---|---|---|
| full fine-tuning | :func:`full_finetune` | every parameter of the model |
| one shared adapter, same rank | ``inject(model, n_groups=1, rank=r)`` (:func:`shared_adapter`) | one residual adapter per site |
| one shared adapter, parameter-matched | :func:`shared_adapter` with ``rank=K·r`` | as above, K× wider |
| learned-routing mixture (token level) | :func:`moe` ``router="token"`` | K experts (same adapters) + a softmax top-k router per site, load-balancing loss |
| learned-routing mixture (prompt level) | :func:`moe` ``router="prompt"`` | as above, one gate per sample from its condition vector |
| random partition | :class:`adapterbank.grasp.RandomPartition` + :func:`inject` | GRASP with a random prior |

Load-balancing loss (Switch Transformer / Mixtral): L_aux = α · K · Σ_k f_k P_k, where f_k is the
fraction of tokens (or samples) whose top-1 expert is k and P_k the mean router probability of k.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterbank._validation import check_int
from adapterbank.errors import ParameterError, UnknownNameError
from adapterbank.grasp.adapters import GroupResidual, Router
from adapterbank.grasp.inject import GraspFFN, GraspHandle, Targets, _parent, inject

logger = logging.getLogger(__name__)

__all__ = ["ROUTERS", "FullFinetune", "MoEHandle", "MoEResidual", "full_finetune", "moe", "shared_adapter"]

ROUTERS = ("token", "prompt")


class FullFinetune:
    """Handle for full fine-tuning: every parameter of ``model`` is trainable, no routing.

    >>> h = full_finetune(nn.Linear(2, 2))
    >>> sum(p.numel() for p in h.parameters())
    6
    """

    static_routing = False
    n_groups = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(True)

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters()]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def training_context(self, groups: Any = None, condition: Any = None) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def aux_loss(self) -> None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_trainable_parameters()}


def full_finetune(model: nn.Module) -> FullFinetune:
    """Make every parameter of ``model`` trainable (the vanilla fine-tuning baseline)."""
    return FullFinetune(model)


def shared_adapter(model: nn.Module, rank: int, **kw: Any) -> GraspHandle:
    """One residual adapter shared by all samples (GRASP with K = 1). Use ``rank=K·r`` to match parameters.

    >>> class B(nn.Module):
    ...     def __init__(self): super().__init__(); self.ff = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    >>> shared_adapter(B(), rank=2).n_params()
    16
    """
    return inject(model, n_groups=1, rank=rank, **kw)


class MoEResidual(nn.Module):
    """K residual experts at one site plus a learned softmax router (token- or prompt-level, top-k).

    out_i = Σ_{k ∈ topk(i)} p_ik · U_k φ(D_k x_i). With top_k > 1 the kept probabilities are renormalised
    (Mixtral); with top_k = 1 the raw probability scales the expert (Switch), so the router gets gradient.
    """

    always_on = True

    def __init__(self, experts: GroupResidual, *, router: str = "token", top_k: int = 1, balance: float = 0.01,
                 condition_dim: int | None = None) -> None:
        super().__init__()
        if router not in ROUTERS:
            raise UnknownNameError(f"Unknown router {router!r}. Valid routers: {', '.join(ROUTERS)}.")
        check_int(top_k, "top_k", "moe", low=1, high=experts.n_groups)
        self.experts, self.mode, self.top_k, self.balance = experts, router, top_k, float(balance)
        d_gate = experts.d_in if (router == "token" or condition_dim is None) else condition_dim
        self.gate = nn.Linear(d_gate, experts.n_groups, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.last_aux: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None  # (B, K): tokens (or 1) per sample routed to each expert

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return self.experts.group_parameters(g)

    def _aux(self, probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
        K = probs.shape[-1]
        f = F.one_hot(top1, K).float().mean(0)  # (K,) fraction routed (no gradient)
        P = probs.mean(0)  # (K,)
        return self.balance * K * (f * P).sum()

    def forward(self, x: torch.Tensor, router: Router) -> torch.Tensor:
        ex = self.experts
        B, d = x.shape[0], x.shape[-1]
        xf = x.to(ex.down[0].dtype)
        K = ex.n_groups
        if self.mode == "token":
            flat = xf.reshape(-1, d)  # (T, d), T = B·N
            probs = F.softmax(self.gate(flat).float(), -1)  # (T, K)
            per_tok = flat.shape[0] // B
        else:
            cond = router.condition
            src = cond.to(xf) if cond is not None else xf.reshape(B, -1, d).mean(1)  # (B, d_gate)
            if src.shape[-1] != self.gate.in_features:
                raise ParameterError(f"The prompt-level router expects condition vectors of dim "
                                     f"{self.gate.in_features}. Got {tuple(src.shape)} instead.")
            probs = F.softmax(self.gate(src).float(), -1)  # (B, K)
            flat = xf.reshape(B, -1)  # (B, N·d): a sample's rows go to one expert together
            per_tok = 1
        w, idx = probs.topk(self.top_k, dim=-1)  # (T, k)
        if self.top_k > 1:
            w = w / w.sum(-1, keepdim=True)
        self.last_aux = self._aux(probs, idx[:, 0])
        self.last_counts = F.one_hot(idx[:, 0], K).reshape(B, per_tok, K).sum(1).detach()
        out = flat.new_zeros(flat.shape[0], ex.d_out if self.mode == "token" else flat.shape[1] // d * ex.d_out)
        for k in range(K):
            hit = (idx == k)  # (T, k)
            rows = hit.any(-1).nonzero().flatten()
            if rows.numel() == 0:
                continue
            wk = (w * hit).sum(-1)[rows].to(flat.dtype)  # (n_k,)
            xk = flat.index_select(0, rows)
            if self.mode == "prompt":
                xk = xk.reshape(rows.numel(), -1, d)
            yk = F.linear(ex._act(F.linear(xk, ex.down[k])), ex.up[k]) * ex.scale
            yk = yk.reshape(rows.numel(), -1) * wk[:, None]
            out = out.index_add(0, rows, yk)
        return out.reshape(*x.shape[:-1], ex.d_out)


class MoEHandle(GraspHandle):
    """A :class:`GraspHandle` whose sites hold :class:`MoEResidual` (learned routing, no static groups)."""

    static_routing = False

    def aux_loss(self) -> torch.Tensor | None:
        terms = [s.adapter.last_aux for s in self.sites if getattr(s.adapter, "last_aux", None) is not None]
        for s in self.sites:
            s.adapter.last_aux = None  # type: ignore[union-attr]
        return torch.stack(terms).sum() if terms else None

    def training_context(self, groups: Any = None, condition: torch.Tensor | None = None,
                         ) -> contextlib.AbstractContextManager[None]:
        return self.condition(condition)

    @contextlib.contextmanager
    def condition(self, condition: torch.Tensor | None) -> Iterator[None]:
        """Set the per-sample condition vectors the prompt-level router reads."""
        prev = self.router.condition
        self.router.condition = condition
        try:
            yield
        finally:
            self.router.condition = prev

    def routing_counts(self) -> torch.Tensor | None:
        """(B, K) rows routed to each expert in the last forward pass, summed over sites."""
        cs = [s.adapter.last_counts for s in self.sites if getattr(s.adapter, "last_counts", None) is not None]
        return torch.stack(cs).sum(0) if cs else None


def moe(model: nn.Module, n_experts: int, rank: int, *, router: str = "token", top_k: int = 1, balance: float = 0.01,
        condition_dim: int | None = None, targets: Targets = "auto", activation: str = "gelu",
        seed: int | None = None, freeze_base: bool = True) -> MoEHandle:
    """Learned-routing mixture of ``n_experts`` residual adapters at every FFN site (the MoE baseline).

    >>> class Blk(nn.Module):
    ...     def __init__(self): super().__init__(); self.ff = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    ...     def forward(self, x): return x + self.ff(x)
    >>> m = Blk(); h = moe(m, n_experts=3, rank=2, seed=0)
    >>> y = m(torch.randn(2, 5, 4)); h.routing_counts().sum(1).tolist()   # 5 tokens per sample
    [5, 5]
    """
    base = inject(model, n_groups=n_experts, rank=rank, targets=targets, activation=activation, seed=seed,
                  freeze_base=freeze_base)
    gen_state = torch.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed + 1)
    try:
        for s in base.sites:
            assert isinstance(s.adapter, GroupResidual)
            s.adapter = MoEResidual(s.adapter, router=router, top_k=top_k, balance=balance,
                                    condition_dim=condition_dim)
            if s.mode == "wrap":
                parent, attr = _parent(model, s.name)
                w = getattr(parent, attr)
                assert isinstance(w, GraspFFN)
                w.adapter = s.adapter
    finally:
        torch.set_rng_state(gen_state)
    h = MoEHandle(model, base.router, base.sites, {**base.config, "kind": "residual", "moe_router": router,
                                                   "top_k": top_k, "balance": balance}, base._saved_grad)
    model._grasp_handle = h  # type: ignore[assignment]
    return h
