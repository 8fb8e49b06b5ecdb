"""LoRA algebra against independent dense float64 references (numpy).

Every check builds random NON-identity factors from seeded generators, forms ΔW densely in numpy float64
(ΔW = s·B@A, transposed for Conv1D/embeddings, reshaped for conv kernels) and compares in relative
Frobenius norm. Truncation is checked against ``numpy.linalg.svd`` of the dense ΔW.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from adapterbank.errors import (
    BaseModelMismatchError,
    NonFiniteError,
    ParameterError,
    ShapeMismatchError,
    UnsupportedAdapterError,
)
from adapterbank.lora import LoraAdapter, LoraModule, ResidualModule, combine, lora_scale, merge_into, truncate

RTOL = 1e-5

# name -> (weight_shape, transposed, kind); (n_out, n_in) of B@A is derived from these.
MODULE_SPECS: dict[str, tuple[tuple[int, ...], bool, str]] = {
    "layers.0.q_proj": ((24, 16), False, "linear"),
    "layers.0.down_proj": ((16, 40), False, "linear"),
    "h.0.attn.c_attn": ((16, 48), True, "linear"),  # GPT-2 Conv1D: weight (n_in, n_out)
    "embed_tokens": ((50, 12), True, "embedding"),  # weight (num_embeddings, dim)
    "conv_in": ((8, 6, 3, 3), False, "conv"),  # (C_out, C_in, kh, kw); A flattened to (r, 54)
}


# ----------------------------------------------------------------------------------------------------
# independent references (numpy float64)
# ----------------------------------------------------------------------------------------------------
def dense_ref(m: LoraModule) -> np.ndarray:
    """ΔW in float64, shaped like the base weight, computed without adapterbank."""
    a = m.A.detach().to(torch.float64).numpy()
    b = m.B.detach().to(torch.float64).numpy()
    d = m.scale * (b @ a)  # (n_out, n_in)
    if m.transposed:
        d = d.T
    return d.reshape(m.weight_shape)


def as_matrix(d: np.ndarray, m: LoraModule) -> np.ndarray:
    """The (n_out, n_in) matrix whose rank is the LoRA rank."""
    if m.transposed:
        return d.T
    return d.reshape(m.weight_shape[0], -1)


def rel_err(x: np.ndarray | torch.Tensor, ref: np.ndarray) -> float:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float64).numpy()
    den = np.linalg.norm(ref)
    num = np.linalg.norm(np.asarray(x, dtype=np.float64) - ref)
    return float(num / den) if den > 0 else float(num)


def matrix_shape(spec: tuple[tuple[int, ...], bool, str]) -> tuple[int, int]:
    ws, transposed, _ = spec
    if transposed:
        return ws[1], ws[0]
    return ws[0], math.prod(ws[1:])


def rand_module(
    g: torch.Generator, spec: tuple[tuple[int, ...], bool, str], rank: int, scale: float,
    dtype: torch.dtype = torch.float32,
) -> LoraModule:
    n_out, n_in = matrix_shape(spec)
    ws, transposed, kind = spec
    A = torch.randn(rank, n_in, generator=g, dtype=torch.float64).to(dtype)
    B = torch.randn(n_out, rank, generator=g, dtype=torch.float64).to(dtype)
    return LoraModule(A=A, B=B, scale=scale, weight_shape=ws, transposed=transposed, kind=kind)  # type: ignore[arg-type]


def rand_adapter(g: torch.Generator, names: list[str], base: str | None = "tiny-base") -> LoraAdapter:
    mods = {}
    for name in names:
        r = int(torch.randint(1, 9, (1,), generator=g))
        alpha = float(torch.randint(1, 33, (1,), generator=g))
        rslora = bool(torch.randint(0, 2, (1,), generator=g))
        mods[name] = rand_module(g, MODULE_SPECS[name], r, lora_scale(alpha, r, rslora=rslora))
    return LoraAdapter(mods, base)


def weighted_ref(adapters: list[LoraAdapter], weights: list[float]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for a, w in zip(adapters, weights, strict=True):
        for name, m in a.modules.items():
            out[name] = out.get(name, np.zeros(m.weight_shape)) + w * dense_ref(m)
    return out


# ----------------------------------------------------------------------------------------------------
# lora_scale / LoraModule
# ----------------------------------------------------------------------------------------------------
def test_lora_scale_plain_and_rslora() -> None:
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, rslora=True) == 8.0
    assert lora_scale(7, 3, rslora=True) == pytest.approx(7 / math.sqrt(3), rel=1e-15)
    for bad in (0, -2):
        with pytest.raises(ShapeMismatchError, match="rank"):
            lora_scale(8, bad)


@pytest.mark.parametrize("name", sorted(MODULE_SPECS))
def test_module_delta_matches_dense(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    m = rand_module(g, MODULE_SPECS[name], 3, 0.7)
    d = m.delta()
    assert tuple(d.shape) == MODULE_SPECS[name][0]
    assert d.dtype == torch.float32
    assert rel_err(d, dense_ref(m)) < RTOL
    assert rel_err(m.delta(torch.float64), dense_ref(m)) < 1e-13
    assert m.rank == 3
    assert m.n_params == m.A.numel() + m.B.numel()


def test_transposed_delta_is_not_the_untransposed_product() -> None:
    # A wrong transpose must be visible: for a square Conv1D module ΔW ≠ s·B@A.
    g = torch.Generator().manual_seed(2)
    m = LoraModule(torch.randn(2, 6, generator=g), torch.randn(6, 2, generator=g), 1.5, (6, 6), transposed=True)
    np.testing.assert_allclose(m.delta().numpy(), (1.5 * (m.B @ m.A)).T.numpy(), rtol=1e-6)
    assert rel_err(m.delta(), (1.5 * (m.B @ m.A)).double().numpy()) > 0.1


def test_module_rejects_bad_factors() -> None:
    with pytest.raises(ShapeMismatchError, match="2-D"):
        LoraModule(torch.zeros(2, 3, 1), torch.zeros(4, 2), 1.0, (4, 3))
    with pytest.raises(ShapeMismatchError, match="rank mismatch"):
        LoraModule(torch.zeros(2, 3), torch.zeros(4, 3), 1.0, (4, 3))
    with pytest.raises(ShapeMismatchError, match="do not fit"):
        LoraModule(torch.zeros(2, 3), torch.zeros(4, 2), 1.0, (3, 4))
    with pytest.raises(ShapeMismatchError, match="do not fit"):  # transposed expects A (r, 4), B (3, r)
        LoraModule(torch.zeros(2, 3), torch.zeros(4, 2), 1.0, (4, 3), transposed=True)
    with pytest.raises(ShapeMismatchError, match="transposed"):
        LoraModule(torch.zeros(2, 3), torch.zeros(4, 2), 1.0, (4, 3, 1), transposed=True)
    for s in (math.nan, math.inf):
        with pytest.raises(NonFiniteError, match="scale"):
            LoraModule(torch.zeros(2, 3), torch.zeros(4, 2), s, (4, 3))


def test_check_finite_names_module_and_factor() -> None:
    A = torch.ones(2, 3)
    A[1, 2] = math.nan
    a = LoraAdapter({"blk.fc": LoraModule(A, torch.ones(4, 2), 1.0, (4, 3))})
    with pytest.raises(NonFiniteError, match=r"A of module blk\.fc"):
        a.check_finite()
    B = torch.ones(4, 2)
    B[0, 0] = -math.inf
    with pytest.raises(NonFiniteError, match="B of module x"):
        LoraModule(torch.ones(2, 3), B, 1.0, (4, 3)).check_finite("x")


@pytest.mark.parametrize("name", sorted(MODULE_SPECS))
def test_fro_norm_matches_dense(name: str) -> None:
    g = torch.Generator().manual_seed(3)
    m = rand_module(g, MODULE_SPECS[name], 5, -1.25)  # negative scale: the norm is still positive
    ref = float(np.linalg.norm(dense_ref(m)))
    assert m.fro_norm() == pytest.approx(ref, rel=1e-10)
    zero = replace(m, A=torch.zeros_like(m.A))
    assert zero.fro_norm() == 0.0


def test_adapter_helpers() -> None:
    g = torch.Generator().manual_seed(4)
    a = rand_adapter(g, ["layers.0.q_proj", "conv_in"])
    assert a.ranks == {k: m.rank for k, m in a.modules.items()}
    assert a.n_params == sum(m.A.numel() + m.B.numel() for m in a.modules.values())
    for k, d in a.deltas().items():
        assert rel_err(d, dense_ref(a.modules[k])) < RTOL
    h = a.to(torch.float16)
    assert all(m.A.dtype == torch.float16 and m.B.dtype == torch.float16 for m in h.modules.values())
    assert a.modules["conv_in"].A.dtype == torch.float32  # to() copies, the original is untouched
    assert h.base_model == a.base_model


# ----------------------------------------------------------------------------------------------------
# combine (Eq. 6)
# ----------------------------------------------------------------------------------------------------
def test_combine_matches_dense_weighted_sum_random() -> None:
    """Random adapters: mixed ranks, rsLoRA and plain scales per module, partial module sets, negative and
    zero weights, transposed, embedding and conv modules."""
    names = sorted(MODULE_SPECS)
    g = torch.Generator().manual_seed(5)
    rng = np.random.default_rng(5)
    n_checked = 0
    for trial in range(25):
        k = int(rng.integers(1, 6))
        adapters = []
        for _ in range(k):
            subset = [n for n in names if rng.random() < 0.7] or [names[int(rng.integers(len(names)))]]
            adapters.append(rand_adapter(g, subset))
        weights = list(rng.normal(size=k) * 2.0)
        if trial % 3 == 0:
            weights[int(rng.integers(k))] = 0.0
        if trial % 5 == 1:
            weights = [-abs(w) for w in weights]  # all negative
        c = combine(adapters, weights)
        ref = weighted_ref(adapters, weights)
        assert set(c.modules) <= set(ref)
        for name, r in ref.items():
            used = [a.modules[name] for a, w in zip(adapters, weights, strict=True) if name in a.modules and w != 0]
            if not used:
                assert name not in c.modules  # every contributing weight is zero: ΔW* = 0, module dropped
                assert np.all(r == 0)
                continue
            m = c.modules[name]
            assert m.scale == 1.0
            assert m.rank == sum(u.rank for u in used)
            assert (m.weight_shape, m.transposed, m.kind) == (used[0].weight_shape, used[0].transposed, used[0].kind)
            assert rel_err(m.delta(torch.float64), r) < RTOL, (trial, name)
            n_checked += 1
        assert c.base_model == "tiny-base"
    assert n_checked > 50


def test_combine_float64_is_exact_to_rounding() -> None:
    g = torch.Generator().manual_seed(6)
    adapters = [rand_adapter(g, sorted(MODULE_SPECS)) for _ in range(4)]
    weights = [0.7, -0.4, 1.3, -0.6]
    c = combine(adapters, weights, dtype=torch.float64)
    ref = weighted_ref(adapters, weights)
    for name, m in c.modules.items():
        assert m.A.dtype == torch.float64
        assert rel_err(m.delta(torch.float64), ref[name]) < 1e-12


def test_combine_module_missing_from_some_adapters_counts_as_zero() -> None:
    g = torch.Generator().manual_seed(7)
    a1 = rand_adapter(g, ["layers.0.q_proj", "conv_in"])
    a2 = rand_adapter(g, ["layers.0.q_proj"])
    a3 = rand_adapter(g, ["embed_tokens"])
    c = combine([a1, a2, a3], [0.5, 0.25, -2.0])
    assert set(c.modules) == {"layers.0.q_proj", "conv_in", "embed_tokens"}
    assert rel_err(c.modules["conv_in"].delta(), 0.5 * dense_ref(a1.modules["conv_in"])) < RTOL
    assert rel_err(c.modules["embed_tokens"].delta(), -2.0 * dense_ref(a3.modules["embed_tokens"])) < RTOL
    ref_q = 0.5 * dense_ref(a1.modules["layers.0.q_proj"]) + 0.25 * dense_ref(a2.modules["layers.0.q_proj"])
    assert rel_err(c.modules["layers.0.q_proj"].delta(), ref_q) < RTOL
    assert c.modules["conv_in"].rank == a1.modules["conv_in"].rank


def test_combine_opposite_weights_cancel() -> None:
    g = torch.Generator().manual_seed(8)
    a = rand_adapter(g, ["layers.0.down_proj"])
    c = combine([a, a], [1.0, -1.0], dtype=torch.float64)
    d = c.modules["layers.0.down_proj"].delta(torch.float64)
    assert float(d.abs().max()) < 1e-12 * float(np.abs(dense_ref(a.modules["layers.0.down_proj"])).max())


def test_combine_identical_adapters_scale_linearly() -> None:
    # PEFT 'linear' gets this wrong (0.98 rel. error for two identical adapters); the exact sum must not.
    g = torch.Generator().manual_seed(9)
    a = rand_adapter(g, ["layers.0.q_proj"])
    c = combine([a, a], [0.5, 0.5])
    assert rel_err(c.modules["layers.0.q_proj"].delta(), dense_ref(a.modules["layers.0.q_proj"])) < RTOL


def test_combine_rejects_shape_kind_transpose_mismatch() -> None:
    g = torch.Generator().manual_seed(10)
    base = rand_module(g, ((6, 4), False, "linear"), 2, 1.0)
    bad_shape = rand_module(g, ((4, 6), False, "linear"), 2, 1.0)
    bad_kind = replace(base, kind="embedding")
    bad_t = LoraModule(torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g), 1.0, (6, 4), transposed=True)
    for other, what in ((bad_shape, "weight shape"), (bad_kind, "kind"), (bad_t, "transposed")):
        with pytest.raises(ShapeMismatchError, match=rf"'fc'.*{what}|{what}") as ei:
            combine([LoraAdapter({"fc": base}), LoraAdapter({"fc": other})], [1.0, 1.0])
        assert "'fc'" in str(ei.value)
    # also a ValueError for callers that do not know adapterbank
    with pytest.raises(ValueError):
        combine([LoraAdapter({"fc": base}), LoraAdapter({"fc": bad_shape})], [1.0, 0.0])


def test_combine_rejects_bad_weights_and_counts() -> None:
    g = torch.Generator().manual_seed(11)
    a = rand_adapter(g, ["layers.0.q_proj"])
    with pytest.raises(ShapeMismatchError, match="2 adapters but 1 weights"):
        combine([a, a], [1.0])
    with pytest.raises(ShapeMismatchError, match="at least one"):
        combine([], [])
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(NonFiniteError, match="finite"):
            combine([a, a], [0.5, bad])


def test_combine_refuses_different_base_models() -> None:
    g = torch.Generator().manual_seed(12)
    a = rand_adapter(g, ["layers.0.q_proj"], base="llama-a")
    b = rand_adapter(g, ["layers.0.q_proj"], base="llama-b")
    with pytest.raises(BaseModelMismatchError, match="llama-a.*llama-b"):
        combine([a, b], [0.5, 0.5])
    forced = combine([a, b], [0.5, 0.5], check_base_model=False)
    assert forced.base_model is None  # no single base to record
    unknown = rand_adapter(g, ["layers.0.q_proj"], base=None)
    assert combine([a, unknown], [0.5, 0.5]).base_model == "llama-a"


def test_combine_does_not_mutate_inputs() -> None:
    g = torch.Generator().manual_seed(13)
    a = rand_adapter(g, ["layers.0.q_proj", "conv_in"])
    before = {k: (m.A.clone(), m.B.clone(), m.scale) for k, m in a.modules.items()}
    combine([a, a], [2.0, -3.0])
    for k, m in a.modules.items():
        assert torch.equal(m.A, before[k][0]) and torch.equal(m.B, before[k][1]) and m.scale == before[k][2]


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_upcast(dt: torch.dtype) -> None:
    g = torch.Generator().manual_seed(14)
    spec = MODULE_SPECS["layers.0.down_proj"]
    adapters = [LoraAdapter({"m": rand_module(g, spec, r, lora_scale(8, r), dtype=dt)}) for r in (2, 5, 3)]
    weights = [0.3, -1.1, 0.8]
    ref = weighted_ref(adapters, weights)["m"]  # the half-precision values, exactly, in float64
    # delta() of a half module computes in float32
    m0 = adapters[0].modules["m"]
    assert m0.delta().dtype == torch.float32
    assert rel_err(m0.delta(), dense_ref(m0)) < RTOL
    # combine to float32: exact w.r.t. the half inputs
    c32 = combine(adapters, weights, dtype=torch.float32)
    assert c32.modules["m"].A.dtype == torch.float32
    assert rel_err(c32.modules["m"].delta(), ref) < RTOL
    # combine stored in half: computed in fp32, only the final cast rounds
    ch = combine(adapters, weights, dtype=dt)
    assert ch.modules["m"].A.dtype == dt and ch.modules["m"].B.dtype == dt
    assert rel_err(ch.modules["m"].delta(), ref) < 2e-2
    # truncate keeps the storage dtype and computes in fp32
    t, err = truncate(c32.to(dt), 10)
    assert t.modules["m"].A.dtype == dt
    assert err["m"] == 0.0 and rel_err(t.modules["m"].delta(), ref) < 2e-2


# ----------------------------------------------------------------------------------------------------
# truncate (QR of the factors + SVD of the small core)
# ----------------------------------------------------------------------------------------------------
def svd_ref(mat: np.ndarray, r: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Dense rank-r approximation, its relative error, and the singular values (numpy reference)."""
    u, s, vh = np.linalg.svd(mat, full_matrices=False)
    approx = (u[:, :r] * s[:r]) @ vh[:r]
    err = float(np.linalg.norm(mat - approx) / np.linalg.norm(mat))
    return approx, err, s


