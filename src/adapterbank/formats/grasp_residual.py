"""GRASP residual adapters on disk: ``grasp_residual.json`` + ``grasp_residual.safetensors`` in a folder.

A residual adapter adds y = FFN(x) + s·U φ(D x) at FFN sites (φ = GELU, erf form); it is *not* a LoRA
weight update, so it has its own format that no LoRA loader mistakes for one.

| key | shape | meaning |
|---|---|---|
| ``<site>.grasp_down.weight`` | (r, d_in) | D (``ResidualModule.D``) |
| ``<site>.grasp_up.weight`` | (d_out, r) | U (``ResidualModule.U``) |

``grasp_residual.json``: ``{"format": "grasp_residual", "format_version": 1, "activation": "gelu",
"base_model": ..., "modules": {"<site>": {"scale": s, "channel_dim": -1|1}}, "metadata": {...}}``.
``scale`` and ``channel_dim`` are those of each :class:`~adapterbank.lora.ResidualModule`; every module's
``activation`` is the file's. The reader is strict: unknown tensor keys, unknown JSON keys, missing factors,
NaN/Inf raise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapterbank._io import atomic_write_bytes
from adapterbank.errors import FormatError, ShapeMismatchError
from adapterbank.formats.peft import member
from adapterbank.formats.safetensors_io import load_file, save_file
from adapterbank.lora import AdapterModule, LoraAdapter, ResidualModule, all_finite

__all__ = [
    "CONFIG_NAME",
    "FORMAT_NAME",
    "WEIGHTS_NAME",
    "grasp_residual_files",
    "is_grasp_residual_dir",
    "read_grasp_residual",
    "write_grasp_residual",
]

FORMAT_NAME = "grasp_residual"
CONFIG_NAME = "grasp_residual.json"
WEIGHTS_NAME = "grasp_residual.safetensors"
FORMAT_VERSION = 1
ACTIVATION = "gelu"
_SUFFIX = {".grasp_down.weight": "D", ".grasp_up.weight": "U"}
_TOP = {"format", "format_version", "activation", "base_model", "modules", "metadata"}


def is_grasp_residual_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and member(p, CONFIG_NAME).is_file()


def grasp_residual_files(path: str | Path) -> dict[str, Path]:
    d = Path(path)
    if not is_grasp_residual_dir(d):
        raise FormatError(f"A {FORMAT_NAME} adapter is a folder with {CONFIG_NAME}; {d} is not one.")
    return {CONFIG_NAME: member(d, CONFIG_NAME), WEIGHTS_NAME: member(d, WEIGHTS_NAME)}


def write_grasp_residual(adapter: LoraAdapter, out: str | Path, *, base_model: str | None = None,
                         extra_metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write an adapter of :class:`ResidualModule` s into the folder ``out``; returns the files.

    >>> import tempfile, torch
    >>> m = ResidualModule(torch.ones(2, 3), torch.zeros(3, 2), 1.0)
    >>> [p.name for p in write_grasp_residual(LoraAdapter({"blocks.0.ff": m}), tempfile.mkdtemp())]
    ['grasp_residual.json', 'grasp_residual.safetensors']
    """
    d = Path(out)
    if d.exists() and not d.is_dir():
        raise FormatError(f"A {FORMAT_NAME} adapter is written into a folder; {d} is a file.")
    residual = {k: m for k, m in adapter.modules.items() if isinstance(m, ResidualModule)}
    bad = [k for k in adapter.modules if k not in residual]
    if bad:
        raise FormatError(f"The {FORMAT_NAME} format holds GRASP residual modules only; {bad[:3]} are LoRA "
                          "weight updates (write those as peft).")
    if not residual:
        raise FormatError("Cannot write an adapter with no modules.")
    other = sorted({m.activation for m in residual.values()} - {ACTIVATION})
    if other:
        raise FormatError(f"The {FORMAT_NAME} format holds φ = {ACTIVATION!r} residual modules only. Got activation "
                          f"{other[0]!r} instead.")
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    mods: dict[str, Any] = {}
    for name, m in residual.items():
        tensors[f"{name}.grasp_down.weight"] = m.D.contiguous()
        tensors[f"{name}.grasp_up.weight"] = m.U.contiguous()
        mods[name] = {"scale": float(m.scale), "channel_dim": int(m.channel_dim)}
    meta = {k: v for k, v in adapter.metadata.items() if k != "format"}
    cfg = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "activation": ACTIVATION,
           "base_model": base_model or adapter.base_model, "modules": mods,
           "metadata": json.loads(json.dumps(meta, default=str))}
    w = save_file(tensors, d / WEIGHTS_NAME, metadata={"format": "pt", **dict(extra_metadata or {})})
    c = atomic_write_bytes(d / CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
    return [c, w]


def read_grasp_residual(path: str | Path, **caps: int) -> LoraAdapter:
    """Read a folder written by :func:`write_grasp_residual` (strict)."""
    d = Path(path)
    files = grasp_residual_files(d)
    try:
        cfg = json.loads(files[CONFIG_NAME].read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"Cannot read {files[CONFIG_NAME]}: {e}.") from None
    if not isinstance(cfg, dict) or set(cfg) != _TOP:
        got = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise FormatError(f"{files[CONFIG_NAME]}: expected exactly the keys {sorted(_TOP)}. Got {got}.")
    if cfg["format"] != FORMAT_NAME or cfg["format_version"] != FORMAT_VERSION:
        raise FormatError(f"{files[CONFIG_NAME]}: format {cfg['format']!r} v{cfg['format_version']!r} is not "
                          f"{FORMAT_NAME!r} v{FORMAT_VERSION}.")
    if cfg["activation"] != ACTIVATION:
        raise FormatError(f"{files[CONFIG_NAME]}: activation {cfg['activation']!r} is not supported "
                          f"(expected {ACTIVATION!r}).")
    if not files[WEIGHTS_NAME].is_file():
        raise FormatError(f"The {FORMAT_NAME} adapter {d} has no {WEIGHTS_NAME}.")
    tensors, _ = load_file(files[WEIGHTS_NAME], **caps)
    factors: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        suf = next((s for s in _SUFFIX if key.endswith(s)), None)
        if suf is None:
            raise FormatError(f"{files[WEIGHTS_NAME]}: unknown tensor key {key!r} (expected <site>.grasp_down.weight "
                              "or <site>.grasp_up.weight).")
        if not all_finite(t):
            raise FormatError(f"{files[WEIGHTS_NAME]}: tensor {key!r} contains NaN or Inf.")
        factors.setdefault(key[: -len(suf)], {})[_SUFFIX[suf]] = t
    mods_cfg = cfg["modules"]
    if set(factors) != set(mods_cfg):
        raise FormatError(f"{d}: the config lists modules {sorted(mods_cfg)[:3]} ... but the weights hold "
                          f"{sorted(factors)[:3]} ...")
    modules: dict[str, AdapterModule] = {}
    for name, f in factors.items():
        if set(f) != {"D", "U"}:
            raise FormatError(f"{files[WEIGHTS_NAME]}: module {name!r} lacks its "
                              f"{'down' if 'D' not in f else 'up'} factor.")
        D, U = f["D"], f["U"]
        if D.ndim != 2 or U.ndim != 2 or D.shape[0] != U.shape[1]:
            raise ShapeMismatchError(f"{files[WEIGHTS_NAME]}: module {name!r} has down {tuple(D.shape)} and up "
                                     f"{tuple(U.shape)}; expected (r, d_in) and (d_out, r).")
        mc = mods_cfg[name]
        if not isinstance(mc, dict) or set(mc) != {"scale", "channel_dim"}:
            raise FormatError(f"{files[CONFIG_NAME]}: modules[{name!r}] must have exactly 'scale' and 'channel_dim'.")
        modules[name] = ResidualModule(D, U, float(mc["scale"]), ACTIVATION, int(mc["channel_dim"]))
    return LoraAdapter(modules, cfg["base_model"], {**cfg["metadata"], "format": FORMAT_NAME})
