"""Training: the unchanged denoising objective, frozen base, AdamW on the adapters only.

Objectives (per sample i, noise ε ~ N(0, I)):

| name | input x_t | target | model timestep |
|---|---|---|---|
| ``flow_matching`` (rectified flow, SD3/Flux/Sana) | (1 − σ) x₀ + σ ε, σ ~ logit-normal(0, 1) or U(0, 1) | v = ε − x₀ | 1000·σ |
| ``epsilon`` (DDPM) | √ᾱ_t x₀ + √(1 − ᾱ_t) ε, t ~ U{0..T−1}, linear β 1e-4..0.02, T = 1000 | ε | t |

Loss = mean over the batch of the per-sample MSE; the per-group means are logged. Each step:
``zero_grad(set_to_none=True)`` → forward inside ``handle.route(groups)`` → backward → clip the global
gradient norm → AdamW step → EMA. Groups absent from a batch get ``grad is None`` and no optimiser or
EMA update (see :mod:`adapterbank.grasp.adapters`), counted in ``TrainResult.group_updates``.

A batch is a mapping: ``"x"`` (clean samples, (B, ...)), and optionally ``"group"`` ((B,) ids),
``"labels"`` (per-sample labels, assigned with ``partitioner``), ``"cond"`` (extra keyword arguments of
the model, e.g. ``{"class_labels": y}``) and ``"condition"`` ((B, d) for prompt-level learned routers).
The batch is sorted by group before the forward pass, so each group runs on one contiguous slice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from adapterbank._validation import check_int, check_number
from adapterbank.errors import FormatError, ParameterError, UnknownNameError

logger = logging.getLogger(__name__)

__all__ = [
    "OBJECTIVES",
    "OPTIMIZER_FILE",
    "TRAINER_STATE",
    "TrainResult",
    "apply_ema",
    "default_forward",
    "denoising_loss",
    "sort_by_group",
    "train",
]

OBJECTIVES = ("flow_matching", "epsilon")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTERS_FILE = "trainable.safetensors"
_T = 1000


@dataclass
class TrainResult:
    """What :func:`train` returns: the loss history, per-group update counts, step times, EMA weights."""

    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    group_updates: list[int] = field(default_factory=list)
    group_samples: list[int] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    ema: dict[str, torch.Tensor] | None = None

    @property
    def median_step_time(self) -> float:
        t = sorted(self.step_times[len(self.step_times) // 10:] or self.step_times)  # skip warm-up
        return t[len(t) // 2] if t else float("nan")


def default_forward(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """``model(x_t, timestep=t, **batch["cond"])``, unwrapping diffusers/transformers outputs."""
    out = model(x_t, timestep=t, **dict(batch.get("cond") or {}))
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, _T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


_ACP = _alphas_cumprod()


def denoising_loss(model: nn.Module, x0: torch.Tensor, batch: Mapping[str, Any], *, objective: str,
                   generator: torch.Generator | None = None, forward: Callable[..., torch.Tensor] = default_forward,
                   timesteps: str = "logit_normal") -> torch.Tensor:
    """Per-sample loss (B,) of the chosen objective (see the module docstring)."""
    B = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    shape = (B,) + (1,) * (x0.ndim - 1)
    if objective == "flow_matching":
        if timesteps == "logit_normal":
            sigma = torch.sigmoid(torch.randn(B, generator=generator))
        else:
            sigma = torch.rand(B, generator=generator)
        sigma = sigma.to(x0.device, x0.dtype)
        s = sigma.view(shape)
        x_t = (1 - s) * x0 + s * noise
        target = noise - x0
        t = sigma * _T
    elif objective == "epsilon":
        t = torch.randint(0, _T, (B,), generator=generator).to(x0.device)
        a = _ACP.to(x0.device, x0.dtype)[t].view(shape)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise
    else:
        raise UnknownNameError(f"Unknown objective {objective!r}. Valid objectives: {', '.join(OBJECTIVES)}.")
    pred = forward(model, x_t, t, batch)
    if pred.shape != target.shape:
        raise ParameterError(f"The model predicted shape {tuple(pred.shape)} for targets of shape "
                             f"{tuple(target.shape)}; check the model's out_channels (learn_sigma?).")
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)  # (B,)


def _permute(obj: Any, perm: torch.Tensor, B: int) -> Any:
    if isinstance(obj, torch.Tensor) and obj.ndim >= 1 and obj.shape[0] == B:
        return obj.index_select(0, perm.to(obj.device))
    if isinstance(obj, Mapping):
        return {k: _permute(v, perm, B) for k, v in obj.items()}
    if isinstance(obj, list) and len(obj) == B:
        return [obj[i] for i in perm.tolist()]
    return obj


def sort_by_group(batch: Mapping[str, Any], groups: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """Reorder every per-sample entry of ``batch`` so equal groups are contiguous (stable).

    >>> b, g = sort_by_group({"x": torch.arange(4)}, torch.tensor([1, 0, 1, 0]))
    >>> b["x"].tolist(), g.tolist()
    ([1, 3, 0, 2], [0, 0, 1, 1])
    """
    B = groups.shape[0]
    perm = torch.sort(groups, stable=True).indices
    return _permute(dict(batch), perm, B), groups[perm]


def _groups_of(batch: Mapping[str, Any], partitioner: Any, n_groups: int | None) -> torch.Tensor | None:
    if "group" in batch:
        return torch.as_tensor(batch["group"], dtype=torch.long).cpu()
    if partitioner is not None:
        if "labels" not in batch:
            raise FormatError("A batch needs 'labels' (for the partitioner) or 'group' ids. "
                              f"Got keys {sorted(batch)}.")
        return partitioner.assign_batch(batch["labels"])
    if n_groups is None:
        return None
    if n_groups == 1:
        return torch.zeros(batch["x"].shape[0], dtype=torch.long)
    raise ParameterError(f"The model has {n_groups} groups: give train() a partitioner or batches with 'group'.")


def apply_ema(handle: Any, ema: Mapping[str, torch.Tensor]) -> None:
    """Copy EMA weights into the handle's trainable parameters."""
    named = _named(handle)
    with torch.no_grad():
        for k, v in ema.items():
            named[k].copy_(v)


