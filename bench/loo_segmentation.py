"""Benchmark B — leave-one-out composition of segmentation LoRAs across acquisition "sites" (seed paper, Tables 1–6).

An imitation of the seed paper's multi-site prostate study on data that is installed here. Images are
Fashion-MNIST (Debian ``dataset-fashion-mnist``); each *site* is a simulated acquisition protocol — a
scanner with another contrast curve, Rician noise of some level, a blurring point-spread function, a
coarser matrix, a receive-coil bias field, inverted contrast — applied to its own disjoint set of images.
The task everywhere is the same: segment the foreground, whose ground truth is the *clean* image
thresholded at ``FG_THRESHOLD`` (intensity > 0.1 on [0, 1], i.e. > 25/255; no hole filling).

Model: a small ViT (``transformers.ViTModel`` built from a config: 28×28 input, 4×4 patches, 4 layers,
width 64) with a linear patch decoder (each patch token → 16 pixel logits), pre-trained on clean source
images only. One PEFT LoRA per site (r = 8, α = 16, on every query/key/value/dense linear, the patch
embedding and the decoder) is trained on that site's training images, saved with ``save_pretrained`` and
added to an adapterbank ``Bank``. Prototypes (Eq. 1): the frozen pre-trained encoder's patch tokens,
mean-pooled per image, averaged over the site's training images — a :class:`CallableEncoder` whose
space records the base weights' fingerprint. Then ``adapterbank.evaluate`` holds each site out in turn,
composes an adapter from the other sites' LoRAs with every strategy (Avg, Sim, Lin, Sparse, Nearest),
and scores the mean per-image Dice on the held-out site's test images, next to Pre-trained (no adapter)
and SFT (the site's own LoRA). The report (results.json/.md, PNGs, index.html) comes from
``adapterbank.evaluate.write_report``; this script appends the seed's appendix tables (cross-site Dice of
every adapter on every site, Table 9; prototype distances, Table 8), a site gallery and a qualitative
figure (Figure 3).

Nothing is tuned on the test splits: every hyper-parameter below was fixed before the first run; the
strategies use their defaults (``lam_rel`` = 0.1, ``tau_rel`` = 1). The validation split of each site is
only used to report how well its LoRA trained.

    python bench/loo_segmentation.py --size small -o bench/results/loo_segmentation_small
    python bench/loo_segmentation.py --size full  -o bench/results/loo_segmentation_full \\
        --figures bench/figures/loo_segmentation
    python bench/loo_segmentation.py --size full --selection-only -o bench/results/loo_segmentation_full
        # issue 11: tune grid, auto (nested leave-one-out), λ fractions, merge methods (bench/_selection.py)
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gzip
import hashlib
import html
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

log = logging.getLogger("loo_segmentation")

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FG_THRESHOLD = 0.1  # foreground = clean intensity > 0.1 (on [0, 1])
SEED = 0
IMG = 28
PATCH = 4
VIT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256}
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        # transformers 5 names ViT's linears q/k/v/o_proj and mlp.fc1/fc2 (v4: query/key/value/dense)
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "projection", "head"]}
N_LORA_MODULES = 6 * VIT["num_hidden_layers"] + 2  # PEFT ignores names that match nothing: count what it wrapped
PRE_LR, LORA_LR, BATCH = 1e-3, 2e-3, 64
BASE_NAME = "adapterbank-bench/vit-seg-fmnist"

# ----- sites ---------------------------------------------------------------------------------------
# Every transform maps clean images x (n, 28, 28) in [0, 1] to what that "scanner" acquires, in [0, 1].


def _rician(sigma: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        re = x + sigma * rng.standard_normal(x.shape)  # magnitude of a complex signal with Gaussian noise
        im = sigma * rng.standard_normal(x.shape)
        return np.sqrt(re**2 + im**2)
    return fn


def _gamma(g: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    return lambda x, rng: x**g


def _low_contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 0.3 + 0.4 * x + 0.03 * rng.standard_normal(x.shape)


def _blur(sigma: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(x, sigma=(0, sigma, sigma), mode="constant")
    return fn


def _lowres(size: int) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        t = torch.from_numpy(x).float().unsqueeze(1)  # (n, 1, 28, 28)
        lo = torch.nn.functional.interpolate(t, size=(size, size), mode="area")  # the coarse acquisition matrix
        hi = torch.nn.functional.interpolate(lo, size=(IMG, IMG), mode="bilinear", align_corners=False)
        return hi.squeeze(1).numpy()
    return fn


def _smooth_fields(n: int, rng: np.random.Generator) -> np.ndarray:
    """n random smooth fields g (n, 28, 28): 2nd-order polynomials in (u, v) ∈ [-1, 1]², scaled to max|g| = 1."""
    u, v = np.meshgrid(np.linspace(-1, 1, IMG), np.linspace(-1, 1, IMG), indexing="ij")
    basis = np.stack([u, v, u * v, u**2 - 1 / 3, v**2 - 1 / 3])  # (5, 28, 28)
    g = np.einsum("nb,bij->nij", rng.standard_normal((n, 5)), basis)  # (n, 28, 28)
    return g / (np.abs(g).reshape(n, -1).max(1)[:, None, None] + 1e-12)


def _bias_field(mult: float, add: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Receive-coil inhomogeneity: a smooth multiplicative field 1 ± mult and a smooth additive near-field
    shading in [0, add] (signal in the background close to a surface coil)."""
    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        g, h = _smooth_fields(len(x), rng), _smooth_fields(len(x), rng)
        return x * (1.0 + mult * g) + add * (h + 1.0) / 2.0
    return fn


