"""PEFT directories: real PEFT as reader reference and as client of what we write; every refusal."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterbank.errors import FormatError, NonFiniteError, ShapeMismatchError, UnsafeFileError, UnsupportedAdapterError
from adapterbank.formats import adapter_files, read_adapter, write_adapter
from adapterbank.formats._lora_config import config_for, get_pattern_key
from adapterbank.formats.safetensors_io import load_file, save_file
from adapterbank.lora import LoraAdapter, combine, merge_into

LLAMA_CASES = {
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
                     alpha_pattern={"down_proj": 3, "layers.0.self_attn.v_proj": 5}),
    "rslora_embedding": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj", "embed_tokens"],
                             rank_pattern={"o_proj": 3}),
}


def merged_model(base: Any, adapter: LoraAdapter) -> Any:
    m = copy.deepcopy(base)
    m.load_state_dict(merge_into(base.state_dict(), adapter))
    return m


def peft_delta(peft_model: Any, module: str) -> torch.Tensor:
    return peft_model.base_model.model.get_submodule(module).get_delta_weight("default")


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_real_peft_read_and_write(tmp_path: Path, tiny_llama: Callable[[int], Any],
                                  peft_adapter: Callable[..., Path], case: str) -> None:
    from peft import PeftModel

    base = tiny_llama(0)
    src = peft_adapter(base, tmp_path / "src", seed=7, **LLAMA_CASES[case])
    a = read_adapter(src)
    assert a.metadata["format"] == "peft" and a.base_model == "tiny-llama"
    ref = PeftModel.from_pretrained(copy.deepcopy(base), src)
    assert len(a.modules) == {"patterns": 6, "rslora_embedding": 5}[case]
    for k, m in a.modules.items():
        torch.testing.assert_close(m.delta(), peft_delta(ref, k), atol=1e-6, rtol=0, msg=k)
    if case == "patterns":
        assert a.modules["model.layers.1.self_attn.q_proj"].rank == 6
        assert a.modules["model.layers.0.self_attn.v_proj"].scale == pytest.approx(5 / 2)
        assert a.modules["model.layers.1.self_attn.v_proj"].scale == pytest.approx(8 / 2)
    else:
        assert a.modules["model.embed_tokens"].kind == "embedding"
        assert a.modules["model.layers.0.self_attn.o_proj"].scale == pytest.approx(6 / 3**0.5)
    out = tmp_path / "out"
    write_adapter(a, out)
    back = read_adapter(out)
    for k, m in a.modules.items():
        assert torch.equal(back.modules[k].A, m.A) and torch.equal(back.modules[k].B, m.B), k
        assert back.modules[k].scale == pytest.approx(m.scale, rel=1e-12), k
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, plain = loaded(x).logits, merged_model(base, a)(x).logits, base(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - plain).abs().max() > 1e-2  # the adapter does something


def test_composite_with_mixed_ranks_loads_in_peft(tmp_path: Path, tiny_llama: Callable[[int], Any],
                                                  peft_adapter: Callable[..., Path]) -> None:
    """An exact Eq. 6 composite (scale 1, per-module ranks) written as PEFT gives base + Σ w_i ΔW_i."""
    from peft import PeftModel

    base = tiny_llama(0)
    a1 = read_adapter(peft_adapter(base, tmp_path / "a1", seed=1, r=2, target_modules=["q_proj"]))
    a2 = read_adapter(peft_adapter(base, tmp_path / "a2", seed=2, r=3, lora_alpha=5,
                                   target_modules=["q_proj", "v_proj"]))
    comp = combine([a1, a2], [0.7, -0.4])
    assert {m.rank for m in comp.modules.values()} == {5, 3}
    write_adapter(comp, tmp_path / "c", base_model="tiny-llama")
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["base_model_name_or_path"] == "tiny-llama"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "c").eval()
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, merged_model(base, comp)(x).logits, atol=1e-5, rtol=0)


def test_gpt2_fan_in_fan_out(tmp_path: Path, tiny_gpt2: Any) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    g = torch.Generator().manual_seed(5)
    pm = get_peft_model(copy.deepcopy(tiny_gpt2), LoraConfig(r=3, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                              fan_in_fan_out=True, rank_pattern={"c_fc": 2}))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path / "src")
    a = read_adapter(tmp_path / "src")
    for k, m in a.modules.items():
        w = tiny_gpt2.get_submodule(k).weight
        assert m.transposed and m.weight_shape == tuple(w.shape), k  # Conv1D weight is (d_in, d_out)
        torch.testing.assert_close(m.delta(), peft_delta(pm, k), atol=1e-6, rtol=0)
    write_adapter(a, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_gpt2), tmp_path / "out").eval()
    x = torch.randint(0, 64, (2, 7), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, merged_model(tiny_gpt2, a)(x).logits, atol=1e-5, rtol=0)


def test_round_trip_conv_and_linear(tmp_path: Path, tiny_unet: Any, rand_adapter: Callable[..., LoraAdapter],
                                    same_deltas: Callable[..., None]) -> None:
    names = ["conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut",
             "down_blocks.0.attentions.0.proj_in", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
             "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", "time_embedding.linear_1"]
    a = rand_adapter(tiny_unet, names, seed=3, base_model="tiny-unet")
    assert a.modules["conv_in"].kind == "conv" and len({m.rank for m in a.modules.values()}) == 3
    write_adapter(a, tmp_path / "p")
    tensors, _ = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert tensors["base_model.model.conv_in.lora_A.weight"].shape == (2, 4, 3, 3)
    assert tensors["base_model.model.conv_in.lora_B.weight"].shape == (32, 2, 1, 1)
    b = read_adapter(tmp_path / "p")
    same_deltas(a, b)
    write_adapter(b, tmp_path / "q")
    same_deltas(a, read_adapter(tmp_path / "q"))
    assert b.base_model == "tiny-unet"


class TwoQ(torch.nn.Module):
    """Module names ``q`` and ``x.q``: a plain pattern key ``q`` would also match ``x.q``."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(6, 6)
        self.x = torch.nn.Module()
        self.x.q = torch.nn.Linear(6, 6)
        self.y = torch.nn.Module()
        self.y.q = torch.nn.Linear(6, 6)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.y.q(self.x.q(self.q(t)))


