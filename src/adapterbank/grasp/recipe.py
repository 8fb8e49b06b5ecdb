"""Config-driven training and sampling (what ``adapterbank grasp train|sample`` run).

A config (YAML or a dict) has exactly these sections; unknown keys are errors:

.. code-block:: yaml

    model:                     # a class-conditional diffusers transformer, e.g. DiTTransformer2DModel
      class: DiTTransformer2DModel
      path: ./base-model       # from_pretrained (local folder) ...
      config: {...}            # ... or built from a config (random weights; for tests)
      null_class: 10           # class id of the unconditional branch (CFG); default: none
    data:
      npz: ./train.npz         # arrays 'x' (N, C, H, W) float in [-1, 1] and 'labels' (N,) int
    partitioner: {type: frequency_tiers, head: 0.5, medium: 0.35}   # or thresholds: [500, 100]
    # or {type: kmeans, n_groups: 3, encoder: default, label_names: [T-shirt, Trouser, ...], template: "a {label}"}
    adapter: {kind: residual, rank: 8, targets: auto}
    train: {objective: flow_matching, steps: 200, batch_size: 32, lr: 0.001, seed: 0}
    output: ./grasp-ckpt

Relative paths are resolved against the config file's folder. The checkpoint records the model spec, so
:func:`sample_checkpoint` rebuilds the base and routes every generated image by its label's group.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterbank.errors import FormatError, ParameterError, UnknownNameError
from adapterbank.grasp.inject import inject, load, read_checkpoint
from adapterbank.grasp.partition import PARTITIONERS, ExplicitMap, FrequencyTiers, KMeansPartition, RandomPartition
from adapterbank.grasp.train import TrainResult, train

logger = logging.getLogger(__name__)

__all__ = ["SCHEMA", "euler_sample", "load_config", "sample_checkpoint", "train_from_config", "validate_config"]

SCHEMA: dict[str, set[str]] = {
    "model": {"class", "path", "config", "null_class"},
    "data": {"npz"},
    "partitioner": {"type", "head", "medium", "thresholds", "healthy_labels", "rule", "mapping", "n_groups", "seed",
                    "encoder", "template", "label_names"},
    "adapter": {"kind", "rank", "targets", "activation", "scale", "include_context"},
    "train": {"objective", "steps", "batch_size", "lr", "weight_decay", "grad_clip", "ema", "seed", "checkpoint_every",
              "log_every"},
    "output": set(),
}
_REQUIRED = {"model", "data", "partitioner", "adapter", "train", "output"}


def validate_config(cfg: Any, where: str = "config") -> dict[str, Any]:
    """Check sections and keys (strict); returns the config. Errors name the section and key.

    >>> validate_config({"model": {}, "data": {}, "partitioner": {}, "adapter": {}, "train": {"stpes": 1},
    ...                  "output": "o"})
    Traceback (most recent call last):
    ...
    adapterbank.errors.FormatError: config: unknown key(s) ['stpes'] in section 'train'; valid keys: ['batch_size', 'checkpoint_every', 'ema', 'grad_clip', 'log_every', 'lr', 'objective', 'seed', 'steps', 'weight_decay'].
    """
    if not isinstance(cfg, Mapping):
        raise FormatError(f"{where} must be a mapping with sections {sorted(_REQUIRED)}. Got {type(cfg).__name__}.")
    extra, missing = set(cfg) - set(SCHEMA), _REQUIRED - set(cfg)
    if extra or missing:
        raise FormatError(f"{where}: unknown sections {sorted(extra)}, missing sections {sorted(missing)}.")
    for sec, keys in SCHEMA.items():
        if sec == "output":
            if not isinstance(cfg[sec], str):
                raise FormatError(f"{where}: 'output' must be a folder path (str). Got {cfg[sec]!r}.")
            continue
        if not isinstance(cfg[sec], Mapping):
            raise FormatError(f"{where}: section '{sec}' must be a mapping. Got {type(cfg[sec]).__name__}.")
        bad = set(cfg[sec]) - keys
        if bad:
            raise FormatError(f"{where}: unknown key(s) {sorted(bad)} in section '{sec}'; valid keys: {sorted(keys)}.")
    m = cfg["model"]
    if "class" not in m or ("path" in m) == ("config" in m):
        raise FormatError(f"{where}: section 'model' needs 'class' and exactly one of 'path' or 'config'.")
    if "npz" not in cfg["data"]:
        raise FormatError(f"{where}: section 'data' needs key 'npz'.")
    if cfg["partitioner"].get("type") not in PARTITIONERS:
        raise UnknownNameError(f"{where}: partitioner type {cfg['partitioner'].get('type')!r} is unknown; valid: "
                               f"{', '.join(PARTITIONERS)}.")
    if "rank" not in cfg["adapter"] or "steps" not in cfg["train"]:
        raise FormatError(f"{where}: 'adapter.rank' and 'train.steps' are required.")
    return dict(cfg)


def load_config(path: str | Path) -> tuple[dict[str, Any], Path]:
    """Read a YAML config; returns (validated config, the folder relative paths resolve against)."""
    import yaml

    p = Path(path)
    try:
        cfg = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FormatError(f"Cannot read the config {p}: {e}.") from None
    return validate_config(cfg, str(p)), p.resolve().parent


def _resolve(root: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else root / q


def build_model(spec: Mapping[str, Any], root: Path) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, str(spec["class"]), None)
    if cls is None or not isinstance(cls, type):
        raise UnknownNameError(f"diffusers has no model class {spec['class']!r}.")
    if "path" in spec:
        return cls.from_pretrained(str(_resolve(root, spec["path"])), local_files_only=True)
    return cls(**dict(spec["config"]))


def _partitioner(spec: Mapping[str, Any], root: Path | None = None) -> Any:
    s = dict(spec)
    kind = s.pop("type")
    if kind == "frequency_tiers":
        return FrequencyTiers(s.get("head", 0.5), s.get("medium", 0.35), thresholds=s.get("thresholds"),
                              healthy_labels=s.get("healthy_labels", ()), rule=s.get("rule", "rarest"))
    if kind == "explicit":
        return ExplicitMap(s["mapping"], rule=s.get("rule", "rarest"), healthy_labels=s.get("healthy_labels", ()))
    if kind == "random":
        return RandomPartition(s.get("n_groups"), seed=s.get("seed", 0))
    if kind == "kmeans":
        return _kmeans(s, root)
    raise UnknownNameError(f"Unknown partitioner type {kind!r}; valid: frequency_tiers, explicit, random, kmeans.")


def _kmeans(s: Mapping[str, Any], root: Path | None) -> KMeansPartition:
    """``{type: kmeans, n_groups, encoder, template, label_names, seed}``: k-means on embeddings of the class
    names. The data's labels are class ids; ``label_names[i]`` is the text of class ``i``, formatted into
    ``template`` (default ``"{label}"``) and embedded by ``encoder`` (``default``, a model folder relative to the
    config, or ``module:function``)."""
    from adapterbank.prototypes import load_encoder

    for key in ("n_groups", "encoder", "label_names"):
        if key not in s:
            raise FormatError(f"partitioner 'kmeans' needs '{key}' (keys: n_groups, encoder, label_names, template, seed).")
    names = s["label_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FormatError(f"partitioner 'kmeans': 'label_names' must be a list of class names. Got {names!r}.")
    spec = str(s["encoder"])
    if root is not None and ":" not in spec and (root / spec).is_dir():
        spec = str(root / spec)
    enc = load_encoder(spec)
    template = str(s.get("template", "{label}"))

    def embed(labels: list[str]) -> Any:
        try:
            texts = [template.format(label=names[int(lab)]) for lab in labels]
        except (ValueError, IndexError):
            raise UnknownNameError(f"partitioner 'kmeans': labels {labels} are not all class ids in "
                                   f"0..{len(names) - 1} of 'label_names'.") from None
        return enc.encode(texts)

    return KMeansPartition(int(s["n_groups"]), encoder=embed, seed=int(s.get("seed", 0)),
                           rule=s.get("rule", "rarest"), healthy_labels=s.get("healthy_labels", ()))


def _load_npz(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "labels" not in z:
                raise FormatError(f"{path} needs arrays 'x' and 'labels'. Got {sorted(z.files)}.")
            x, labels = z["x"], z["labels"]
    except (OSError, ValueError) as e:
        raise FormatError(f"Cannot read the data file {path}: {e}.") from None
    if x.ndim != 4 or len(x) != len(labels) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise FormatError(f"{path}: 'x' must be (N, C, H, W) and 'labels' (N,) integers. Got {x.shape}, "
                          f"{labels.shape} {labels.dtype}.")
    return torch.as_tensor(x, dtype=torch.float32), labels.astype(np.int64)


def _batches(x: torch.Tensor, labels: np.ndarray, part: Any, batch: int, seed: int) -> Iterator[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(labels)
    groups = part.assign_batch(labels.tolist())
    while True:
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, max(len(perm) - batch + 1, 1), batch):
            i = perm[s:s + batch]
            yield {"x": x[i], "y": y[i], "group": groups[i]}


def class_forward(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """Forward of a class-conditional diffusers transformer (``class_labels`` from ``batch['y']``)."""
    return model(x_t, timestep=t, class_labels=batch["y"]).sample


def train_from_config(cfg: Mapping[str, Any], root: str | Path = ".", *, progress: bool = False,
                      ) -> tuple[Any, TrainResult, Path]:
    """Fit the partitioner, inject, train and save, as the config says; returns (handle, result, checkpoint)."""
    cfg = validate_config(cfg)
    root = Path(root)
    x, labels = _load_npz(_resolve(root, cfg["data"]["npz"]))
    part = _partitioner(cfg["partitioner"], root).fit(labels.tolist())
    model = build_model(cfg["model"], root)
    a = cfg["adapter"]
    handle = inject(model, part.n_groups, int(a["rank"]), kind=a.get("kind", "residual"), targets=a.get("targets", "auto"),
                    activation=a.get("activation", "gelu"), scale=a.get("scale", 1.0),
                    include_context=bool(a.get("include_context", False)), seed=cfg["train"].get("seed", 0))
    handle.partitioner = part
    t = cfg["train"]
    out = _resolve(root, cfg["output"])
    res = train(handle, _batches(x, labels, part, int(t.get("batch_size", 32)), int(t.get("seed", 0))),
                objective=t.get("objective", "flow_matching"), steps=int(t["steps"]), lr=float(t.get("lr", 1e-3)),
                weight_decay=float(t.get("weight_decay", 0.0)), grad_clip=t.get("grad_clip", 1.0), ema=t.get("ema"),
                seed=int(t.get("seed", 0)), forward=class_forward, progress=progress,
                log_every=int(t.get("log_every", 50)), checkpoint_dir=out / "trainer" if t.get("checkpoint_every") else None,
                checkpoint_every=int(t.get("checkpoint_every", 0)))
    model_spec = dict(cfg["model"])
    if "path" in model_spec:
        model_spec["path"] = str(_resolve(root, model_spec["path"]).resolve())
    handle.save(out, extra={"model": model_spec, "objective": t.get("objective", "flow_matching"),
                            "group_updates": res.group_updates, "final_loss": res.history[-1]["mean_loss"]
                            if res.history else None})
    return handle, res, out


@torch.no_grad()
def euler_sample(model: nn.Module, labels: torch.Tensor, shape: Sequence[int], *, steps: int = 20, cfg_scale: float = 1.0,
                 null_class: int | None = None, seed: int = 0, objective: str = "flow_matching") -> torch.Tensor:
    """Rectified-flow Euler sampler σ: 1 → 0 (x ← x + (σ' − σ) v), with CFG when ``null_class`` is given."""
    if objective != "flow_matching":
        raise ParameterError(f"euler_sample integrates flow-matching models only. Got objective {objective!r}.")
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    x = torch.randn((n, *shape), generator=g)
    sig = torch.linspace(1.0, 0.0, steps + 1)
    guided = null_class is not None and cfg_scale != 1.0
    yy = torch.cat([torch.full_like(labels, int(null_class)), labels]) if guided else labels  # type: ignore[arg-type]
    for i in range(steps):
        xin = torch.cat([x, x]) if guided else x
        v = model(xin, timestep=torch.full((len(xin),), float(sig[i]) * 1000), class_labels=yy).sample
        if guided:
            v = v[:n] + cfg_scale * (v[n:] - v[:n])
        x = x + (sig[i + 1] - sig[i]).item() * v
    return x


def sample_checkpoint(ckpt: str | Path, labels: Sequence[int], *, steps: int = 20, cfg_scale: float = 1.0,
                      seed: int = 0, shape: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Images for ``labels`` from a checkpoint written by :func:`train_from_config`; returns (images, groups)."""
    cfg, _ = read_checkpoint(ckpt)
    spec = cfg["extra"].get("model")
    if spec is None:
        raise FormatError(f"{ckpt} records no model spec (extra.model); it was not written by train_from_config.")
    model = build_model(spec, Path(ckpt)).eval()
    h = load(model, ckpt)
    if h.partitioner is None:
        raise FormatError(f"{ckpt} has no partitioner; cannot route labels to groups.")
    groups = h.partitioner.assign_batch(list(labels))
    if shape is None:
        c = model.config
        shape = (int(c.in_channels), int(c.sample_size), int(c.sample_size))
    from adapterbank.grasp.inject import route

    y = torch.as_tensor(list(labels), dtype=torch.long)
    with route(model, groups):
        imgs = euler_sample(model, y, shape, steps=steps, cfg_scale=cfg_scale, null_class=spec.get("null_class"),
                            seed=seed, objective=cfg["extra"].get("objective", "flow_matching"))
    logger.info("sampled %d images; groups %s", len(y), groups.tolist())
    return imgs, groups.tolist()
