"""Benchmark C — prompt-level LoRA composition for text-to-image diffusion over a Civitai-style style library.

The seed paper's third domain (image generation: each prompt is a new task) on data installed here. A small
text-conditional diffusion transformer — diffusers ``PixArtTransformer2DModel`` (PixArt-α blocks: AdaLN-single,
self-attention, cross-attention to the caption, GELU FFN) on 16×16 single-channel images, patch 2 — is
pre-trained by flow matching on *clean* Fashion-MNIST (Debian ``dataset-fashion-mnist``) with captions
``"a photo of a sneaker"``. The caption is the token-level last hidden states of the default MiniLM encoder
(``all-MiniLM-L6-v2``, 384-d, padded to ``CTX_TOKENS`` tokens with its attention mask) — the PixArt layout,
where T5 token states feed the cross-attention through the caption projection.

Library: ``≥ 60`` LoRAs (default), each a visual *style* applied to the training images — blur / noise / gamma /
contrast at several strengths, inversion, pixelation, outline and sketch, faded corners, stripes, upside-down,
rotation, posterisation, solarisation, frame, salt-and-pepper, and pairs of these (``LIBRARY``). Each is a PEFT
LoRA (r = 8 on every attention and FFN linear of every block) trained on that style's images with captions that
name the style (``"a photo of a sneaker, strongly blurred"``), written as a **kohya** file (``lora_unet_…``: the
layout kohya-ss uses for DiT LoRAs too) with ``adapterbank.formats.write_adapter`` and added to a ``Bank`` the way
a Civitai dump would be: the file, a one-line description written like a LoRA author's (``describe(encoder,
description)`` is its only prototype in the text space; no training data). Variant: each LoRA also gets an
*image* prototype from 8 showcase images generated with it (as on a Civitai model page), embedded by a
"style tagger" CNN trained on real images of the library styles only (``CallableEncoder``; its 64-d
penultimate features).

Tasks: held-out prompts ``"a photo of a {class}, {style}"`` whose style is *not* in the library but lies near or
between library styles (an unseen strength, an unseen pair; ``HELD_OUT``), for every class. Methods (each
prompt generates ``n_gen`` images from the same noise for every method):

- ``base``: the pre-trained model, no LoRA;
- ``stylus``: a Stylus-style selector (Luo et al., 2024) — retriever: top-``stylus_candidates`` LoRAs by
  description-embedding similarity to the whole prompt; composer (stand-in for its LLM): the prompt's style
  keywords (the comma / "and" separated phrases after the subject) each keep the candidates whose description
  is most similar to that keyword (⌊k / #keywords⌋ each); fixed equal weights. Not reproduced: the VLM refiner
  (our descriptions are already clean one-liners; no VLM offline), the LLM composer (replaced as above), and
  Stylus's per-image masking of adapter subsets (a diversity device);
- ``nearest``, ``avg``, ``sim``, ``lin``, ``sparse`` (library defaults; Sparse: ``lam_frac`` = 1, the
  projection onto the convex hull of the k retrieved description prototypes) on the prompt's MiniLM prototype;
- ``nearest_img``, ``sim_img``, ``sparse_img``: the same with the image prototypes; the target is the tagger's
  mean feature of 8 reference images of the held-out style (the user shows what look they want);
- ``real``: real images of the held-out style (the metrics' ceiling, not a method).

Every method but ``base``/``real`` generates through ``adapterbank.integrations.diffusers.ComposedLoRA``: the
composite Σ w_i ΔW_i of the retrieved kohya LoRAs is written as a diffusers LoRA and loaded with the pipeline's
own ``load_lora_weights`` (replaced per prompt). The pipeline is ``StylePipeline`` below: a diffusers
``DiffusionPipeline`` with ``StableDiffusionLoraLoaderMixin`` whose ``unet`` is the PixArt transformer (with
``PeftAdapterMixin``) and whose scheduler is ``FlowMatchEulerDiscreteScheduler`` — diffusers' own PixArt pipeline
has no LoRA loader and needs a T5 and a VAE. Each run checks, on one prompt, that the loaded composite equals the
dense model W + Σ w_i ΔW_i.

Metrics per prompt (style s, class c), under CNNs trained on *real* transformed images: style accuracy (a style
classifier over clean + every library and held-out style), class accuracy (a class classifier trained on all
styles), FD in the style classifier's 64-d features against real images of (s, c) (small-sample, biased, same n
for every method), Vendi diversity in the class classifier's features; paired bootstrap intervals over prompts of
Sparse − each method. A grid figure (prompts × methods) for judging by eye.

    python bench/loo_synthesis.py --size tiny      # seconds; the smoke test
    python bench/loo_synthesis.py --size small     # ≤ 5 min
    python bench/loo_synthesis.py                  # default: ≤ 45 min on 2 cores; --figures bench/figures/loo_synthesis

Without ``/usr/share/datasets/fashion-mnist`` the tiny and small sizes fall back to procedurally drawn
garment-like shapes (``procedural_garments``); the default size refuses.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import gzip
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # also when imported by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine, quiet_logging
from _metrics import frechet, vendi

log = logging.getLogger("loo_synthesis")

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
IMG = 16
CTX_TOKENS = 16  # MiniLM tokens per caption (padded / truncated; the captions here have ≤ 14)
SEED = 0
BASE_NAME = "adapterbank-bench/pixart-fmnist16"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]  # in attn1, attn2 and ff of each block
NULL_PROMPT = ""  # the unconditional caption (classifier-free guidance)

# ----- styles ----------------------------------------------------------------------------------------------
# An op maps images x (n, 16, 16) in [0, 1] to the styled images, with a generator for random ones.
Op = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _blur(s: float) -> Op:
    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(x, sigma=(0, s, s), mode="constant")
    return fn


def _noise(s: float) -> Op:
    return lambda x, rng: x + s * rng.standard_normal(x.shape)


def _gamma(g: float) -> Op:
    return lambda x, rng: np.clip(x, 0, 1) ** g


def _contrast(c: float) -> Op:
    return lambda x, rng: 0.5 + c * (x - 0.5)


def _invert(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - x


def _pixelate(f: int) -> Op:
    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(x)
        lo = x.reshape(n, IMG // f, f, IMG // f, f).mean((2, 4))
        return np.repeat(np.repeat(lo, f, 1), f, 2)
    return fn


def _outline(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import sobel

    m = np.hypot(sobel(x, axis=1, mode="constant"), sobel(x, axis=2, mode="constant"))
    return m / (m.reshape(len(x), -1).max(1)[:, None, None] + 1e-6)


def _sketch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - _outline(x, rng)


def _haze(a: float) -> Op:
    u, v = np.meshgrid(np.linspace(-1, 1, IMG), np.linspace(-1, 1, IMG), indexing="ij")
    r2 = (u**2 + v**2) / 2  # 0 at the centre, 1 in the corners
    return lambda x, rng: x + a * r2[None] ** 1.5


def _stripes(axis: int) -> Op:
    band = (np.arange(IMG) % 4 < 2).astype(np.float64) * 0.35
    pat = band[:, None] * np.ones(IMG)[None] if axis == 0 else np.ones(IMG)[:, None] * band[None]
    return lambda x, rng: x + pat[None]


def _upside_down(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x[:, ::-1, :]


def _rot90(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.rot90(x, 1, axes=(1, 2))


def _posterize(levels: int) -> Op:
    return lambda x, rng: np.round(np.clip(x, 0, 1) * (levels - 1)) / (levels - 1)


def _solarize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.where(x < 0.5, x, 1.0 - x) * 2.0


def _frame(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y = x.copy()
    y[:, :1, :] = y[:, -1:, :] = y[:, :, :1] = y[:, :, -1:] = 1.0
    return y


def _salt_pepper(p: float) -> Op:
    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(x.shape)
        return np.where(u < p / 2, 0.0, np.where(u > 1 - p / 2, 1.0, x))
    return fn


@dataclass(frozen=True)
class Atom:
    """One style operation with its words: ``phrase`` as a prompt says it, ``name`` and ``blurb`` as a LoRA author
    would title and describe it."""

    key: str
    op: Op
    phrase: str
    name: str
    blurb: str


def _atoms() -> dict[str, Atom]:
    A: list[Atom] = []
    for s, ph in ((0.5, "faintly blurred"), (0.8, "slightly blurred"), (1.1, "blurred"), (1.3, "moderately blurred"),
                  (1.6, "strongly blurred"), (2.2, "very strongly blurred")):
        A.append(Atom(f"blur{s}", _blur(s), ph, f"Soft Focus {s}", f"{ph} gaussian blur (sigma {s} px), out-of-focus look"))
    for s, ph in ((0.05, "with faint grain"), (0.1, "with light noise"), (0.15, "with moderate noise"), (0.2, "noisy"),
                  (0.3, "with heavy noise"), (0.45, "with extreme noise")):
        A.append(Atom(f"noise{s}", _noise(s), ph, f"Film Grain {s}", f"gaussian sensor noise sigma {s}, {ph.replace('with ', '')}"))
    for g, ph in ((1.5, "slightly dark"), (2.0, "dark"), (2.5, "rather dark"), (3.0, "very dark"), (4.5, "extremely dark")):
        A.append(Atom(f"dark{g}", _gamma(g), ph, f"Low Key {g}", f"{ph} low-key exposure, gamma {g}, crushed mid-tones"))
    for g, ph in ((0.7, "slightly bright"), (0.5, "bright"), (0.3, "very bright")):
        A.append(Atom(f"bright{g}", _gamma(g), ph, f"High Key {g}", f"{ph} high-key exposure, gamma {g}, lifted mid-tones"))
    for c, ph in ((0.7, "with slightly reduced contrast"), (0.5, "low contrast"), (0.4, "fairly low contrast"),
                  (0.3, "very low contrast"), (0.15, "extremely low contrast")):
        A.append(Atom(f"lowc{c}", _contrast(c), ph, f"Faded Print {c}", f"{ph.replace('with ', '')}, grey washed-out tones (contrast x{c})"))
    for a, ph in ((0.4, "with faded corners"), (0.6, "with moderately faded corners"), (0.8, "with strongly faded corners")):
        A.append(Atom(f"haze{a}", _haze(a), ph, f"Light Leak {a}", f"white vignette, corners {ph.split('with ')[1].replace(' corners', '')} to white (strength {a})"))
    for f, ph in ((2, "pixelated"), (4, "heavily pixelated")):
        A.append(Atom(f"pixel{f}", _pixelate(f), ph, f"Pixel Art x{f}", f"{ph}, blocky {f}x{f} pixel retro look"))
    for lv, ph in ((2, "posterized in black and white"), (4, "posterized")):
        A.append(Atom(f"poster{lv}", _posterize(lv), ph, f"Posterize {lv}", f"{ph}, {lv} flat tone levels"))
    for sp, ph in ((0.05, "with a few specks"), (0.15, "with many specks")):
        A.append(Atom(f"specks{sp}", _salt_pepper(sp), ph, f"Dust and Scratches {sp}", f"salt and pepper specks on {int(100 * sp)}% of pixels"))
    A += [
        Atom("invert", _invert, "inverted colors", "Negative", "inverted colors, white background, dark garment, film negative"),
        Atom("outline", _outline, "as a glowing outline", "Neon Outline", "edge detection, bright outlines on black"),
        Atom("sketch", _sketch, "as a pencil sketch", "Pencil Sketch", "dark pencil lines on white paper, edges only"),
        Atom("stripes_h", _stripes(0), "with horizontal stripes", "Scanlines", "horizontal stripes overlay, CRT scanlines"),
        Atom("stripes_v", _stripes(1), "with vertical stripes", "Pinstripe", "vertical stripes overlay, pinstripe pattern"),
        Atom("upside", _upside_down, "upside down", "Upside Down", "image flipped vertically, upside down"),
        Atom("rot90", _rot90, "rotated sideways", "Sideways", "rotated 90 degrees, lying on its side"),
        Atom("solarize", _solarize, "solarized", "Solarize", "solarized tones, bright parts turn dark, darkroom effect"),
        Atom("frame", _frame, "with a white frame", "Polaroid Frame", "thin white border frame around the picture"),
    ]
    return {a.key: a for a in A}


ATOMS = _atoms()


@dataclass(frozen=True)
class Style:
    """A style: one atom or a pair of atoms applied in order."""

    atoms: tuple[str, ...]

    @property
    def key(self) -> str:
        return "+".join(self.atoms)

    @property
    def id(self) -> str:
        """A bank id (``[A-Za-z0-9._-]``)."""
        return "style-" + "_".join(self.atoms).replace("+", "_")

    @property
    def phrase(self) -> str:
        return " and ".join(ATOMS[a].phrase for a in self.atoms)

    def prompt(self, cls: int) -> str:
        return f"a photo of a {CLASSES[cls]}, {self.phrase}"

    def description(self) -> str:
        """One line as a LoRA author writes it: title, what it does, trigger words."""
        a = [ATOMS[k] for k in self.atoms]
        if len(a) == 1:
            return f"{a[0].name} LoRA - {a[0].blurb}. Trigger: {self.phrase}"
        return f"{a[0].name} x {a[1].name} combo LoRA - {a[0].blurb}, plus {a[1].blurb}. Trigger: {self.phrase}"

    def apply(self, x: np.ndarray, seed: int) -> np.ndarray:
        """x (n, 16, 16) in [0, 1] → the styled images, float32 in [0, 1] (deterministic for a seed)."""
        rng = np.random.default_rng(seed)
        y = x.astype(np.float64)
        for k in self.atoms:
            y = np.clip(ATOMS[k].op(y, rng), 0.0, 1.0)
        return np.ascontiguousarray(y, dtype=np.float32)


def S(*atoms: str) -> Style:
    return Style(tuple(atoms))


CLEAN = S()  # the empty style (pre-training data; a class of the style classifier)

_SINGLES = ["blur0.5", "blur0.8", "blur1.1", "blur1.6", "blur2.2", "noise0.05", "noise0.1", "noise0.2", "noise0.3",
            "noise0.45", "dark1.5", "dark2.0", "dark3.0", "dark4.5", "bright0.7", "bright0.5", "bright0.3", "lowc0.7",
            "lowc0.5", "lowc0.3", "lowc0.15", "invert", "pixel2", "pixel4", "outline", "sketch", "haze0.4", "haze0.8",
            "stripes_h", "stripes_v", "upside", "rot90", "poster2", "poster4", "solarize", "frame", "specks0.05",
            "specks0.15"]
_PAIRS = [("invert", "blur0.8"), ("invert", "blur1.6"), ("invert", "noise0.1"), ("invert", "noise0.3"),
          ("invert", "lowc0.5"), ("invert", "pixel2"), ("invert", "haze0.8"), ("invert", "poster4"),
          ("dark2.0", "noise0.1"), ("dark2.0", "noise0.3"), ("dark3.0", "blur0.8"), ("dark2.0", "pixel2"),
          ("dark3.0", "lowc0.5"), ("blur0.8", "noise0.1"), ("blur1.6", "noise0.2"), ("blur1.1", "stripes_h"),
          ("lowc0.5", "noise0.1"), ("lowc0.3", "blur1.1"), ("bright0.5", "noise0.2"), ("bright0.5", "blur1.1"),
          ("upside", "blur1.1"), ("upside", "invert"), ("haze0.4", "noise0.1"), ("pixel4", "noise0.2")]
#: The library (62 styles): singles at several strengths and pairs.
LIBRARY: list[Style] = [S(a) for a in _SINGLES] + [S(*p) for p in _PAIRS]
#: Held-out styles: an unseen strength between two library strengths, or an unseen pair of library atoms.
HELD_OUT: list[Style] = [S("blur1.3"), S("noise0.15"), S("dark2.5"), S("lowc0.4"), S("invert", "blur1.1"),
                         S("invert", "noise0.2"), S("invert", "dark2.0"), S("haze0.6")]
HELD_OUT_WHY = {"blur1.3": "strength between blur 1.1 and 1.6", "noise0.15": "strength between noise 0.1 and 0.2",
                "dark2.5": "gamma between 2.0 and 3.0", "lowc0.4": "contrast between 0.5 and 0.3",
                "invert+blur1.1": "pair strength between inverted+blur 0.8 and 1.6",
                "invert+noise0.2": "pair strength between inverted+noise 0.1 and 0.3",
                "invert+dark2.0": "unseen pair (both atoms in other pairs)", "haze0.6": "strength between 0.4 and 0.8"}

SIZES: dict[str, dict[str, Any]] = {
    # fixed before the first default run; nothing is tuned on the held-out prompts
    "tiny": {"library": ["blur0.8", "blur1.6", "noise0.1", "noise0.2", "invert", "invert+blur0.8"],
             "held_out": ["blur1.3", "invert+blur1.1"], "classes": [0, 7], "dim": 32, "heads": 1, "depth": 1,
             "patch": 4, "n_pre": 400, "pre_steps": 30, "batch": 32, "lora_steps": 6, "lora_batch": 16, "n_lora": 64,
             "rank": 4, "n_gen": 4, "euler": 3, "cfg": 2.0, "n_clf": 24, "clf_epochs": 1, "n_real": 8, "n_showcase": 4,
             "n_ref": 4, "k": 3, "stylus_candidates": 4, "boot": 50},
    "small": {"library": ["blur0.5", "blur0.8", "blur1.1", "blur1.6", "blur2.2", "noise0.05", "noise0.1", "noise0.2",
                          "noise0.3", "invert", "dark2.0", "pixel2", "invert+blur0.8", "invert+blur1.6",
                          "invert+noise0.1", "dark2.0+noise0.1"],
              "held_out": ["blur1.3", "noise0.15", "invert+blur1.1"], "classes": list(range(10)), "dim": 64,
              "heads": 2, "depth": 2, "patch": 2, "n_pre": 6000, "pre_steps": 600, "batch": 64, "lora_steps": 60,
              "lora_batch": 32, "n_lora": 400, "rank": 8, "n_gen": 8, "euler": 10, "cfg": 3.0, "n_clf": 150,
              "clf_epochs": 4, "n_real": 30, "n_showcase": 8, "n_ref": 8, "k": 4, "stylus_candidates": 12, "boot": 500},
    "default": {"library": [s.key for s in LIBRARY], "held_out": [s.key for s in HELD_OUT],
                "classes": list(range(10)), "dim": 96, "heads": 3, "depth": 3, "patch": 2, "n_pre": 20000,
                "pre_steps": 2000, "batch": 64, "lora_steps": 120, "lora_batch": 32, "n_lora": 300, "rank": 8,
                "n_gen": 16, "euler": 14, "cfg": 3.0, "n_clf": 250, "clf_epochs": 6, "n_real": 100, "n_showcase": 8,
                "n_ref": 8, "k": 5, "stylus_candidates": 15, "boot": 2000},
}
PRE_LR, LORA_LR, CLF_LR = 1e-3, 5e-3, 2e-3
TEXT_METHODS = ["stylus", "nearest", "avg", "sim", "lin", "sparse"]
IMAGE_METHODS = ["nearest_img", "sim_img", "sparse_img"]
METHODS = ["base", *TEXT_METHODS, *IMAGE_METHODS]
LABEL = {"base": "Base", "stylus": "Stylus-style", "nearest": "Nearest", "avg": "Avg", "sim": "Sim", "lin": "Lin",
         "sparse": "Sparse", "nearest_img": "Nearest (img)", "sim_img": "Sim (img)", "sparse_img": "Sparse (img)",
         "real": "real (ceiling)"}


def style_family(key: str) -> str:
    """The kind of a style, strengths dropped: "invert+blur1.1" → "blur+invert" (sorted), "clean" → "clean"."""
    return "+".join(sorted(re.sub(r"[0-9.]+$", "", a) for a in key.split("+")))


def style_of(key: str) -> Style:
    return Style(tuple(key.split("+"))) if key else CLEAN


# ----- data --------------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        buf = fh.read()
    magic, n = int.from_bytes(buf[:4], "big"), int.from_bytes(buf[4:8], "big")
    if magic == 2051:
        return np.frombuffer(buf, np.uint8, offset=16).reshape(n, 28, 28)
    return np.frombuffer(buf, np.uint8, offset=8).copy()


def to16(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) in [0, 1] → (n, 16, 16) float32 (area resampling)."""
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    return F.interpolate(t, size=(IMG, IMG), mode="area")[:, 0].numpy()


