"""kohya/A1111 and diffusers LoRA files: name mapping, round trips, refusals, and diffusers as the real client."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterbank.errors import FormatError, NonFiniteError, UnsupportedAdapterError
from adapterbank.formats import FORMATS, adapter_files, detect_format, read_adapter, write_adapter
from adapterbank.formats.kohya import stem_to_path
from adapterbank.formats.safetensors_io import load_file, save_file
from adapterbank.lora import LoraAdapter, LoraModule, merge_into

UNET_NAMES = [
    "conv_in",  # 3x3 conv (LoCon)
    "down_blocks.0.attentions.0.proj_in",  # 1x1 conv
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.1.resnets.0.time_emb_proj",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "mid_block.resnets.1.conv2",
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.upsamplers.0.conv",
    "time_embedding.linear_2",
]
TE_NAMES = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.1.mlp.fc1"]
#: The formats diffusers pipelines load (``pipe.load_lora_weights``): kohya and diffusers.
PIPELINE_FORMATS = [name for name, f in FORMATS.items() if f.family == "diffusers"]


def linear_and_conv_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.fixture(scope="module")
def sd_adapter(tiny_unet: Any, tiny_clip: Any, rand_adapter: Callable[..., LoraAdapter]) -> LoraAdapter:
    """Random adapter on UNet (linear, 1x1 and 3x3 conv) and text encoder, mixed ranks and scales."""
    u = rand_adapter(tiny_unet, UNET_NAMES, seed=11, prefix="unet.")
    # transformers >= 5 flattened CLIPTextModel; canonical paths keep the `text_model.` layout of the files
    t = rand_adapter(tiny_clip, TE_NAMES, seed=12, prefix="text_encoder.text_model.", ranks={TE_NAMES[0]: 5},
                     scales={TE_NAMES[1]: 0.3})
    return LoraAdapter({**u.modules, **t.modules}, "tiny-sd", {})


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def check_pipe_equals_dense(pipe: Any, tiny_unet: Any, tiny_clip: Any, adapter: LoraAdapter) -> None:
    """UNet and text-encoder outputs of the LoRA-loaded pipeline equal the base models with dense ΔW added."""
    def sub(prefix: str) -> LoraAdapter:
        mods = {k[len(prefix):]: m for k, m in adapter.modules.items() if k.startswith(prefix)}
        return LoraAdapter(mods)

    ref_unet = copy.deepcopy(tiny_unet)
    ref_unet.load_state_dict(merge_into(tiny_unet.state_dict(), sub("unet.")))
    ref_te = copy.deepcopy(tiny_clip)
    ref_te.load_state_dict(merge_into(tiny_clip.state_dict(), sub("text_encoder.text_model.")))
    x, t, c = unet_inputs()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = pipe.unet(x, t, c).sample
        want = ref_unet(x, t, c).sample
        plain = tiny_unet(x, t, c).sample
        got_te = pipe.text_encoder(ids).last_hidden_state
        want_te = ref_te(ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_te, want_te, atol=1e-4, rtol=0)
    assert (want - plain).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- kohya names


def test_rule_parser_inverts_all_sd_module_names(tiny_unet: Any, tiny_clip: Any) -> None:
    unet_names = linear_and_conv_names(tiny_unet)
    te_names = linear_and_conv_names(tiny_clip)
    assert len(unet_names) > 50 and len(te_names) > 10
    for n in unet_names:
        assert stem_to_path("lora_unet_" + n.replace(".", "_")) == f"unet.{n}"
    for n in te_names:  # kohya files name CLIP modules text_model.encoder... (transformers 4 layout)
        n = "text_model." + n
        assert stem_to_path("lora_te_" + n.replace(".", "_")) == f"text_encoder.{n}"
        assert stem_to_path("lora_te2_" + n.replace(".", "_")) == f"text_encoder_2.{n}"


def test_ldm_names_need_module_names(tmp_path: Path) -> None:
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    p = tmp_path / "sdxl.safetensors"
    save_file({f"{stem}.lora_down.weight": torch.randn(2, 8), f"{stem}.lora_up.weight": torch.randn(8, 2),
               f"{stem}.alpha": torch.tensor(1.0, dtype=torch.float16)}, p)
    with pytest.raises(FormatError, match="module_names") as ei:
        read_adapter(p)
    assert "SDXL" in str(ei.value) and stem in str(ei.value)
    real = ["unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q", "unet.input_blocks.4.1.proj_in"]
    a = read_adapter(p, module_names=real)
    m = a.modules["unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
    assert m.scale == 0.5 and a.metadata["format"] == "kohya"  # fp16 alpha 1.0 / rank 2
    with pytest.raises(FormatError, match="none of the given module_names"):
        read_adapter(p, module_names=["unet.conv_in"])
    ambiguous = real + ["unet.input_blocks_4.1.transformer_blocks.0.attn1.to_q"]
    with pytest.raises(FormatError, match="ambiguous"):
        read_adapter(p, module_names=ambiguous)
    # module_names of a flattened transformers>=5 CLIP still resolve kohya's text_model stems
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    save_file({f"{te}.lora_down.weight": torch.randn(2, 32), f"{te}.lora_up.weight": torch.randn(37, 2)}, p)
    b = read_adapter(p, module_names=["text_encoder.encoder.layers.0.mlp.fc1", "text_encoder.encoder"])
    assert list(b.modules) == ["text_encoder.text_model.encoder.layers.0.mlp.fc1"]


# ----------------------------------------------------------------------------------- round trips


def test_pipeline_formats() -> None:
    assert PIPELINE_FORMATS == ["kohya", "diffusers"]


@pytest.mark.parametrize("fmt", PIPELINE_FORMATS)
def test_round_trip(tmp_path: Path, sd_adapter: LoraAdapter, same_deltas: Callable[..., None], fmt: str) -> None:
    files = write_adapter(sd_adapter, tmp_path / "w", format=fmt, extra_metadata={"note": "hi"})
    assert detect_format(tmp_path / "w") == fmt == detect_format(files[0])
    a = read_adapter(tmp_path / "w")
    same_deltas(sd_adapter, a)
    assert a.base_model == "tiny-sd" and a.metadata["format"] == fmt
    assert a.metadata["file_metadata"]["note"] == "hi"
    assert a.modules["unet.conv_in"].kind == "conv" and a.modules["unet.conv_in"].weight_shape == (32, 4, 3, 3)
    write_adapter(a, tmp_path / "w2", format=fmt)
    same_deltas(sd_adapter, read_adapter(tmp_path / "w2"))
    assert list(adapter_files(tmp_path / "w")) == [files[0].name]


def test_kohya_file_layout(tmp_path: Path, sd_adapter: LoraAdapter) -> None:
    (f,) = write_adapter(sd_adapter, tmp_path / "x.safetensors", format="kohya")
    t, meta = load_file(f)
    stem = "lora_unet_conv_in"
    assert t[f"{stem}.lora_down.weight"].shape == (2, 4, 3, 3) and t[f"{stem}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert t[f"{stem}.alpha"].shape == () and t[f"{stem}.alpha"].dtype == torch.float32
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in t
    alphas = {k: v.item() for k, v in t.items() if k.endswith(".alpha")}
    assert len(set(alphas.values())) == 1 and meta["ss_network_alpha"] == repr(next(iter(alphas.values())))
    assert meta["ss_network_module"] == "networks.lora"
    # per-module alphas on request; modules keep their factors bit for bit
    from adapterbank.formats.kohya import write_kohya

    (f2,) = write_kohya(sd_adapter, tmp_path / "y.safetensors", uniform_alpha=False)
    t2, meta2 = load_file(f2)
    assert t2[f"{stem}.alpha"].item() == pytest.approx(sd_adapter.modules["unet.conv_in"].scale * 2)
    assert meta2["ss_network_alpha"] == "Dynamic"
    for name, m in sd_adapter.modules.items():
        s = "lora_unet_" + name[5:].replace(".", "_") if name.startswith("unet.") else None
        if s:
            assert torch.equal(t2[f"{s}.lora_up.weight"].reshape(m.B.shape), m.B)


def test_kohya_missing_alpha_means_rank(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(3, 32, generator=g),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(37, 3, generator=g)}, p)
    m = read_adapter(p).modules["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    assert m.scale == 1.0 and m.weight_shape == (37, 32)


@pytest.mark.parametrize(
    "extra, error, match",
    [
        ({"lora_unet_conv_in.dora_scale": torch.ones(32)}, UnsupportedAdapterError, "DoRA"),
        ({"lora_unet_conv_out.hada_w1_a": torch.ones(2, 2)}, UnsupportedAdapterError, "LoHa"),
        ({"lora_unet_conv_out.lokr_w1": torch.ones(2, 2)}, UnsupportedAdapterError, "LoKr"),
        ({"lora_unet_conv_in.lora_mystery.weight": torch.ones(2, 2)}, FormatError, "lora_mystery"),
        ({"model.diffusion_model.x": torch.ones(2)}, FormatError, "not a kohya LoRA key"),
        ({"lora_unet_conv_out.lora_down.weight": torch.ones(2, 32, 3, 3)}, FormatError, "no lora_up"),
        ({"lora_unet_conv_out.lora_down.weight": torch.full((2, 32, 3, 3), float("nan")),
          "lora_unet_conv_out.lora_up.weight": torch.ones(4, 2, 1, 1)}, NonFiniteError, "lora_unet_conv_out"),
        ({"lora_unet_frobnicator_0.lora_down.weight": torch.ones(2, 3),
          "lora_unet_frobnicator_0.lora_up.weight": torch.ones(3, 2)}, FormatError, "frobnicator"),
    ],
)
def test_kohya_refusals(tmp_path: Path, extra: dict[str, torch.Tensor], error: type[Exception], match: str) -> None:
    p = tmp_path / "k.safetensors"
    base = {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": torch.ones(32, 2, 1, 1)}
    save_file({**base, **extra}, p)
    with pytest.raises(error, match=match) as ei:
        read_adapter(p, format="kohya")
    assert str(p) in str(ei.value)


def test_writers_refuse_what_they_cannot_hold(tmp_path: Path) -> None:
    emb = LoraModule(torch.ones(2, 10), torch.ones(4, 2), 1.0, (10, 4), True, "embedding")
    for fmt in ("kohya", "diffusers"):
        with pytest.raises(UnsupportedAdapterError, match="transposed"):
            write_adapter(LoraAdapter({"text_encoder.emb": emb}), tmp_path / fmt, format=fmt)
        lin = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 1.0, (4, 3))
        with pytest.raises(UnsupportedAdapterError, match="component"):
            write_adapter(LoraAdapter({"model.layers.0.q_proj": lin}), tmp_path / fmt, format=fmt)


# ------------------------------------------------------------------------------------------ diffusers


def test_diffusers_metadata_and_alpha_rules(tmp_path: Path, sd_adapter: LoraAdapter) -> None:
    (f,) = write_adapter(sd_adapter, tmp_path / "d", format="diffusers")
    tensors, meta = load_file(f)
    packed = json.loads(meta["lora_adapter_metadata"])
    assert packed["unet.use_rslora"] is False and "unet.conv_in" not in packed["unet.target_modules"]
    assert "conv_in" in packed["unet.target_modules"]
    # Without metadata diffusers uses alpha = rank (scale 1); so do we.
    save_file(tensors, tmp_path / "nometa.safetensors", {"format": "pt"})
    a = read_adapter(tmp_path / "nometa.safetensors")
    assert a.metadata["format"] == "diffusers" and all(m.scale == 1.0 for m in a.modules.values())
    # `.alpha` tensors (kohya-converted network alphas) set α per module.
    alpha_key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.alpha"
    save_file({**tensors, alpha_key: torch.tensor(1.0, dtype=torch.float16)}, tmp_path / "alpha.safetensors")
    b = read_adapter(tmp_path / "alpha.safetensors")
    m = b.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert m.scale == pytest.approx(1.0 / m.rank)


def test_diffusers_legacy_keys(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    blk = "unet.mid_block.attentions.0.transformer_blocks.0.attn1"
    te = "text_encoder.text_model.encoder.layers.0.self_attn"
    sd = {f"{blk}.processor.to_q_lora.down.weight": torch.randn(2, 64, generator=g),
          f"{blk}.processor.to_q_lora.up.weight": torch.randn(64, 2, generator=g),
          f"{blk}.processor.to_out_lora.down.weight": torch.randn(2, 64, generator=g),
          f"{blk}.processor.to_out_lora.up.weight": torch.randn(64, 2, generator=g),
          f"{te}.k_proj.lora_linear_layer.down.weight": torch.randn(3, 32, generator=g),
          f"{te}.k_proj.lora_linear_layer.up.weight": torch.randn(32, 3, generator=g)}
    save_file(sd, tmp_path / "pytorch_lora_weights.safetensors")
    a = read_adapter(tmp_path)
    assert sorted(a.modules) == ["text_encoder.text_model.encoder.layers.0.self_attn.k_proj", f"{blk}.to_out.0",
                                 f"{blk}.to_q"]
    m = a.modules[f"{blk}.to_q"]
    torch.testing.assert_close(m.delta(), sd[f"{blk}.processor.to_q_lora.up.weight"]
                               @ sd[f"{blk}.processor.to_q_lora.down.weight"])


@pytest.mark.parametrize(
    "extra, error, match",
    [
        ({"unet.conv_in.lora_magnitude_vector": torch.ones(32)}, UnsupportedAdapterError, "DoRA"),
        ({"unet.conv_in.lora_B.bias": torch.ones(32)}, UnsupportedAdapterError, "bias"),
        ({"vae.decoder.conv_in.lora_A.weight": torch.ones(2, 2)}, FormatError, "pipeline component"),
        ({"unet.conv_in.lora_Q.weight": torch.ones(2, 2)}, FormatError, "lora_Q"),
        ({"unet.conv_out.lora_A.weight": torch.full((2, 32, 3, 3), float("inf")),
          "unet.conv_out.lora_B.weight": torch.ones(4, 2, 1, 1)}, NonFiniteError, "unet.conv_out.lora_A"),
    ],
)
def test_diffusers_refusals(tmp_path: Path, extra: dict[str, torch.Tensor], error: type[Exception],
                            match: str) -> None:
    base = {"unet.conv_in.lora_A.weight": torch.ones(2, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.ones(32, 2, 1, 1)}
    save_file({**base, **extra}, tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(error, match=match):
        read_adapter(tmp_path, format="diffusers")


def test_diffusers_metadata_with_dora_refused(tmp_path: Path) -> None:
    base = {"unet.conv_in.lora_A.weight": torch.ones(2, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.ones(32, 2, 1, 1)}
    meta = {"unet.r": 2, "unet.lora_alpha": 2, "unet.use_dora": True, "unet.target_modules": ["conv_in"]}
    save_file(base, tmp_path / "pytorch_lora_weights.safetensors", {"lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(UnsupportedAdapterError, match="use_dora"):
        read_adapter(tmp_path)


# ------------------------------------------------------------------------------- diffusers as the client


@pytest.mark.parametrize("fmt", PIPELINE_FORMATS)
def test_pipeline_load_lora_weights_applies_exact_delta(tmp_path: Path, sd_pipe_factory: Callable[[], Any],
                                                        tiny_unet: Any, tiny_clip: Any, sd_adapter: LoraAdapter,
                                                        fmt: str) -> None:
    (f,) = write_adapter(sd_adapter, tmp_path / "lora", format=fmt)
    pipe = sd_pipe_factory()
    pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name="x")
    check_pipe_equals_dense(pipe, tiny_unet, tiny_clip, sd_adapter)


def test_read_what_diffusers_saves(tmp_path: Path, sd_pipe_factory: Callable[[], Any], tiny_unet: Any,
                                   tiny_clip: Any) -> None:
    """diffusers' own save_lora_weights output (with its metadata) reads back to PEFT's ΔW."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = sd_pipe_factory()
    ucfg = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_v", "conv1", "proj_in"],
                      rank_pattern={"to_v": 2}, alpha_pattern={"conv1": 3})
    tcfg = LoraConfig(r=3, lora_alpha=1.5, target_modules=["q_proj", "fc2"])
    pipe.unet.add_adapter(ucfg)
    # peft's own injection: transformers' add_adapter integration may ask for a newer peft than the registry has
    inject_adapter_in_model(tcfg, pipe.text_encoder)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "saved",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict(),
    )
    a = read_adapter(tmp_path / "saved")
    assert a.metadata["format"] == "diffusers"
    assert len(a.modules) == len([n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")]) + len(
        [n for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A")])
    for k, m in a.modules.items():
        comp, _, rest = k.partition(".")
        model = getattr(pipe, comp)
        if not hasattr(model, "text_model"):  # flattened CLIP (transformers >= 5)
            rest = rest.removeprefix("text_model.")
        ref = model.get_submodule(rest).get_delta_weight("default")
        torch.testing.assert_close(m.delta(), ref, atol=1e-6, rtol=0, msg=k)
