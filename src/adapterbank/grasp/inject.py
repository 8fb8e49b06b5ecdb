"""Inject group adapters into the FFN sites of diffusers / transformers models, route, save, load, remove.

Sites found by ``targets="auto"`` (class-agnostic: by attribute, checked on the installed versions):

| model family | site | input | how |
|---|---|---|---|
| diffusers DiT/PixArt ``BasicTransformerBlock``, UNet2DConditionModel transformer blocks, SD3 ``JointTransformerBlock``, Flux ``FluxTransformerBlock`` | ``.ff`` (and ``.ff_context`` with ``include_context=True``) | (B, N, C) | wrap |
| diffusers ``SanaTransformerBlock`` | ``.ff`` = ``GLUMBConv`` | (B, C, H, W), channel-first | wrap, ``channel_dim=1`` |
| transformers Llama/Mistral/Qwen2/GPT-2/CLIP layers | ``.mlp`` | (B, N, C) | wrap |
| transformers T5 | ``.DenseReluDense`` | (B, N, C) | wrap |
| transformers BERT/ViT layers (FFN split in ``intermediate`` + ``output``) | ``.intermediate`` → ``.output.dense`` | (B, N, C) | hooks: x captured before ``intermediate``, ``s·U φ(D x)`` added to ``output.dense``'s output (before dropout, residual, LayerNorm) |

Flux's single-stream blocks have no separate FFN and are skipped. ``targets`` may instead be a list of
module names, a regex (full match on module names), or a callable ``(name, module) -> bool | int``
(an int is the channel dim).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterbank._validation import check_int
from adapterbank._versions import versions
from adapterbank.errors import FormatError, ParameterError, ShapeMismatchError, UnknownNameError
from adapterbank.grasp.adapters import GroupLoraLinear, GroupResidual, Router

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "KINDS",
    "WEIGHTS_NAME",
    "GraspFFN",
    "GraspHandle",
    "Site",
    "find_ffn_sites",
    "inject",
    "load",
    "read_checkpoint",
    "route",
    "versions",
]

CONFIG_NAME = "grasp_config.json"
WEIGHTS_NAME = "grasp_adapters.safetensors"
CHECKPOINT_VERSION = 1
KINDS = ("residual", "lora")
Targets = str | Sequence[str] | Callable[[str, nn.Module], Any]


# ------------------------------------------------------------------------------------------ site discovery
@dataclass
class Site:
    """One FFN site: ``name`` (module path), how it is hooked, its channel dim and widths."""

    name: str
    mode: str  # "wrap" | "split"
    channel_dim: int
    d_in: int
    d_out: int
    adapter: nn.Module | None = None
    hooks: list[Any] = field(default_factory=list)
    lora_layers: dict[str, GroupLoraLinear] = field(default_factory=dict)  # kind="lora": child path -> layer
    _captured: list[torch.Tensor] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode, "channel_dim": self.channel_dim, "d_in": self.d_in,
                "d_out": self.d_out}


def _leaf_dims(mod: nn.Module) -> list[tuple[int, int]]:
    """(in, out) widths of the linear/conv leaves of ``mod`` in registration order."""
    dims = []
    for m in mod.modules():
        if isinstance(m, nn.Linear):
            dims.append((m.in_features, m.out_features))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims.append((m.in_channels, m.out_channels))
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None:
            dims.append((int(m.weight.shape[0]), int(m.nf)))  # transformers GPT-2 Conv1D: weight (in, out)
    return dims


def _io_dims(mod: nn.Module, name: str) -> tuple[int, int]:
    dims = _leaf_dims(mod)
    if not dims:
        raise ShapeMismatchError(f"Cannot tell the input/output width of FFN site {name!r} "
                                 f"({type(mod).__name__}): it has no Linear/Conv layer.")
    return dims[0][0], dims[-1][1]


def _channel_dim(mod: nn.Module) -> int:
    return 1 if type(mod).__name__ == "GLUMBConv" else -1


def find_ffn_sites(model: nn.Module, targets: Targets = "auto", *, include_context: bool = False) -> list[Site]:
    """The FFN sites of ``model`` (see the module docstring), in module order.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    >>> [s.name for s in find_ffn_sites(m)]
    ['model.layers.0.mlp', 'model.layers.1.mlp']
    """
    mods = dict(model.named_modules())
    sites: list[Site] = []
    if targets == "auto":
        attrs = ("ff", "ff_context", "mlp", "DenseReluDense") if include_context else ("ff", "mlp", "DenseReluDense")
        for name, mod in mods.items():
            if isinstance(mod, (GraspFFN, GroupResidual)):
                continue
            children = mod._modules
            pre = f"{name}." if name else ""
            for a in attrs:
                child = children.get(a)
                if child is not None and not isinstance(child, GraspFFN):
                    d_in, d_out = _io_dims(child, pre + a)
                    sites.append(Site(pre + a, "wrap", _channel_dim(child), d_in, d_out))
            if _is_split(mod):
                sites.append(Site(name, "split", -1, mod.intermediate.dense.in_features, mod.output.dense.out_features))
        if not sites:
            raise ParameterError(f"No FFN site found in {type(model).__name__} (looked for .ff, .mlp, "
                                 ".DenseReluDense and .intermediate/.output); pass targets=[...] or a regex.")
        return sites
    if isinstance(targets, str):
        rx = re.compile(targets)
        chosen = [(n, m, None) for n, m in mods.items() if n and rx.fullmatch(n)]
        if not chosen:
            raise UnknownNameError(f"The targets regex {targets!r} matches no module of {type(model).__name__}.")
    elif callable(targets):
        chosen = []
        for n, m in mods.items():
            r = targets(n, m) if n else False
            if r is not False and r is not None:
                chosen.append((n, m, r if isinstance(r, int) and not isinstance(r, bool) else None))
        if not chosen:
            raise UnknownNameError(f"The targets callable selected no module of {type(model).__name__}.")
    else:
        names = list(targets)
        missing = [n for n in names if n not in mods or not n]
        if missing:
            raise UnknownNameError(f"Target modules {missing[:5]} are not in {type(model).__name__} "
                                   f"(e.g. {[n for n in mods if n][:5]}).")
        chosen = [(n, mods[n], None) for n in names]
    for n, m, cd in chosen:
        if _is_split(m):  # a BERT/ViT-style layer named directly: hook it like "auto" does
            sites.append(Site(n, "split", -1, m.intermediate.dense.in_features, m.output.dense.out_features))
            continue
        d_in, d_out = _io_dims(m, n)
        sites.append(Site(n, "wrap", _channel_dim(m) if cd is None else cd, d_in, d_out))
    return sites


def _is_split(mod: nn.Module) -> bool:
    inter, out = mod._modules.get("intermediate"), mod._modules.get("output")
    return (inter is not None and out is not None and isinstance(getattr(inter, "dense", None), nn.Linear)
            and isinstance(getattr(out, "dense", None), nn.Linear))


# ------------------------------------------------------------------------------------------------ wrapper
class GraspFFN(nn.Module):
    """``y = ffn(x) + adapter(x)`` on the channel dim, with the rows' groups taken from the router."""

    def __init__(self, ffn: nn.Module, adapter: nn.Module, router: Router, channel_dim: int = -1) -> None:
        super().__init__()
        self.ffn, self.adapter, self.router, self.channel_dim = ffn, adapter, router, channel_dim

    def forward(self, x: torch.Tensor, *args: Any, **kw: Any) -> Any:
        y = self.ffn(x, *args, **kw)
        if not self.router.active and not getattr(self.adapter, "always_on", False):
            return y
        cd = self.channel_dim
        xc = x if cd in (-1, x.ndim - 1) else x.movedim(cd, -1)  # channels last
        d = self.adapter(xc, self.router)
        if d is None:
            return y
        if cd not in (-1, x.ndim - 1):
            d = d.movedim(-1, cd)
        # The sum keeps the base output's memory layout: a d of another layout or dtype is first copied into
        # y's strides (empty_like preserves them; copy_ keeps the autograd graph). With a permuted d, y + d
        # could come out channels-last and the layers after us would sum in another order — not bit-exact at
        # U = 0 (seen with Sana's channel-first FFN, diffusers 0.42). Same layout and dtype: no copy needed.
        if d.dtype != y.dtype or d.stride() != y.stride():
            d = torch.empty_like(y).copy_(d)
        return y + d


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        p, a = name.rsplit(".", 1)
        return model.get_submodule(p), a
    return model, name


