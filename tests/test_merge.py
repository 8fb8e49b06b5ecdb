"""merge_into_files: streamed W₀ + ΔW into a copy of a base model's safetensors, checked against
numpy float64 dense references, a reload with ``from_pretrained`` and the logits of the base model patched
in memory and of PEFT's (unmerged) runtime LoRA forward."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterbank import merge as merge_mod
from adapterbank.errors import FormatError, InvalidNameError, NonFiniteError, ShapeMismatchError, UnknownNameError
from adapterbank.lora import LoraAdapter, LoraModule
from adapterbank.merge import default_key, merge_into_files

R, ALPHA = 4, 8.0  # one rank/alpha so PEFT can hold the same adapter
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]


def dense_ref(m: LoraModule) -> np.ndarray:
    d = m.scale * (m.B.double().numpy() @ m.A.double().numpy())
    return (d.T if m.transposed else d).reshape(m.weight_shape)


def llama_adapter(model: Any, seed: int) -> LoraAdapter:
    """Random non-identity LoRA on every q/v/down projection, the embedding (transposed) and lm_head."""
    g = torch.Generator().manual_seed(seed)
    mods: dict[str, LoraModule] = {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in TARGETS:
            continue
        ws = tuple(mod.weight.shape)
        emb = leaf == "embed_tokens"
        n_out, n_in = (ws[1], ws[0]) if emb else ws
        mods[name] = LoraModule(
            A=torch.randn(R, n_in, generator=g) * 0.3, B=torch.randn(n_out, R, generator=g) * 0.3,
            scale=ALPHA / R, weight_shape=ws, transposed=emb, kind="embedding" if emb else "linear",
        )
    return LoraAdapter(mods, "tiny-llama")


def peft_model(base: Any, adapter: LoraAdapter) -> Any:
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    n_set = 0
    with torch.no_grad():
        for name, mod in pm.base_model.model.named_modules():
            if name in adapter.modules:
                m = adapter.modules[name]
                if m.kind == "embedding":
                    mod.lora_embedding_A["default"].copy_(m.A)
                    mod.lora_embedding_B["default"].copy_(m.B)
                else:
                    mod.lora_A["default"].weight.copy_(m.A)
                    mod.lora_B["default"].weight.copy_(m.B)
                n_set += 1
    assert n_set == len(adapter.modules)
    return pm.eval()


def patched_in_memory(base: Any, adapter: LoraAdapter) -> Any:
    """The base model with the dense numpy ΔW added to its parameters — independent of adapterbank."""
    m = copy.deepcopy(base)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, mod in adapter.modules.items():
            p = params[f"{name}.weight"]
            p.copy_(torch.from_numpy(p.double().numpy() + dense_ref(mod)).to(p.dtype))
    return m.eval()


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def base_model(tiny_llama: Callable[[int], Any]) -> Any:
    return tiny_llama(0)


@pytest.fixture(scope="module")
def saved(base_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    base_model.save_pretrained(root / "single")
    base_model.save_pretrained(root / "sharded", max_shard_size="20KB")
    copy.deepcopy(base_model).to(torch.bfloat16).save_pretrained(root / "bf16")
    return {"single": root / "single", "sharded": root / "sharded", "bf16": root / "bf16"}


def dir_tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_merge_matches_dense_reload_and_logits(layout: str, saved: dict[str, Path], base_model: Any,
                                               tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    adapter = llama_adapter(base_model, seed=1)
    out = tmp_path / "merged"
    rep = merge_into_files(saved[layout], adapter, out)

    # the same files, the same tensor names, config copied
    src_files = sorted(p.name for p in saved[layout].iterdir())
    assert sorted(p.name for p in out.iterdir()) == src_files
    assert rep["modules_merged"] == len(adapter.modules) == 8  # 2 layers × (q, v, down) + embed + lm_head
    if layout == "sharded":
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
        idx_in = json.loads((saved[layout] / "model.safetensors.index.json").read_text())
        idx_out = json.loads((out / "model.safetensors.index.json").read_text())
        assert idx_out["weight_map"] == idx_in["weight_map"]
        assert idx_out["metadata"]["total_size"] == idx_in["metadata"]["total_size"] == rep["bytes"]
    assert json.loads((out / "config.json").read_text()) == json.loads((saved[layout] / "config.json").read_text())

    # tensors: W0 + ΔW (numpy float64 reference) on the targets, bit-identical elsewhere
    w0, w1 = dir_tensors(saved[layout]), dir_tensors(out)
    assert w1.keys() == w0.keys() and rep["tensors"] == len(w0)
    for k, t in w0.items():
        mod = k.removesuffix(".weight")
        if mod in adapter.modules:
            ref = t.double().numpy() + dense_ref(adapter.modules[mod])
            np.testing.assert_allclose(w1[k].double().numpy(), ref, rtol=1e-6, atol=1e-6)
            assert not torch.equal(w1[k], t)
            assert rep["keys"][mod] == k
            assert rep["delta_fro"][mod] == pytest.approx(float(np.linalg.norm(dense_ref(adapter.modules[mod]))),
                                                          rel=1e-5)
            assert rep["delta_max_abs"][mod] == pytest.approx(float(np.abs(dense_ref(adapter.modules[mod])).max()),
                                                              rel=1e-5)
        else:
            assert torch.equal(w1[k], t), k

    # reload: from_pretrained sees the merged weights; logits equal the in-memory patched base and PEFT
    merged = LlamaForCausalLM.from_pretrained(out).eval()
    sd = merged.state_dict()
    for name, m in adapter.modules.items():
        ref = base_model.state_dict()[f"{name}.weight"].double().numpy() + dense_ref(m)
        np.testing.assert_allclose(sd[f"{name}.weight"].double().numpy(), ref, rtol=1e-6, atol=1e-6)
    ids = torch.randint(0, base_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    got = logits(merged, ids)
    torch.testing.assert_close(got, logits(patched_in_memory(base_model, adapter), ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, logits(peft_model(base_model, adapter), ids), rtol=1e-4, atol=1e-4)
    assert (got - logits(base_model, ids)).abs().max() > 1e-2  # the adapter does change the model


def test_empty_adapter_copies_bytes_exactly(saved: dict[str, Path], tmp_path: Path) -> None:
    """The streaming writer reproduces safetensors' own layout byte for byte."""
    for layout in ("single", "sharded", "bf16"):
        out = tmp_path / layout
        rep = merge_into_files(saved[layout], LoraAdapter({}), out)
        assert rep["modules_merged"] == 0
        for p in saved[layout].glob("*.safetensors"):
            assert (out / p.name).read_bytes() == p.read_bytes(), (layout, p.name)