def test_ambiguous_pattern_keys_are_anchored(tmp_path: Path, rand_adapter: Callable[..., LoraAdapter]) -> None:
    from peft import PeftModel

    torch.manual_seed(0)
    model = TwoQ().eval()
    a = rand_adapter(model, ["q", "x.q", "y.q"], ranks={"q": 2, "x.q": 3, "y.q": 3},
                     scales={"q": 0.5, "x.q": 2.0, "y.q": 2.0})
    cfg = config_for(a.modules)
    assert cfg["r"] == 3 and all(k.startswith("^") for k in cfg["rank_pattern"])
    for k, m in a.modules.items():  # PEFT's own resolution rule gives every module its values
        rp = cfg["rank_pattern"]
        assert rp.get(get_pattern_key(rp, k), cfg["r"]) == m.rank
    write_adapter(a, tmp_path / "p")
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "p").eval()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), merged_model(model, a)(x), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- refusals


@pytest.fixture()
def good_dir(tmp_path: Path) -> Path:
    from adapterbank.lora import LoraModule

    g = torch.Generator().manual_seed(0)
    a = LoraAdapter({f"model.layers.{i}.q_proj": LoraModule(torch.randn(2, 4, generator=g),
                                                           torch.randn(5, 2, generator=g), 1.5, (5, 4))
                     for i in range(2)}, "tiny")
    write_adapter(a, tmp_path / "good")
    return tmp_path / "good"


def edit_config(d: Path, **changes: Any) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(d: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors, meta = load_file(d / "adapter_model.safetensors")
    tensors = {k: v.clone() for k, v in tensors.items()}
    fn(tensors)
    save_file(tensors, d / "adapter_model.safetensors", meta)


Q0 = "base_model.model.model.layers.0.q_proj"


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"peft_type": "IA3"}, "'peft_type' must be 'LORA'"),
        ({"bias": "all"}, "'bias' is 'all'"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
        ({"some_future_switch": True}, "unknown LoraConfig key 'some_future_switch'"),
    ],
)
def test_unsupported_configs(good_dir: Path, changes: dict[str, Any], match: str) -> None:
    edit_config(good_dir, **changes)
    with pytest.raises(UnsupportedAdapterError, match=match) as ei:
        read_adapter(good_dir)
    assert "adapter_config.json" in str(ei.value)


