"""Fixtures for the format tests: tiny real models from configs and random non-identity adapters."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
import torch

from adapterbank.lora import LoraAdapter, LoraModule


def random_module(mod: torch.nn.Module, rank: int, scale: float, g: torch.Generator,
                  *, transposed: bool = False) -> LoraModule:
    """A random LoRA factor pair that fits ``mod`` (Linear, Conv2d, Embedding, GPT-2 Conv1D)."""
    w = mod.weight
    if isinstance(mod, torch.nn.Embedding):
        n_emb, d = w.shape
        return LoraModule(torch.randn(rank, n_emb, generator=g), torch.randn(d, rank, generator=g), scale,
                          tuple(w.shape), True, "embedding")
    if isinstance(mod, torch.nn.Conv2d):
        c_out = w.shape[0]
        n_in = w[0].numel()
        return LoraModule(torch.randn(rank, n_in, generator=g) * 0.1, torch.randn(c_out, rank, generator=g) * 0.1,
                          scale, tuple(w.shape), False, "conv")
    if transposed:  # Conv1D weight is (d_in, d_out)
        d_in, d_out = w.shape
        return LoraModule(torch.randn(rank, d_in, generator=g) * 0.1, torch.randn(d_out, rank, generator=g) * 0.1,
                          scale, tuple(w.shape), True, "linear")
    d_out, d_in = w.shape
    return LoraModule(torch.randn(rank, d_in, generator=g) * 0.1, torch.randn(d_out, rank, generator=g) * 0.1,
                      scale, tuple(w.shape), False, "linear")


def random_adapter(model: torch.nn.Module, names: Iterable[str], *, seed: int = 0, prefix: str = "",
                   ranks: Mapping[str, int] | None = None, scales: Mapping[str, float] | None = None,
                   transposed: bool = False, base_model: str | None = None) -> LoraAdapter:
    """Random adapter on ``names`` of ``model``; rank/scale vary per module unless given."""
    g = torch.Generator().manual_seed(seed)
    mods: dict[str, LoraModule] = {}
    for i, n in enumerate(names):
        r = (ranks or {}).get(n, 2 + i % 3)
        s = (scales or {}).get(n, [0.5, 1.25, 2.0][i % 3])
        mods[prefix + n] = random_module(model.get_submodule(n), r, s, g, transposed=transposed)
    return LoraAdapter(mods, base_model, {})


def assert_same_deltas(a: LoraAdapter, b: LoraAdapter, atol: float = 1e-6) -> None:
    assert set(a.modules) == set(b.modules)
    for k, m in a.modules.items():
        n = b.modules[k]
        assert m.weight_shape == n.weight_shape, k
        assert (m.kind, m.transposed) == (n.kind, n.transposed), k
        torch.testing.assert_close(m.delta(torch.float64), n.delta(torch.float64), atol=atol, rtol=0, msg=k)


def build_tiny_unet(seed: int = 0) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=16,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, in_channels=4, out_channels=4,
    ).eval()


def build_tiny_clip(seed: int = 1) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=100, max_position_embeddings=16,
                                       projection_dim=32)).eval()


def build_tiny_gpt2(seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)).eval()


@pytest.fixture(scope="session")
def tiny_unet() -> Any:
    return build_tiny_unet()


@pytest.fixture(scope="session")
def tiny_clip() -> Any:
    return build_tiny_clip()


@pytest.fixture(scope="session")
def tiny_gpt2() -> Any:
    return build_tiny_gpt2()


@pytest.fixture(scope="session")
def sd_pipe_factory() -> Callable[[], Any]:
    """Factory for a tiny StableDiffusionPipeline (fresh UNet/CLIP copies each call, same weights)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    unet, clip = build_tiny_unet(), build_tiny_clip()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)

    def make() -> Any:
        return StableDiffusionPipeline(vae=vae, text_encoder=copy.deepcopy(clip), tokenizer=None,
                                       unet=copy.deepcopy(unet), scheduler=DDIMScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    return make


@pytest.fixture(scope="session")
def rand_adapter() -> Callable[..., LoraAdapter]:
    """``rand_adapter(model, names, seed=, prefix=, ranks=, scales=, transposed=, base_model=)``."""
    return random_adapter


@pytest.fixture(scope="session")
def same_deltas() -> Callable[..., None]:
    """``same_deltas(a, b, atol=1e-6)``: same modules, shapes, kinds and ΔW."""
    return assert_same_deltas