def procedural_garments(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n garment-like silhouettes (n, 28, 28) in [0, 1] with labels 0–9 (the Fashion-MNIST classes): shapes drawn
    from rectangles and ellipses with jittered size and shading. The fallback when Fashion-MNIST is absent."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    X = np.zeros((n, 28, 28), np.float32)
    y = rng.integers(0, 10, n)

    def rect(r0: float, r1: float, c0: float, c1: float) -> np.ndarray:
        return (yy >= r0) & (yy < r1) & (xx >= c0) & (xx < c1)

    def ell(r: float, c: float, hr: float, hc: float) -> np.ndarray:
        return ((yy - r) / hr) ** 2 + ((xx - c) / hc) ** 2 <= 1

    for i in range(n):
        j = rng.uniform(-1.5, 1.5, 4)
        c = int(y[i])
        if c == 0:  # T-shirt: torso and short sleeves
            m = rect(5 + j[0], 25, 8 + j[1], 20 - j[1]) | rect(5 + j[0], 11 + j[2], 3, 25)
        elif c == 1:  # trouser: two legs
            m = rect(3 + j[0], 26, 8 + j[1], 13) | rect(3 + j[0], 26, 15, 20 - j[1]) | rect(3 + j[0], 8, 8 + j[1], 20 - j[1])
        elif c == 2:  # pullover: torso and long sleeves
            m = rect(5 + j[0], 25, 8 + j[1], 20 - j[1]) | rect(6 + j[0], 24 + j[2], 3, 8) | rect(6 + j[0], 24 + j[2], 20, 25)
        elif c == 3:  # dress: widening downwards
            m = (np.abs(xx - 14 - j[1] / 2) <= 3 + (yy - 3) * (0.35 + j[2] / 20)) & (yy >= 3 + j[0]) & (yy < 26)
        elif c == 4:  # coat: long sleeves and an opening
            m = (rect(4 + j[0], 26, 7 + j[1], 21 - j[1]) | rect(5, 25, 2, 7) | rect(5, 25, 21, 26)) & ~rect(8, 26, 13.5, 14.5)
        elif c == 5:  # sandal: straps
            m = rect(20 + j[0], 23 + j[0], 2, 26) | rect(14 + j[0], 16 + j[0], 6 + j[1], 22) | rect(14, 22, 8 + j[2], 10 + j[2])
        elif c == 6:  # shirt: torso, sleeves, a collar notch
            m = (rect(5 + j[0], 25, 8 + j[1], 20 - j[1]) | rect(5 + j[0], 20 + j[2], 3, 25)) & ~((yy - 5) < (3 - np.abs(xx - 14)))
        elif c == 7:  # sneaker: low shoe
            m = ell(18 + j[0], 14 + j[1], 5, 11) & (yy >= 13 + j[0]) | rect(20 + j[0], 23 + j[0], 2, 26)
        elif c == 8:  # bag: body and handle
            m = rect(10 + j[0], 25, 4 + j[1], 24 - j[1]) | (ell(10 + j[0], 14, 6, 6) & ~ell(10 + j[0], 14, 4, 4) & (yy < 10 + j[0]))
        else:  # ankle boot: shaft and foot
            m = rect(4 + j[0], 24, 6 + j[1], 14 + j[2]) | rect(16 + j[0], 24, 6 + j[1], 25) | rect(22 + j[0], 25, 5, 26)
        shade = 0.55 + 0.35 * rng.random() + 0.1 * np.sin(yy / (2.0 + rng.random()))
        X[i] = np.where(m, np.clip(shade, 0, 1), 0.0)
    return X, y.astype(np.int64)


@dataclass
class Data:
    train_x: np.ndarray  # (N, 16, 16) clean, [0, 1]
    train_y: np.ndarray  # (N,)
    test_x: np.ndarray
    test_y: np.ndarray
    source: str


def load_data(size: str) -> Data:
    """Fashion-MNIST at 16×16, or (tiny/small without it) procedural garments."""
    if (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        tr = _read_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz").astype(np.float32) / 255
        te = _read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255
        return Data(to16(tr), _read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz").astype(np.int64), to16(te),
                    _read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64), f"Fashion-MNIST ({FMNIST_DIR})")
    if size == "default":
        raise FileNotFoundError(f"The default size needs Fashion-MNIST in {FMNIST_DIR} (apt-get install "
                                "dataset-fashion-mnist); the tiny and small sizes fall back to procedural garments.")
    n_tr = 4 * SIZES[size]["n_pre"] + 20000
    xtr, ytr = procedural_garments(n_tr, SEED)
    xte, yte = procedural_garments(6000, SEED + 1)
    return Data(to16(xtr), ytr, to16(xte), yte, "procedural garments (Fashion-MNIST absent)")


class Pool:
    """Draws disjoint index sets from one array (so no image is in two roles)."""

    def __init__(self, n: int, seed: int) -> None:
        self.perm = np.random.default_rng(seed).permutation(n)
        self.pos = 0

    def take(self, m: int) -> np.ndarray:
        if self.pos + m > len(self.perm):
            raise ValueError(f"the data has {len(self.perm)} images; this size needs more (at {self.pos} + {m})")
        out = self.perm[self.pos:self.pos + m]
        self.pos += m
        return out


def style_seed(style: Style, role: str) -> int:
    return int(hashlib.sha256(f"{style.key}|{role}|{SEED}".encode()).hexdigest()[:8], 16)


# ----- text --------------------------------------------------------------------------------------------------


class CaptionStates:
    """MiniLM token-level last hidden states of captions: (CTX_TOKENS, 384) and a mask, cached per text."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        from adapterbank.prototypes.encoders import default_text_model_path

        d = default_text_model_path()
        self.tok = AutoTokenizer.from_pretrained(d)
        self.model = AutoModel.from_pretrained(d).eval()
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(texts), CTX_TOKENS, 384) states and (len(texts), CTX_TOKENS) masks."""
        new = sorted({t for t in texts if t not in self.cache})
        for i in range(0, len(new), 64):
            chunk = new[i:i + 64]
            b = self.tok(chunk, padding="max_length", truncation=True, max_length=CTX_TOKENS, return_tensors="pt")
            h = self.model(**b).last_hidden_state  # (b, CTX_TOKENS, 384)
            for j, t in enumerate(chunk):
                self.cache[t] = (h[j].clone(), b["attention_mask"][j].float())
        return (torch.stack([self.cache[t][0] for t in texts]), torch.stack([self.cache[t][1] for t in texts]))


# ----- model and pipeline ------------------------------------------------------------------------------------


def _denoiser_class() -> type:
    from diffusers import PixArtTransformer2DModel
    from diffusers.loaders.peft import PeftAdapterMixin

    class Denoiser(PixArtTransformer2DModel, PeftAdapterMixin):
        """diffusers' PixArt-α transformer with diffusers' LoRA loading (``load_lora_adapter``/``delete_adapters``)."""

    return Denoiser


def build_denoiser(cfg: dict[str, Any]) -> nn.Module:
    torch.manual_seed(SEED)
    return _denoiser_class()(
        num_attention_heads=cfg["heads"], attention_head_dim=cfg["dim"] // cfg["heads"], in_channels=1, out_channels=1,
        num_layers=cfg["depth"], cross_attention_dim=cfg["dim"], sample_size=IMG, patch_size=cfg["patch"],
        caption_channels=384, norm_type="ada_norm_single", num_embeds_ada_norm=1000, attention_bias=True,
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)


def denoise(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The velocity v̂(x_σ, σ, caption): (n, 1, 16, 16); σ ∈ [0, 1] enters as timestep 1000·σ."""
    return model(x, encoder_hidden_states=ctx, timestep=sigma * 1000, encoder_attention_mask=mask,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


@dataclass
class StyleOutput:
    images: torch.Tensor  # (n, 1, 16, 16) in [0, 1]


def _pipeline_class() -> type:
    from diffusers import DiffusionPipeline
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class StylePipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
        """Text-to-image with the PixArt denoiser in pixel space: flow-matching Euler steps with classifier-free
        guidance. Captions come in as MiniLM token states (``prompt_embeds``); LoRAs load through diffusers'
        ``load_lora_weights`` into ``unet`` (the denoiser)."""

        def __init__(self, unet: nn.Module, scheduler: Any, text_encoder: Any = None) -> None:
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder)

        @torch.no_grad()
        def __call__(self, *, prompt_embeds: torch.Tensor, prompt_attention_mask: torch.Tensor,
                     negative_prompt_embeds: torch.Tensor, negative_prompt_attention_mask: torch.Tensor,
                     num_images_per_prompt: int = 1, num_inference_steps: int = 16, guidance_scale: float = 3.0,
                     generator: torch.Generator | None = None, prompt: str | None = None) -> StyleOutput:
            n = num_images_per_prompt  # caption states of batch 1 are repeated; of batch n, one per image
            self.unet.eval()
            ctx = torch.cat([negative_prompt_embeds.expand(n, -1, -1), prompt_embeds.expand(n, -1, -1)])
            mask = torch.cat([negative_prompt_attention_mask.expand(n, -1), prompt_attention_mask.expand(n, -1)])
            x = torch.randn(n, 1, IMG, IMG, generator=generator)
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.scheduler.timesteps:
                sig = (t / 1000).expand(2 * n).float()
                v = denoise(self.unet, torch.cat([x, x]), sig, ctx, mask)
                vu, vc = v[:n], v[n:]
                x = self.scheduler.step(vu + guidance_scale * (vc - vu), t, x).prev_sample
            return StyleOutput(((x.clamp(-1, 1) + 1) / 2).float())

    return StylePipeline


def make_pipeline(model: nn.Module) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return _pipeline_class()(model, FlowMatchEulerDiscreteScheduler(shift=1.0))


def flow_batches(x: torch.Tensor, texts: Sequence[str], batch: int, seed: int):
    """Endless shuffled (x0 in [-1, 1], caption) batches."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(perm) - batch + 1, batch):
            i = perm[s:s + batch]
            yield x[i], [texts[j] for j in i.tolist()]


def train_flow(model: nn.Module, params: list[torch.Tensor], x: np.ndarray, texts: Sequence[str], caps: CaptionStates,
               steps: int, lr: float, batch: int, seed: int, p_uncond: float = 0.1, log_every: int = 0) -> dict[str, Any]:
    """Rectified flow: x_σ = (1−σ) x0 + σ ε, loss ‖v̂ − (ε − x0)‖², σ ~ logit-normal; the caption dropped to the null
    caption with probability ``p_uncond``. AdamW, 5 % warm-up, linear decay."""
    t0 = time.perf_counter()
    model.train()
    xt = torch.from_numpy(x).unsqueeze(1) * 2 - 1  # (n, 1, 16, 16) in [-1, 1]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / steps))
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step, (x0, tx) in zip(range(steps), flow_batches(xt, texts, batch, seed)):
        drop = torch.rand(len(tx), generator=g) < p_uncond
        ctx, mask = caps([NULL_PROMPT if d else t for t, d in zip(tx, drop.tolist())])
        sig = torch.sigmoid(torch.randn(len(x0), generator=g))  # logit-normal σ
        eps = torch.randn(x0.shape, generator=g)
        s4 = sig[:, None, None, None]
        v = denoise(model, (1 - s4) * x0 + s4 * eps, sig, ctx, mask)
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log.info("  step %d/%d: loss %.4f (%.0f s)", step + 1, steps, np.mean(losses[-log_every:]),
                     time.perf_counter() - t0)
    model.eval()
    k = max(1, len(losses) // 10)
    return {"first_loss": float(np.mean(losses[:k])), "last_loss": float(np.mean(losses[-k:])), "steps": steps,
            "seconds": round(time.perf_counter() - t0, 1)}


def lora_targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer_blocks.")
            and any(n.endswith(t) for t in LORA_TARGETS)]


def train_lora(base: nn.Module, x: np.ndarray, texts: Sequence[str], caps: CaptionStates, cfg: dict[str, Any],
               seed: int) -> tuple[Any, nn.Module, dict[str, Any]]:
    """A PEFT LoRA (r, α = r) on every attention/FFN linear of every block of a copy of ``base``: the
    :class:`~adapterbank.lora.LoraAdapter` (``unet.``-prefixed paths), the trained PEFT model and the log."""
    from peft import LoraConfig, inject_adapter_in_model

    from adapterbank.lora import LoraAdapter, LoraModule

    model = copy.deepcopy(base)
    targets = lora_targets(model)
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=cfg["rank"], lora_alpha=cfg["rank"], target_modules=targets,
                                       lora_dropout=0.0), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    info = train_flow(model, params, x, texts, caps, cfg["lora_steps"], LORA_LR, cfg["lora_batch"], seed)
    mods = {}
    for name in targets:
        m = model.get_submodule(name)
        mods[f"unet.{name}"] = LoraModule(A=m.lora_A["default"].weight.detach().clone(),
                                          B=m.lora_B["default"].weight.detach().clone(),
                                          scale=float(m.scaling["default"]), weight_shape=tuple(m.base_layer.weight.shape))
    info["trainable_params"] = sum(p.numel() for p in params)
    return LoraAdapter(mods, BASE_NAME, {}), model, info


def dense_model(base: nn.Module, adapters: Sequence[Any], weights: Sequence[float]) -> nn.Module:
    """A copy of ``base`` with W + Σ w_i ΔW_i merged in (the reference a composite must equal)."""
    from adapterbank.lora import LoraAdapter, merge_into

    model = copy.deepcopy(base)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for ad, w in zip(adapters, weights):
        mods = {k[len("unet."):]: dataclasses.replace(m, B=m.B * float(w)) for k, m in ad.modules.items()}
        sd.update(merge_into(sd, LoraAdapter(mods)))
    model.load_state_dict(sd)
    return model.eval()


# ----- classifiers -------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """16×16 classifier; ``features`` is the 64-d penultimate layer (FD, Vendi, the tagger's prototypes)."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 64), nn.ReLU())
        self.head = nn.Linear(64, n_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(x: np.ndarray, y: np.ndarray, n_out: int, epochs: int, seed: int) -> SmallCNN:
    """x (n, 16, 16) in [0, 1]; AdamW, batch 128."""
    torch.manual_seed(seed)
    net = SmallCNN(n_out)
    opt = torch.optim.AdamW(net.parameters(), CLF_LR, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for s in range(0, len(xt), 128):
            i = perm[s:s + 128]
            loss = F.cross_entropy(net(xt[i]), yt[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.inference_mode()
def classify(net: SmallCNN, x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, 64) float64, probabilities (n, n_out))."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1, 1, IMG, IMG)
    f = torch.cat([net.features(xt[s:s + 1000]) for s in range(0, len(xt), 1000)])
    return f.double().numpy(), torch.softmax(net.head(f), 1).double().numpy()


# ----- methods -----------------------------------------------------------------------------------------------


def style_keywords(prompt: str) -> list[str]:
    """The stand-in for Stylus's LLM composer segmenting a prompt into tasks: the phrases after the subject
    ("a photo of a sneaker, blurred and noisy" → ["blurred", "noisy"])."""
    _, _, rest = prompt.partition(",")
    return [p.strip() for p in re.split(r",| and ", rest) if p.strip()] or [prompt]


def _composer_classes() -> tuple[type, type]:
    from adapterbank.compose import compose
    from adapterbank.integrations.diffusers import ComposedLoRA, PromptComposition
    from adapterbank.prototypes import describe

    class StylusComposer(ComposedLoRA):
        """Stylus-style selection: retrieve ``candidates`` by description similarity to the whole prompt, keep per
        style keyword the ⌊k / #keywords⌋ candidates whose description is most similar to it, equal weights."""

        def __init__(self, *a: Any, candidates: int, **kw: Any) -> None:
            super().__init__(*a, strategy="avg", **kw)
            self.candidates = candidates
            self.chosen: dict[str, dict[str, Any]] = {}

        def compose(self, prompt: str, reference_image: Any = None) -> Any:
            proto = self.prototype(prompt)
            key = self._key(proto)
            hit = self._cache.get(key)
            if hit is not None:
                return PromptComposition(prompt, proto, hit[0], True)
            cands = [h.id for h in self.bank.search(proto, k=self.candidates)]  # retriever: the whole prompt
            P = {i: self.bank.get_prototype(i, proto.space).vector.astype(np.float64) for i in cands}
            kws = style_keywords(prompt)
            per = max(1, self.k // len(kws))
            ids: list[str] = []
            for kw_text in kws:  # composer: the candidates that fit each keyword (cosine of unit vectors)
                q = describe(self.encoder, kw_text).vector.astype(np.float64)
                ranked = sorted(cands, key=lambda i: -float(q @ P[i] / (np.linalg.norm(q) * np.linalg.norm(P[i]))))
                ids += [i for i in ranked[:per] if i not in ids]
            self.chosen[prompt] = {"candidates": cands, "keywords": kws, "ids": ids}
            comp = compose(self.bank, proto, ids=ids, strategy="avg")  # fixed equal weights
            self._store(key, comp)
            return PromptComposition(prompt, proto, comp, False)

    class ReferenceComposer(ComposedLoRA):
        """Composition for a prompt whose target prototype is given (the tagger's mean feature of reference
        images of the wanted style), in the bank's image space."""

        def __init__(self, *a: Any, targets: dict[str, Any], **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.targets = targets

        def prototype(self, prompt: str, reference_image: Any = None) -> Any:
            return self.targets[prompt]

    return StylusComposer, ReferenceComposer


# ----- stages ------------------------------------------------------------------------------------------------


@dataclass
class Trained:
    base: nn.Module
    bank: Any
    text_enc: Any
    tagger: SmallCNN
    tagger_enc: Any
    style_clf: SmallCNN
    class_clf: SmallCNN
    style_names: list[str]
    info: dict[str, Any]
    showcase: dict[str, np.ndarray]
    lora_models: dict[str, nn.Module] = field(default_factory=dict)


def stage_train(cfg: dict[str, Any], data: Data, caps: CaptionStates, out: Path) -> Trained:
    """Pre-train the denoiser, the three CNNs, the library LoRAs; build the bank (kohya files + descriptions +
    image prototypes)."""
    from adapterbank.bank import Bank
    from adapterbank.formats import write_adapter
    from adapterbank.prototypes import CallableEncoder, compute_prototype, describe, load_encoder

    info: dict[str, Any] = {}
    lib = [style_of(k) for k in cfg["library"]]
    held = [style_of(k) for k in cfg["held_out"]]
    pool = Pool(len(data.train_x), SEED)

    # 1. the base model on clean captioned images
    t0 = time.perf_counter()
    base = build_denoiser(cfg)
    idx = pool.take(cfg["n_pre"])
    info["pretrain"] = train_flow(base, list(base.parameters()), data.train_x[idx],
                                  [f"a photo of a {CLASSES[c]}" for c in data.train_y[idx]], caps, cfg["pre_steps"],
                                  PRE_LR, cfg["batch"], SEED, log_every=max(50, cfg["pre_steps"] // 10))
    info["base_params"] = sum(p.numel() for p in base.parameters())
    for p in base.parameters():
        p.requires_grad_(False)
    log.info("pre-trained the denoiser (%d parameters): loss %.4f → %.4f in %.0f s", info["base_params"],
             info["pretrain"]["first_loss"], info["pretrain"]["last_loss"], info["pretrain"]["seconds"])

    # 2. classifiers on real transformed images: style (clean + library + held-out), class, and the tagger
    t1 = time.perf_counter()
    style_names = ["clean", *[s.key for s in lib], *[s.key for s in held]]
    xs, ys, yc = [], [], []
    for si, key in enumerate(style_names):
        st = style_of("" if key == "clean" else key)
        i = pool.take(cfg["n_clf"])
        xs.append(st.apply(data.train_x[i], style_seed(st, "clf")))
        ys.append(np.full(len(i), si))
        yc.append(data.train_y[i])
    X, YS, YC = np.concatenate(xs), np.concatenate(ys), np.concatenate(yc)
    style_clf = train_classifier(X, YS, len(style_names), cfg["clf_epochs"], SEED)
    class_clf = train_classifier(X, YC, 10, cfg["clf_epochs"], SEED + 1)
    n_lib = 1 + len(lib)
    tag_mask = YS < n_lib  # the tagger never sees a held-out style
    tagger = train_classifier(X[tag_mask], YS[tag_mask], n_lib, cfg["clf_epochs"], SEED + 2)
    info["classifiers_seconds"] = round(time.perf_counter() - t1, 1)

    # 3. the LoRA library, the bank
    text_enc = load_encoder("default")
    fp = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in tagger.parameters())).hexdigest()[:12]
    tagger_enc = CallableEncoder(lambda xs: classify(tagger, np.stack(xs))[0], name=f"style-tagger-{fp}", dim=64)
    bank_dir = out / "bank"
    if bank_dir.exists():
        shutil.rmtree(bank_dir)
    bank = Bank.init(bank_dir)
    files = out / "civitai_dump"
    shutil.rmtree(files, ignore_errors=True)
    info["loras"] = {}
    showcase: dict[str, np.ndarray] = {}
    pipe_g = torch.Generator()
    t2 = time.perf_counter()
    for li, st in enumerate(lib):
        i = pool.take(cfg["n_lora"])
        x = st.apply(data.train_x[i], style_seed(st, "lora"))
        texts = [st.prompt(int(c)) for c in data.train_y[i]]
        ad, peft_model, tinfo = train_lora(base, x, texts, caps, cfg, SEED + 100 + li)
        (f,) = write_adapter(ad, files / st.id, format="kohya", base_model=BASE_NAME)
        desc = st.description()
        bank.add(f, id=st.id, description=desc, prototype=describe(text_enc, desc), tags=["style"])
        # showcase images, as on the model's page: generated with the LoRA from its trigger words
        pipe = make_pipeline(peft_model)
        pipe_g.manual_seed(style_seed(st, "showcase"))
        e, msk = caps([st.prompt(int(c)) for c in np.arange(cfg["n_showcase"]) % 10])  # one class per image
        (ne, nm) = caps([NULL_PROMPT])
        imgs = pipe(prompt_embeds=e, prompt_attention_mask=msk, negative_prompt_embeds=ne,
                    negative_prompt_attention_mask=nm, num_images_per_prompt=len(e), num_inference_steps=cfg["euler"],
                    guidance_scale=cfg["cfg"], generator=pipe_g).images[:, 0].numpy()
        showcase[st.id] = imgs
        bank.set_prototype(st.id, compute_prototype(tagger_enc, list(showcase[st.id]), batch_size=64,
                                                    description=f"{len(imgs)} showcase images of {st.id}"))
        info["loras"][st.id] = {**tinfo, "style": st.key, "description": desc}
        log.info("[%d/%d] LoRA %s: loss %.4f → %.4f (%.1f s)", li + 1, len(lib), st.id, tinfo["first_loss"],
                 tinfo["last_loss"], tinfo["seconds"])
    bank.remember_encoder(text_enc.space.key, "default")
    info["loras_seconds"] = round(time.perf_counter() - t2, 1)
    info["train_seconds"] = round(time.perf_counter() - t0, 1)
    return Trained(base, bank, text_enc, tagger, tagger_enc, style_clf, class_clf, style_names, info, showcase)


def prompt_kwargs(caps: CaptionStates, prompt: str) -> dict[str, torch.Tensor]:
    (e, m), (ne, nm) = caps([prompt]), caps([NULL_PROMPT])
    return {"prompt_embeds": e, "prompt_attention_mask": m, "negative_prompt_embeds": ne,
            "negative_prompt_attention_mask": nm}


@dataclass
class Task:
    style: Style
    cls: int

    @property
    def prompt(self) -> str:
        return self.style.prompt(self.cls)


def stage_generate(tr: Trained, tasks: list[Task], refs: dict[str, np.ndarray], real: dict[str, np.ndarray],
                   caps: CaptionStates, cfg: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """Every method on every task: images (n_gen per prompt, the same noise for every method), the
    compositions, the seconds, and one exactness check of a loaded composite against the dense model."""
    from adapterbank.integrations.diffusers import ComposedLoRA
    from adapterbank.prototypes import compute_prototype

    Stylus, Reference = _composer_classes()
    pipe = make_pipeline(copy.deepcopy(tr.base))  # the composites load into this copy; tr.base stays plain
    targets = {}
    for t in tasks:
        if t.style.key not in targets:
            targets[t.style.key] = compute_prototype(tr.tagger_enc, list(refs[t.style.key]), batch_size=64,
                                                     description=f"{len(refs[t.style.key])} reference images of {t.style.key}")
    images: dict[str, np.ndarray] = {}
    comps: dict[str, dict[str, Any]] = {}
    secs: dict[str, float] = {}
    check: dict[str, Any] = {}
    for m in methods:
        t0 = time.perf_counter()
        composer: Any = None
        if m == "stylus":
            composer = Stylus(tr.bank, pipe, k=cfg["k"], encoder=tr.text_enc, candidates=cfg["stylus_candidates"])
        elif m in TEXT_METHODS:
            composer = ComposedLoRA(tr.bank, pipe, k=cfg["k"], strategy=m, encoder=tr.text_enc)
        elif m in IMAGE_METHODS:
            composer = Reference(tr.bank, pipe, k=cfg["k"], strategy=m.removesuffix("_img"), encoder=tr.text_enc,
                                 targets={t.prompt: targets[t.style.key] for t in tasks})
        out, comp_m = [], {}
        for ti, t in enumerate(tasks):
            g = torch.Generator().manual_seed(SEED + 1000 + ti)  # the same noise for every method
            kw = {**prompt_kwargs(caps, t.prompt), "num_images_per_prompt": cfg["n_gen"],
                  "num_inference_steps": cfg["euler"], "guidance_scale": cfg["cfg"], "generator": g}
            if composer is None:
                res = pipe(**kw)
            else:
                res = composer(t.prompt, **kw)
                pc = composer.last
                comp_m[t.prompt] = {"ids": pc.ids, "weights": [round(float(w), 4) for w in pc.weights],
                                    "distances": [round(float(r[1]), 5) for r in pc.weight_table()]}
                if m == "stylus":
                    comp_m[t.prompt]["stylus"] = composer.chosen.get(t.prompt)
                if m == "sparse" and not check:
                    check = exactness_check(tr, pipe, pc, caps, t.prompt)
            out.append(res.images[:, 0].numpy())
        if composer is not None:
            composer.close()
        images[m] = np.stack(out)  # (tasks, n_gen, 16, 16)
        comps[m] = comp_m
        secs[m] = round(time.perf_counter() - t0, 1)
        log.info("generated %s: %d prompts × %d images in %.0f s", m, len(tasks), cfg["n_gen"], secs[m])
    images["real"] = np.stack([real[t.prompt][:cfg["n_gen"]] for t in tasks])
    return {"images": images, "compositions": comps, "seconds": secs, "exactness": check}


@torch.no_grad()
def exactness_check(tr: Trained, pipe: Any, pc: Any, caps: CaptionStates, prompt: str) -> dict[str, Any]:
    """The loaded composite (PEFT layers in the pipeline) against a copy of the base holding W + Σ w_i ΔW_i."""
    dense = dense_model(tr.base, [tr.bank.load_adapter(i) for i in pc.ids], pc.weights.tolist())
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 1, IMG, IMG, generator=g)
    sig = torch.tensor([0.9, 0.6, 0.3, 0.1])
    e, msk = caps([prompt] * 4)
    got = denoise(pipe.unet, x, sig, e, msk)
    want = denoise(dense, x, sig, e, msk)
    base = denoise(tr.base, x, sig, e, msk)
    return {"prompt": prompt, "ids": pc.ids, "weights": pc.weights.tolist(),
            "max_abs_diff_vs_dense": float((got - want).abs().max()),
            "max_abs_effect_of_composite": float((want - base).abs().max())}


def stage_metrics(tr: Trained, tasks: list[Task], gen: dict[str, Any], real_fd: dict[str, np.ndarray],
                  methods: Sequence[str]) -> dict[str, Any]:
    """Per method and prompt: style accuracy, family accuracy (the predicted style is of the wanted kind, any
    strength: ``style_family``), mean probability of the wanted style, class accuracy, FD in the
    style classifier's features against real images of (style, class), Vendi in the class classifier's features,
    and the most frequent predicted style."""
    ref_feats = {t.prompt: classify(tr.style_clf, real_fd[t.prompt])[0] for t in tasks}
    per: dict[str, dict[str, list[Any]]] = {}
    for m in [*methods, "real"]:
        rows: dict[str, list[Any]] = {k: [] for k in ("style_acc", "family_acc", "p_style", "class_acc", "fd", "vendi",
                                                      "top_style")}
        fam = [style_family(n) for n in tr.style_names]
        for ti, t in enumerate(tasks):
            imgs = gen["images"][m][ti]
            fs, ps = classify(tr.style_clf, imgs)
            fc, pc = classify(tr.class_clf, imgs)
            si = tr.style_names.index(t.style.key)
            pred = ps.argmax(1)
            rows["style_acc"].append(float((pred == si).mean()))
            rows["family_acc"].append(float(np.mean([fam[j] == fam[si] for j in pred])))
            rows["p_style"].append(float(ps[:, si].mean()))
            rows["class_acc"].append(float((pc.argmax(1) == t.cls).mean()))
            rows["fd"].append(frechet(fs, ref_feats[t.prompt]))
            rows["vendi"].append(vendi(fc))
            vals, cnt = np.unique(pred, return_counts=True)
            rows["top_style"].append(tr.style_names[int(vals[cnt.argmax()])])
        per[m] = rows
    return per


METRICS = [("style_acc", "style acc ↑", True), ("family_acc", "family acc ↑", True), ("p_style", "p(style) ↑", True), ("class_acc", "class acc ↑", True),
           ("fd", "FD ↓", False), ("vendi", "Vendi", True)]


def paired_intervals(per: dict[str, Any], methods: Sequence[str], n_boot: int) -> dict[str, dict[str, Any]]:
    """Sparse − each other method, per metric: mean paired difference over prompts and its 95 % bootstrap interval."""
    from adapterbank.evaluate.bootstrap import paired_bootstrap

    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        if m == "sparse":
            continue
        out[m] = {}
        for key, _, _ in METRICS:
            iv = paired_bootstrap(per["sparse"][key], per[m][key], n_boot=n_boot, seed=SEED)
            out[m][key] = [iv.diff, iv.lo, iv.hi]
    return out


def _save_trained(tr: Trained, path: Path, digest: str) -> None:
    torch.save({"digest": digest, "base": tr.base.state_dict(), "tagger": tr.tagger.state_dict(),
                "style_clf": tr.style_clf.state_dict(), "class_clf": tr.class_clf.state_dict(),
                "style_names": tr.style_names, "info": tr.info, "showcase": tr.showcase}, path)


def _load_trained(path: Path, digest: str, cfg: dict[str, Any], out: Path) -> Trained | None:
    """The training of an earlier run with the same config and data (``None`` if there is none)."""
    from adapterbank.bank import Bank
    from adapterbank.prototypes import CallableEncoder, load_encoder

    if not path.exists() or not (out / "bank").exists():
        return None
    blob = torch.load(path, weights_only=False)
    if blob.get("digest") != digest:
        return None
    base = build_denoiser(cfg)
    base.load_state_dict(blob["base"])
    base.eval().requires_grad_(False)
    names = blob["style_names"]
    n_lib = 1 + len(cfg["library"])
    nets = {}
    for key, n_out in (("tagger", n_lib), ("style_clf", len(names)), ("class_clf", 10)):
        nets[key] = SmallCNN(n_out)
        nets[key].load_state_dict(blob[key])
        nets[key].eval()
    tagger = nets["tagger"]
    fp = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in tagger.parameters())).hexdigest()[:12]
    enc = CallableEncoder(lambda xs: classify(tagger, np.stack(xs))[0], name=f"style-tagger-{fp}", dim=64)
    info = blob["info"]
    info["reused"] = True
    return Trained(base, Bank.open(out / "bank"), load_encoder("default"), tagger, enc, nets["style_clf"],
                   nets["class_clf"], names, info, blob["showcase"])


def config_digest(cfg: dict[str, Any], data: Data) -> str:
    h = hashlib.sha256(json.dumps({k: cfg[k] for k in sorted(cfg)}, sort_keys=True, default=str).encode())
    h.update(json.dumps([PRE_LR, LORA_LR, CLF_LR, CTX_TOKENS, LORA_TARGETS, SEED]).encode())
    h.update(data.source.encode())
    h.update(data.train_x[:256].tobytes())
    return h.hexdigest()


def train_need(cfg: dict[str, Any]) -> int:
    """Training-set images a size uses (pre-training, classifiers, LoRAs, reference images)."""
    n_styles = 1 + len(cfg["library"]) + len(cfg["held_out"])
    return (cfg["n_pre"] + cfg["n_clf"] * n_styles + cfg["n_lora"] * len(cfg["library"])
            + cfg["n_ref"] * len(cfg["held_out"]))


def held_out_images(data: Data, cfg: dict[str, Any], tasks: list[Task]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per prompt: real FD reference images and the ``real`` row (disjoint test images of the class, styled);
    per held-out style: the reference images for the image-prototype target (training images not used before)."""
    by_cls = {c: np.random.default_rng(SEED + 3 + c).permutation(np.flatnonzero(data.test_y == c)) for c in range(10)}
    used = dict.fromkeys(range(10), 0)
    real_fd, real_row = {}, {}
    for t in tasks:
        n = cfg["n_real"] + cfg["n_gen"]
        i = by_cls[t.cls][used[t.cls]:used[t.cls] + n]
        if len(i) < n:
            raise ValueError(f"class {t.cls} has {len(by_cls[t.cls])} test images; this size needs more")
        used[t.cls] += n
        x = t.style.apply(data.test_x[i], style_seed(t.style, f"real{t.cls}"))
        real_fd[t.prompt], real_row[t.prompt] = x[:cfg["n_real"]], x[cfg["n_real"]:]
    pool = Pool(len(data.train_x), SEED)
    pool.take(train_need(cfg) - cfg["n_ref"] * len(cfg["held_out"]))  # what stage_train used
    refs = {}
    for key in cfg["held_out"]:
        st = style_of(key)
        refs[key] = st.apply(data.train_x[pool.take(cfg["n_ref"])], style_seed(st, "ref"))
    return real_fd, real_row, refs


# ----- report ------------------------------------------------------------------------------------------------


def grid_png(tasks: list[Task], images: dict[str, np.ndarray], cols: Sequence[str], path: Path, per: dict[str, Any],
             n_show: int = 4) -> None:
    """Rows: one prompt per held-out style; columns: real images, then each method; each cell 2×2 samples with
    the method's style accuracy on that prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(t.style.key for t in tasks))
    rows = []
    for ri, key in enumerate(keys):  # one class per style, rotating through the classes
        cand = [ti for ti, t in enumerate(tasks) if t.style.key == key]
        rows.append(cand[ri % len(cand)])
    side = 2 if n_show >= 4 else 1
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.25 * len(cols) + 1.5, 1.35 * len(rows) + 0.8),
                             squeeze=False)
    for r, ti in enumerate(rows):
        for c, m in enumerate(cols):
            ims = images[m][ti][:side * side]
            tile = np.concatenate([np.concatenate(list(ims[i * side:(i + 1) * side]), 1) for i in range(side)], 0)
            ax = axes[r, c]
            ax.imshow(tile, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"style {per[m]['style_acc'][ti]:.2f}", fontsize=6, labelpad=1)
            if r == 0:
                ax.set_title(LABEL[m], fontsize=7)
            if c == 0:
                ax.set_ylabel(tasks[ti].prompt.replace("a photo of a ", "").replace(", ", ",\n", 1), fontsize=6,
                              rotation=0, ha="right", va="center")
    fig.suptitle("Held-out prompts (rows) × methods (columns): first samples; under each cell the style accuracy "
                 "of that prompt's samples", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    plt.close(fig)


def library_png(showcase: dict[str, np.ndarray], path: Path, per_row: int = 8) -> None:
    """The library's showcase: the first showcase image of every LoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = list(showcase)
    nr = math.ceil(len(ids) / per_row)
    fig, axes = plt.subplots(nr, per_row, figsize=(per_row * 1.1, nr * 1.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, sid in enumerate(ids):
        ax = axes.flat[i]
        ax.imshow(np.concatenate(list(showcase[sid][:2]), 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(sid.removeprefix("style-"), fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _fmt(v: float, key: str) -> str:
    return f"{v:.2f}" if key in ("fd", "vendi") else f"{v:.3f}"


def report(res: dict[str, Any], cfg: dict[str, Any]) -> str:
    per, ivs, methods = res["per_prompt"], res["intervals"], res["methods"]
    keys = res["held_out"]
    L = [f"# Benchmark C — prompt-level LoRA composition for text-to-image (size `{res['size']}`)", "",
         (f"{res['date']}; {res['machine']['cpu']}, {res['machine']['cores']} cores (load average at the start "
         f"{', '.join(f'{v:.1f}' for v in res['machine']['load_avg'])}), torch {res['machine']['torch']}, "
         f"{res['machine']['torch_threads']} thread(s). Command: `{res['command']}`. Wall time "
         f"{res['seconds']['total'] / 60:.1f} min (training {res['seconds']['train'] / 60:.1f} min"
         f"{' — reused from an earlier run' if res['train_info'].get('reused') else ''}, generation "
         f"{res['seconds']['generate'] / 60:.1f} min, metrics {res['seconds']['metrics']:.0f} s)."), "",
         (f"Data: {res['data']}, 16×16. Denoiser: diffusers `PixArtTransformer2DModel` (width {cfg['dim']}, "
         f"{cfg['depth']} blocks, {cfg['heads']} heads, patch {cfg['patch']}, {res['train_info']['base_params']:,} "
         f"parameters), rectified flow, caption = MiniLM token states ({CTX_TOKENS} tokens), pre-trained on "
         f"{cfg['n_pre']} clean images for {cfg['pre_steps']} steps (loss {res['train_info']['pretrain']['first_loss']:.3f} "
         f"→ {res['train_info']['pretrain']['last_loss']:.3f}). Library: {len(cfg['library'])} kohya LoRAs (r = "
         f"{cfg['rank']} on every attention/FFN linear, {cfg['lora_steps']} steps × {cfg['lora_batch']} images of "
         f"{cfg['n_lora']}); mean loss {res['lora_loss'][0]:.3f} → {res['lora_loss'][1]:.3f}. Sampling: "
         f"{cfg['euler']} Euler steps, CFG {cfg['cfg']}, {cfg['n_gen']} images per prompt (the same noise for every "
         f"method); k = {cfg['k']}, Stylus candidates {cfg['stylus_candidates']}."), "",
         (f"Classifiers on real styled test images: style classifier ({len(res['style_names'])} styles) accuracy "
         f"{res['clf_acc']['style']:.3f} on the held-out styles' real images; class classifier {res['clf_acc']['class']:.3f}. "
         f"Each LoRA's own showcase images classified as its style: {res['showcase_style_acc']:.3f} (how well the "
         f"LoRAs learned their styles; chance {1 / len(res['style_names']):.3f})."), "",
         (f"Exactness (one Sparse prompt, `{res['exactness'].get('prompt')}`): the composite loaded with "
         f"`load_lora_weights` vs a copy of the base holding W + Σ w_i ΔW_i: max |Δ output| "
         f"{res['exactness'].get('max_abs_diff_vs_dense', float('nan')):.2e} (the composite itself moves the output by "
         f"{res['exactness'].get('max_abs_effect_of_composite', float('nan')):.2e})."), "",
         f"## Mean over {len(res['prompts'])} held-out prompts ({len(keys)} styles × {len(cfg['classes'])} classes)", "",
         "| method | " + " | ".join(h for _, h, _ in METRICS) + " | s per prompt |", "|:---|" + "---:|" * (len(METRICS) + 1)]
    for m in [*methods, "real"]:
        s = res["seconds"]["per_method"].get(m)
        L.append(f"| {LABEL[m]} | " + " | ".join(_fmt(float(np.mean(per[m][k])), k) for k, _, _ in METRICS)
                 + f" | {s / len(res['prompts']):.2f} |" if s is not None else f"| {LABEL[m]} | "
                 + " | ".join(_fmt(float(np.mean(per[m][k])), k) for k, _, _ in METRICS) + " | — |")
    L += ["", "## Sparse − each method: mean paired difference over prompts [95 % bootstrap interval]", "",
          "Positive is better for Sparse except FD (negative is better). **Bold**: the interval excludes 0.", "",
          "| Sparse − | " + " | ".join(h for _, h, _ in METRICS) + " |", "|:---|" + "---:|" * len(METRICS)]
    for m, row in ivs.items():
        cells = []
        for k, _, _ in METRICS:
            d, lo, hi = row[k]
            c = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" if k not in ("fd",) else f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            cells.append(f"**{c}**" if lo > 0 or hi < 0 else c)
        L.append(f"| {LABEL[m]} | " + " | ".join(cells) + " |")
    L += ["", "## Per held-out style: style accuracy (mean over classes)", "",
          "| held-out style | why held out | " + " | ".join(LABEL[m] for m in [*methods, "real"]) + " |",
          "|:---|:---|" + "---:|" * (len(methods) + 1)]
    prompts = res["prompts"]
    for key in keys:
        idx = [i for i, p in enumerate(prompts) if p["style"] == key]
        L.append(f"| {key} | {HELD_OUT_WHY.get(key, '')} | " + " | ".join(
            f"{np.mean([per[m]['style_acc'][i] for i in idx]):.2f}" for m in [*methods, "real"]) + " |")
    L += ["", "## Per held-out style: FD ↓ (mean over classes)", "",
          "| held-out style | " + " | ".join(LABEL[m] for m in [*methods, "real"]) + " |",
          "|:---|" + "---:|" * (len(methods) + 1)]
    for key in keys:
        idx = [i for i, p in enumerate(prompts) if p["style"] == key]
        L.append(f"| {key} | " + " | ".join(f"{np.mean([per[m]['fd'][i] for i in idx]):.1f}"
                                             for m in [*methods, "real"]) + " |")
    L += ["", "## What each method composed (first class of each held-out style)", "",
          "| prompt | method | LoRAs (weight) | most frequent predicted style |", "|:---|:---|:---|:---|"]
    comps = res["compositions"]
    for key in keys:
        i = next(i for i, p in enumerate(prompts) if p["style"] == key)
        pr = prompts[i]["prompt"]
        for m in [x for x in ("stylus", "sim", "sparse", "sparse_img") if x in comps]:
            c = comps[m][pr]
            L.append(f"| {pr} | {LABEL[m]} | " + ", ".join(
                f"{a.removeprefix('style-')} ({w:+.2f})" for a, w in zip(c["ids"], c["weights"]) if abs(w) > 5e-3)
                + f" | {per[m]['top_style'][i]} |")
    L += ["", "![grid](grid.png)", "", "![library](library.png)", ""]
    return "\n".join(L)


# ----- main --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="default")
    ap.add_argument("-o", "--out", type=Path, default=None, help="output folder (default bench/results/loo_synthesis_SIZE)")
    ap.add_argument("--figures", type=Path, default=None, help="also copy results.md/json and the PNGs here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on the shared 2-core machine)")
    ap.add_argument("--retrain", action="store_true", help="do not reuse an earlier run's training")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the results dict (also written as results.json / results.md / PNGs)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder": this pipeline has none
    t_all = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    cfg = SIZES[args.size]
    out: Path = args.out or Path("bench/results") / f"loo_synthesis_{args.size}"
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.size)
    if train_need(cfg) > len(data.train_x):
        raise ValueError(f"size {args.size} needs {train_need(cfg)} training images; the data has {len(data.train_x)}")
    log.info("data: %s", data.source)
    caps = CaptionStates()
    digest = config_digest(cfg, data)
    tr = None if args.retrain else _load_trained(out / "trained.pt", digest, cfg, out)
    if tr is None:
        tr = stage_train(cfg, data, caps, out)
        _save_trained(tr, out / "trained.pt", digest)
    else:
        log.info("reusing the training of an earlier run (%s)", out / "trained.pt")
    t_train = time.perf_counter() - t_all

    tasks = [Task(style_of(k), c) for k in cfg["held_out"] for c in cfg["classes"]]
    real_fd, real_row, refs = held_out_images(data, cfg, tasks)
    t1 = time.perf_counter()
    methods = [m for m in METHODS if m in args.methods]
    gen = stage_generate(tr, tasks, refs, real_row, caps, cfg, methods)
    t_gen = time.perf_counter() - t1
    t2 = time.perf_counter()
    per = stage_metrics(tr, tasks, gen, real_fd, methods)
    ivs = paired_intervals(per, methods, cfg["boot"]) if "sparse" in methods else {}
    # sanity: the classifiers on real held-out images, the LoRAs on their own showcase images
    allreal = np.concatenate([real_fd[t.prompt] for t in tasks])
    s_true = np.concatenate([[tr.style_names.index(t.style.key)] * cfg["n_real"] for t in tasks])
    c_true = np.concatenate([[t.cls] * cfg["n_real"] for t in tasks])
    clf_acc = {"style": float((classify(tr.style_clf, allreal)[1].argmax(1) == s_true).mean()),
               "class": float((classify(tr.class_clf, allreal)[1].argmax(1) == c_true).mean())}
    show_ok = [float((classify(tr.style_clf, imgs)[1].argmax(1) == tr.style_names.index(
        style_of(tr.info["loras"][sid]["style"]).key)).mean()) for sid, imgs in tr.showcase.items()]
    t_met = time.perf_counter() - t2
    lo = tr.info["loras"].values()
    res: dict[str, Any] = {
        "benchmark": "C: loo_synthesis", "size": args.size,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "config": cfg, "data": data.source, "digest": digest, "methods": methods, "held_out": cfg["held_out"],
        "style_names": tr.style_names, "descriptions": {sid: v["description"] for sid, v in tr.info["loras"].items()},
        "prompts": [{"prompt": t.prompt, "style": t.style.key, "class": t.cls} for t in tasks],
        "per_prompt": per, "intervals": ivs, "compositions": gen["compositions"], "exactness": gen["exactness"],
        "clf_acc": clf_acc, "showcase_style_acc": float(np.mean(show_ok)),
        "showcase_style_acc_per_lora": dict(zip(tr.showcase, show_ok)),
        "lora_loss": [float(np.mean([v["first_loss"] for v in lo])), float(np.mean([v["last_loss"] for v in lo]))],
        "train_info": tr.info,
        "seconds": {"train": round(t_train, 1), "generate": round(t_gen, 1), "metrics": round(t_met, 1),
                    "per_method": gen["seconds"], "total": round(time.perf_counter() - t_all, 1)},
    }
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    grid_png(tasks, gen["images"], ["real", *methods], out / "grid.png", per)
    library_png(tr.showcase, out / "library.png")
    md = report(res, cfg)
    (out / "results.md").write_text(md)
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", "results.json", "grid.png", "library.png"):
            shutil.copy2(out / name, args.figures / name)
    tr.bank.close()
    log.info("report in %s (%.0f s in all)", out, res["seconds"]["total"])
    return res


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging("matplotlib", "diffusers", "peft")
    warnings.filterwarnings("ignore")
    res = run(args)
    print(report(res, SIZES[args.size]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