def test_harmless_unknown_keys_are_tolerated(good_dir: Path) -> None:
    edit_config(good_dir, some_future_option=None, another_one={}, lora_dropout=0.1, task_type="CAUSAL_LM",
                init_lora_weights="gaussian")
    a = read_adapter(good_dir)
    assert a.metadata["task_type"] == "CAUSAL_LM" and len(a.modules) == 2


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda t: t.__setitem__(f"{Q0}.lora_magnitude_vector.weight", torch.ones(5)), UnsupportedAdapterError, "DoRA"),
        (lambda t: t.__setitem__(f"{Q0}.lora_B.bias", torch.ones(5)), UnsupportedAdapterError, "lora_bias"),
        (lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.ones(3, 4)), UnsupportedAdapterError,
         "modules_to_save"),
        (lambda t: t.__setitem__(f"{Q0}.lora_C.weight", torch.ones(2, 2)), FormatError, "lora_C"),
        (lambda t: t.__setitem__("model.layers.0.q_proj.lora_A.weight", torch.ones(2, 4)), FormatError,
         "does not start with 'base_model.model.'"),
        (lambda t: t.pop(f"{Q0}.lora_B.weight"), FormatError, "no lora_B"),
        (lambda t: t.__setitem__(f"{Q0}.lora_B.weight", torch.ones(5, 3)), ShapeMismatchError, "3 columns"),
        (lambda t: (t.__setitem__(f"{Q0}.lora_A.weight", torch.ones(3, 4)),
                    t.__setitem__(f"{Q0}.lora_B.weight", torch.ones(5, 3))), ShapeMismatchError, "r=2"),
        (lambda t: t[f"{Q0}.lora_B.weight"].__setitem__((0, 0), float("nan")), NonFiniteError, "NaN"),
        (lambda t: t[f"{Q0}.lora_A.weight"].__setitem__((1, 1), float("inf")), NonFiniteError, "lora_A"),
    ],
)
def test_bad_tensors(good_dir: Path, mutate: Callable[[dict[str, torch.Tensor]], None],
                     error: type[Exception], match: str) -> None:
    edit_tensors(good_dir, mutate)
    with pytest.raises(error, match=match) as ei:
        read_adapter(good_dir)
    assert "adapter_model.safetensors" in str(ei.value) or "adapter_config.json" in str(ei.value)


def test_nan_error_names_file_and_key(good_dir: Path) -> None:
    edit_tensors(good_dir, lambda t: t[f"{Q0}.lora_B.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(NonFiniteError) as ei:
        read_adapter(good_dir)
    assert f"{Q0}.lora_B.weight" in str(ei.value) and str(good_dir) in str(ei.value)


def test_module_outside_target_modules(good_dir: Path) -> None:
    edit_config(good_dir, target_modules=["model.layers.0.q_proj"])
    with pytest.raises(FormatError, match="target_modules"):
        read_adapter(good_dir)


def test_config_with_duplicate_keys(good_dir: Path) -> None:
    text = (good_dir / "adapter_config.json").read_text()
    (good_dir / "adapter_config.json").write_text(text.replace('"r": 2,', '"r": 2, "r": 4,', 1))
    with pytest.raises(FormatError, match="'r' more than once"):
        read_adapter(good_dir)


def test_symlink_outside_dir_refused(good_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(good_dir / "adapter_model.safetensors", outside)
    (good_dir / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(UnsafeFileError, match="outside the adapter directory"):
        read_adapter(good_dir)
    with pytest.raises(UnsafeFileError):
        adapter_files(good_dir)


def test_adapter_files(good_dir: Path) -> None:
    files = adapter_files(good_dir)
    assert files == {"adapter_config.json": good_dir / "adapter_config.json",
                     "adapter_model.safetensors": good_dir / "adapter_model.safetensors"}
    assert adapter_files(good_dir / "adapter_config.json", "peft") == files
