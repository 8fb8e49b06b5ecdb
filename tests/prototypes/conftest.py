"""Fixtures for the prototype tests: a tiny BERT (+ WordPiece tokenizer), a tiny ViT, an image folder,
and the real all-MiniLM-L6-v2 (loaded once per session). Everything is built from configs, offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world", "legal", "contract", "summary",
         "translate", "french", "code", "python", "function", "returns", "list", "of", "numbers"]


def _vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", *letters, *[f"##{c}" for c in letters], *WORDS]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 2-layer BertModel (hidden 32) with a BertTokenizerFast built from a vocab file."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(_vocab()) + "\n")
    out = root / "tiny-bert"
    tok = BertTokenizerFast(vocab=str(vocab))
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=len(_vocab()), max_position_embeddings=64, hidden_dropout_prob=0.3,
                     attention_probs_dropout_prob=0.3)  # dropout > 0: eval mode must switch it off
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 2-layer ViTModel (hidden 32, 32×32 images, 8×8 patches) and its ViTImageProcessor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out = tmp_path_factory.mktemp("tiny-vit") / "tiny-vit"
    torch.manual_seed(1)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8)
    ViTModel(cfg).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five random PNGs of different sizes and modes (named out of creation order), plus a non-image file."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, name in enumerate(["c.png", "a.png", "e.jpg", "b.PNG", "d.bmp"]):
        arr = rng.integers(0, 256, size=(20 + 3 * i, 24 + 2 * i, 3), dtype=np.uint8)
        im = Image.fromarray(arr)
        if name == "d.bmp":
            im = im.convert("L")  # grayscale must become RGB
        im.save(d / name)
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="session")
def minilm() -> Any:
    """The real all-MiniLM-L6-v2 through our default encoder (loaded once; ~10 s)."""
    from adapterbank.prototypes import default_text_encoder

    return default_text_encoder()
