"""Tiny real models built from configs (nothing downloads)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


def tiny_dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                 num_layers=2, sample_size=8, patch_size=4, num_embeds_ada_norm=5,
                                 norm_num_groups=1).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=40)).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                vocab_size=40, max_position_embeddings=16)).eval()


def tiny_vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4, num_channels=1)).eval()


def tiny_sana_block():
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    return SanaTransformerBlock(dim=16, num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                                cross_attention_head_dim=8, cross_attention_dim=16, mlp_ratio=2.0).eval()


def randomize(handle, std: float = 0.3) -> None:
    """Non-zero, non-identity adapters so a wrong route, scale or transpose shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def dit_call(model, x, groups=None):
    t = torch.full((x.shape[0],), 500.0)
    y = torch.arange(x.shape[0]) % 5
    return model(x, timestep=t, class_labels=y).sample


class _Helpers:
    tiny_dit = staticmethod(tiny_dit)
    tiny_llama = staticmethod(tiny_llama)
    tiny_bert = staticmethod(tiny_bert)
    tiny_vit = staticmethod(tiny_vit)
    tiny_sana_block = staticmethod(tiny_sana_block)
    randomize = staticmethod(randomize)
    dit_call = staticmethod(dit_call)


@pytest.fixture
def tm() -> type[_Helpers]:
    """Model builders and helpers (tests cannot import conftest under --import-mode=importlib)."""
    return _Helpers
