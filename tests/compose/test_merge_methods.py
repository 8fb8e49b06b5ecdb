"""Merge methods beside Eq. 6 (TIES, DARE, magnitude pruning): contract tests over the table, independent dense
references written from the papers' / mergekit's definitions, PEFT's ``add_weighted_adapter`` (``*_svd`` variants,
which apply the method to the dense deltas) on a tiny Llama, compose() and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

from adapterbank.bank import Bank
from adapterbank.compose import RECIPE_FILE, compose
from adapterbank.compose.merge_methods import MERGE_METHODS, get_merge_method, merge_adapters, module_seed
from adapterbank.errors import ParameterError, UnknownNameError, UnsupportedAdapterError
from adapterbank.formats import read_adapter
from adapterbank.lora import LoraAdapter, LoraModule, ResidualModule, combine
from adapterbank.prototypes import Prototype, PrototypeSpace

SPACE = PrototypeSpace("toy-encoder", "r1", "mean", False, 8)
TARGETS = ["q_proj", "o_proj", "down_proj"]  # min(n_out, n_in) = 32 on each: one full svd_rank for PEFT


# ------------------------------------------------------------------ independent dense references (float64, numpy)
def ref_trim(x: np.ndarray, density: float) -> np.ndarray:
    """Keep the ⌊ρ·n⌋ largest |x| (TIES 'trim'; mergekit sparsify 'magnitude')."""
    keep = int(density * x.size)
    if density >= 1:
        return x.copy()
    if keep == 0:
        return np.zeros_like(x)
    thr = np.sort(np.abs(x).ravel())[::-1][keep - 1]
    return np.where(np.abs(x) >= thr, x, 0.0)


def ref_ties_merge(tau: np.ndarray, w: np.ndarray, sign_method: str) -> np.ndarray:
    """Elect γ from the weighted trimmed deltas τ, then the weighted mean over the entries that agree with γ."""
    score = tau.sum(0) if sign_method == "total" else np.sign(tau).sum(0)
    gamma = np.where(score >= 0, 1.0, -1.0)
    out = np.zeros(tau.shape[1:])
    for idx in np.ndindex(*tau.shape[1:]):
        agree = [i for i in range(len(w)) if tau[(i, *idx)] != 0 and np.sign(tau[(i, *idx)]) == gamma[idx]]
        if agree:
            out[idx] = sum(tau[(i, *idx)] for i in agree) / sum(abs(w[i]) for i in agree)
    return out


def ref_method(method: str, deltas: np.ndarray, w: np.ndarray, masks: np.ndarray | None, **p: Any) -> np.ndarray:
    rho = p.get("density", 0.5)
    if method == "linear":
        return np.einsum("k,kij->ij", w, deltas)
    if method == "magnitude_prune":
        return sum(wi * ref_trim(d, rho) for wi, d in zip(w, deltas, strict=True))
    dropped = None if masks is None else masks * deltas / rho  # DARE: drop with prob 1−ρ, rescale 1/ρ
    if method == "dare_linear":
        return np.einsum("k,kij->ij", w, dropped)
    sparse = dropped if method == "dare_ties" else np.stack([ref_trim(d, rho) for d in deltas])
    return ref_ties_merge(w[:, None, None] * sparse, w, p.get("majority_sign_method", "total"))


def draw_masks(seed: int, k: int, shape: tuple[int, int], density: float) -> np.ndarray:
    """The Bernoulli masks as PEFT's random_pruning draws them after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return np.stack([torch.bernoulli(torch.full(shape, density)).numpy() for _ in range(k)]).astype(np.float64)


def random_case(seed: int, k: int = 4, shape: tuple[int, int] = (7, 9)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, *shape, generator=g, dtype=torch.float64), torch.tensor([0.5, -0.3, 0.6, 0.2][:k],
                                                                                  dtype=torch.float64)