def _named(handle: Any) -> dict[str, nn.Parameter]:
    if hasattr(handle, "named_adapter_parameters"):
        return handle.named_adapter_parameters()
    return dict(handle.named_trainable_parameters())


# ------------------------------------------------------------------------------------------- checkpoints
def _save_ckpt(d: Path, handle: Any, opt: torch.optim.Optimizer, step: int, result: TrainResult,
               names: list[str], rng: torch.Tensor) -> None:
    from adapterbank._io import atomic_write_bytes
    from adapterbank.formats.safetensors_io import save_file

    d.mkdir(parents=True, exist_ok=True)
    named = _named(handle)
    tensors = {f"param.{k}": v.detach().contiguous() for k, v in named.items()}
    if result.ema is not None:
        tensors.update({f"ema.{k}": v.contiguous() for k, v in result.ema.items()})
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{i}.{key}"] = v.detach().reshape(-1).contiguous() if v.ndim == 0 else v.contiguous()
    tensors["rng"] = rng
    tensors["torch_rng"] = torch.get_rng_state()  # models draw from it too (e.g. DiT's class-label dropout)
    save_file(tensors, d / OPTIMIZER_FILE, metadata={"format": "pt"})
    state = {"step": step, "param_names": names, "param_groups": sd["param_groups"],
             "scalar_state": {str(i): [k for k, v in st.items() if isinstance(v, torch.Tensor) and v.ndim == 0]
                              for i, st in sd["state"].items()},
             "history": result.history, "group_updates": result.group_updates,
             "group_samples": result.group_samples}
    atomic_write_bytes(d / TRAINER_STATE, (json.dumps(state, indent=1) + "\n").encode())


