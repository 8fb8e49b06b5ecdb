"""LoRA algebra: per-module (A, B, scale), exact ΔW, exact weighted composition, exact truncation.

Notation (docs/design.md §1–2):

| symbol | here            | shape             |
|--------|-----------------|-------------------|
| A_i^m  | ``module.A``    | (r_i, n_in)       |
| B_i^m  | ``module.B``    | (n_out, r_i)      |
| s_i^m  | ``module.scale``| scalar (α/r, α/√r)|
| ΔW_i^m | ``module.delta()`` | ``weight_shape`` |

ΔW = s · B @ A, transposed when ``transposed`` (GPT-2 Conv1D with ``fan_in_fan_out``, embeddings) and
reshaped to ``weight_shape`` (conv kernels: A is stored flattened as (r, C_in·kh·kw), B as (C_out, r)).

Eq. 6 of the seed paper, ΔW_T = Σ_i w_i ΔW_i, is computed exactly in low-rank form by concatenation:
B* = [B_1 … B_k], A* = [w_1 s_1 A_1; …; w_k s_k A_k], scale 1 (:func:`combine`). No d_out×d_in matrix
is formed unless :meth:`LoraModule.delta` is called. :func:`truncate` caps the rank exactly: QR of B*
and of A*ᵀ, SVD of the small R×R core, keep the top r, and report ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F.

A :class:`LoraAdapter` may also hold :class:`ResidualModule` s — GRASP residual adapters (docs/design.md §3),
y = FFN(x) + s·U φ(D x). They are not weight updates and have no ``delta()``; :func:`combine` composes them
exactly by concatenation, and every ΔW operation (``delta``, :func:`truncate`, :func:`merge_into`, merging
into files, the PEFT/kohya/diffusers writers) takes its modules from :meth:`LoraAdapter.lora_modules`,
which refuses a residual one by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from adapterbank._validation import check_int
from adapterbank.errors import BaseModelMismatchError, NonFiniteError, ShapeMismatchError, UnsupportedAdapterError

ModuleKind = Literal["linear", "conv", "embedding"]

#: Metadata that describes how a client loads an adapter, not ΔW (PEFT ``task_type``, base model ``revision``):
#: :func:`combine` keeps each key whose value all the combined adapters share.
SHARED_METADATA: tuple[str, ...] = ("task_type", "revision")

__all__ = [
    "AdapterModule",
    "LoraModule",
    "ResidualModule",
    "LoraAdapter",
    "combine",
    "truncate",
    "merge_into",
    "lora_scale",
]


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf. Fast path: NaN and Inf propagate through a sum (~8× faster than
    ``isfinite().all()`` on bf16); only a non-finite sum (NaN/Inf present, or an overflow) pays for the exact
    element-wise check.

    >>> all_finite(torch.ones(3)), all_finite(torch.tensor([1.0, float("nan")])), all_finite(torch.full((2,), 3e38))
    (True, False, True)
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(t).all())


def lora_scale(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """The LoRA scale s = α/r, or α/√r for rsLoRA.

    >>> lora_scale(32, 16), lora_scale(32, 16, rslora=True)
    (2.0, 8.0)
    """
    if rank <= 0:
        raise ShapeMismatchError(f"The 'rank' of a LoRA module must be a positive int. Got {rank} instead.")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One target module of a LoRA adapter: ΔW = scale · B @ A.

    Args:
        A: down projection, (r, n_in). Conv kernels are stored flattened, (r, C_in·kh·kw).
        B: up projection, (n_out, r).
        scale: s = α/r (or α/√r for rsLoRA), already resolved per module.
        weight_shape: shape of the base weight that ΔW is added to.
        transposed: ΔW = (s B A)ᵀ — GPT-2 Conv1D (``fan_in_fan_out``) and embeddings.
        kind: what the base module is; decides the key names and tensor shapes on disk.

    >>> m = LoraModule(A=torch.ones(2, 3), B=torch.ones(4, 2), scale=0.5, weight_shape=(4, 3))
    >>> m.rank, m.delta()[0, 0].item()
    (2, 1.0)
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    weight_shape: tuple[int, ...]
    transposed: bool = False
    kind: ModuleKind = "linear"

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ShapeMismatchError(
                f"LoRA factors must be 2-D (A: (r, n_in), B: (n_out, r)). Got A {tuple(self.A.shape)}, "
                f"B {tuple(self.B.shape)} instead."
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise ShapeMismatchError(
                f"LoRA rank mismatch: A has {self.A.shape[0]} rows but B has {self.B.shape[1]} columns."
            )
        object.__setattr__(self, "weight_shape", tuple(int(s) for s in self.weight_shape))
        n_out, n_in = self.matrix_shape
        if self.B.shape[0] != n_out or self.A.shape[1] != n_in:
            raise ShapeMismatchError(
                f"LoRA factors A {tuple(self.A.shape)}, B {tuple(self.B.shape)} do not fit a base weight of "
                f"shape {self.weight_shape} (transposed={self.transposed}): expected A (r, {n_in}), B ({n_out}, r)."
            )
        if not math.isfinite(self.scale):
            raise NonFiniteError(f"LoRA scale must be finite. Got {self.scale} instead.")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(n_out, n_in) of the untransposed, flattened product B @ A."""
        ws = self.weight_shape
        if self.transposed:
            if len(ws) != 2:
                raise ShapeMismatchError(f"A transposed LoRA module needs a 2-D weight. Got {ws} instead.")
            return ws[1], ws[0]
        return ws[0], math.prod(ws[1:])

    @property
    def n_params(self) -> int:
        return self.A.numel() + self.B.numel()

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ΔW, shaped like the base weight. Forms an n_out×n_in matrix: use for checks."""
        d = self.scale * (self.B.to(dtype) @ self.A.to(dtype))  # (n_out, n_in)
        if self.transposed:
            d = d.T
        return d.reshape(self.weight_shape)

    def check_finite(self, where: str = "") -> None:
        """Raise :class:`NonFiniteError` if A or B holds NaN/Inf; ``where`` names the module."""
        for name, t in (("A", self.A), ("B", self.B)):
            if not all_finite(t):
                raise NonFiniteError(f"LoRA factor {name} of module {where or '?'} contains NaN or Inf.")

    def fro_norm(self) -> float:
        """‖ΔW‖_F computed in low-rank form: ‖s B A‖_F² = s² tr((BᵀB)(AAᵀ))."""
        b, a = self.B.double(), self.A.double()
        val = torch.sum((b.T @ b) * (a @ a.T)).clamp_min(0).sqrt().item()
        return abs(self.scale) * val

    def to(self, dtype: torch.dtype) -> LoraModule:
        """The same module with A and B cast to ``dtype``."""
        return replace(self, A=self.A.to(dtype), B=self.B.to(dtype))

    def describe(self) -> str:
        """What must agree between adapters for :func:`combine` (named in its error message)."""
        return f"LoRA, weight shape {self.weight_shape}, transposed {self.transposed}, kind {self.kind}"


@dataclass(frozen=True, eq=False)
class ResidualModule:
    """One FFN site of a GRASP residual adapter (arXiv:2512.01675): y = FFN(x) + scale · U φ(D x).

    Not a weight update: it has no dense ΔW and no ``delta()``, so rank truncation, merging into base
    weights and the ΔW file formats refuse it (:meth:`LoraAdapter.lora_modules`); it is stored in the
    ``grasp_residual`` format. :func:`combine` composes it exactly by concatenation with the weights on U:
    φ acts elementwise, so Σ_i w_i s_i U_i φ(D_i x) = [w_1 s_1 U_1 … w_k s_k U_k] φ([D_1; …; D_k] x).

    Args:
        D: down projection, (r, d_in).
        U: up projection, (d_out, r).
        scale: s.
        activation: φ; ``"gelu"`` (erf form) is the one the ``grasp_residual`` format holds.
        channel_dim: the feature axis of the site's input: -1 (features last) or 1 (channel-first conv FFNs, Sana).

    >>> m = ResidualModule(D=torch.ones(2, 3), U=torch.zeros(4, 2), scale=1.0)
    >>> m.rank, (m.d_out, m.d_in), hasattr(m, "delta")
    (2, (4, 3), False)
    """

    D: torch.Tensor
    U: torch.Tensor
    scale: float
    activation: str = "gelu"
    channel_dim: int = -1

    def __post_init__(self) -> None:
        if self.D.ndim != 2 or self.U.ndim != 2 or self.D.shape[0] != self.U.shape[1]:
            raise ShapeMismatchError(
                f"A residual module needs D (r, d_in) and U (d_out, r). Got D {tuple(self.D.shape)}, "
                f"U {tuple(self.U.shape)} instead."
            )
        if not math.isfinite(self.scale):
            raise NonFiniteError(f"Residual module scale must be finite. Got {self.scale} instead.")

    @property
    def rank(self) -> int:
        return int(self.D.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.D.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.U.shape[0])

    @property
    def n_params(self) -> int:
        return self.D.numel() + self.U.numel()

    def check_finite(self, where: str = "") -> None:
        """Raise :class:`NonFiniteError` if D or U holds NaN/Inf; ``where`` names the module."""
        for name, t in (("D", self.D), ("U", self.U)):
            if not all_finite(t):
                raise NonFiniteError(f"Residual factor {name} of module {where or '?'} contains NaN or Inf.")

    def to(self, dtype: torch.dtype) -> ResidualModule:
        """The same module with D and U cast to ``dtype``."""
        return replace(self, D=self.D.to(dtype), U=self.U.to(dtype))

    def describe(self) -> str:
        """What must agree between adapters for :func:`combine` (named in its error message)."""
        return (f"GRASP residual, {self.d_in} → {self.d_out}, activation {self.activation}, "
                f"channel_dim {self.channel_dim}")


#: A module of a :class:`LoraAdapter`: a LoRA weight update, or a GRASP residual adapter (no ΔW).
AdapterModule = LoraModule | ResidualModule


@dataclass
class LoraAdapter:
    """A LoRA adapter: module path -> :class:`LoraModule`, plus the base model it was made for.

    A GRASP adapter holds :class:`ResidualModule` s instead (no ΔW); ΔW operations take
    :meth:`lora_modules`, which refuses those.

    Module paths are those of the model the adapter is applied to, with no wrapper prefix:
    ``model.layers.0.self_attn.q_proj`` for a LlamaForCausalLM, and with the pipeline component first for
    diffusion adapters (``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``).
    ``metadata`` keeps format extras that do not change ΔW (PEFT ``task_type``, kohya ``ss_*`` keys).
    """

    modules: dict[str, AdapterModule]
    base_model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    @property
    def n_params(self) -> int:
        return sum(m.n_params for m in self.modules.values())

    def lora_modules(self, what: str) -> dict[str, LoraModule]:
        """The modules as LoRA weight updates, for the ΔW operation ``what`` (``"merging into base weights"``).

        The one place that refuses a GRASP :class:`ResidualModule`: it raises
        :class:`UnsupportedAdapterError` naming the first one.

        >>> a = LoraAdapter({"ff": ResidualModule(torch.ones(1, 2), torch.ones(2, 1), 1.0)})
        >>> a.lora_modules("merging into base weights")
        Traceback (most recent call last):
        ...
        adapterbank.errors.UnsupportedAdapterError: Module 'ff' is a GRASP residual adapter ...
        """
        out: dict[str, LoraModule] = {}
        for name, m in self.modules.items():
            if not isinstance(m, LoraModule):
                raise UnsupportedAdapterError(
                    f"Module {name!r} is a GRASP residual adapter (y = FFN(x) + s·U φ(D x)), not a LoRA weight "
                    f"update; it has no ΔW, so {what} is refused. Compose residual adapters with combine/compose "
                    "(no rank cap) and write them with format='grasp_residual'."
                )
            out[name] = m
        return out

    def check_finite(self) -> None:
        for name, m in self.modules.items():
            m.check_finite(name)

    def deltas(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Dense ΔW of every module (for checks and small models)."""
        return {k: m.delta(dtype) for k, m in self.lora_modules("deltas() (a dense ΔW)").items()}

    def to(self, dtype: torch.dtype) -> LoraAdapter:
        mods = {k: m.to(dtype) for k, m in self.modules.items()}
        return LoraAdapter(mods, self.base_model, dict(self.metadata))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 matmuls are ~100x slower than fp32 on these CPUs and lose the exactness we promise.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def combine(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
    check_base_model: bool = True,
) -> LoraAdapter:
    """Exact weighted sum of adapters (Eq. 6): ΔW*^m = Σ_i w_i ΔW_i^m for every module m.

    Low-rank concatenation: B* = [B_1 … B_k], A* = [w_1 s_1 A_1; …; w_k s_k A_k], scale 1, so rank
    R = Σ r_i over the adapters that have m and a nonzero weight. Any real weights (negative too), mixed
    ranks, rsLoRA and per-module scales; a module missing from an adapter counts as zero there. Metadata
    keys in :data:`SHARED_METADATA` (``task_type``, ...) are kept where every adapter has the same value.
    :class:`ResidualModule` s carry the weights on U instead: U* = [w_1 s_1 U_1 … w_k s_k U_k],
    D* = [D_1; …; D_k], scale 1, exact because φ acts elementwise on the rows of D* x.

    >>> a = LoraAdapter({"fc": LoraModule(torch.eye(2), torch.eye(2), 1.0, (2, 2))})
    >>> c = combine([a, a], [0.25, -1.0])
    >>> c.modules["fc"].rank, c.modules["fc"].delta()[0, 0].item()
    (4, -0.75)
    """
    if len(adapters) != len(weights):
        raise ShapeMismatchError(f"combine got {len(adapters)} adapters but {len(weights)} weights.")
    if not adapters:
        raise ShapeMismatchError("combine needs at least one adapter.")
    w = [float(x) for x in weights]
    if not all(math.isfinite(x) for x in w):
        raise NonFiniteError(f"Composition weights must be finite. Got {w} instead.")
    bases = {a.base_model for a in adapters if a.base_model}
    if check_base_model and len(bases) > 1:
        raise BaseModelMismatchError(
            f"Cannot combine adapters made for different base models: {sorted(bases)}."
        )
    cdt = _compute_dtype(dtype)
    names: dict[str, None] = {}
    for a in adapters:
        names.update(dict.fromkeys(a.modules))
    out: dict[str, AdapterModule] = {}
    for name in names:
        present = [(wi, a.modules[name]) for wi, a in zip(w, adapters, strict=True) if name in a.modules]
        ref = present[0][1]
        for _, m in present[1:]:
            if _layout(m) != _layout(ref):
                raise ShapeMismatchError(
                    f"Module {name!r} differs between adapters: {m.describe()} vs {ref.describe()}."
                )
        used = [(wi, m) for wi, m in present if wi != 0.0]
        if not used:
            continue  # ΔW* = 0 on this module
        if isinstance(ref, ResidualModule):
            out[name] = _combine_residual([(wi, m) for wi, m in used if isinstance(m, ResidualModule)], cdt, dtype)
        else:
            out[name] = _combine_lora([(wi, m) for wi, m in used if isinstance(m, LoraModule)], cdt, dtype)
    base = next(iter(bases)) if len(bases) == 1 else None
    return LoraAdapter(out, base, shared_metadata(adapters))