def prescribed_module(
    g: torch.Generator, n_out: int, n_in: int, sv: list[float], scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> LoraModule:
    """ΔW with the given singular values, hidden behind non-orthogonal, badly scaled factors."""
    R = len(sv)
    u, _ = torch.linalg.qr(torch.randn(n_out, R, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n_in, R, generator=g, dtype=torch.float64))
    mix = torch.randn(R, R, generator=g, dtype=torch.float64) + 3 * torch.eye(R, dtype=torch.float64)
    B = (u * torch.tensor(sv, dtype=torch.float64)) @ mix / scale  # (n_out, R)
    A = torch.linalg.solve(mix, v.T)  # (R, n_in)
    return LoraModule(A.to(dtype), B.to(dtype), scale, (n_out, n_in))


@pytest.mark.parametrize("name", sorted(MODULE_SPECS))
def test_truncate_matches_dense_svd_random(name: str) -> None:
    """A rank-R combination truncated to r: the error and the truncated ΔW equal the dense SVD's."""
    g = torch.Generator().manual_seed(15)
    spec = MODULE_SPECS[name]
    adapters = [LoraAdapter({name: rand_module(g, spec, r, lora_scale(16, r, rslora=r % 2 == 0))}) for r in (3, 4, 5)]
    c = combine(adapters, [0.9, -0.5, 0.3])
    m = c.modules[name]
    ref_dense = weighted_ref(adapters, [0.9, -0.5, 0.3])[name]
    mat = as_matrix(ref_dense, m)
    for r in (1, 4, 7):  # all ≤ min(n_out, n_in) of every spec; above that see the test below
        t, err = truncate(c, r)
        tm = t.modules[name]
        approx, ref_err, s = svd_ref(mat, r)
        assert tm.rank == r and tm.scale == 1.0
        assert (tm.weight_shape, tm.transposed, tm.kind) == (m.weight_shape, m.transposed, m.kind)
        assert err[name] == pytest.approx(ref_err, rel=RTOL)
        assert np.linalg.norm(as_matrix(tm.delta(torch.float64).numpy(), tm) - mat) / np.linalg.norm(mat) == (
            pytest.approx(ref_err, rel=1e-4)
        )
        gap = (s[r - 1] - s[r]) / s[0]
        assert gap > 1e-3, "reference singular values must be separated for a unique rank-r approximation"
        assert rel_err(as_matrix(tm.delta(torch.float64).numpy(), tm), approx) < RTOL


def test_truncate_rank_between_matrix_rank_and_factor_rank() -> None:
    """conv_in: n_out = 8 < R = 12. Any rank in 9..11 keeps the whole (rank ≤ 8) ΔW: exact, error 0."""
    g = torch.Generator().manual_seed(25)
    spec = MODULE_SPECS["conv_in"]
    adapters = [LoraAdapter({"c": rand_module(g, spec, r, 1.0)}) for r in (5, 7)]
    c = combine(adapters, [1.0, -0.5])
    ref = weighted_ref(adapters, [1.0, -0.5])["c"]
    for r in (9, 11):
        t, err = truncate(c, r)
        assert err["c"] < 1e-6
        assert t.modules["c"].rank <= 8
        assert rel_err(t.modules["c"].delta(), ref) < RTOL


def test_truncate_prescribed_spectrum_float64() -> None:
    g = torch.Generator().manual_seed(16)
    sv = [9.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1]
    m = prescribed_module(g, 40, 30, sv, scale=2.5, dtype=torch.float64)
    a = LoraAdapter({"fc": m})
    mat = dense_ref(m)
    s_np = np.linalg.svd(mat, compute_uv=False)
    np.testing.assert_allclose(s_np[: len(sv)], sv, rtol=1e-5)
    for r in range(1, len(sv)):
        t, err = truncate(a, r, dtype=torch.float64)
        approx, ref_err, _ = svd_ref(mat, r)
        expected = math.sqrt(sum(x * x for x in sv[r:]) / sum(x * x for x in sv))
        assert ref_err == pytest.approx(expected, rel=1e-5)
        assert err["fc"] == pytest.approx(ref_err, rel=1e-9)
        assert rel_err(t.modules["fc"].delta(torch.float64), approx) < 1e-9


def test_truncate_small_error_is_accurate() -> None:
    """A tail that holds 1e-6 of the energy: the reported error must not drown in cancellation."""
    g = torch.Generator().manual_seed(17)
    m = prescribed_module(g, 64, 48, [10.0, 7.0, 4.0, 1e-2])
    _, err = truncate(LoraAdapter({"fc": m}), 3)
    _, ref_err, _ = svd_ref(dense_ref(m), 3)
    assert ref_err == pytest.approx(1e-2 / math.sqrt(100 + 49 + 16 + 1e-4), rel=1e-3)
    assert err["fc"] == pytest.approx(ref_err, rel=1e-3)


def test_truncate_rank_at_or_above_current_is_exact() -> None:
    g = torch.Generator().manual_seed(18)
    a = rand_adapter(g, sorted(MODULE_SPECS))
    top = max(a.ranks.values())
    for r in (top, top + 1, 100):
        t, err = truncate(a, r)
        assert set(err.values()) == {0.0}
        for name, m in t.modules.items():
            assert torch.equal(m.delta(), a.modules[name].delta())


def test_truncate_to_exact_rank_of_a_deficient_combination() -> None:
    # Two copies of one rank-3 adapter make a rank-6 factorisation of a rank-3 ΔW: truncating to 3 is exact.
    g = torch.Generator().manual_seed(19)
    a = rand_adapter(g, ["layers.0.down_proj"])
    r0 = a.modules["layers.0.down_proj"].rank
    c = combine([a, a], [0.25, 0.75])
    assert c.modules["layers.0.down_proj"].rank == 2 * r0
    t, err = truncate(c, r0)
    assert err["layers.0.down_proj"] < 1e-3
    assert rel_err(t.modules["layers.0.down_proj"].delta(), dense_ref(a.modules["layers.0.down_proj"])) < 1e-4


def test_truncate_zero_module() -> None:
    z = LoraModule(torch.zeros(6, 9), torch.zeros(7, 6), 1.0, (7, 9))
    t, err = truncate(LoraAdapter({"z": z}), 2)
    assert err == {"z": 0.0}
    d = t.modules["z"].delta()
    assert torch.isfinite(d).all() and float(d.abs().max()) == 0.0
    assert t.modules["z"].rank <= 2


def test_truncate_rejects_bad_rank() -> None:
    a = LoraAdapter({"fc": LoraModule(torch.ones(2, 3), torch.ones(4, 2), 1.0, (4, 3))})
    for bad in (0, -1, 2.5, True, "2"):
        with pytest.raises(ParameterError, match="'rank' parameter of truncate"):
            truncate(a, bad)  # type: ignore[arg-type]


def test_truncate_keeps_metadata_and_base() -> None:
    g = torch.Generator().manual_seed(20)
    a = rand_adapter(g, ["layers.0.q_proj"], base="tiny")
    a.metadata["note"] = "x"
    t, _ = truncate(a, 1)
    assert t.base_model == "tiny" and t.metadata == {"note": "x"}


# ----------------------------------------------------------------------------------------------------
# merge_into (W ← W0 + ΔW)
# ----------------------------------------------------------------------------------------------------
def _base_sd(g: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sd = {f"{n}.weight": torch.randn(*MODULE_SPECS[n][0], generator=g).to(dtype) for n in MODULE_SPECS}
    sd["untouched.bias"] = torch.randn(5, generator=g).to(dtype)
    return sd


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_merge_into_matches_dense_addition_and_keeps_dtype(dt: torch.dtype) -> None:
    g = torch.Generator().manual_seed(21)
    sd = _base_sd(g, dt)
    orig = {k: v.clone() for k, v in sd.items()}
    a = combine([rand_adapter(g, sorted(MODULE_SPECS)), rand_adapter(g, sorted(MODULE_SPECS))], [0.6, -0.4])
    out = merge_into(sd, a)
    assert set(out) == set(sd)
    assert out["untouched.bias"] is sd["untouched.bias"]
    for name, m in a.modules.items():
        k = f"{name}.weight"
        assert out[k].dtype == dt and tuple(out[k].shape) == m.weight_shape
        ref = sd[k].double().numpy() + dense_ref(m)
        if dt in (torch.float32, torch.float64):
            assert rel_err(out[k], ref) < (1e-12 if dt == torch.float64 else 1e-6)
        else:  # one rounding to half precision of the fp32 sum
            ulp = 2.0 ** -8 if dt == torch.bfloat16 else 2.0 ** -11
            diff = np.abs(out[k].double().numpy() - ref)
            assert np.all(diff <= ulp * np.abs(ref) + 1e-6)
            assert not torch.equal(out[k], sd[k])
        assert torch.equal(sd[k], orig[k])  # the input state dict is not modified


def test_merge_into_half_adapter_on_half_base() -> None:
    g = torch.Generator().manual_seed(22)
    sd = _base_sd(g, torch.bfloat16)
    a = rand_adapter(g, ["layers.0.q_proj", "conv_in"]).to(torch.bfloat16)
    out = merge_into(sd, a)
    for name, m in a.modules.items():
        ref = sd[f"{name}.weight"].double().numpy() + dense_ref(m)
        assert out[f"{name}.weight"].dtype == torch.bfloat16
        assert rel_err(out[f"{name}.weight"], ref) < 1e-2


def test_merge_into_missing_key_and_shape_errors() -> None:
    g = torch.Generator().manual_seed(23)
    sd = _base_sd(g, torch.float32)
    a = rand_adapter(g, ["layers.0.q_proj"])
    missing = LoraAdapter({"nope": a.modules["layers.0.q_proj"]})
    with pytest.raises(ShapeMismatchError, match=r"'nope\.weight'.*'nope'"):
        merge_into(sd, missing)
    assert merge_into(sd, missing, strict=False).keys() == sd.keys()
    sd_bad = dict(sd, **{"layers.0.q_proj.weight": torch.zeros(16, 24)})
    with pytest.raises(ShapeMismatchError, match=r"\(16, 24\).*\(24, 16\)"):
        merge_into(sd_bad, a)


def test_merge_into_custom_key() -> None:
    g = torch.Generator().manual_seed(24)
    m = rand_module(g, MODULE_SPECS["layers.0.q_proj"], 3, 2.0)
    sd = {"model.q.w": torch.randn(24, 16, generator=g)}
    out = merge_into(sd, LoraAdapter({"q": m}), key=lambda n: f"model.{n}.w")
    assert rel_err(out["model.q.w"], sd["model.q.w"].double().numpy() + dense_ref(m)) < 1e-6



# ------------------------------------------------------------------ GRASP residual modules (no ΔW)


def residual_ref(x: torch.Tensor, mods: list[ResidualModule], w: list[float]) -> torch.Tensor:
    """Σ_i w_i s_i U_i φ(D_i x), φ = GELU (erf), one module at a time in float64."""
    return sum(wi * m.scale * (torch.nn.functional.gelu(x @ m.D.double().T) @ m.U.double().T)
               for wi, m in zip(w, mods, strict=True))


def test_residual_module_combines_exactly_by_concatenation() -> None:
    g = torch.Generator().manual_seed(21)
    mods = [ResidualModule(torch.randn(r, 5, generator=g), torch.randn(7, r, generator=g), s, channel_dim=1)
            for r, s in ((2, 0.5), (3, 2.0), (1, -1.0))]
    w = [0.7, -0.4, 0.0]
    adapters = [LoraAdapter({"ff": m, **({"other": mods[0]} if i == 0 else {})}) for i, m in enumerate(mods)]
    c = combine(adapters, w, dtype=torch.float64)
    m = c.modules["ff"]
    assert isinstance(m, ResidualModule) and m.rank == 5 and m.scale == 1.0  # zero weight dropped
    assert (m.activation, m.channel_dim) == ("gelu", 1)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    got = torch.nn.functional.gelu(x @ m.D.T) @ m.U.T
    torch.testing.assert_close(got, residual_ref(x, mods, w), rtol=1e-12, atol=1e-12)
    assert c.modules["other"].rank == 2 and c.n_params == sum(t.numel() for t in (m.D, m.U)) + mods[0].n_params
    assert not hasattr(m, "delta")
    half = c.to(torch.float32).modules["ff"]
    assert isinstance(half, ResidualModule) and half.D.dtype == torch.float32 and half.channel_dim == 1


def test_residual_module_is_refused_by_delta_operations_with_one_error() -> None:
    g = torch.Generator().manual_seed(22)
    res = ResidualModule(torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g), 1.0)
    a = LoraAdapter({"fc": rand_module(g, ((4, 4), False, "linear"), 2, 1.0), "blocks.0.ff": res})
    msgs = []
    for call, what in ((lambda: truncate(a, 1), "rank truncation by SVD"),
                       (lambda: merge_into({"fc.weight": torch.zeros(4, 4), "blocks.0.ff.weight": torch.zeros(4, 4)}, a),
                        "merging into base weights"),
                       (a.deltas, "deltas()")):
        with pytest.raises(UnsupportedAdapterError, match=r"Module 'blocks\.0\.ff' is a GRASP residual adapter") as ei:
            call()
        assert what in str(ei.value)
        msgs.append(str(ei.value).split(" so ")[0])
    assert len(set(msgs)) == 1
    assert isinstance(UnsupportedAdapterError("x"), ValueError)


def test_residual_module_checks_and_mismatches() -> None:
    g = torch.Generator().manual_seed(23)
    with pytest.raises(ShapeMismatchError, match="D \\(r, d_in\\) and U \\(d_out, r\\)"):
        ResidualModule(torch.randn(2, 4, generator=g), torch.randn(4, 3, generator=g), 1.0)
    with pytest.raises(NonFiniteError):
        ResidualModule(torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g), float("nan"))
    bad = ResidualModule(torch.full((1, 2), float("inf")), torch.ones(2, 1), 1.0)
    with pytest.raises(NonFiniteError, match="'?ff'?"):
        LoraAdapter({"ff": bad}).check_finite()
    base = ResidualModule(torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g), 1.0)
    for other, what in ((replace(base, channel_dim=1), "channel_dim"), (replace(base, activation="silu"), "activation"),
                        (ResidualModule(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), 1.0), "5 → 4"),
                        (LoraModule(base.D, base.U, 1.0, (4, 4)), "LoRA")):
        with pytest.raises(ShapeMismatchError, match=f"'ff' differs between adapters.*{what}|{what}.*GRASP"):
            combine([LoraAdapter({"ff": base}), LoraAdapter({"ff": other})], [1.0, 1.0])