# ------------------------------------------------------------------------------------------------- handle
class GraspHandle:
    """What :func:`inject` returns: the router, the adapter parameters, save/load and :meth:`remove`.

    ``named_adapter_parameters()`` names are ``<site>.down.<g>`` / ``<site>.up.<g>`` (residual) or
    ``<site>.<linear>.lora_A.<g>`` / ``.lora_B.<g>`` (lora); the checkpoint uses the same keys.
    """

    def __init__(self, model: nn.Module, router: Router, sites: list[Site], config: dict[str, Any],
                 saved_grad: dict[str, bool]) -> None:
        self.model, self.router, self.sites, self.config = model, router, sites, config
        self._saved_grad = saved_grad
        self.partitioner: Any = None
        self.removed = False

    # -- info --------------------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return int(self.config["n_groups"])

    @property
    def kind(self) -> str:
        return str(self.config["kind"])

    @property
    def group_names(self) -> list[str]:
        if self.partitioner is not None:
            return list(self.partitioner.group_names)
        return list(self.config.get("group_names") or [f"group{g}" for g in range(self.n_groups)])

    def named_adapter_parameters(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for s in self.sites:
            if self.kind == "lora":
                for child, lin in s.lora_layers.items():
                    for g in range(lin.n_groups):
                        out[f"{s.name}.{child}.lora_A.{g}"] = lin.lora_A[g]
                        out[f"{s.name}.{child}.lora_B.{g}"] = lin.lora_B[g]
            else:
                assert s.adapter is not None
                for n, p in s.adapter.named_parameters():
                    out[f"{s.name}.{n}"] = p
        return out

    def parameters(self) -> list[nn.Parameter]:
        """All adapter parameters (what the optimiser trains)."""
        return list(self.named_adapter_parameters().values())

    trainable_parameters = parameters

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        """The parameters of group ``g`` at every site."""
        if not 0 <= g < self.n_groups:
            raise UnknownNameError(f"Group {g} does not exist; groups are 0..{self.n_groups - 1}.")
        out: list[nn.Parameter] = []
        for s in self.sites:
            if self.kind == "lora":
                for lin in s.lora_layers.values():
                    out += lin.group_parameters(g)
            else:
                out += s.adapter.group_parameters(g)  # type: ignore[union-attr]
        return out

    def n_params(self, group: int | None = None) -> int:
        ps = self.parameters() if group is None else self.group_parameters(group)
        return sum(p.numel() for p in ps)

    def aux_loss(self) -> torch.Tensor | None:
        """Auxiliary loss of learned routers (None for static GRASP routing)."""
        return None

    # -- routing -----------------------------------------------------------------------------------
    def route(self, groups: torch.Tensor | Sequence[int] | int, **kw: Any) -> contextlib.AbstractContextManager[None]:
        """Context manager: rows of the next forward passes use ``groups`` (see :func:`route`)."""
        return route(self.model, groups, **kw)

    static_routing = True

    def training_context(self, groups: torch.Tensor | None, condition: torch.Tensor | None = None,
                         ) -> contextlib.AbstractContextManager[None]:
        """The context the trainer runs a batch in: the batch's groups (all 0 with one group)."""
        if groups is None:
            raise ParameterError(f"This model has {self.n_groups} GRASP groups: batches need group ids.")
        g = torch.zeros_like(groups) if self.n_groups == 1 else groups
        return route(self.model, g, condition=condition)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_adapter_parameters().items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor], *, where: str = "state dict") -> None:
        """Copy adapter tensors in; missing/unexpected keys and shape mismatches raise (nothing is copied then)."""
        own = self.named_adapter_parameters()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise FormatError(f"{where}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                              f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}.")
        for k, p in own.items():
            if tuple(sd[k].shape) != tuple(p.shape):
                raise ShapeMismatchError(f"{where}: {k} has shape {tuple(sd[k].shape)}, the model expects "
                                         f"{tuple(p.shape)}.")
            if not torch.isfinite(sd[k]).all():
                raise FormatError(f"{where}: {k} contains NaN or Inf.")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(sd[k].to(p.dtype))

    def save(self, out: str | Path, *, partitioner: Any = None, extra: dict[str, Any] | None = None) -> Path:
        """Write ``grasp_adapters.safetensors`` + ``grasp_config.json`` (config, sites, partitioner, versions)."""
        from adapterbank._io import atomic_write_bytes
        from adapterbank.formats.safetensors_io import save_file

        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        part = partitioner if partitioner is not None else self.partitioner
        cfg = {**self.config, "format_version": CHECKPOINT_VERSION, "sites": [s.to_dict() for s in self.sites],
               "group_names": list(part.group_names) if part is not None else self.group_names, "partitioner": part.to_dict() if part is not None else None,
               "versions": versions(), "extra": extra or {}}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, d / WEIGHTS_NAME,
                  metadata={"format": "pt", "adapterbank_grasp": str(CHECKPOINT_VERSION)})
        atomic_write_bytes(d / CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
        logger.info("saved GRASP checkpoint (%s, %d groups, %d sites) to %s", self.kind, self.n_groups,
                    len(self.sites), d)
        return d

    # -- removal -----------------------------------------------------------------------------------
    def remove(self) -> nn.Module:
        """Restore the original modules, hooks and ``requires_grad`` flags; returns the model."""
        if self.removed:
            return self.model
        for s in self.sites:
            for h in s.hooks:
                h.remove()
            s.hooks.clear()
            if s.mode == "wrap" and self.kind == "residual":
                parent, attr = _parent(self.model, s.name)
                w = getattr(parent, attr)
                if isinstance(w, GraspFFN):
                    setattr(parent, attr, w.ffn)
            for child, lin in s.lora_layers.items():
                parent, attr = _parent(self.model, f"{s.name}.{child}")
                setattr(parent, attr, lin.base)
        if hasattr(self.model, "_grasp_handle"):
            del self.model._grasp_handle
        for n, p in self.model.named_parameters():
            if n in self._saved_grad:
                p.requires_grad_(self._saved_grad[n])
        self.removed = True
        return self.model

    def __repr__(self) -> str:
        return (f"GraspHandle(kind={self.kind!r}, n_groups={self.n_groups}, rank={self.config['rank']}, "
                f"sites={len(self.sites)}, params={self.n_params()})")


def inject(
    model: nn.Module,
    n_groups: int,
    rank: int,
    *,
    kind: str = "residual",
    targets: Targets = "auto",
    include_context: bool = False,
    activation: str = "gelu",
    scale: float = 1.0,
    lora_alpha: float | None = None,
    freeze_base: bool = True,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> GraspHandle:
    """Add ``n_groups`` adapters of rank ``rank`` at every FFN site of ``model``; returns a :class:`GraspHandle`.

    Args:
        kind: ``"residual"`` (y = FFN(x) + s·U_g φ(D_g x), U_g = 0 at init) or ``"lora"`` (a LoRA per group on
            every ``nn.Linear`` of the FFN, exportable to PEFT).
        targets: ``"auto"``, module names, a regex or a callable (see the module docstring).
        include_context: also adapt ``.ff_context`` (SD3/Flux text stream).
        freeze_base: set ``requires_grad=False`` on every base parameter (restored by ``remove()``).
        seed: seeds the adapters' initialisation (else the global torch RNG is used).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=2, vocab_size=32)).eval()
    >>> ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    >>> before = m(ids).logits
    >>> h = inject(m, n_groups=3, rank=4)
    >>> with route(m, [0, 2]):
    ...     torch.equal(m(ids).logits, before)   # U = 0: identical to the base at step 0
    True
    >>> _ = h.remove()
    """
    if kind not in KINDS:
        raise UnknownNameError(f"Unknown adapter kind {kind!r}. Valid kinds: {', '.join(KINDS)}.")
    check_int(n_groups, "n_groups", "inject", low=1)
    check_int(rank, "rank", "inject", low=1)
    if getattr(model, "_grasp_handle", None) is not None:
        raise ParameterError(f"{type(model).__name__} already has GRASP adapters; call handle.remove() first.")
    sites = find_ffn_sites(model, targets, include_context=include_context)
    saved_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    router = Router(n_groups)
    gen_state = None
    if seed is not None:
        gen_state = torch.get_rng_state()
        torch.manual_seed(seed)
    try:
        for s in sites:
            if kind == "residual":
                s.adapter = GroupResidual(n_groups, s.d_in, s.d_out, rank, activation=activation, scale=scale,
                                          dtype=dtype)
                if s.mode == "wrap":
                    parent, attr = _parent(model, s.name)
                    setattr(parent, attr, GraspFFN(getattr(parent, attr), s.adapter, router, s.channel_dim))
                else:
                    _hook_split(model, s, router)
            else:
                root = model.get_submodule(s.name)
                linears = ([("intermediate.dense", root.intermediate.dense), ("output.dense", root.output.dense)]
                           if s.mode == "split" else
                           [(n, m) for n, m in root.named_modules() if isinstance(m, nn.Linear)])
                if not linears:
                    raise ParameterError(f"kind='lora' needs nn.Linear layers in FFN site {s.name!r} "
                                         f"({type(root).__name__}); use kind='residual' for conv FFNs.")
                for child, lin in linears:
                    gl = GroupLoraLinear(lin, router, n_groups=n_groups, rank=rank, alpha=lora_alpha)
                    parent, attr = _parent(root, child)
                    setattr(parent, attr, gl)
                    s.lora_layers[child] = gl
    except Exception:
        for n, p in model.named_parameters():
            if n in saved_grad:
                p.requires_grad_(saved_grad[n])
        raise
    finally:
        if gen_state is not None:
            torch.set_rng_state(gen_state)
    config = {"kind": kind, "n_groups": n_groups, "rank": rank, "activation": activation, "scale": float(scale),
              "lora_alpha": float(rank if lora_alpha is None else lora_alpha), "include_context": include_context,
              "targets": targets if isinstance(targets, str) else [s.name for s in sites],
              "base_model": type(model).__name__}
    handle = GraspHandle(model, router, sites, config, saved_grad)
    model._grasp_handle = handle  # type: ignore[assignment]
    logger.info("injected %s adapters: %d groups × %d sites, rank %d, %d parameters", kind, n_groups, len(sites),
                rank, handle.n_params())
    return handle


def _hook_split(model: nn.Module, s: Site, router: Router) -> None:
    """BERT/ViT: capture x before ``intermediate``; add the adapter to ``output.dense``'s output."""
    layer = model.get_submodule(s.name) if s.name else model
    def capture(_m: nn.Module, args: tuple[Any, ...]) -> None:
        s._captured.append(args[0])

    def add(_m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        x = s._captured.pop() if s._captured else None
        if x is None or s.adapter is None or not (router.active or getattr(s.adapter, "always_on", False)):
            return out
        d = s.adapter(x, router)
        return out if d is None else out + d.to(out.dtype)

    s.hooks += [layer.intermediate.register_forward_pre_hook(capture),
                layer.output.dense.register_forward_hook(add)]


def _handle_of(model: nn.Module) -> Any:
    h = getattr(model, "_grasp_handle", None)
    if h is None:
        raise ParameterError(f"{type(model).__name__} has no GRASP adapters; call grasp.inject(model, ...) first.")
    return h


@contextlib.contextmanager
def route(model: nn.Module, groups: torch.Tensor | Sequence[int] | int, *, uncond: str | int = "same",
          images_per_prompt: int = 1, condition: torch.Tensor | None = None) -> Iterator[None]:
    """Route the rows of every forward pass inside the block to ``groups`` (an int: all rows).

    The batch may be ``len(groups)`` rows or a multiple (classifier-free guidance doubles it: ``uncond``
    sets the unconditional half's groups to ``"same"``, ``"off"`` (base model) or a group id); any other
    batch size raises :class:`ParameterError`. ``images_per_prompt`` repeats each id first.
    ``condition`` (B, d) feeds prompt-level learned routers (baselines).

    >>> import torch.nn as nn
    >>> class Block(nn.Module):
    ...     def __init__(self): super().__init__(); self.ff = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    ...     def forward(self, x): return x + self.ff(x)
    >>> m = Block(); h = inject(m, n_groups=2, rank=2)
    >>> with route(m, [0, 1]):
    ...     m(torch.randn(4, 3, 4)).shape                 # CFG: 2 ids, 4 rows
    torch.Size([4, 3, 4])
    """
    h = _handle_of(model)
    prev = (h.router._groups, h.router._uncond, h.router.condition)
    h.router.set(groups, uncond=uncond, images_per_prompt=images_per_prompt)
    h.router.condition = condition
    try:
        yield
    finally:
        h.router._groups, h.router._uncond, h.router.condition = prev
        h.router._plans = {}


# --------------------------------------------------------------------------------------------- checkpoints
_CFG_KEYS = {"kind", "n_groups", "rank", "activation", "scale", "lora_alpha", "include_context", "targets",
             "base_model", "format_version", "sites", "group_names", "partitioner", "versions", "extra"}


def read_checkpoint(ckpt: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a checkpoint folder, validated (header checked before safetensors reads it)."""
    from adapterbank.formats.safetensors_io import load_file

    d = Path(ckpt)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise FormatError(f"A GRASP checkpoint is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}; {d} is not a folder.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise FormatError(f"The GRASP checkpoint {d} has no {CONFIG_NAME}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"Cannot read {cfg_path}: {e}.") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path} must hold a JSON object. Got {type(cfg).__name__}.")
    extra, missing = set(cfg) - _CFG_KEYS, _CFG_KEYS - set(cfg)
    if extra or missing:
        raise FormatError(f"{cfg_path}: unexpected keys {sorted(extra)}, missing keys {sorted(missing)}.")
    if cfg["format_version"] != CHECKPOINT_VERSION:
        raise FormatError(f"{cfg_path}: format_version {cfg['format_version']!r} is not supported "
                          f"(expected {CHECKPOINT_VERSION}).")
    if cfg["kind"] not in KINDS:
        raise FormatError(f"{cfg_path}: key 'kind' must be one of {KINDS}. Got {cfg['kind']!r}.")
    if not w_path.is_file():
        raise FormatError(f"The GRASP checkpoint {d} has no {WEIGHTS_NAME}.")
    tensors, _ = load_file(w_path)
    return cfg, tensors


def load(model: nn.Module, ckpt: str | Path, *, freeze_base: bool = True, encoder: Any = None) -> GraspHandle:
    """Inject the adapters of checkpoint ``ckpt`` into ``model`` (same sites) and load their weights.

    The partitioner saved with the checkpoint is restored as ``handle.partitioner`` (``encoder`` is handed
    to a k-means partitioner for prompts). Raises :class:`FormatError` for a damaged or foreign
    checkpoint and :class:`ShapeMismatchError` when the model's sites differ.

    >>> import tempfile
    >>> class Blk(nn.Module):
    ...     def __init__(self): super().__init__(); self.ff = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    ...     def forward(self, x): return self.ff(x)
    >>> m = Blk(); d = inject(m, n_groups=2, rank=2, seed=0).save(tempfile.mkdtemp())
    >>> _ = m._grasp_handle.remove()
    >>> load(m, d).n_params()       # 2 groups × (D: 2×4 + U: 4×2)
    32
    """
    from adapterbank.grasp.partition import partitioner_from_dict

    cfg, tensors = read_checkpoint(ckpt)
    names = [s["name"] for s in cfg["sites"]]
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        raise ShapeMismatchError(f"{ckpt}: the checkpoint's FFN sites {missing[:3]} are not in "
                                 f"{type(model).__name__}: it was made for {cfg['base_model']}.")
    targets: Targets = "auto" if cfg["targets"] == "auto" else names
    h = inject(model, cfg["n_groups"], cfg["rank"], kind=cfg["kind"], targets=targets,
               include_context=bool(cfg["include_context"]), activation=cfg["activation"], scale=cfg["scale"],
               lora_alpha=cfg["lora_alpha"], freeze_base=freeze_base)
    try:
        got = [s.to_dict() for s in h.sites]
        if got != cfg["sites"]:
            raise ShapeMismatchError(f"{ckpt}: the model's FFN sites {got[:2]} ... differ from the checkpoint's "
                                     f"{cfg['sites'][:2]} ...")
        h.load_state_dict(tensors, where=str(Path(ckpt) / WEIGHTS_NAME))
        if cfg["partitioner"] is not None:
            h.partitioner = partitioner_from_dict(cfg["partitioner"], encoder=encoder,
                                                  where=f"{Path(ckpt) / CONFIG_NAME}: partitioner")
        h.config["group_names"] = cfg["group_names"]
    except Exception:
        h.remove()
        raise
    return h