def test_single_file_base(saved: dict[str, Path], base_model: Any, tmp_path: Path) -> None:
    adapter = llama_adapter(base_model, seed=2)
    rep = merge_into_files(saved["single"] / "model.safetensors", adapter, tmp_path / "o")
    assert sorted(os.listdir(tmp_path / "o")) == ["model.safetensors"] and rep["copied"] == []
    got = load_file(tmp_path / "o" / "model.safetensors")
    k = "model.layers.1.self_attn.q_proj"
    ref = base_model.state_dict()[f"{k}.weight"].double().numpy() + dense_ref(adapter.modules[k])
    np.testing.assert_allclose(got[f"{k}.weight"].double().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_bf16_base_keeps_dtype(saved: dict[str, Path], base_model: Any, tmp_path: Path) -> None:
    adapter = llama_adapter(base_model, seed=3)
    merge_into_files(saved["bf16"], adapter, tmp_path / "o")
    w0, w1 = dir_tensors(saved["bf16"]), dir_tensors(tmp_path / "o")
    assert {t.dtype for t in w1.values()} == {torch.bfloat16}
    for name, m in adapter.modules.items():
        k = f"{name}.weight"
        ref = w0[k].double().numpy() + dense_ref(m)
        diff = np.abs(w1[k].double().numpy() - ref)
        assert np.all(diff <= 2.0**-8 * np.abs(ref) + 1e-30), name  # one bf16 rounding of the fp32 sum


def test_dtype_cast_output(saved: dict[str, Path], base_model: Any, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    adapter = llama_adapter(base_model, seed=4)
    rep = merge_into_files(saved["sharded"], adapter, tmp_path / "o", dtype="bfloat16")
    assert rep["dtype"] == "torch.bfloat16"
    w0, w1 = dir_tensors(saved["sharded"]), dir_tensors(tmp_path / "o")
    assert {t.dtype for t in w1.values()} == {torch.bfloat16}
    for k, t in w0.items():
        mod = k.removesuffix(".weight")
        ref = t.double().numpy() + (dense_ref(adapter.modules[mod]) if mod in adapter.modules else 0.0)
        assert np.all(np.abs(w1[k].double().numpy() - ref) <= 2.0**-8 * np.abs(ref) + 1e-30), k
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    idx = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == rep["bytes"] == sum(t.numel() * 2 for t in w1.values())
    assert LlamaForCausalLM.from_pretrained(tmp_path / "o").dtype == torch.bfloat16
    with pytest.raises(UnknownNameError, match="'dtype' parameter.*int8"):
        merge_into_files(saved["single"], adapter, tmp_path / "o2", dtype="int8")


def test_unknown_module_leaves_nothing_behind(saved: dict[str, Path], base_model: Any, tmp_path: Path) -> None:
    adapter = llama_adapter(base_model, seed=5)
    m = next(iter(adapter.modules.values()))
    bad = LoraAdapter(dict(adapter.modules, **{"model.layers.7.self_attn.q_proj": m}))
    for layout in ("single", "sharded"):
        out = tmp_path / f"o-{layout}"
        with pytest.raises(ShapeMismatchError, match=r"'model\.layers\.7\.self_attn\.q_proj'.*'model\.layers\.7\."):
            merge_into_files(saved[layout], bad, out)
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_shape_mismatch_names_tensor(saved: dict[str, Path], tmp_path: Path) -> None:
    m = LoraModule(torch.ones(2, 32), torch.ones(64, 2), 1.0, (64, 32))  # q_proj is (32, 32)
    with pytest.raises(ShapeMismatchError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight'.*\(32, 32\).*\(64, 32\)"):
        merge_into_files(saved["single"], LoraAdapter({"model.layers.0.self_attn.q_proj": m}), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_failure_mid_write_leaves_nothing_behind(saved: dict[str, Path], base_model: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = llama_adapter(base_model, seed=6)
    calls = {"n": 0}
    real = merge_mod._merged_tensor

    def flaky(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:  # several shards are already written by now
            raise OSError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(merge_mod, "_merged_tensor", flaky)
    with pytest.raises(OSError, match="simulated"):
        merge_into_files(saved["sharded"], adapter, tmp_path / "o")
    assert calls["n"] == 5
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_non_finite_adapter_refused_before_writing(saved: dict[str, Path], base_model: Any, tmp_path: Path) -> None:
    adapter = llama_adapter(base_model, seed=7)
    m = adapter.modules["lm_head"]
    A = m.A.clone()
    A[0, 0] = float("nan")
    adapter.modules["lm_head"] = LoraModule(A, m.B, m.scale, m.weight_shape)
    with pytest.raises(NonFiniteError, match="lm_head"):
        merge_into_files(saved["single"], adapter, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_out_dir_rules(saved: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    merge_into_files(saved["single"], LoraAdapter({}), tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="not empty"):
        merge_into_files(saved["single"], LoraAdapter({}), tmp_path / "empty")
    with pytest.raises(FileExistsError):
        merge_into_files(saved["single"], LoraAdapter({}), saved["single"])  # never into the base itself


def test_copies_small_files_not_other_weights(saved: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(saved["single"], base)
    (base / "tokenizer_config.json").write_text("{}")
    (base / "pytorch_model.bin").write_bytes(b"stale unmerged weights")
    (base / ".hidden").write_text("x")
    (base / "sub").mkdir()
    rep = merge_into_files(base, LoraAdapter({}), tmp_path / "o")
    assert sorted(rep["copied"]) == ["config.json", "generation_config.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path / "o")) == sorted(rep["copied"] + ["model.safetensors"])


def test_ambiguous_or_broken_bases(saved: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    two = tmp_path / "two"
    two.mkdir()
    save_file({"a.weight": torch.zeros(2)}, two / "x.safetensors")
    save_file({"a.weight": torch.zeros(2)}, two / "y.safetensors")
    with pytest.raises(FormatError, match="several weight sets"):
        merge_into_files(two, LoraAdapter({}), tmp_path / "o")
    save_file({"a.weight": torch.zeros(2)}, two / "model.safetensors")  # the standard name wins
    assert merge_into_files(two, LoraAdapter({}), tmp_path / "o")["files"] == ["model.safetensors"]

    none = tmp_path / "none"
    none.mkdir()
    (none / "config.json").write_text("{}")
    with pytest.raises(FormatError, match="no .safetensors"):
        merge_into_files(none, LoraAdapter({}), tmp_path / "o2")
    with pytest.raises(FormatError, match="do not exist"):
        merge_into_files(tmp_path / "missing", LoraAdapter({}), tmp_path / "o2")

    bad = tmp_path / "bad"
    shutil.copytree(saved["sharded"], bad)
    idx = json.loads((bad / "model.safetensors.index.json").read_text())
    idx["weight_map"]["lm_head.weight"] = "../escape.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(InvalidNameError, match="escape"):
        merge_into_files(bad, LoraAdapter({}), tmp_path / "o3")
    idx["weight_map"]["lm_head.weight"] = "model-00001-of-00007.safetensors"  # does not hold it
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FormatError, match="'lm_head.weight'"):
        merge_into_files(bad, LoraAdapter({}), tmp_path / "o3")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists() and leftovers(tmp_path) == []


def test_custom_key(tmp_path: Path) -> None:
    save_file({"blk.w": torch.zeros(3, 2)}, tmp_path / "m.safetensors")
    g = torch.Generator().manual_seed(8)
    m = LoraModule(torch.randn(1, 2, generator=g), torch.randn(3, 1, generator=g), 2.0, (3, 2))
    merge_into_files(tmp_path / "m.safetensors", LoraAdapter({"blk": m}), tmp_path / "o", key=lambda n: f"{n}.w")
    np.testing.assert_allclose(load_file(tmp_path / "o" / "m.safetensors")["blk.w"].numpy(), dense_ref(m), rtol=1e-6)


def tiny_unet(cross_attention_dim: int) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=2,
    ).eval()


def test_diffusers_component_folder(tmp_path: Path) -> None:
    """`unet.`-prefixed module paths merge into a UNet folder; conv 3×3 and attention projections."""
    from diffusers import UNet2DConditionModel

    unet = tiny_unet(8)
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    g = torch.Generator().manual_seed(9)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    mods = {
        "unet.conv_in": LoraModule(torch.randn(3, 4 * 9, generator=g), torch.randn(8, 3, generator=g), 0.5,
                                   (8, 4, 3, 3), kind="conv"),
        f"unet.{q}": LoraModule(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 1.5, (8, 8)),
    }
    adapter = LoraAdapter(mods, "tiny-unet")
    rep = merge_into_files(tmp_path / "pipe" / "unet", adapter, tmp_path / "out" / "unet")
    assert rep["keys"] == {"unet.conv_in": "conv_in.weight", f"unet.{q}": f"{q}.weight"}
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").eval()
    sd0, sd1 = unet.state_dict(), merged.state_dict()
    for name, m in mods.items():
        k = rep["keys"][name]
        np.testing.assert_allclose(sd1[k].double().numpy(), sd0[k].double().numpy() + dense_ref(m),
                                   rtol=1e-6, atol=1e-6)
    untouched = [k for k in sd0 if k not in rep["keys"].values()]
    assert all(torch.equal(sd0[k], sd1[k]) for k in untouched)
    # a module of another component does not silently vanish
    te = LoraAdapter({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": mods[f"unet.{q}"]})
    with pytest.raises(ShapeMismatchError, match="text_encoder"):
        merge_into_files(tmp_path / "pipe" / "unet", te, tmp_path / "out2")


def test_default_key_prefers_the_unstripped_name() -> None:
    keys = frozenset({"model.layers.0.q.weight", "layers.0.q.weight"})
    assert default_key("model.layers.0.q", keys, component="model") == "model.layers.0.q.weight"
    assert default_key("unet.x", frozenset(), component="unet") == "unet.x.weight"  # not found: reported as is


def test_streams_one_tensor_at_a_time(saved: dict[str, Path], base_model: Any, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """No more than one base tensor is alive at a time: each is dropped before the next is read."""
    import weakref

    live: list[weakref.ref[torch.Tensor]] = []
    peak = {"n": 0}
    real_open = merge_mod.safe_open

    class Spy:
        def __init__(self, *a: Any, **k: Any) -> None:
            self._cm = real_open(*a, **k)

        def __enter__(self) -> Spy:
            self._f = self._cm.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            return self._cm.__exit__(*exc)

        def get_tensor(self, k: str) -> torch.Tensor:
            t = self._f.get_tensor(k)
            live[:] = [r for r in live if r() is not None]
            peak["n"] = max(peak["n"], len(live) + 1)
            live.append(weakref.ref(t))
            return t

    monkeypatch.setattr(merge_mod, "safe_open", Spy)
    merge_into_files(saved["single"], llama_adapter(base_model, seed=10), tmp_path / "o")
    assert peak["n"] == 1
    with safe_open(tmp_path / "o" / "model.safetensors", "pt") as f:
        assert len(list(f.keys())) == len(base_model.state_dict())


def test_residual_adapter_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A GRASP residual module (y = FFN(x) + B φ(A x)) has no ΔW: merging it would be silently wrong."""
    from adapterbank.errors import OutputExistsError, UnsupportedAdapterError

    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    from adapterbank.lora import ResidualModule

    res = LoraAdapter({"fc": ResidualModule(torch.ones(1, 2), torch.ones(2, 1), 1.0)})
    with pytest.raises(UnsupportedAdapterError, match="Module 'fc' is a GRASP residual adapter"):
        merge_into_files(tmp_path, res, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    ok = LoraAdapter({"fc": LoraModule(torch.ones(1, 2), torch.ones(2, 1), 1.0, (2, 2))})
    with pytest.raises(OutputExistsError):
        merge_into_files(tmp_path / "model.safetensors", ok, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep"


# ------------------------------------------------------------------ real clients: transformers 5 ViT, diffusers


def vit_config() -> Any:
    from transformers import ViTConfig

    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16,
                     patch_size=8, num_labels=3)


def random_linear_adapter(model: Any, names: list[str], seed: int, prefix: str = "") -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for n in names:
        w = model.get_submodule(n).weight
        mods[prefix + n] = LoraModule(torch.randn(3, w.shape[1], generator=g) * 0.2,
                                      torch.randn(w.shape[0], 3, generator=g) * 0.2, 1.5, tuple(w.shape))
    return LoraAdapter(mods)


@pytest.mark.parametrize("adapter_on", ["ViTForImageClassification", "ViTModel"])
def test_vit_saved_by_transformers5(adapter_on: str, tmp_path: Path) -> None:
    """transformers 5 renames ViT modules in memory (vit.layers.0.attention.q_proj) but saves the old keys
    (vit.encoder.layer.0.attention.attention.query); an adapter on ViTModel lacks the ``vit.`` prefix."""
    import transformers

    torch.manual_seed(0)
    base = transformers.ViTForImageClassification(vit_config()).eval()
    base.save_pretrained(tmp_path / "vit")
    names = ["vit.layers.0.attention.q_proj", "vit.layers.1.attention.v_proj", "vit.layers.0.mlp.fc1",
             "vit.layers.1.attention.o_proj"]
    adapter = random_linear_adapter(base, names, seed=3)
    if adapter_on == "ViTModel":
        adapter = LoraAdapter({k.removeprefix("vit."): m for k, m in adapter.modules.items()})
    with safe_open(tmp_path / "vit" / "model.safetensors", "pt") as f:
        assert "vit.layers.0.attention.q_proj.weight" not in set(f.keys())  # the mismatch being fixed
    rep = merge_into_files(tmp_path / "vit", adapter, tmp_path / "out")
    assert rep["keys"][next(iter(adapter.modules))] == "vit.encoder.layer.0.attention.attention.query.weight"
    merged = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    sd0, sd1 = base.state_dict(), merged.state_dict()
    for name, m in adapter.modules.items():
        k = f"{name if name.startswith('vit.') else 'vit.' + name}.weight"
        np.testing.assert_allclose(sd1[k].double().numpy(), sd0[k].double().numpy() + dense_ref(m), atol=1e-6)
    assert sum(not torch.equal(sd0[k], sd1[k]) for k in sd0) == len(adapter.modules)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(base)
    ref.load_state_dict({k: (v.double() + torch.from_numpy(dense_ref(adapter.modules[n]))).float()
                         if (n := k.removesuffix(".weight")) in adapter.modules
                         or (n := k.removesuffix(".weight").removeprefix("vit.")) in adapter.modules else v
                         for k, v in sd0.items()})
    with torch.inference_mode():
        torch.testing.assert_close(merged(x).logits, ref(x).logits, atol=1e-5, rtol=0)


def tiny_sd_pipeline() -> Any:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = tiny_unet(32)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=100, max_position_embeddings=16, projection_dim=32,
                                      bos_token_id=0, eos_token_id=1)).eval()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sd_adapter_for(pipe: Any) -> LoraAdapter:
    u = random_linear_adapter(pipe.unet, ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                          "up_blocks.1.attentions.0.proj_in"], seed=5, prefix="unet.")
    t = random_linear_adapter(pipe.text_encoder, ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"],
                              seed=6, prefix="text_encoder.text_model.")  # canonical (kohya/diffusers) CLIP paths
    return LoraAdapter({**u.modules, **t.modules}, "tiny-sd")


def check_component(base: Any, merged: Any, adapter: LoraAdapter, prefix: str) -> None:
    sd0, sd1 = base.state_dict(), merged.state_dict()
    mods = {k[len(prefix):]: m for k, m in adapter.modules.items() if k.startswith(prefix)}
    for n, m in mods.items():
        np.testing.assert_allclose(sd1[f"{n}.weight"].double().numpy(),
                                   sd0[f"{n}.weight"].double().numpy() + dense_ref(m), atol=1e-6)
    assert sum(not torch.equal(sd0[k], sd1[k]) for k in sd0) == len(mods)


def test_diffusers_pipeline_folder(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    adapter = sd_adapter_for(pipe)
    rep = merge_into_files(tmp_path / "pipe", adapter, tmp_path / "out")
    assert sorted(rep["components"]) == ["text_encoder", "unet"] and rep["modules_merged"] == 4
    assert {"vae/", "scheduler/", "model_index.json"} <= set(rep["copied"])
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "out", tokenizer=None, safety_checker=None,
                                                     feature_extractor=None, requires_safety_checker=False)
    check_component(pipe.unet, merged.unet, adapter, "unet.")
    check_component(pipe.text_encoder, merged.text_encoder, adapter, "text_encoder.text_model.")
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), merged.vae.state_dict().values()))
    # the unet/ folder alone: its modules merge, the text encoder's are reported as skipped
    rep = merge_into_files(tmp_path / "pipe" / "unet", adapter, tmp_path / "unet_only")
    assert rep["modules_merged"] == 2 and all(k.startswith("text_encoder.") for k in rep["skipped_modules"])
    from diffusers import UNet2DConditionModel

    check_component(pipe.unet, UNet2DConditionModel.from_pretrained(tmp_path / "unet_only"), adapter, "unet.")
    bad = LoraAdapter({"controlnet.conv_in": next(iter(adapter.modules.values()))})
    with pytest.raises(ShapeMismatchError, match="component of the pipeline"):
        merge_into_files(tmp_path / "pipe", bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []
