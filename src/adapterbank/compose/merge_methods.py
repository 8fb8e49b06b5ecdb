"""Merge methods beside Eq. 6: how the weighted ΔW_i of one module are combined (docs/design.md §2).

The strategy gives the weights w (Eq. 3–5); a merge method decides how τ_i = w_i ΔW_i^m are combined on each
module m. Every method is a pure function on one module's stacked dense deltas::

    fn(deltas (k, n_out, n_in), weights (k,), **params) -> ΔW (n_out, n_in)

=================  ===================================================================  ===========================
name               ΔW^m                                                                 reference
=================  ===================================================================  ===========================
linear             Σ_i w_i ΔW_i (Eq. 6; compose() keeps it in exact low-rank form)      the seed paper
magnitude_prune    Σ_i w_i trim_ρ(ΔW_i)                                                 PEFT ``magnitude_prune``
ties               trim_ρ, elect γ = sgn Σ_i w_i trim_ρ(ΔW_i), weighted disjoint mean    Yadav et al. 2023
dare_linear        Σ_i w_i drop_ρ(ΔW_i)                                                 Yu et al. 2024
dare_ties          drop_ρ, then TIES' sign election and weighted disjoint mean           Yu et al. 2024
=================  ===================================================================  ===========================

- trim_ρ(X) keeps the ⌊ρ·numel⌋ entries of X of largest |X| and zeroes the rest (ρ = ``density``).
- drop_ρ(X) = M ⊙ X / ρ with M_jl ~ Bernoulli(ρ) i.i.d. (DARE: drop with probability 1 − ρ, rescale by 1/ρ).
  The masks are drawn in float32 from a ``torch.Generator`` seeded with ``seed``, one (n_out, n_in) mask per
  adapter in stacking order — the draws PEFT's ``random_pruning`` makes after ``torch.manual_seed(seed)``.
- Sign election (``majority_sign_method``): ``total``: γ = sgn Σ_i τ̂_i, ``frequency``: γ = sgn Σ_i sgn τ̂_i,
  with τ̂_i = w_i trim_ρ(ΔW_i) (or drop_ρ) and sgn 0 := +1.
- Weighted disjoint mean: ΔW = Σ_i [sgn τ̂_i = γ] τ̂_i / Σ_i [sgn τ̂_i = γ] |w_i| (0 where no entry agrees).
  With non-negative weights this is mergekit's ``ties`` (``normalize: true``); with equal weights it is the TIES
  paper's disjoint mean, whatever their value, and equal to PEFT's ``ties`` called with weights 1 (PEFT elects
  the sign on the unweighted deltas and divides by the count of agreeing adapters instead). |w_i| keeps the
  divisor positive for the negative weights that Lin/Sparse may give.

:data:`MERGE_METHODS` is the only list of methods: each :class:`MergeMethod` row carries the name, the pure
function, the description, the reference and its parameters (:class:`MergeParam`, with defaults). compose()'s
``merge=``/``merge_params=``, the CLI's ``--merge``/``--merge-param`` and :func:`merge_adapters` read it.
:func:`merge_adapters` streams module by module (the dense ΔW of only one module exists at a time) and
re-factors each result exactly by SVD, truncated at R = min(Σ r_i, n_out, n_in) or a given rank, reporting
‖ΔW − ΔW_R‖_F / ‖ΔW‖_F per module.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from adapterbank._validation import Bounds, check_choice, check_int
from adapterbank.errors import BaseModelMismatchError, NonFiniteError, ShapeMismatchError, UnknownNameError
from adapterbank.lora import LoraAdapter, LoraModule, _layout, shared_metadata

log = logging.getLogger(__name__)

__all__ = ["MergeParam", "MergeMethod", "MERGE_METHODS", "get_merge_method", "merge_adapters", "module_seed", "refactor",
           "trim", "dare_drop", "elect_sign", "disjoint_mean", "linear", "magnitude_prune", "ties",
           "dare_linear", "dare_ties"]

SignMethod = Literal["total", "frequency"]


# ----------------------------------------------------------------------------------------------
# the steps (each testable alone)
# ----------------------------------------------------------------------------------------------


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """trim_ρ: keep the ⌊ρ·numel⌋ entries of largest magnitude, zero the rest (a new tensor).

    >>> trim(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), 0.5).tolist()
    [[0.0, -3.0], [0.0, 2.0]]
    """
    if density >= 1.0:
        return delta.clone()
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[torch.topk(delta.abs().reshape(-1), k=keep, largest=True).indices] = True
    return delta * mask.reshape(delta.shape)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """drop_ρ: M ⊙ X / ρ with M ~ Bernoulli(ρ), drawn in float32 from ``generator`` (a new tensor).

    ρ = 1 returns a copy and draws nothing (as PEFT's ``prune``).
    """
    if density >= 1.0:
        return delta.clone()
    mask = torch.bernoulli(torch.full(delta.shape, density, dtype=torch.float32), generator=generator)
    return delta * mask.to(delta.dtype) / density


def elect_sign(tau: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """γ, the elected sign (n_out, n_in) in {−1, +1} of the stacked τ̂ (k, n_out, n_in); a tie elects +1.

    ``total``: sgn Σ_i τ̂_i (the mass), ``frequency``: sgn Σ_i sgn τ̂_i (the count).

    >>> elect_sign(torch.tensor([[3.0], [-1.0], [-1.0]])).tolist(), elect_sign(torch.tensor([[3.0], [-1.0], [-1.0]]), "frequency").tolist()
    ([1.0], [-1.0])
    """
    score = torch.zeros(tau.shape[1:], dtype=tau.dtype, device=tau.device)
    for t in tau:  # no (k, n_out, n_in) temporary
        score += t if method == "total" else t.sign()
    return torch.where(score >= 0, 1.0, -1.0).to(tau.dtype)


def disjoint_mean(tau: torch.Tensor, weights: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Σ_i [sgn τ̂_i = γ] τ̂_i / Σ_i [sgn τ̂_i = γ] |w_i|, 0 where no τ̂_i agrees with γ (zeros never agree).

    >>> disjoint_mean(torch.tensor([[2.0], [-1.0], [4.0]]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0])).tolist()
    [3.0]
    """
    num = torch.zeros(tau.shape[1:], dtype=tau.dtype, device=tau.device)
    den = torch.zeros_like(num)
    for t, w in zip(tau, weights.tolist(), strict=True):
        agree = (t.sign() == sign).to(tau.dtype)  # (n_out, n_in), 1 where τ̂_i agrees with γ
        num += t * agree
        den.add_(agree, alpha=abs(w))
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def _weighted_sum(parts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.einsum("k,kij->ij", weights.to(parts.dtype), parts)  # (n_out, n_in)


def _stack(fn: Callable[[torch.Tensor], torch.Tensor], deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """τ̂ = [w_i fn(ΔW_i)]_i, (k, n_out, n_in)."""
    out = torch.empty_like(deltas)
    for i, (d, w) in enumerate(zip(deltas, weights.tolist(), strict=True)):
        torch.mul(fn(d), w, out=out[i])
    return out


def _generator(seed: int, generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# the methods: (deltas (k, n_out, n_in), weights (k,), **params) -> ΔW (n_out, n_in)
# ----------------------------------------------------------------------------------------------


def linear(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 6: Σ_i w_i ΔW_i."""
    return _weighted_sum(deltas, weights)


def magnitude_prune(deltas: torch.Tensor, weights: torch.Tensor, *, density: float = 0.5) -> torch.Tensor:
    """Σ_i w_i trim_ρ(ΔW_i)."""
    return _weighted_sum(_stack(lambda d: trim(d, density), deltas, torch.ones_like(weights)), weights)


def ties(deltas: torch.Tensor, weights: torch.Tensor, *, density: float = 0.5,
         majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """TIES: # sparsify (trim_ρ), # elect sign of Σ w_i trim_ρ(ΔW_i), # disjoint merge (weighted mean)."""
    tau = _stack(lambda d: trim(d, density), deltas, weights)  # (k, n_out, n_in)
    return disjoint_mean(tau, weights, elect_sign(tau, majority_sign_method))


def dare_linear(deltas: torch.Tensor, weights: torch.Tensor, *, density: float = 0.5, seed: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: Σ_i w_i drop_ρ(ΔW_i); masks from ``generator`` (default: a new one seeded with ``seed``)."""
    g = _generator(seed, generator)
    return _weighted_sum(_stack(lambda d: dare_drop(d, density, g), deltas, torch.ones_like(weights)), weights)


def dare_ties(deltas: torch.Tensor, weights: torch.Tensor, *, density: float = 0.5,
              majority_sign_method: SignMethod = "total", seed: int = 0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE then TIES: # sparsify (drop_ρ), # elect sign, # disjoint merge (weighted mean)."""
    g = _generator(seed, generator)
    tau = _stack(lambda d: dare_drop(d, density, g), deltas, weights)  # (k, n_out, n_in)
    return disjoint_mean(tau, weights, elect_sign(tau, majority_sign_method))


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeParam:
    """One parameter of a merge method: ``kind`` ``number``/``int`` within ``bounds``, or ``choice`` among
    ``choices``; its ``default`` and what it does."""

    name: str
    kind: Literal["number", "int", "choice"]
    default: Any
    description: str
    bounds: Bounds | None = None
    choices: tuple[str, ...] = ()

    def check(self, method: str, value: Any) -> Any:
        """``value`` (or a string spelling it, from the command line) checked; else ParameterError/UnknownNameError."""
        owner = f"merge method {method}"
        if self.kind == "choice":
            return check_choice(value, self.name, owner, self.choices)
        return (self.bounds or Bounds("int" if self.kind == "int" else "number")).check(value, self.name, owner, parse=True)


DENSITY = MergeParam("density", "number", 0.5, "fraction ρ of each ΔW_i's entries kept",
                     Bounds("number", 0.0, 1.0, low_open=True))
SIGN = MergeParam("majority_sign_method", "choice", "total", "sign election: total (mass) or frequency (count)",
                  choices=("total", "frequency"))
SEED = MergeParam("seed", "int", 0, "seed of DARE's Bernoulli masks (each module: a seed derived from it and "
                  "the module name)", Bounds("int", 0, 2**63 - 1))


@dataclass(frozen=True)
class MergeMethod:
    """One row of :data:`MERGE_METHODS`: name, pure function, description, reference, parameters."""

    name: str
    fn: Callable[..., torch.Tensor]
    description: str
    reference: str
    params: tuple[MergeParam, ...] = ()

    def resolve(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The effective parameters: ``params`` checked, defaults filled in; an unknown name lists the valid ones."""
        given = dict(params or {})
        names = [p.name for p in self.params]
        for name in given:
            if name not in names:
                raise UnknownNameError(f"Unknown parameter {name!r} for merge method {self.name!r} (--merge-param). "
                                       f"Valid parameters: {', '.join(names) or 'none'}.")
        return {p.name: p.check(self.name, given[p.name]) if p.name in given else p.default for p in self.params}


MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("linear", linear, "Σ w_i ΔW_i, exact low-rank concatenation (Eq. 6)", "the seed paper, Eq. 6"),
    MergeMethod("ties", ties, "trim to density, elect sign by weighted mass, weighted disjoint mean",
                "TIES-Merging, Yadav et al. 2023 (arXiv:2306.01708)", (DENSITY, SIGN)),
    MergeMethod("dare_linear", dare_linear, "drop with prob 1−density, rescale 1/density, Σ w_i",
                "DARE, Yu et al. 2024 (arXiv:2311.03099)", (DENSITY, SEED)),
    MergeMethod("dare_ties", dare_ties, "DARE drop and rescale, then TIES sign election and disjoint mean",
                "DARE, Yu et al. 2024 (arXiv:2311.03099)", (DENSITY, SIGN, SEED)),
    MergeMethod("magnitude_prune", magnitude_prune, "trim each ΔW_i to density by magnitude, Σ w_i",
                "PEFT add_weighted_adapter(combination_type='magnitude_prune')", (DENSITY,)),
)}


def get_merge_method(name: str) -> MergeMethod:
    """The row of :data:`MERGE_METHODS` called ``name``; an unknown name lists the valid ones."""
    return MERGE_METHODS[check_choice(name, "merge", "compose", MERGE_METHODS)]


def module_seed(seed: int, module: str) -> int:
    """The seed of DARE's masks on ``module``: independent of module order, so streaming needs no shared state.

    >>> module_seed(0, "fc") == module_seed(0, "fc") != module_seed(1, "fc")
    True
    """
    return int.from_bytes(hashlib.sha256(f"{seed}/{module}".encode()).digest()[:8], "little") & (2**63 - 1)


# ----------------------------------------------------------------------------------------------
# the streaming driver
# ----------------------------------------------------------------------------------------------


def refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact SVD of one dense ΔW (n_out, n_in), top ``rank``: B (n_out, r), A (r, n_in), relative Fro error."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    s64 = s.double() ** 2
    total = float(s64.sum())
    err = math.sqrt(max(total - float(s64[:rank].sum()), 0.0) / total) if total > 0 else 0.0
    root = s[:rank].sqrt()  # split Σ evenly between the factors
    return u[:, :rank] * root, root[:, None] * vh[:rank], err


def merge_adapters(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[LoraAdapter, dict[str, float]]:
    """Merge ``adapters`` with ``weights`` by ``method`` (a :data:`MERGE_METHODS` name), module by module.

    Per module m (only one module's dense ΔW at a time): ΔW_i^m = s_i B_i A_i for the adapters that have m
    (stacked (k_m, n_out, n_in) in ``dtype``, float32 by default), the method's function, then the exact SVD of
    the result truncated at R = min(Σ r_i, n_out, n_in) — Σ over the adapters with a nonzero weight — or at
    min(``rank``, n_out, n_in). Returns the LoRA adapter (scale 1) and ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F per module.
    DARE's masks on m come from ``module_seed(seed, m)``. Modules where every weight is 0 are left out (as in
    :func:`~adapterbank.lora.combine`).
    """
    m = get_merge_method(method)
    eff = m.resolve(params)
    rank = check_int(rank, "rank", "merge_adapters", low=1, optional=True)
    if len(adapters) != len(weights) or not adapters:
        raise ShapeMismatchError(f"merge_adapters got {len(adapters)} adapters and {len(weights)} weights; "
                                 "give one weight per adapter, at least one adapter.")
    w = [float(x) for x in weights]
    if not all(math.isfinite(x) for x in w):
        raise NonFiniteError(f"Composition weights must be finite. Got {w} instead.")
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        raise BaseModelMismatchError(f"Cannot merge adapters made for different base models: {sorted(bases)}.")
    what = f"the merge method {method!r} (--merge)"
    loras = [a.lora_modules(what) for a in adapters]
    names = list(dict.fromkeys(n for mods in loras for n in mods))
    out: dict[str, LoraModule] = {}
    errs: dict[str, float] = {}
    for name in names:
        present = [(wi, mods[name]) for wi, mods in zip(w, loras, strict=True) if name in mods]
        ref = present[0][1]
        for _, mod in present[1:]:
            if _layout(mod) != _layout(ref):
                raise ShapeMismatchError(f"Module {name!r} differs between adapters: {mod.describe()} vs "
                                         f"{ref.describe()}.")
        if all(wi == 0.0 for wi, _ in present):
            continue
        n_out, n_in = ref.matrix_shape
        deltas = torch.empty(len(present), n_out, n_in, dtype=dtype)  # (k_m, n_out, n_in), this module only
        for i, (_, mod) in enumerate(present):
            torch.matmul(mod.B.to(dtype), mod.A.to(dtype), out=deltas[i]).mul_(mod.scale)
        kw = dict(eff)
        if "seed" in kw:
            kw["seed"] = module_seed(kw["seed"], name)
        delta = m.fn(deltas, torch.tensor([wi for wi, _ in present], dtype=dtype), **kw)  # (n_out, n_in)
        del deltas
        full = sum(mod.rank for wi, mod in present if wi != 0.0)
        r = min(full if rank is None else rank, n_out, n_in)
        B, A, errs[name] = refactor(delta, r)
        out[name] = LoraModule(A.contiguous(), B.contiguous(), 1.0, ref.weight_shape, ref.transposed, ref.kind)
    log.info("merge %s %s over %d modules: max rel. Fro error %.3g", method, eff, len(out), max(errs.values(), default=0))
    return LoraAdapter(dict(out), next(iter(bases)) if len(bases) == 1 else None, shared_metadata(adapters)), errs