def _layout(m: AdapterModule) -> tuple[Any, ...]:
    """What must agree between adapters on one module for :func:`combine` (``describe()`` words it)."""
    if isinstance(m, ResidualModule):
        return ResidualModule, m.d_in, m.d_out, m.activation, m.channel_dim
    return LoraModule, m.weight_shape, m.transposed, m.kind


def _combine_residual(used: Sequence[tuple[float, ResidualModule]], cdt: torch.dtype, dtype: torch.dtype,
                      ) -> ResidualModule:
    """U* = [w_1 s_1 U_1 … w_k s_k U_k], D* = [D_1; …; D_k]: the weights go on U, as φ(w·Dx) ≠ w·φ(Dx)."""
    ref = used[0][1]
    U = torch.cat([(wi * m.scale) * m.U.to(cdt) for wi, m in used], dim=1)  # (d_out, R)
    D = torch.cat([m.D.to(cdt) for _, m in used], dim=0)  # (R, d_in)
    return ResidualModule(D.to(dtype), U.to(dtype), 1.0, ref.activation, ref.channel_dim)


def _combine_lora(used: Sequence[tuple[float, LoraModule]], cdt: torch.dtype, dtype: torch.dtype) -> LoraModule:
    """B* = [B_1 … B_k], A* = [w_1 s_1 A_1; …; w_k s_k A_k], scale 1."""
    ref = used[0][1]
    B = torch.cat([m.B.to(cdt) for _, m in used], dim=1)  # (n_out, R)
    A = torch.empty(sum(m.rank for _, m in used), ref.A.shape[1], dtype=cdt)  # (R, n_in), one copy
    off = 0
    for wi, m in used:
        torch.mul(m.A.to(cdt), wi * m.scale, out=A[off:off + m.rank])
        off += m.rank
    return LoraModule(A.to(dtype), B.to(dtype), 1.0, ref.weight_shape, ref.transposed, ref.kind)


