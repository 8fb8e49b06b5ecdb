"""Group adapters and the static router that feeds them group ids.

Residual adapter of group g at one FFN site (arXiv:2512.01675; docs/design.md §3):

    y = FFN(x) + s · U_g φ(D_g x)

| symbol | here | shape | init |
|---|---|---|---|
| D_g | ``GroupResidual.down[g]`` | (r, d_in) | Kaiming-uniform (a=√5), as nn.Linear |
| U_g | ``GroupResidual.up[g]`` | (d_out, r) | zeros → the model equals the base at step 0 |
| φ | ``activation`` | elementwise | GELU (erf) by default |
| s | ``scale`` | scalar | 1.0 |

Each group holds its own ``nn.Parameter`` objects (``nn.ParameterList``), and a forward pass touches
only the parameters of the groups present in the batch. With ``optimizer.zero_grad(set_to_none=True)``
the absent groups keep ``grad is None``, and torch optimisers (AdamW included: no weight decay, no
momentum step) skip parameters whose grad is None, so absent groups stay bit-identical. (A stacked
(K, d, r) tensor would get zero-filled gradients and be moved by momentum and decoupled weight decay.)

Rows of a batch with mixed groups are processed group by group: when the batch is sorted by group (the
trainer sorts it), every group is a contiguous slice and the output is one ``torch.cat``; otherwise
rows are gathered and scattered. Group id ``-1`` means "adapter off" (the base model's output).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterbank._validation import check_int
from adapterbank.errors import ParameterError, UnknownNameError

logger = logging.getLogger(__name__)

__all__ = ["ACTIVATIONS", "GroupLoraLinear", "GroupResidual", "Plan", "Router"]

ACTIVATIONS: dict[str, Any] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}

#: A routing plan: (group id, rows) pairs; rows is a slice (sorted batch) or an index tensor.
Plan = list[tuple[int, Any]]


def make_plan(g: torch.Tensor) -> Plan:
    """Split a (B,) tensor of group ids into per-group rows; contiguous runs become slices.

    >>> make_plan(torch.tensor([0, 0, 2, 2, 2]))
    [(0, slice(0, 2, None)), (2, slice(2, 5, None))]
    >>> [(k, v.tolist()) for k, v in make_plan(torch.tensor([1, 0, 1, -1]))]
    [(0, [1]), (1, [0, 2])]
    """
    vals = g.tolist()
    runs: list[tuple[int, int, int]] = []  # (gid, start, end)
    for i, v in enumerate(vals):
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1], i + 1)
        else:
            runs.append((v, i, i + 1))
    gids = [r[0] for r in runs]
    if len(set(gids)) == len(gids):  # each group is one contiguous run
        return [(v, slice(s, e)) for v, s, e in runs if v >= 0]
    return [(v, (g == v).nonzero().flatten()) for v in sorted(set(vals)) if v >= 0]


class Router:
    """Holds the current group ids (set by :func:`adapterbank.grasp.route`) and maps them to batches.

    ``groups_for(B)`` accepts B == n (one row per id), B == k·n (the ids tiled k times: classifier-free
    guidance stacks [uncond, cond], ``uncond`` decides the first half's groups when k == 2), and
    refuses any other B. An int group applies to every row. ``images_per_prompt`` first repeats each id
    (``repeat_interleave``), as diffusers pipelines do for ``num_images_per_prompt``.

    >>> r = Router(n_groups=3)
    >>> r.set(torch.tensor([0, 2])); r.groups_for(4).tolist()
    [0, 2, 0, 2]
    >>> r.set(torch.tensor([0, 2]), uncond="off"); r.groups_for(4).tolist()
    [-1, -1, 0, 2]
    """

    def __init__(self, n_groups: int) -> None:
        self.n_groups = n_groups
        self._groups: torch.Tensor | int | None = None
        self._uncond: str | int = "same"
        self._plans: dict[int, Plan] = {}
        self.condition: torch.Tensor | None = None  # per-sample vector for prompt-level learned routers

    @property
    def active(self) -> bool:
        return self._groups is not None

    def set(self, groups: torch.Tensor | Sequence[int] | int | None, *, uncond: str | int = "same",
            images_per_prompt: int = 1) -> None:
        """Set (or clear, with None) the current group ids."""
        self._plans = {}
        if groups is None:
            self._groups = None
            return
        if not (uncond in ("same", "off") or (isinstance(uncond, int) and -1 <= uncond < self.n_groups)):
            raise ParameterError(f"The 'uncond' parameter of route must be 'same', 'off' or a group id in "
                                 f"-1..{self.n_groups - 1}. Got {uncond!r} instead.")
        check_int(images_per_prompt, "images_per_prompt", "route", low=1)
        if isinstance(groups, int) and not isinstance(groups, bool):
            g: torch.Tensor | int = groups
            bad = [groups] if not -1 <= groups < self.n_groups else []
        else:
            t = torch.as_tensor(groups)
            if t.ndim != 1 or t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ParameterError(f"route() needs group ids as an int or a non-empty 1-D integer sequence. "
                                     f"Got {tuple(t.shape)} of {t.dtype} instead.")
            g = t.to(torch.long).cpu().repeat_interleave(images_per_prompt)
            bad = sorted({int(v) for v in g.tolist() if not -1 <= v < self.n_groups})
        if bad:
            raise UnknownNameError(f"Group ids {bad} are out of range: this model has groups 0..{self.n_groups - 1} "
                                   "(and -1 for 'adapter off').")
        self._groups, self._uncond = g, uncond

    def groups_for(self, batch: int) -> torch.Tensor | None:
        """The (batch,) group ids for a forward pass of ``batch`` rows, or None outside a route context."""
        g = self._groups
        if g is None:
            return None
        if isinstance(g, int):
            return torch.full((batch,), g, dtype=torch.long)
        n = g.numel()
        if batch == n:
            return g
        if batch % n != 0:
            raise ParameterError(f"Cannot map a batch of {batch} rows onto {n} group ids: the batch must be "
                                 f"{n} or a multiple of it (e.g. {2 * n} with classifier-free guidance).")
        k = batch // n
        out = g.repeat(k)
        if k == 2 and self._uncond != "same":
            out[:n] = -1 if self._uncond == "off" else int(self._uncond)
        return out

    def plan(self, batch: int) -> Plan | None:
        """Per-group rows for a batch of ``batch`` (cached until the next :meth:`set`)."""
        if self._groups is None:
            return None
        p = self._plans.get(batch)
        if p is None:
            g = self.groups_for(batch)
            assert g is not None
            p = self._plans[batch] = make_plan(g)
        return p


def _take(x: torch.Tensor, rows: Any) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows.to(x.device))


def _assemble(pieces: list[tuple[Any, torch.Tensor]], plan: Plan, like: torch.Tensor, d_out: int) -> torch.Tensor:
    """Put per-group outputs back in batch order; rows of no (or the off) group are zero."""
    B = like.shape[0]
    shape = (B, *like.shape[1:-1], d_out)
    if all(isinstance(r, slice) for r, _ in pieces):
        covered = sum(r.stop - r.start for r, _ in pieces)
        if len(pieces) == 1 and covered == B:
            return pieces[0][1]
        if covered == B:  # sorted and complete: one cat
            return torch.cat([p for _, p in pieces], dim=0)
    out = pieces[0][1].new_zeros(shape)
    for rows, p in pieces:
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=p.device)
        out = out.index_copy(0, rows.to(p.device), p)
    return out


class GroupResidual(nn.Module):
    """K residual adapters of one FFN site: ``delta(x, plan)[i] = s · U_g φ(D_g x_i)`` for row i of group g.

    ``x`` is channels-last, (B, ..., d_in). Returns None when no row has an active group.

    >>> _ = torch.manual_seed(0); bank = GroupResidual(2, 4, 4, rank=2)
    >>> x = torch.randn(3, 5, 4)
    >>> float(bank.delta(x, make_plan(torch.tensor([0, 1, 1]))).abs().max().detach())  # U = 0 at init
    0.0
    """

    def __init__(self, n_groups: int, d_in: int, d_out: int, rank: int, *, activation: str = "gelu",
                 scale: float = 1.0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, v in (("n_groups", n_groups), ("d_in", d_in), ("d_out", d_out), ("rank", rank)):
            check_int(v, name, "GroupResidual", low=1)
        if activation not in ACTIVATIONS:
            raise UnknownNameError(f"Unknown activation {activation!r}. Valid: {', '.join(ACTIVATIONS)}.")
        self.n_groups, self.d_in, self.d_out, self.rank = n_groups, d_in, d_out, rank
        self.activation, self.scale = activation, float(scale)
        self._act = ACTIVATIONS[activation]
        self.down = nn.ParameterList([nn.Parameter(torch.empty(rank, d_in, dtype=dtype)) for _ in range(n_groups)])
        self.up = nn.ParameterList([nn.Parameter(torch.zeros(d_out, rank, dtype=dtype)) for _ in range(n_groups)])
        for d in self.down:
            nn.init.kaiming_uniform_(d, a=math.sqrt(5))  # as nn.Linear's weight

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return [self.down[g], self.up[g]]

    def forward(self, x: torch.Tensor, router: Router) -> torch.Tensor | None:
        """The adapter output for the rows the router assigns to a group (None if none is active)."""
        return self.delta(x, router.plan(x.shape[0]))

    def delta(self, x: torch.Tensor, plan: Plan | None) -> torch.Tensor | None:
        if not plan:
            return None
        xd = x.to(self.down[0].dtype)
        pieces = []
        for g, rows in plan:
            h = self._act(F.linear(_take(xd, rows), self.down[g]))  # (b, ..., r)
            pieces.append((rows, F.linear(h, self.up[g]) * self.scale))  # (b, ..., d_out)
        return _assemble(pieces, plan, xd, self.d_out)

    def extra_repr(self) -> str:
        return (f"n_groups={self.n_groups}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, "
                f"activation={self.activation!r}, scale={self.scale}")


class GroupLoraLinear(nn.Module):
    """An ``nn.Linear`` plus one LoRA per group: y_i = W x_i + b + (α/r) B_g A_g x_i (PEFT's convention).

    A_g (r, d_in) Kaiming-uniform, B_g (d_out, r) zeros. Outside a route context it is the base layer.

    >>> lin = GroupLoraLinear(nn.Linear(4, 3), Router(2), n_groups=2, rank=2)
    >>> x = torch.randn(2, 4)
    >>> torch.equal(lin(x), lin.base(x))
    True
    """

    def __init__(self, base: nn.Linear, router: Router, *, n_groups: int, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ParameterError(f"kind='lora' wraps nn.Linear layers only. Got {type(base).__name__} instead.")
        check_int(rank, "rank", "GroupLoraLinear", low=1)
        self.base, self.router = base, router
        self.n_groups, self.rank = n_groups, rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        dt = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(rank, base.in_features, dtype=dt))
                                        for _ in range(n_groups)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(base.out_features, rank, dtype=dt))
                                        for _ in range(n_groups)])
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return [self.lora_A[g], self.lora_B[g]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = self.router.plan(x.shape[0])
        if not plan:
            return y
        pieces = [(rows, F.linear(F.linear(_take(x, rows), self.lora_A[g]), self.lora_B[g]) * self.scale)
                  for g, rows in plan]
        return y + _assemble(pieces, plan, x, self.base.out_features).to(y.dtype)
