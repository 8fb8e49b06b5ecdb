"""adapterbank.integrations.diffusers.ComposedLoRA on a tiny Stable Diffusion pipeline built from configs, with a
real tokenizer: per-prompt composites load through the pipeline's own load_lora_weights, the generated latents
equal a pipeline whose UNet and text encoder hold W + Σ w_i ΔW_i, and switching prompts replaces the composite."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adapterbank.bank import Bank
from adapterbank.errors import KohyaTextEncoderWarning, ParameterError
from adapterbank.formats import write_adapter
from adapterbank.lora import LoraAdapter, merge_into
from adapterbank.prototypes.encoders import CallableEncoder, default_text_model_path

pytest.importorskip("diffusers")
from adapterbank.integrations.diffusers import ComposedLoRA  # noqa: E402

from .conftest import build_tiny_unet, random_adapter  # noqa: E402

UNET = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", "down_blocks.0.resnets.0.conv1"]
TE = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]
WORDS = ["watercolor", "dark", "noisy", "sketch", "fox"]
STYLES = {"watercolor-lora": "soft watercolor paintings", "dark-lora": "dark moody night scenes",
          "noisy-lora": "noisy grainy film photos", "sketch-lora": "pencil sketch drawings"}


def keyword_features(texts: list[str]) -> list[list[float]]:
    """A transparent text encoder: counts of a few keywords (plus a constant so no vector is zero)."""
    return [[float(t.lower().count(w)) for w in WORDS] + [1.0] for t in texts]


ENCODER = CallableEncoder(keyword_features, name="keywords", dim=len(WORDS) + 1)


def tiny_clip(vocab: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                        vocab_size=vocab, max_position_embeddings=16, projection_dim=32)).eval()


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_text_model_path())
    tok.model_max_length = 16  # the tiny CLIP's positions
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    return {"unet": build_tiny_unet(), "te": tiny_clip(len(tok)), "tok": tok, "vae": vae}


def make_pipe(parts: dict[str, Any], unet_sd: dict[str, torch.Tensor] | None = None,
              te_sd: dict[str, torch.Tensor] | None = None) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, te = copy.deepcopy(parts["unet"]), copy.deepcopy(parts["te"])
    if unet_sd is not None:
        unet.load_state_dict(unet_sd)
    if te_sd is not None:
        te.load_state_dict(te_sd)
    return StableDiffusionPipeline(vae=parts["vae"], text_encoder=te, tokenizer=parts["tok"], unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def style_bank(parts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Bank, dict[str, LoraAdapter]]:
    """Four kohya style LoRAs (UNet linear + conv, text encoder) with description prototypes only."""
    from adapterbank.prototypes import describe

    root = tmp_path_factory.mktemp("styles")
    bank = Bank.init(root / "bank")
    adapters = {}
    for i, (name, desc) in enumerate(STYLES.items()):
        u = random_adapter(parts["unet"], UNET, seed=20 + i, prefix="unet.")
        t = random_adapter(parts["te"], TE, seed=40 + i, prefix="text_encoder.text_model.")
        ad = LoraAdapter({**u.modules, **t.modules}, "tiny-sd", {})
        with warnings.catch_warnings():  # the kohya text-encoder notice: the composite is written as diffusers
            warnings.simplefilter("ignore", KohyaTextEncoderWarning)
            (f,) = write_adapter(ad, root / name, format="kohya")
        bank.add(f, id=name, description=desc, prototype=describe(ENCODER, desc))
        adapters[name] = bank.load_adapter(name)  # what the bank holds, as read back
    return bank, adapters


def dense_pipe(parts: dict[str, Any], adapters: dict[str, LoraAdapter], weights: dict[str, float]) -> Any:
    """The reference: a pipeline whose weights are W + Σ w_i ΔW_i, each ΔW_i merged on its own."""
    unet_sd = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
    te_sd = {k: v.clone() for k, v in parts["te"].state_dict().items()}
    for name, w in weights.items():
        for prefix, sd in (("unet.", unet_sd), ("text_encoder.text_model.", te_sd)):
            mods = {k[len(prefix):]: dataclasses.replace(m, B=m.B * w) for k, m in adapters[name].modules.items()
                    if k.startswith(prefix)}
            sd.update(merge_into(sd, LoraAdapter(mods)))
    return make_pipe(parts, unet_sd, te_sd)


def latents(pipe: Any, prompt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(prompt=prompt, num_inference_steps=2, guidance_scale=3.0, height=16, width=16, generator=g,
                    output_type="latent").images


def test_latents_equal_the_dense_composite_and_prompts_replace_each_other(parts: dict[str, Any],
                                                                          style_bank: Any) -> None:
    bank, adapters = style_bank
    pipe = make_pipe(parts)
    base = latents(pipe, "a watercolor fox")
    composer = ComposedLoRA(bank, pipe, k=3, strategy="sim", encoder=ENCODER)
    out = {}
    for prompt in ("a watercolor fox", "a dark noisy fox"):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            got = composer(prompt, num_inference_steps=2, guidance_scale=3.0, height=16, width=16, generator=g,
                           output_type="latent").images
        pc = composer.last
        assert pc is not None and len(pc.ids) == 3 and pc.weights.sum() == pytest.approx(1.0)
        assert [r[0] for r in pc.weight_table()] == pc.ids
        want = latents(dense_pipe(parts, adapters, dict(zip(pc.ids, pc.weights.tolist()))), prompt)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert (want - base).abs().max() > 1e-3  # the LoRAs (UNet and text encoder) matter
        out[prompt] = (pc.ids, got)
    assert out["a watercolor fox"][0][0] == "watercolor-lora"
    assert out["a dark noisy fox"][0][0] in ("dark-lora", "noisy-lora")
    # one composite loaded at a time, under one name: the second prompt replaced the first (never stacked)
    assert set(pipe.get_list_adapters().get("unet", [])) == {"adapterbank"}
    again = latents(pipe, "a watercolor fox")  # plain pipe call: the dark composite is what is loaded
    torch.testing.assert_close(again, latents(dense_pipe(parts, adapters, dict(zip(
        composer.last.ids, composer.last.weights.tolist()))), "a watercolor fox"), atol=1e-4, rtol=0)
    composer.unload()
    torch.testing.assert_close(latents(pipe, "a watercolor fox"), base, atol=1e-6, rtol=0)
    composer.close()


def test_composites_are_cached_per_prompt_prototype_and_bank_version(parts: dict[str, Any], style_bank: Any,
                                                                     tmp_path: Path) -> None:
    bank, _ = style_bank
    composer = ComposedLoRA(bank, make_pipe(parts), k=2, strategy="sparse", encoder=ENCODER, cache_size=2)
    a = composer.compose("a watercolor fox")
    b = composer.compose("A WATERCOLOR fox")  # same keyword counts: same prototype, same composite
    assert not a.cached and b.cached and b.composition is a.composition
    composer.compose("a dark fox")
    composer.compose("a noisy fox")  # cache_size 2: the watercolor composite is dropped
    assert not composer.compose("a watercolor fox").cached
    np.testing.assert_array_equal(composer.compose("a watercolor fox").weights, a.weights)
    bank.set_setting("touch", 1)  # any write moves the bank version: composites are made again
    assert not composer.compose("a watercolor fox").cached
    bank.set_setting("touch", None)
    composer.close()


def test_bad_use_is_refused_clearly(parts: dict[str, Any], style_bank: Any) -> None:
    bank, _ = style_bank
    with pytest.raises(ParameterError, match="needs a diffusers pipeline with LoRA support"):
        ComposedLoRA(bank, object())
    composer = ComposedLoRA(bank, make_pipe(parts), encoder=ENCODER)
    with pytest.raises(ParameterError, match="non-empty text prompt"):
        composer.compose("  ")
    with pytest.raises(ParameterError, match="reference_image needs image_encoder="):
        composer.compose("a fox", reference_image=np.zeros((4, 4)))
    with pytest.raises(ParameterError, match="pass encoder="):
        _ = ComposedLoRA(bank, make_pipe(parts)).encoder  # the bank records no encoder spec here