def shared_metadata(adapters: Sequence[LoraAdapter]) -> dict[str, Any]:
    """The :data:`SHARED_METADATA` entries on which all ``adapters`` agree (set and equal in every one).

    >>> a = LoraAdapter({}, metadata={"task_type": "CAUSAL_LM", "revision": "x"})
    >>> shared_metadata([a, LoraAdapter({}, metadata={"task_type": "CAUSAL_LM"})])
    {'task_type': 'CAUSAL_LM'}
    """
    out: dict[str, Any] = {}
    for key in SHARED_METADATA:
        values = [a.metadata.get(key) for a in adapters]
        if values and values[0] is not None and all(v == values[0] for v in values):
            out[key] = values[0]
    return out


def _truncate_module(m: LoraModule, rank: int, cdt: torch.dtype) -> tuple[LoraModule, float]:
    B = m.B.to(cdt) * m.scale  # (n_out, R)
    A = m.A.to(cdt)  # (R, n_in)
    q1, r1 = torch.linalg.qr(B)  # (n_out, R1), (R1, R)
    q2, r2 = torch.linalg.qr(A.T)  # (n_in, R2), (R2, R)
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)  # core (R1, R2)
    total = float(torch.sum(s.double() ** 2))
    kept = float(torch.sum(s[:rank].double() ** 2))
    err = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    root = s[:rank].sqrt()  # split Σ evenly between the factors
    B_new = (q1 @ u[:, :rank]) * root  # (n_out, r)
    A_new = root[:, None] * (vh[:rank] @ q2.T)  # (r, n_in)
    return LoraModule(A_new.to(m.A.dtype), B_new.to(m.B.dtype), 1.0, m.weight_shape, m.transposed, m.kind), err


