"""Shared fixtures: tiny real models built from configs, real PEFT adapters with random non-zero factors."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def save_peft_adapter(base: Any, out: Path, seed: int, base_id: str = "tiny-llama", **cfg_kw: Any) -> Path:
    """A real PEFT LoRA (get_peft_model + save_pretrained) with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    kw.update(cfg_kw)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.peft_config["default"].base_model_name_or_path = base_id
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama() -> Callable[[int], Any]:
    """Factory: a fresh 2-layer LlamaForCausalLM (same weights for the same seed)."""
    return build_tiny_llama


@pytest.fixture(scope="session")
def peft_adapter() -> Callable[..., Path]:
    """Factory: ``peft_adapter(base, out_dir, seed, **LoraConfig kwargs) -> Path``."""
    return save_peft_adapter