# ------------------------------------------------------------------ the table's contract
@pytest.mark.parametrize("name", list(MERGE_METHODS))
def test_every_method_keeps_the_contract(name):
    """Shape, finite, deterministic (seeded), input untouched; density 1 makes the linear-type ones Eq. 6."""
    m = MERGE_METHODS[name]
    deltas, w = random_case(0)
    before = deltas.clone()
    eff = m.resolve({})
    a, b = m.fn(deltas, w, **eff), m.fn(deltas, w, **eff)
    assert a.shape == (7, 9) and bool(torch.isfinite(a).all()) and torch.equal(a, b)
    assert torch.equal(deltas, before)
    assert set(eff) == {p.name for p in m.params}
    if name in ("linear", "magnitude_prune", "dare_linear"):
        dense = m.fn(deltas, w, **m.resolve({"density": 1.0} if m.params else {}))
        assert torch.allclose(dense, torch.einsum("k,kij->ij", w, deltas), atol=1e-12)


@pytest.mark.parametrize("name", [n for n in MERGE_METHODS if n != "linear"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_methods_equal_independent_dense_reference(name, density, sign):
    deltas, w = random_case(int(density * 10))
    p: dict[str, Any] = {"density": density, "majority_sign_method": sign, "seed": 7}
    eff = MERGE_METHODS[name].resolve({k: v for k, v in p.items() if k in {q.name for q in MERGE_METHODS[name].params}})
    masks = draw_masks(7, 4, (7, 9), density) if name.startswith("dare") else None
    want = ref_method(name, deltas.numpy(), w.numpy(), masks, **p)
    got = MERGE_METHODS[name].fn(deltas, w, **eff).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.abs(want).sum() > 0


def test_ties_is_scale_free_in_the_weights_and_negative_weights_stay_finite():
    deltas, _ = random_case(3)
    ties = MERGE_METHODS["ties"].fn
    w = torch.tensor([0.2, 0.3, 0.1, 0.4], dtype=torch.float64)
    assert torch.allclose(ties(deltas, w, density=0.4), ties(deltas, 7 * w, density=0.4), atol=1e-12)
    got = ties(deltas, torch.tensor([1.5, -0.5, 0.25, -0.25], dtype=torch.float64), density=0.4)
    assert bool(torch.isfinite(got).all()) and float(got.abs().max()) < 10 * float(deltas.abs().max())


def test_parameters_are_checked_with_the_one_template():
    with pytest.raises(UnknownNameError, match="one of linear, ties"):
        get_merge_method("tie")
    with pytest.raises(UnknownNameError, match="Valid parameters: density, majority_sign_method"):
        MERGE_METHODS["ties"].resolve({"dens": 0.2})
    with pytest.raises(ParameterError, match="'density' parameter of merge method ties must be a number in"):
        MERGE_METHODS["ties"].resolve({"density": 0})
    with pytest.raises(ParameterError, match="Got 'abc' instead"):
        MERGE_METHODS["dare_linear"].resolve({"density": "abc"})
    with pytest.raises(UnknownNameError, match="one of total, frequency"):
        MERGE_METHODS["ties"].resolve({"majority_sign_method": "mass"})
    assert MERGE_METHODS["dare_ties"].resolve({"density": "0.25", "seed": "3"}) == {
        "density": 0.25, "majority_sign_method": "total", "seed": 3}


# ------------------------------------------------------------------ PEFT's add_weighted_adapter (*_svd: dense path)
@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory, tiny_llama, peft_adapter):
    """Three real PEFT LoRAs (mixed ranks, α, a module only some have) on a tiny Llama, loaded into one PeftModel."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("peft_merge")
    base = tiny_llama()
    cfgs: list[dict[str, Any]] = [{"r": 4, "lora_alpha": 8, "target_modules": TARGETS},
                                  {"r": 2, "lora_alpha": 4, "target_modules": TARGETS},
                                  {"r": 3, "lora_alpha": 9, "target_modules": ["q_proj", "o_proj"]}]
    paths = [peft_adapter(base, root / f"a{i}", seed=20 + i, **c) for i, c in enumerate(cfgs)]
    model = PeftModel.from_pretrained(tiny_llama(), paths[0], adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(p, adapter_name=f"a{i}")
    return model, paths


def _peft_dense(model: Any, name: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {k.removeprefix("base_model.model."): mod.get_delta_weight(name).double()
            for k, mod in model.named_modules() if isinstance(mod, LoraLayer) and name in mod.lora_A}


_PEFT_CASES = [  # (method, weights, sign): PEFT's ties elects the sign unweighted and divides by the count → weights 1
    ("ties", [1.0, 1.0, 1.0], "total"), ("ties", [1.0, 1.0, 1.0], "frequency"),
    ("dare_ties", [1.0, 1.0, 1.0], "total"), ("dare_ties", [1.0, 1.0, 1.0], "frequency"),
    ("magnitude_prune", [0.7, -0.2, 0.5], "total"), ("dare_linear", [0.7, -0.2, 0.5], "total"),
]


@pytest.mark.parametrize("method,weights,sign", _PEFT_CASES)
def test_dense_result_equals_peft_svd_variant(peft_setup, method, weights, sign, monkeypatch):
    """Full-rank svd_rank: PEFT's dense ΔW. DARE: the same Bernoulli draws — PEFT draws from the global RNG, module
    after module, after its adapter injection has consumed draws, so the RNG state at its first mask is recorded
    (a pass-through wrapper of peft's random_pruning) and our generator starts from that state."""
    import peft.utils.merge_utils as mu

    model, paths = peft_setup
    name = f"{method}_{sign}"
    states: list[torch.Tensor] = []
    original = mu.random_pruning

    def recording(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        states.append(torch.get_rng_state())
        return original(tensor, density, rescale)

    monkeypatch.setattr(mu, "random_pruning", recording)
    torch.manual_seed(1234)
    model.add_weighted_adapter(["a0", "a1", "a2"], weights, name, combination_type=f"{method}_svd", svd_rank=32,
                               density=0.3, majority_sign_method=sign)
    peft = _peft_dense(model, name)
    ours_w = [w / 3 for w in weights] if "ties" in method else weights  # our TIES is scale-free in w
    adapters = [read_adapter(p) for p in paths]
    fn, eff = MERGE_METHODS[method].fn, MERGE_METHODS[method].resolve({"density": 0.3} | (
        {"majority_sign_method": sign} if "ties" in method else {}))
    g = torch.Generator()  # PEFT draws module after module (named_modules order), one stream
    if method.startswith("dare"):
        g.set_state(states[0])
    for mod in peft:
        present = [(w, a.modules[mod]) for w, a in zip(ours_w, adapters, strict=True) if mod in a.modules]
        deltas = torch.stack([m.scale * (m.B @ m.A) for _, m in present])
        kw = {k: v for k, v in eff.items() if k != "seed"} | ({"generator": g} if method.startswith("dare") else {})
        got = fn(deltas, torch.tensor([w for w, _ in present]), **kw).double()
        assert float((got - peft[mod]).norm()) <= 1e-5 * float(peft[mod].norm()), mod
        assert float(peft[mod].norm()) > 0


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_truncated_result_equals_peft_truncated_svd(peft_setup, method):
    """Both keep the top-8 singular triplets of the same dense ΔW: the same rank-8 ΔW; ours reports the error."""
    model, paths = peft_setup
    w = [1.0, 1.0, 1.0]
    model.add_weighted_adapter(["a0", "a1", "a2"], w, f"{method}_r8", combination_type=f"{method}_svd",
                               svd_rank=8, density=0.4)
    peft = _peft_dense(model, f"{method}_r8")
    ours, errs = merge_adapters([read_adapter(p) for p in paths], [1 / 3] * 3 if method == "ties" else w, method,
                                {"density": 0.4}, rank=8)
    full, _ = merge_adapters([read_adapter(p) for p in paths], [1 / 3] * 3 if method == "ties" else w, method,
                             {"density": 0.4}, rank=64)
    for mod, want in peft.items():
        got = ours.modules[mod].delta(torch.float64)
        assert float((got - want).norm()) <= 1e-4 * float(want.norm()), mod
        dense = full.modules[mod].delta(torch.float64)
        assert errs[mod] == pytest.approx(float((dense - got).norm() / dense.norm()), rel=1e-3, abs=1e-6)
        assert ours.modules[mod].rank == 8 and errs[mod] > 0


def test_merge_adapters_default_rank_and_dare_seed_per_module(peft_setup):
    _, paths = peft_setup
    adapters = [read_adapter(p) for p in paths]
    out, errs = merge_adapters(adapters, [0.5, 0.3, 0.2], "dare_linear", {"density": 0.5, "seed": 5})
    q = "model.layers.0.self_attn.q_proj"
    down = "model.layers.1.mlp.down_proj"
    assert out.modules[q].rank == 4 + 2 + 3 and out.modules[down].rank == 4 + 2  # Σ r_i of the adapters present
    assert set(errs) == set(out.modules) and all(0 < e < 1 for e in errs.values())
    # the module's masks come from module_seed(seed, name): reproduce them by hand
    present = [(w, a.modules[q]) for w, a in zip([0.5, 0.3, 0.2], adapters, strict=True)]
    deltas = torch.stack([m.scale * (m.B @ m.A) for _, m in present])
    g = torch.Generator().manual_seed(module_seed(5, q))
    want = sum(w * d * torch.bernoulli(torch.full(d.shape, 0.5), generator=g) / 0.5
               for (w, _), d in zip(present, deltas, strict=True))
    _, s, _ = torch.linalg.svd(want.double())
    got = out.modules[q].delta(torch.float64)
    rel = float((got - want.double()).norm() / want.norm())
    assert rel == pytest.approx(float((s[9:] ** 2).sum().sqrt() / s.norm()), abs=1e-5)
    again, _ = merge_adapters(adapters, [0.5, 0.3, 0.2], "dare_linear", {"density": 0.5, "seed": 5})
    other, _ = merge_adapters(adapters, [0.5, 0.3, 0.2], "dare_linear", {"density": 0.5, "seed": 6})
    assert torch.equal(again.modules[q].A, out.modules[q].A)
    assert not torch.allclose(other.modules[q].delta(), out.modules[q].delta())


def test_residual_adapters_are_refused_by_name():
    res = LoraAdapter({"ff": ResidualModule(torch.ones(1, 2), torch.ones(2, 1), 1.0)})
    with pytest.raises(UnsupportedAdapterError, match="merge method 'ties'"):
        merge_adapters([res, res], [0.5, 0.5], "ties")


# ------------------------------------------------------------------ compose() and the CLI
@pytest.fixture(scope="module")
def bank(tmp_path_factory, peft_setup):
    _, paths = peft_setup
    root = tmp_path_factory.mktemp("merge_bank")
    b = Bank.init(root / "bank")
    rng = np.random.default_rng(1)
    for i, p in enumerate(paths):
        b.add(p, id=f"t{i}", prototype=Prototype(rng.normal(size=8), SPACE, n_samples=5, source=f"t{i}"))
    return b, root


def test_compose_ties_streams_refactors_and_records_the_recipe(bank, tmp_path):
    b, _ = bank
    target = Prototype(np.linspace(-1, 1, 8), SPACE, source="target")
    comp = compose(b, target, k=3, strategy="avg", merge="ties", merge_params={"density": 0.4})
    assert comp.merge == "ties" and comp.merge_params == {"density": 0.4, "majority_sign_method": "total"}
    adapters = [b.load_adapter(i) for i in comp.ids]
    want, _ = merge_adapters(adapters, comp.weights.tolist(), "ties", {"density": 0.4}, rank=64)
    for mod, m in comp.adapter.modules.items():
        dense = want.modules[mod].delta(torch.float64)
        rel = float((m.delta(torch.float64) - dense).norm() / dense.norm())
        assert rel == pytest.approx(comp.truncation_error[mod], abs=1e-5)
    out = comp.save(tmp_path / "c")
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["merge"] == {"method": "ties", "params": {"density": 0.4, "majority_sign_method": "total"}}
    assert set(recipe["truncation"]["per_module"]) == set(comp.adapter.modules)
    back = read_adapter(out)
    for mod, m in comp.adapter.modules.items():
        assert torch.allclose(back.modules[mod].delta(), m.delta(), atol=1e-6)


def test_compose_default_linear_is_eq6_unchanged(bank, tmp_path):
    b, _ = bank
    target = Prototype(np.linspace(-1, 1, 8), SPACE, source="target")
    comp = compose(b, target, k=3, strategy="lin")
    exact = combine([b.load_adapter(i) for i in comp.ids], comp.weights.tolist())
    assert comp.merge == "linear" and comp.truncation_error is None
    for mod, m in exact.modules.items():
        assert torch.equal(comp.adapter.modules[mod].A, m.A) and torch.equal(comp.adapter.modules[mod].B, m.B)
    assert comp.recipe()["merge"] == {"method": "linear", "params": {}}


def test_compose_refuses_bad_merge_before_reading_files(bank):
    b, _ = bank
    target = Prototype(np.zeros(8), SPACE, source="t")
    with pytest.raises(UnknownNameError, match="'merge' parameter of compose must be one of linear"):
        compose(b, target, merge="tie")
    with pytest.raises(ParameterError, match="density"):
        compose(b, target, merge="dare_ties", merge_params={"density": 1.5})


def test_cli_merge_and_merge_param(bank, tmp_path):
    b, _ = bank
    target = Prototype(np.linspace(-1, 1, 8), SPACE, source="target").save(tmp_path / "t.npy")
    res = _cli("compose", b.root, "--prototype", target, "-k", "3", "--strategy", "avg", "--merge", "dare_ties",
               "--merge-param", "density=0.5", "--merge-param", "seed=9", "--rank", "4", "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "merge dare_ties" in res.stdout and "re-factored at rank 4" in res.stdout
    recipe = json.loads((tmp_path / "out" / RECIPE_FILE).read_text())
    assert recipe["merge"] == {"method": "dare_ties", "params": {"density": 0.5, "majority_sign_method": "total",
                                                                  "seed": 9}}
    assert max(read_adapter(tmp_path / "out").ranks.values()) == 4
    bad = _cli("compose", b.root, "--prototype", target, "--merge", "ties", "--merge-param", "density",
               "-o", tmp_path / "bad")
    assert bad.returncode == 2 and "error: --merge-param must be NAME=VALUE" in bad.stderr
    bad = _cli("compose", b.root, "--prototype", target, "--merge", "tie", "-o", tmp_path / "bad")
    assert bad.returncode == 2 and "must be one of linear, ties, dare_linear" in bad.stderr
    assert not (tmp_path / "bad").exists()


def _cli(*args: Any) -> subprocess.CompletedProcess[str]:
    """The ``adapterbank`` command as users run it (a real subprocess; PYTHONPATH is inherited)."""
    return subprocess.run([sys.executable, "-m", "adapterbank.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, check=False)


def test_linear_module_stack_matches_combine_on_a_transposed_module():
    """The dense ΔW_i are stacked in matrix layout (n_out, n_in) and the result keeps the module's layout."""
    g = torch.Generator().manual_seed(0)
    mods = [LoraModule(torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g), 0.5, (5, 3), transposed=True)
            for _ in range(2)]
    ads = [LoraAdapter({"c": m}) for m in mods]
    got, errs = merge_adapters(ads, [0.3, 0.7], "magnitude_prune", {"density": 1.0})
    assert torch.allclose(got.modules["c"].delta(), combine(ads, [0.3, 0.7]).modules["c"].delta(), atol=1e-6)
    assert got.modules["c"].transposed and errs["c"] < 1e-6