def truncate(
    adapter: LoraAdapter, rank: int, *, dtype: torch.dtype = torch.float32
) -> tuple[LoraAdapter, dict[str, float]]:
    """Best rank-``rank`` approximation of every module's ΔW (Eckart–Young), without forming ΔW.

    QR of B (n_out×R) and of Aᵀ (n_in×R), SVD of the small core R_B R_Aᵀ, keep the top ``rank`` singular
    triplets. Returns the truncated adapter (scale 1) and, per module, ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F (0 where
    the module already had rank ≤ ``rank``).

    >>> g = torch.Generator().manual_seed(0)
    >>> m = LoraModule(torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g), 1.0, (5, 6))
    >>> t, err = truncate(LoraAdapter({"fc": m}), 4)
    >>> round(err["fc"], 6), torch.allclose(t.modules["fc"].delta(), m.delta(), atol=1e-4)
    (0.0, True)
    """
    rank = check_int(rank, "rank", "truncate", low=1)
    cdt = _compute_dtype(dtype)
    mods: dict[str, AdapterModule] = {}
    errs: dict[str, float] = {}
    for name, m in adapter.lora_modules("rank truncation by SVD").items():
        if m.rank <= rank:
            mods[name], errs[name] = m, 0.0
        else:
            mods[name], errs[name] = _truncate_module(m, rank, cdt)
    return LoraAdapter(mods, adapter.base_model, dict(adapter.metadata)), errs