def _inverted(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - x


@dataclass(frozen=True)
class Site:
    name: str
    analog: str  # the acquisition difference it stands for
    fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]

    def apply(self, x: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.clip(self.fn(x.astype(np.float64), rng), 0.0, 1.0).astype(np.float32)


SITES: dict[str, Site] = {s.name: s for s in (
    Site("gamma-dark", "other contrast weighting: gamma 2.5 (dark mid-tones)", _gamma(2.5)),
    Site("low-contrast", "low-field scanner: range compressed to [0.3, 0.7] + noise σ=0.03", _low_contrast),
    Site("rician-0.10", "Rician noise σ=0.10 (magnitude image)", _rician(0.10)),
    Site("rician-0.20", "Rician noise σ=0.20", _rician(0.20)),
    Site("rician-0.30", "Rician noise σ=0.30", _rician(0.30)),
    Site("blur-1.2", "wide point-spread function / partial volume: Gaussian blur σ=1.2 px", _blur(1.2)),
    Site("lowres-10", "coarse matrix: 10×10 acquisition, bilinear upsampling", _lowres(10)),
    Site("bias-field", "surface-coil bias field: smooth gain 1 ± 0.6 and smooth background shading 0–0.3",
         _bias_field(0.6, 0.3)),
    Site("inverted", "inverted contrast (bright background, T2-like)", _inverted),
)}

SIZES: dict[str, dict[str, Any]] = {
    # fixed before the first run; nothing is tuned on test
    "small": {"sites": ("gamma-dark", "rician-0.10", "rician-0.30", "blur-1.2", "lowres-10", "bias-field"),
              "n_pre": 4000, "pre_steps": 400, "n_train": 500, "n_val": 100, "n_test": 200, "lora_steps": 100,
              "k": 4, "sweep_k": [1, 3, 5], "sweep_lam": [0.01, 1.0], "n_clean_test": 500},
    # tests only (tests/bench/test_selection_smoke.py): seconds; "sel_k" replaces the selection grid's k ∈ {3, 5}
    "tiny": {"sites": ("gamma-dark", "rician-0.10", "blur-1.2", "lowres-10"), "n_pre": 256, "pre_steps": 10,
             "n_train": 64, "n_val": 16, "n_test": 32, "lora_steps": 4, "k": 3, "sweep_k": [1, 2],
             "sweep_lam": [1.0], "n_clean_test": 32, "sel_k": [2, 3]},
    "full": {"sites": tuple(SITES), "n_pre": 12000, "pre_steps": 2000, "n_train": 2000, "n_val": 200,
             "n_test": 1000, "lora_steps": 500, "k": 5, "sweep_k": [1, 2, 3, 4, 5, 6, 7, 8],
             "sweep_lam": [0.001, 0.01, 0.1, 1.0, 10.0], "n_clean_test": 1000},
}

# ----- data ----------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        buf = fh.read()
    n = int.from_bytes(buf[4:8], "big")
    return np.frombuffer(buf, np.uint8, offset=16).reshape(n, IMG, IMG)


def load_fmnist(root: Path = FMNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(train (60000, 28, 28), test (10000, 28, 28)) float32 in [0, 1]."""
    tr = _read_idx(root / "train-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    te = _read_idx(root / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    return tr, te


def foreground(clean: np.ndarray) -> np.ndarray:
    """The ground truth: clean intensity > FG_THRESHOLD (bool, same shape)."""
    return clean > FG_THRESHOLD


def _site_seed(name: str, split: str) -> int:
    return int(hashlib.sha256(f"{name}|{split}|{SEED}".encode()).hexdigest()[:8], 16)


@dataclass
class Split:
    x: torch.Tensor  # (n, 1, 28, 28) acquired image
    y: torch.Tensor  # (n, 28, 28) bool foreground of the clean image
    idx: np.ndarray  # indices into the Fashion-MNIST train or test set


def make_splits(cfg: dict[str, Any]) -> tuple[dict[str, Split], dict[str, dict[str, Split]], str]:
    """Clean pre-training splits and, per site, disjoint train / val (from FMNIST train) and test (FMNIST test)."""
    tr, te = load_fmnist()
    rng = np.random.default_rng(SEED)
    p_tr, p_te = rng.permutation(len(tr)), rng.permutation(len(te))
    n_sites = len(cfg["sites"])
    need_tr = cfg["n_pre"] + cfg["n_val"] + n_sites * (cfg["n_train"] + cfg["n_val"])
    need_te = cfg["n_clean_test"] + n_sites * cfg["n_test"]
    if need_tr > len(tr) or need_te > len(te):
        raise ValueError(f"size needs {need_tr} train / {need_te} test images; Fashion-MNIST has {len(tr)} / {len(te)}")

    def split(src: np.ndarray, idx: np.ndarray, site: Site | None, name: str) -> Split:
        clean = src[idx]
        x = clean if site is None else site.apply(clean, _site_seed(site.name, name))
        return Split(torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1), torch.from_numpy(foreground(clean)), idx)

    o = 0
    clean = {"train": split(tr, p_tr[o:o + cfg["n_pre"]], None, "train")}
    o += cfg["n_pre"]
    clean["val"] = split(tr, p_tr[o:o + cfg["n_val"]], None, "val")
    o += cfg["n_val"]
    clean["test"] = split(te, p_te[:cfg["n_clean_test"]], None, "test")
    ot = cfg["n_clean_test"]
    sites: dict[str, dict[str, Split]] = {}
    for name in cfg["sites"]:
        s = SITES[name]
        d = {"train": split(tr, p_tr[o:o + cfg["n_train"]], s, "train")}
        o += cfg["n_train"]
        d["val"] = split(tr, p_tr[o:o + cfg["n_val"]], s, "val")
        o += cfg["n_val"]
        d["test"] = split(te, p_te[ot:ot + cfg["n_test"]], s, "test")
        ot += cfg["n_test"]
        sites[name] = d
    h = hashlib.sha256()
    for d in [clean, *sites.values()]:
        for sp in d.values():
            h.update(sp.idx.tobytes())
            h.update(sp.x.numpy().tobytes())
    return clean, sites, h.hexdigest()


# ----- model ---------------------------------------------------------------------------------------


def _vit_classes() -> tuple[Any, Any]:
    from transformers import ViTModel, ViTPreTrainedModel

    return ViTModel, ViTPreTrainedModel


class ViTSegmenter(_vit_classes()[1]):  # type: ignore[misc]
    """A ViT encoder (``transformers.ViTModel``) and a linear patch decoder: token → PATCH×PATCH pixel logits."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.vit = _vit_classes()[0](config, add_pooling_layer=False)
        self.head = torch.nn.Linear(config.hidden_size, config.patch_size**2)
        self.post_init()

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the last layer (after the final LayerNorm): (B, N, D); the CLS token is dropped."""
        return self.vit(pixel_values=(x - 0.5) / 0.5).last_hidden_state[:, 1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, p = IMG // PATCH, PATCH
        logits = self.head(self.tokens(x))  # (B, g·g, p·p)
        return logits.view(-1, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(-1, 1, IMG, IMG)  # (B, 1, 28, 28)


def build_model() -> ViTSegmenter:
    from transformers import ViTConfig

    cfg = ViTConfig(image_size=IMG, patch_size=PATCH, num_channels=1, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, attn_implementation="sdpa", **VIT)
    return ViTSegmenter(cfg)


def seg_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (per image, mean)."""
    t = y.unsqueeze(1).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t)
    p = torch.sigmoid(logits)
    inter = (p * t).flatten(1).sum(1)
    dice = (2 * inter + 1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)
    return bce + (1 - dice).mean()


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """Binary masks (n, 28, 28): logits > 0."""
    model.eval()
    return torch.cat([model(x[i:i + batch])[:, 0] > 0 for i in range(0, len(x), batch)])


def dice_per_image(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dice of each image (n,); 1 when both masks are empty."""
    p, t = pred.flatten(1).float(), y.flatten(1).float()
    inter, tot = (p * t).sum(1), p.sum(1) + t.sum(1)
    return torch.where(tot > 0, 2 * inter / tot.clamp_min(1), torch.ones_like(tot))


def train(model: torch.nn.Module, data: Split, steps: int, lr: float, seed: int) -> dict[str, Any]:
    """AdamW, linear warm-up (5 %) and linear decay, batch BATCH, shuffled epochs."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / steps))
    model.train()
    order = torch.empty(0, dtype=torch.long)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        if len(order) < BATCH:
            order = torch.cat([order, torch.randperm(len(data.x), generator=g)])
        b, order = order[:BATCH], order[BATCH:]
        loss = seg_loss(model(data.x[b]), data.y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
    model.eval()
    return {"steps": steps, "batch": BATCH, "lr": lr, "first_loss": round(float(np.mean(losses[:10])), 4),
            "last_loss": round(float(np.mean(losses[-10:])), 4), "seconds": round(time.perf_counter() - t0, 1)}


def save_base(model: ViTSegmenter, folder: Path) -> None:
    model.save_pretrained(str(folder))  # config.json + model.safetensors


def load_base(folder: Path) -> ViTSegmenter:
    return ViTSegmenter.from_pretrained(str(folder), local_files_only=True).eval()


def train_lora(base: ViTSegmenter, data: Split, steps: int, out: Path, seed: int, base_id: str) -> dict[str, Any]:
    """One PEFT LoRA on a copy of the frozen base, saved with ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**LORA))
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    if len(wrapped) != N_LORA_MODULES:
        raise RuntimeError(f"LoRA wrapped {len(wrapped)} modules, expected {N_LORA_MODULES}: {wrapped}")
    info = train(model, data, steps, LORA_LR, seed)
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.peft_config["default"].base_model_name_or_path = base_id
    model.save_pretrained(str(out))
    return info


# ----- prototypes and evaluator --------------------------------------------------------------------


def make_encoder(base: ViTSegmenter, revision: str) -> Any:
    """E(x) of Eq. 1: the frozen pre-trained encoder's last-layer patch tokens, mean-pooled per image (64-d)."""
    from adapterbank.prototypes import CallableEncoder

    def fn(items: list[Any]) -> np.ndarray:
        x = torch.stack([torch.as_tensor(np.asarray(i), dtype=torch.float32).reshape(1, IMG, IMG) for i in items])
        with torch.inference_mode():
            return base.tokens(x).mean(1).numpy()  # (n, 64)

    return CallableEncoder(fn, name=f"{BASE_NAME}/encoder", dim=VIT["hidden_size"], revision=revision,
                           pooling="mean-patch-tokens")


def make_encoder_all_layers(base: ViTSegmenter, revision: str) -> Any:
    """Ablation space: every layer's tokens (embedding output and each block), LayerNorm'd without affine,
    mean-pooled per image and concatenated (5 × 64 = 320-d) — keeps the low-level statistics of early layers."""
    from adapterbank.prototypes import CallableEncoder

    d = VIT["hidden_size"]

    def fn(items: list[Any]) -> np.ndarray:
        x = torch.stack([torch.as_tensor(np.asarray(i), dtype=torch.float32).reshape(1, IMG, IMG) for i in items])
        with torch.inference_mode():
            hs = base.vit(pixel_values=(x - 0.5) / 0.5, output_hidden_states=True).hidden_states
            return torch.cat([torch.nn.functional.layer_norm(h[:, 1:], (d,)).mean(1) for h in hs], 1).numpy()

    return CallableEncoder(fn, name=f"{BASE_NAME}/encoder-all-layers", dim=d * (VIT["num_hidden_layers"] + 1),
                           revision=revision, pooling="ln-mean-patch-tokens-all-layers")


class DiceEvaluator:
    """``(adapter | None, task) -> {"dice"}``: ΔW merged into a copy of the base (Eq. 6 applied, exact), then the
    mean per-image Dice of the predicted foreground on the task's test images."""

    def __init__(self, base: ViTSegmenter, cache_key: str, per_item: bool = False) -> None:
        self.per_item = per_item  # also return each image's Dice (paired intervals over images)
        self.cache_key = cache_key + (":per_item" if per_item else "")
        self.base_sd = {k: v.clone() for k, v in base.state_dict().items()}
        self.work = copy.deepcopy(base).eval()

    def model(self, adapter: Any) -> ViTSegmenter:
        from adapterbank.lora import merge_into

        self.work.load_state_dict(self.base_sd if adapter is None else merge_into(self.base_sd, adapter))
        return self.work

    def __call__(self, adapter: Any, task: Split) -> dict[str, float]:
        pred = predict(self.model(adapter), task.x)
        d = dice_per_image(pred, task.y)
        out: dict[str, Any] = {"dice": float(d.mean())}
        if self.per_item:
            out["per_item"] = {"dice": d.tolist()}
        return out


# ----- extra report parts (seed appendix: Tables 8-9, Figure 3) -------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_gallery(sites: dict[str, dict[str, Split]], clean: dict[str, Split], path: Path, n: int = 6) -> Path:
    plt = _plt()
    names = ["clean (source)", *sites]
    fig, axes = plt.subplots(len(names), n, figsize=(1.1 * n + 1.6, 1.1 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        sp = clean["test"] if r == 0 else sites[name]["test"]
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(sp.x[c, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.contour(sp.y[c].numpy().astype(float), levels=[0.5], colors=["#E69F00"], linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Sites: test images (orange: ground-truth foreground = clean > {FG_THRESHOLD:.1f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_matrix(mat: np.ndarray, rows: list[str], cols: list[str], path: Path, title: str, fmt: str,
                cmap: str, vmin: float | None = None, vmax: float | None = None, xlabel: str = "",
                ylabel: str = "", log: bool = False) -> Path:
    plt = _plt()
    from matplotlib.colors import LogNorm, Normalize

    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(cols), 0.9 + 0.42 * len(rows)))
    norm = LogNorm(vmin=vmin or np.nanmin(mat[mat > 0]), vmax=vmax or np.nanmax(mat)) if log else Normalize(vmin, vmax)
    im = ax.imshow(mat, cmap=cmap, norm=norm, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = mat[i, j]
            frac = float(norm(max(v, 1e-30)))
            light = frac < 0.5 if not cmap.endswith("_r") else frac > 0.5
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7, color="white" if light else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_qualitative(panels: dict[str, dict[str, np.ndarray]], cols: list[str], path: Path,
                     dice: dict[str, dict[str, float]]) -> Path:
    plt = _plt()
    rows = list(panels)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.15 * len(cols) + 1.4, 1.2 * len(rows)), squeeze=False)
    for r, t in enumerate(rows):
        for c, col in enumerate(cols):
            ax = axes[r, c]
            img = panels[t][col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if col not in ("input", "ground truth"):
                ax.contour(panels[t]["ground truth"].astype(float), levels=[0.5], colors=["#E69F00"], linewidths=0.5)
                ax.set_xlabel(f"{dice[t][col]:.3f}", fontsize=7, labelpad=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                from adapterbank.evaluate.results import display_name

                ax.set_title(display_name(col), fontsize=8)
        axes[r, 0].set_ylabel(t, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("One test image per held-out site: predicted masks (white), ground truth (orange); "
                 "number = Dice of that image", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _md_matrix(mat: np.ndarray, rows: list[str], cols: list[str], corner: str, fmt: str,
               bold_diag: bool = False) -> list[str]:
    out = ["| " + " | ".join([corner, *cols]) + " |", "|:---|" + "---:|" * len(cols)]
    for i, r in enumerate(rows):
        cells = []
        for j, c in enumerate(cols):
            s = format(mat[i, j], fmt)
            cells.append(f"**{s}**" if bold_diag and r == c else s)
        out.append("| " + " | ".join([r, *cells]) + " |")
    return out


def _md_to_html(lines: list[str]) -> str:
    """A tiny Markdown → HTML for what ``extra_markdown`` writes (headings, paragraphs, tables, images, lists)."""
    out, i = [], 0
    esc = html.escape

    def inline(s: str) -> str:
        s = esc(s)
        while "**" in s:
            s = s.replace("**", "<b>", 1).replace("**", "</b>", 1)
        while s.count("`") >= 2:
            s = s.replace("`", "<code>", 1).replace("`", "</code>", 1)
        return s

    while i < len(lines):
        ln = lines[i]
        if ln.startswith("#"):
            lvl = len(ln) - len(ln.lstrip("#"))
            out.append(f"<h{lvl}>{inline(ln[lvl:].strip())}</h{lvl}>")
        elif ln.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split(" | ")])
                i += 1
            head, body = rows[0], rows[2:]
            out.append("<table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("</tbody></table>")
            continue
        elif ln.startswith("!["):
            alt, src = ln[2:].split("](", 1)
            out.append(f'<figure><img src="{esc(src.rstrip(")"))}" alt="{esc(alt)}" loading="lazy">'
                       f"<figcaption>{esc(alt)}</figcaption></figure>")
        elif ln.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif ln.strip():
            out.append(f"<p>{inline(ln)}</p>")
        i += 1
    return "\n".join(out)


# ----- stages --------------------------------------------------------------------------------------


if str(Path(__file__).resolve().parent) not in sys.path:  # also when imported by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine, quiet_logging  # noqa: E402

QUAL_COLS = ["input", "ground truth", "pretrained", "sft", "nearest", "avg", "lin", "sparse"]  # Figure 3's columns


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("-o", "--out", type=Path, default=None, help="output folder (default bench/results/loo_segmentation_SIZE)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on the shared 2-core machine)")
    ap.add_argument("--retrain", action="store_true", help="train the base and the LoRAs again even if they exist")
    ap.add_argument("--selection", action="store_true",
                    help="also run the composition-selection stage (issue 11: tune grid, auto, λ fractions, merges)")
    ap.add_argument("--selection-only", action="store_true",
                    help="train or reuse the bank, then run only the composition-selection stage")
    ap.add_argument("--figures", type=Path, default=None,
                    help="also copy results.md and the PNGs to this folder (e.g. bench/figures/loo_segmentation)")
    return ap.parse_args(argv)


def stage_data(cfg: dict[str, Any]) -> tuple[dict[str, Split], dict[str, dict[str, Split]], str]:
    """1. The clean pre-training splits, each site's train / val / test splits, and their digest."""
    t0 = time.perf_counter()
    clean, sites, digest = make_splits(cfg)
    log.info("data: %d sites, %d train / %d val / %d test images each, %d clean pre-training images (%.1f s)",
             len(sites), cfg["n_train"], cfg["n_val"], cfg["n_test"], cfg["n_pre"], time.perf_counter() - t0)
    return clean, sites, digest


@dataclass
class Trained:
    """What stage 2 leaves: the frozen base, its encoder (Eq. 1) and how the base and the LoRAs were trained."""

    base: ViTSegmenter
    enc: Any
    fp: str  # the base weights' fingerprint
    base_id: str
    pre_info: dict[str, Any]
    train_info: dict[str, Any]
    fresh: bool  # trained by this invocation (else reused from an earlier one)


def _freeze(base: ViTSegmenter) -> None:
    for p in base.parameters():
        p.requires_grad_(False)


def stage_pretrain(clean: dict[str, Split], cfg: dict[str, Any], base_dir: Path) -> tuple[ViTSegmenter, dict[str, Any], str]:
    """2a. The base, pre-trained on clean images only, saved to ``base_dir`` and frozen: (base, info, fingerprint)."""
    from adapterbank.prototypes import model_fingerprint

    torch.manual_seed(SEED)
    base = build_model()
    pre_info = train(base, clean["train"], cfg["pre_steps"], PRE_LR, SEED)
    save_base(base, base_dir)
    fp = model_fingerprint(base_dir)
    pre_info["val_dice_clean"] = round(float(dice_per_image(predict(base, clean["val"].x), clean["val"].y).mean()), 4)
    log.info("pre-trained on clean images: loss %.3f -> %.3f, val Dice %.4f (%.0f s)", pre_info["first_loss"],
             pre_info["last_loss"], pre_info["val_dice_clean"], pre_info["seconds"])
    _freeze(base)
    return base, pre_info, fp


def stage_site_adapters(base: ViTSegmenter, enc: Any, sites: dict[str, dict[str, Split]], cfg: dict[str, Any],
                        out: Path, bank_dir: Path, base_id: str) -> dict[str, Any]:
    """2b. One PEFT LoRA per site, each added to a new bank with its training images' prototype: training info."""
    from adapterbank.bank import Bank
    from adapterbank.formats import read_adapter
    from adapterbank.prototypes import compute_prototype

    bank = Bank.init(bank_dir)
    train_info: dict[str, Any] = {}
    for j, (name, d) in enumerate(sites.items()):
        folder = out / "adapters" / name
        info = train_lora(base, d["train"], cfg["lora_steps"], folder, SEED + 1 + j, base_id)
        ev = DiceEvaluator(base, "val")
        ad = read_adapter(folder)
        info["val_dice_pretrained"] = round(ev(None, d["val"])["dice"], 4)
        info["val_dice_lora"] = round(ev(ad, d["val"])["dice"], 4)
        proto = compute_prototype(enc, [im[0] for im in d["train"].x.numpy()], batch_size=250,
                                  description=f"site {name}: {len(d['train'].x)} training images "
                                              f"(Fashion-MNIST train), {SITES[name].analog}")
        bank.add(folder, id=name, prototype=proto, tags=["fmnist-seg"], description=SITES[name].analog)
        train_info[name] = info
        log.info("LoRA %-12s loss %.3f -> %.3f, val Dice %.4f -> %.4f (%.0f s)", name, info["first_loss"],
                 info["last_loss"], info["val_dice_pretrained"], info["val_dice_lora"], info["seconds"])
    bank.close()
    return train_info


def stage_train_or_reuse(out: Path, size: str, cfg: dict[str, Any], clean: dict[str, Split],
                         sites: dict[str, dict[str, Split]], digest: str, retrain: bool) -> Trained:
    """2. The pre-trained base, then one LoRA per site in a bank; reused while ``bank.stamp.json`` is unchanged."""
    from adapterbank.prototypes import model_fingerprint

    stamp = {"digest": digest, "size": size, "cfg": cfg, "vit": VIT, "lora": LORA, "lr": [PRE_LR, LORA_LR],
             "batch": BATCH, "fg": FG_THRESHOLD, "seed": SEED, "sites": {n: SITES[n].analog for n in cfg["sites"]}}
    stamp_file = out / "bank.stamp.json"
    base_dir, bank_dir = out / "base", out / "bank"
    stamp = json.loads(json.dumps(stamp))  # tuples -> lists, so it compares equal to the stored copy
    fresh = retrain or not stamp_file.exists() or json.loads(stamp_file.read_text()).get("stamp") != stamp
    if fresh:
        for d in (base_dir, bank_dir, out / "adapters", out / "cache"):
            if d.exists():
                shutil.rmtree(d)
        base, pre_info, fp = stage_pretrain(clean, cfg, base_dir)
        base_id = f"{BASE_NAME}@{fp}"
        enc = make_encoder(base, fp)
        train_info = stage_site_adapters(base, enc, sites, cfg, out, bank_dir, base_id)
        stamp_file.write_text(json.dumps({"stamp": stamp, "pretrain": pre_info, "train": train_info,
                                          "base_id": base_id, "fingerprint": fp}, indent=1))
    else:
        st = json.loads(stamp_file.read_text())
        pre_info, train_info, base_id, fp = st["pretrain"], st["train"], st["base_id"], st["fingerprint"]
        base = load_base(base_dir)
        if model_fingerprint(base_dir) != fp:
            raise RuntimeError(f"{base_dir} changed since the bank was built; run with --retrain")
        _freeze(base)
        enc = make_encoder(base, fp)
        log.info("reusing the base model and the bank in %s", out)
    return Trained(base, enc, fp, base_id, pre_info, train_info, fresh)


def stage_ablation_space(bank: Any, trained: Trained, sites: dict[str, dict[str, Split]]) -> Any:
    """3a. The ablation's prototype space (same images, another pooling of the same frozen encoder): its encoder."""
    from adapterbank.prototypes import compute_prototype

    enc2 = make_encoder_all_layers(trained.base, trained.fp)
    cards = {c.id: c for c in bank.list()}
    for name, d in sites.items():
        if enc2.space.key not in cards[name].prototype_spaces:
            bank.set_prototype(name, compute_prototype(
                enc2, [im[0] for im in d["train"].x.numpy()], batch_size=250,
                description=f"site {name}: {len(d['train'].x)} training images (all-layer encoder)"))
    return enc2


def stage_leave_one_out(bank: Any, evaluator: DiceEvaluator, tasks: dict[str, Split], enc: Any, cfg: dict[str, Any],
                        out: Path) -> tuple[Any, float]:
    """3b. ``adapterbank.evaluate``: every site held out in turn, every strategy: (results, seconds)."""
    from adapterbank.evaluate import evaluate

    t0 = time.perf_counter()
    res = evaluate(bank, evaluator, strategies="all", k=cfg["k"], tasks=tasks, sweep_k=cfg["sweep_k"],
                   sweep_lam=cfg["sweep_lam"], cache_dir=out / "cache", progress=sys.stderr.isatty(),
                   space=enc.space)
    return res, time.perf_counter() - t0


def stage_selection(bank: Any, trained: Trained, tasks: dict[str, Split], enc: Any, cfg: dict[str, Any], out: Path,
                    args: argparse.Namespace, digest: str) -> Path:
    """7. Composition selection (issue 11): the tune grid, auto (nested leave-one-out), the λ-fraction sweep and the
    merge methods over the same bank and tasks; per-image Dice for paired intervals. -> selection.md's path."""
    from _selection import run_selection, write_selection

    evaluator = DiceEvaluator(trained.base, f"loo_segmentation.DiceEvaluator:v1:{trained.fp}:{digest[:16]}",
                              per_item=True)
    t0 = time.perf_counter()
    sel = run_selection(bank, evaluator, tasks, main_k=cfg["k"], cache_dir=out / "cache", space=enc.space,
                        k_values=cfg.get("sel_k"))
    sel.seconds["total"] = round(time.perf_counter() - t0, 1)
    md = write_selection(sel, out / "selection", f"Benchmark B ({args.size}): composition selection")
    log.info("selection table in %s (%.0f s)", md, sel.seconds["total"])
    return md


def validation_prototypes(enc: Any, sites: dict[str, dict[str, Split]]) -> dict[str, Any]:
    """p_T of each site from its *validation* images (unlabelled; not the images its adapter's prototype came from)."""
    from adapterbank.prototypes import compute_prototype

    return {t: compute_prototype(enc, [im[0] for im in d["val"].x.numpy()], batch_size=250,
                                 description=f"site {t}: {len(d['val'].x)} validation images")
            for t, d in sites.items()}


def stage_ablations(bank: Any, evaluator: DiceEvaluator, tasks: dict[str, Split], sites: dict[str, dict[str, Split]],
                    enc: Any, enc2: Any, cfg: dict[str, Any], out: Path) -> tuple[dict[str, tuple[str, Any]], float]:
    """3c. The ablations, each a report of its own: the target's own LoRA left in the pool (seed Table 6) with p_T
    from the target's validation images — with the bank prototype it would sit at distance 0 and Nearest, Lin and
    Sparse would pick it alone by construction — and the all-layer prototype space. ({key: (description,
    results)}, seconds)."""
    from adapterbank.evaluate import evaluate

    t0 = time.perf_counter()
    ablations = {
        "include_self": ("target's own LoRA left in the pool, p_T from the target's validation images (seed Table 6)",
                         evaluate(bank, evaluator, strategies="all", k=cfg["k"], tasks=tasks, include_self=True,
                                  target_prototypes=validation_prototypes(enc, sites), cache_dir=out / "cache",
                                  space=enc.space)),
        "all_layers": ("prototypes from every encoder layer (320-d, space `encoder-all-layers`)",
                       evaluate(bank, evaluator, strategies="all", k=cfg["k"], tasks=tasks,
                                cache_dir=out / "cache", space=enc2.space)),
    }
    return ablations, time.perf_counter() - t0


@dataclass
class Appendix:
    """Stage 4's numbers: cross-site Dice (Table 9), prototype distances (Table 8), qualitative panels (Figure 3)."""

    names: list[str]  # the sites, in the size's order
    cross: np.ndarray  # (test site, adapter) Dice
    pre_col: np.ndarray  # (test site,) Dice of the pre-trained model
    clean_dice: dict[str, float]
    dist_tt: np.ndarray  # (test site, training site) squared prototype distance
    panels: dict[str, dict[str, np.ndarray]]
    qdice: dict[str, dict[str, float]]
    seconds: float


def stage_appendix(bank: Any, evaluator: DiceEvaluator, res: Any, tasks: dict[str, Split], clean: dict[str, Split],
                   enc: Any, cfg: dict[str, Any]) -> Appendix:
    """4. Seed appendix: cross-site Dice (Table 9), prototype distances (Table 8), qualitative figure (Figure 3)."""
    from adapterbank.compose import compose
    from adapterbank.prototypes import compute_prototype

    t0 = time.perf_counter()
    names = list(tasks)
    adapters = {n: bank.load_adapter(n) for n in names}
    cross = np.array([[evaluator(adapters[a], tasks[t])["dice"] for a in names] for t in names])  # (test site, adapter)
    pre_col = np.array([res.table("dice")[t]["pretrained"] for t in names])
    clean_dice = {"pretrained": evaluator(None, clean["test"])["dice"]}
    protos = {n: bank.get_prototype(n, enc.space).vector.astype(np.float64) for n in names}
    test_protos = {n: compute_prototype(enc, [im[0] for im in tasks[n].x.numpy()], batch_size=250).vector.astype(np.float64)
                   for n in names}
    dist_tt = np.array([[np.sum((test_protos[t] - protos[a]) ** 2) for a in names] for t in names])
    panels: dict[str, dict[str, np.ndarray]] = {}
    qdice: dict[str, dict[str, float]] = {}
    comp_params = dict(res.config.get("params", {}))
    for t in names:
        i0 = 0
        x, y = tasks[t].x[i0:i0 + 1], tasks[t].y[i0:i0 + 1]
        panels[t] = {"input": x[0, 0].numpy(), "ground truth": y[0].numpy()}
        qdice[t] = {}
        p_t = bank.get_prototype(t, enc.space)
        for m in QUAL_COLS[2:]:
            if m == "pretrained":
                ad = None
            elif m == "sft":
                ad = adapters[t]
            else:
                ad = compose(bank, p_t, k=cfg["k"], strategy=m, params=comp_params.get(m) or None,
                             exclude=[t]).adapter
            pred = predict(evaluator.model(ad), x)
            panels[t][m] = pred[0].numpy().astype(np.float32)
            qdice[t][m] = float(dice_per_image(pred, y)[0])
    return Appendix(names, cross, pre_col, clean_dice, dist_tt, panels, qdice, time.perf_counter() - t0)


def stage_reports(res: Any, ablations: dict[str, tuple[str, Any]], trained: Trained, app: Appendix, args: argparse.Namespace,
                  cfg: dict[str, Any], digest: str, out: Path, t_eval: float, t_abl: float, t_all: float) -> None:
    """5a. The run's metadata, then ``write_report`` for the main results and for each ablation."""
    from adapterbank.evaluate import write_report

    names = app.names
    res.meta.update({
        "benchmark": "B: loo_segmentation", "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "size": args.size,
        "config": {**cfg, "vit": VIT, "patch": PATCH, "image": IMG, "lora": LORA, "pre_lr": PRE_LR,
                   "lora_lr": LORA_LR, "batch": BATCH, "fg_threshold": FG_THRESHOLD, "seed": SEED,
                   "base": trained.base_id, "data": str(FMNIST_DIR)},
        "sites": {n: SITES[n].analog for n in names}, "data_digest": digest, "pretrain": trained.pre_info,
        "train": trained.train_info, "clean_test_dice": app.clean_dice,
        "cross_site_dice": {"rows_test_site": names, "cols_adapter": names, "dice": app.cross.tolist(),
                            "pretrained": app.pre_col.tolist()},
        "prototype_sq_dist_test_vs_train": {"rows_test_site": names, "cols_train_site": names,
                                            "d2": app.dist_tt.tolist()},
        "eval_seconds": round(t_eval, 1), "extra_seconds": round(app.seconds, 1), "ablation_seconds": round(t_abl, 1),
        "ablations": {k: {"description": v[0], "report": f"ablation_{k}/results.md",
                          "dice": v[1].table("dice")} for k, v in ablations.items()},
    })
    res.meta["total_seconds"] = round(time.perf_counter() - t_all, 1)
    title = f"Benchmark B — leave-one-out segmentation across acquisition sites ({args.size})"
    write_report(res, out, title=title)

    for key, (desc, ares) in ablations.items():
        ares.meta.update({k: res.meta[k] for k in ("benchmark", "command", "date", "machine", "size", "config",
                                                   "data_digest")})
        ares.meta["ablation"] = desc
        write_report(ares, out / f"ablation_{key}", title=f"{title} — ablation: {desc}")


def stage_extra_sections(res: Any, ablations: dict[str, tuple[str, Any]], trained: Trained, app: Appendix,
                         sites: dict[str, dict[str, Split]], clean: dict[str, Split], enc: Any, enc2: Any,
                         cfg: dict[str, Any], out: Path, t_eval: float, t_abl: float) -> Path:
    """5b. The seed-appendix plots and sections, appended to results.md and index.html: results.md's path."""
    from adapterbank.evaluate.results import display_name

    names = app.names
    pre_info, train_info = trained.pre_info, trained.train_info
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_gallery(sites, clean, plots / "sites.png")
    plot_matrix(np.concatenate([app.pre_col[:, None], app.cross], 1), names, ["Pre-trained", *names],
                plots / "cross_site_dice.png", "Dice of each site's LoRA (columns) on each site's test images (rows)",
                ".2f", "viridis", 0.0, 1.0, xlabel="adapter", ylabel="test site")
    plot_matrix(app.dist_tt, names, names, plots / "prototype_distances.png",
                "Squared prototype distance (log colour): test images (rows) vs training images (columns)", ".3g",
                "viridis_r", xlabel="training set", ylabel="test set", log=True)
    plot_qualitative(app.panels, QUAL_COLS, plots / "qualitative.png", app.qdice)
    tab = res.table("dice")
    lines = [
        "", "## Benchmark B: setup", "",
        (f"Data: Fashion-MNIST (`{FMNIST_DIR}`), {len(names)} simulated acquisition sites, each on its own images: "
        f"{cfg['n_train']} train / {cfg['n_val']} val (from the Fashion-MNIST train set) and {cfg['n_test']} test images "
        f"(from its test set). Ground truth: the clean image's foreground, intensity > {FG_THRESHOLD} on [0, 1] "
        f"(no hole filling). Metric: mean per-image Dice of the predicted foreground."),
        "",
        (f"Model: `{trained.base_id}` — `transformers.ViTModel` (28×28, {PATCH}×{PATCH} patches, "
        f"{VIT['num_hidden_layers']} layers, "
        f"width {VIT['hidden_size']}, {VIT['num_attention_heads']} heads, MLP {VIT['intermediate_size']}) + a linear patch "
        f"decoder; pre-trained on {cfg['n_pre']} clean images ({cfg['pre_steps']} steps, batch {BATCH}, BCE + Dice): "
        f"Dice {app.clean_dice['pretrained']:.4f} on {cfg['n_clean_test']} clean test images. "
        f"LoRA per site: PEFT r={LORA['r']}, α={LORA['lora_alpha']} on {', '.join(LORA['target_modules'])} "
        f"({next(iter(train_info.values()))['trainable_params']} parameters), {cfg['lora_steps']} steps, lr {LORA_LR}."),
        "",
        (f"Prototypes (Eq. 1): `{enc.space.key}` — the frozen pre-trained encoder's last-layer patch tokens, "
        "mean-pooled per image, averaged over the site's training images (no labels used)."),
        "",
        "| site | acquisition (simulated) | val Dice Pre-trained | val Dice own LoRA | LoRA loss first → last | train s |",
        "|:---|:---|---:|---:|---:|---:|",
    ]
    for n in names:
        ti = train_info[n]
        lines.append(f"| {n} | {SITES[n].analog} | {ti['val_dice_pretrained']:.4f} | {ti['val_dice_lora']:.4f} | "
                     f"{ti['first_loss']:.3f} → {ti['last_loss']:.3f} | {ti['seconds']:.0f} |")
    gaps = {t: (tab[t]["sparse"] - tab[t]["pretrained"]) / max(1e-9, tab[t]["sft"] - tab[t]["pretrained"]) for t in names}
    lines += [
        "", "![sites](plots/sites.png)", "",
        "## Cross-site Dice (seed Table 9)", "",
        ("Each site's own LoRA applied to every site's test images (rows: test site; columns: adapter). "
        "The diagonal is SFT."), "",
        *_md_matrix(np.concatenate([app.pre_col[:, None], app.cross], 1), names, ["Pre-trained", *names],
                    "test \\ adapter", ".4f", bold_diag=True),
        "", "![cross-site Dice](plots/cross_site_dice.png)", "",
        "## Prototype distances (seed Table 8)", "",
        ("Squared distance between the prototype of each site's *test* images (rows) and each site's *training* "
        "prototype (columns; the ones in the bank)."), "",
        *_md_matrix(app.dist_tt, names, names, "test \\ train", ".4g", bold_diag=True),
        "", "![prototype distances](plots/prototype_distances.png)", "",
        "## Gap closed by Sparse", "",
        "(Sparse − Pre-trained) / (SFT − Pre-trained) per target: "
        + ", ".join(f"{t} {g:+.2f}" for t, g in gaps.items()) + ".", "",
        "## Qualitative (seed Figure 3)", "", "![qualitative](plots/qualitative.png)", "",
        "## Ablations", "",
        ("Mean Dice over targets (main table first). Each ablation has its own report in `ablation_*/`. "
        f"All-layer space: `{enc2.space.key}`."), "",
        "| setting | " + " | ".join(map(display_name, res.methods)) + " |", "|:---|" + "---:|" * len(res.methods),
        *[f"| {label} | " + " | ".join(
            f"{np.mean([r.table('dice')[t][m] for t in names]):.4f}"
            for m in res.methods) + " |"
          for label, r in [("main (last-layer prototypes, target excluded)", res)]
          + [(d, r) for d, r in ablations.values()]],
        "",
        "Sparse per target: " + "; ".join(
            f"{t}: main {tab[t]['sparse']:.4f}, include-self "
            f"{ablations['include_self'][1].table('dice')[t]['sparse']:.4f}, all-layer "
            f"{ablations['all_layers'][1].table('dice')[t]['sparse']:.4f}" for t in names) + ".",
        "",
        "Weights given to the target's own LoRA with include-self (Table 6): " + "; ".join(
            f"{t}: " + ", ".join(f"{m} {ablations['include_self'][1].main(t, m).weight_of(t) or 0.0:+.2f}"
                                 for m in ("sim", "lin", "sparse")) for t in names) + ". "
        "(With the bank prototype as p_T the target's own adapter sits at distance 0, so Nearest, Lin and Sparse "
        "would pick it alone by construction; this ablation therefore passes p_T from the target's validation "
        "images: `evaluate(include_self=True, target_prototypes=...)`.)",
        "",
        "## Run", "",
        f"- command: `{res.meta['command']}`",
        (f"- date: {res.meta['date']}; machine: {res.meta['machine']['cpu']}, {res.meta['machine']['cores']} cores, "
        f"torch threads {res.meta['machine']['torch_threads']}"),
        (f"- training (when the bank was built{'' if trained.fresh else ', by an earlier invocation'}): pre-training "
        f"{pre_info['seconds']:.0f} s, LoRAs {sum(t['seconds'] for t in train_info.values()):.0f} s"),
        (f"- this invocation: {res.meta['total_seconds']:.0f} s (leave-one-out {t_eval:.0f} s with "
        f"{res.meta.get('evaluator_calls')} evaluator calls and {res.meta.get('cache_hits')} cache hits; ablations "
        f"{t_abl:.0f} s; appendix {app.seconds:.0f} s)"),
        "",
    ]
    md = out / "results.md"
    md.write_text(md.read_text() + "\n".join(lines))
    idx = out / "index.html"
    page = idx.read_text()
    page = page.replace("</body>", _md_to_html(lines) + "\n</body>", 1)
    idx.write_text(page)
    return md


def stage_copy_figures(out: Path, fig_dir: Path, ablation_keys: Sequence[str]) -> None:
    """6. Copy the results.md files and the PNGs (main report and each ablation's) to ``fig_dir``."""
    (fig_dir / "plots").mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "results.md", fig_dir / "results.md")
    n = 0
    for src in [out, *(out / f"ablation_{key}" for key in ablation_keys)]:
        dst = fig_dir / src.relative_to(out)
        (dst / "plots").mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "results.md", dst / "results.md")
        for p in sorted((src / "plots").glob("*.png")):
            shutil.copy2(p, dst / "plots" / p.name)
            n += 1
    log.info("copied the results.md files and %d PNGs to %s", n, fig_dir)


def log_summary(res: Any, out: Path, t_all: float) -> None:
    tab = res.table("dice")
    cols = res.methods
    log.info("%s  %s", "dice".ljust(12), " ".join(c.rjust(10) for c in cols))
    for t in res.targets:
        log.info("%s  %s", t.ljust(12), " ".join(f"{tab[t].get(c, math.nan):10.4f}" for c in cols))
    log.info("report in %s (%.0f s in all)", out, time.perf_counter() - t_all)


# ----- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging("matplotlib")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    cfg = SIZES[args.size]
    out: Path = args.out or Path("bench/results") / f"loo_segmentation_{args.size}"
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    from adapterbank.bank import Bank

    clean, sites, digest = stage_data(cfg)  # 1
    trained = stage_train_or_reuse(out, args.size, cfg, clean, sites, digest, args.retrain)  # 2
    bank = Bank.open(out / "bank")
    enc = trained.enc
    enc2 = stage_ablation_space(bank, trained, sites)  # 3
    evaluator = DiceEvaluator(trained.base, f"loo_segmentation.DiceEvaluator:v1:{trained.fp}:{digest[:16]}")
    tasks = {name: d["test"] for name, d in sites.items()}
    if args.selection_only:  # 7 only
        stage_selection(bank, trained, tasks, enc, cfg, out, args, digest)
        bank.close()
        log.info("done in %.0f s", time.perf_counter() - t_all)
        return 0
    res, t_eval = stage_leave_one_out(bank, evaluator, tasks, enc, cfg, out)
    ablations, t_abl = stage_ablations(bank, evaluator, tasks, sites, enc, enc2, cfg, out)
    app = stage_appendix(bank, evaluator, res, tasks, clean, enc, cfg)  # 4
    bank.close()
    stage_reports(res, ablations, trained, app, args, cfg, digest, out, t_eval, t_abl, t_all)  # 5
    stage_extra_sections(res, ablations, trained, app, sites, clean, enc, enc2, cfg, out, t_eval, t_abl)
    if args.figures is not None:  # 6
        stage_copy_figures(out, args.figures, list(ablations))
    if args.selection:  # 7
        bank = Bank.open(out / "bank")
        stage_selection(bank, trained, tasks, enc, cfg, out, args, digest)
        bank.close()
    log_summary(res, out, t_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