def _load_ckpt(d: Path, handle: Any, opt: torch.optim.Optimizer, result: TrainResult, names: list[str]) -> tuple[int, torch.Tensor]:
    from adapterbank.formats.safetensors_io import load_file

    try:
        state = json.loads((d / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"Cannot resume from {d}: {TRAINER_STATE} is missing or unreadable ({e}).") from None
    if state.get("param_names") != names:
        raise FormatError(f"Cannot resume from {d}: its trainable parameters differ from this model's "
                          f"({len(state.get('param_names') or [])} vs {len(names)}).")
    tensors, _ = load_file(d / OPTIMIZER_FILE)
    named = _named(handle)
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(tensors[f"param.{k}"])
    ema = {k[4:]: v.clone() for k, v in tensors.items() if k.startswith("ema.")}
    result.ema = ema or result.ema
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v.clone()
    for i, scalars in state["scalar_state"].items():
        for name in scalars:
            opt_state[int(i)][name] = opt_state[int(i)][name].reshape(())
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    result.history = state["history"]
    result.group_updates = state["group_updates"]
    result.group_samples = state["group_samples"]
    torch.set_rng_state(tensors["torch_rng"].clone())
    return int(state["step"]), tensors["rng"]


def _cycle(data: Iterable[Any]) -> Any:
    while True:
        empty = True
        for b in data:
            empty = False
            yield b
        if empty:
            raise ParameterError("train() got an empty dataloader.")


def train(
    handle: Any,
    data: Iterable[Mapping[str, Any]],
    *,
    objective: str = "flow_matching",
    steps: int,
    partitioner: Any = None,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    grad_clip: float | None = 1.0,
    ema: float | None = None,
    seed: int = 0,
    forward: Callable[..., torch.Tensor] = default_forward,
    timesteps: str = "logit_normal",
    aux_weight: float = 1.0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: bool = False,
    log_every: int = 50,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune the adapters of ``handle`` (a :class:`GraspHandle` or a baseline handle) for ``steps`` steps.

    Args:
        data: an iterable of batches (re-iterated when exhausted; see the module docstring).
        partitioner: assigns groups from ``batch["labels"]`` when batches carry no ``"group"``.
        ema: EMA decay (e.g. 0.999); the EMA weights are in ``result.ema`` (see :func:`apply_ema`).
        checkpoint_dir / checkpoint_every / resume: save trainable weights, AdamW state, EMA, step, history
            and RNG every N steps; ``resume=True`` continues from the checkpoint (the data order restarts).
        aux_weight: weight of ``handle.aux_loss()`` (load balancing of learned routers).

    >>> from torch import nn
    >>> from adapterbank.grasp import inject
    >>> class Net(nn.Module):
    ...     def __init__(self): super().__init__(); self.ff = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    ...     def forward(self, x, timestep): return x + self.ff(x)
    >>> h = inject(Net(), n_groups=2, rank=2, seed=0)
    >>> batches = [{"x": torch.randn(4, 3, 4), "group": torch.tensor([0, 0, 0, 0])}]
    >>> res = train(h, batches, steps=3, lr=1e-2)
    >>> res.group_updates
    [3, 0]
    """
    if objective not in OBJECTIVES:
        raise UnknownNameError(f"Unknown objective {objective!r}. Valid objectives: {', '.join(OBJECTIVES)}.")
    check_int(steps, "steps", "train", low=1)
    check_number(ema, "ema", "train", low=0.0, high=1.0, low_open=True, high_open=True, optional=True)
    model: nn.Module = handle.model
    named = _named(handle)
    names = list(named)
    params = list(named.values())
    if not params:
        raise ParameterError("train() found no trainable parameters in the handle.")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    n_groups = getattr(handle, "n_groups", None)
    static = bool(getattr(handle, "static_routing", False))
    group_params = [handle.group_parameters(i) for i in range(n_groups)] if n_groups else []
    result = TrainResult(steps=steps, group_updates=[0] * (n_groups or 0), group_samples=[0] * (n_groups or 0))
    if ema is not None:
        result.ema = {k: p.detach().clone() for k, p in named.items()}
    gen = torch.Generator().manual_seed(seed)
    start = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume:
        if ckpt is None or not (ckpt / TRAINER_STATE).is_file():
            raise FormatError(f"resume=True needs a checkpoint in checkpoint_dir; {ckpt} has no {TRAINER_STATE}.")
        start, rng = _load_ckpt(ckpt, handle, opt, result, names)
        gen.set_state(rng)
        logger.info("resumed from %s at step %d", ckpt, start)
    it = _cycle(data)
    model.train()
    running: dict[str, list[float]] = {}
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="grasp train")
    for step in bar:
        batch = next(it)
        x0 = batch["x"]
        g = _groups_of(batch, partitioner, n_groups if static else None)
        if g is not None:
            batch, g = sort_by_group(batch, g)
            x0 = batch["x"]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if hasattr(handle, "training_context"):
            ctx = handle.training_context(g if static else None, batch.get("condition"))
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            per = denoising_loss(model, x0, batch, objective=objective, generator=gen, forward=forward,
                                 timesteps=timesteps)
            loss = per.mean()
            aux = handle.aux_loss() if hasattr(handle, "aux_loss") else None
            total = loss + aux_weight * aux if aux is not None else loss
        if not torch.isfinite(total):
            raise ParameterError(f"The training loss became {total.item()} at step {step}; lower the learning rate.")
        total.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
        opt.step()
        if result.ema is not None:
            with torch.no_grad():
                for k, p in named.items():
                    if p.grad is not None:
                        result.ema[k].mul_(ema).add_(p.detach(), alpha=1 - ema)
        result.step_times.append(time.perf_counter() - t0)
        rec: dict[str, Any] = {"step": step + 1, "loss": float(loss.detach())}
        if aux is not None:
            rec["aux"] = float(aux.detach())
        for gid, gparams in enumerate(group_params):  # an update happened iff a group parameter got a grad
            if any(p.grad is not None for p in gparams):
                result.group_updates[gid] += 1
        if g is not None:
            for gid in torch.unique(g).tolist():
                if gid < 0:
                    continue
                m = g == gid
                if gid < len(result.group_samples):
                    result.group_samples[gid] += int(m.sum())
                running.setdefault(str(gid), []).append(float(per.detach()[m.to(per.device)].mean()))
        running.setdefault("all", []).append(float(loss.detach()))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            rec["group_loss"] = {k: sum(v) / len(v) for k, v in running.items() if k != "all"}
            rec["mean_loss"] = sum(running["all"]) / len(running["all"])
            result.history.append(rec)
            logger.info("step %d loss %.4f groups %s", step + 1, rec["mean_loss"],
                        {k: round(v, 4) for k, v in rec["group_loss"].items()})
            bar.set_postfix(loss=f"{rec['mean_loss']:.4f}")
            running = {}
        if callback is not None:
            callback(step + 1, rec)
        if ckpt is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            _save_ckpt(ckpt, handle, opt, step + 1, result, names, gen.get_state())
    bar.close()
    model.eval()
    if not math.isfinite(result.median_step_time):
        logger.debug("no step timed")
    return result