def merge_into(
    state_dict: Mapping[str, torch.Tensor],
    adapter: LoraAdapter,
    *,
    key: Callable[[str], str] = lambda m: f"{m}.weight",
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` with W^m ← W_0^m + ΔW^m for every adapter module (Eq. 6 applied).

    ``key`` maps a module path to its weight key in ``state_dict``. Computation is in fp32 (fp64 kept),
    the result is cast back to each weight's dtype. Only the touched tensors are copied.

    >>> sd = {"fc.weight": torch.zeros(2, 2)}
    >>> a = LoraAdapter({"fc": LoraModule(torch.eye(2), torch.eye(2), 2.0, (2, 2))})
    >>> merge_into(sd, a)["fc.weight"].diagonal().tolist()
    [2.0, 2.0]
    """
    out = dict(state_dict)
    for name, m in adapter.lora_modules("merging into base weights").items():
        k = key(name)
        if k not in state_dict:
            if strict:
                raise ShapeMismatchError(f"Base weights have no key {k!r} for adapter module {name!r}.")
            continue
        w0 = state_dict[k]
        if tuple(w0.shape) != m.weight_shape:
            raise ShapeMismatchError(
                f"Base weight {k!r} has shape {tuple(w0.shape)}, adapter module {name!r} expects {m.weight_shape}."
            )
        cdt = torch.float64 if w0.dtype == torch.float64 else torch.float32
        out[k] = (w0.to(cdt) + m.delta(cdt)).to(w0.dtype)
    return out
