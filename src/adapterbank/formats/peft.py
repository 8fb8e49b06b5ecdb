"""PEFT LoRA adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys (the adapter name is stripped on save): ``base_model.model.<module>.lora_A.weight`` (r, d_in)
and ``.lora_B.weight`` (d_out, r); conv ``lora_A.weight`` (r, C_in, kh, kw), ``lora_B.weight`` (C_out, r, 1, 1);
embeddings ``.lora_embedding_A`` (r, n_emb) and ``.lora_embedding_B`` (d_emb, r), ΔW transposed. ``<module>``
is relative to the base model, e.g. ``model.layers.0.self_attn.q_proj`` for a ``LlamaForCausalLM``.

Per module, r and α come from ``r``/``lora_alpha`` or the first matching ``rank_pattern``/``alpha_pattern``
key (PEFT's ``get_pattern_key``); s = α/r, or α/√r with ``use_rslora``; ``fan_in_fan_out`` (GPT-2 Conv1D)
transposes ΔW of linear modules. Which config keys are accepted, ignored or refused: see
:mod:`adapterbank.formats._lora_config`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adapterbank._io import atomic_write_bytes
from adapterbank.errors import FormatError, ShapeMismatchError, UnsafeFileError, UnsupportedAdapterError
from adapterbank.formats import _lora_config as lc
from adapterbank.formats.pickle_convert import convert_pickle
from adapterbank.formats.safetensors_io import load_file, save_file
from adapterbank.lora import LoraAdapter, LoraModule

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "LEGACY_WEIGHTS_NAME", "read_peft", "write_peft", "peft_files"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 64 * 2**20

_SUFFIXES: dict[str, tuple[str, str]] = {  # suffix -> (factor, kind)
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}


def member(directory: Path, name: str) -> Path:
    """``directory / name``, refusing a symlink that leaves ``directory``."""
    p = directory / name
    if p.is_symlink() or p.exists():
        real, root = p.resolve(), directory.resolve()
        if root != real.parent and root not in real.parents:
            raise UnsafeFileError(f"{p} is a symlink to {real}, outside the adapter directory {root}; refused.")
    return p


def peft_files(path: str | Path) -> dict[str, Path]:
    """The files that make up a PEFT adapter directory (config + weights).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "adapter_config.json").write_text("{}"); _ = (d / "adapter_model.safetensors").write_bytes(b"")
    >>> sorted(peft_files(d))
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    d = Path(path)
    if not d.is_dir():
        raise FormatError(f"A PEFT adapter is a directory; {d} is not one.")
    cfg = member(d, CONFIG_NAME)
    if not cfg.is_file():
        raise FormatError(f"The PEFT adapter directory {d} has no {CONFIG_NAME}.")
    out = {CONFIG_NAME: cfg}
    w = member(d, WEIGHTS_NAME)
    if w.is_file():
        out[WEIGHTS_NAME] = w
    elif member(d, LEGACY_WEIGHTS_NAME).is_file():
        out[LEGACY_WEIGHTS_NAME] = d / LEGACY_WEIGHTS_NAME
    else:
        raise FormatError(f"The PEFT adapter directory {d} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}.")
    return out


def read_config(path: Path) -> dict[str, Any]:
    """Parse ``adapter_config.json`` strictly (size cap, duplicate keys, must be an object)."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise FormatError(f"{path} is {size} bytes; the cap is {MAX_CONFIG_BYTES}.")
    return lc.parse_json_object(path.read_bytes(), str(path))


def read_peft(path: str | Path, *, allow_pickle: bool = False, **caps: int) -> LoraAdapter:
    """Read a PEFT LoRA directory into a :class:`LoraAdapter` (see the module docstring for the rules).

    ``adapter_model.bin`` (pickle) is read only with ``allow_pickle=True``, through
    :func:`~adapterbank.formats.pickle_convert.convert_pickle`. ``caps`` go to the safetensors loader.

    >>> import tempfile
    >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 0.5, (4, 3))
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = write_peft(LoraAdapter({"fc": m}, "tiny"), d)
    >>> a = read_peft(d)
    >>> a.base_model, a.modules["fc"].scale, a.metadata["format"]
    ('tiny', 0.5, 'peft')
    """
    d = Path(path)
    files = peft_files(d)
    cfg = read_config(files[CONFIG_NAME])
    where_cfg = str(files[CONFIG_NAME])
    lc.check_config(cfg, where_cfg)
    if WEIGHTS_NAME in files:
        wpath = files[WEIGHTS_NAME]
        tensors, header_meta = load_file(wpath, **caps)
    else:
        wpath = files[LEGACY_WEIGHTS_NAME]
        if not allow_pickle:
            raise UnsafeFileError(
                f"{wpath} is a pickle file; pass allow_pickle=True to convert it in a sandboxed subprocess "
                "with weights_only=True."
            )
        with tempfile.TemporaryDirectory(prefix="adapterbank-peft-") as tmp:
            converted = convert_pickle(wpath, Path(tmp) / WEIGHTS_NAME)
            tensors, header_meta = load_file(converted, **caps)  # read into memory; the temp file may go
    modules = modules_from_peft_tensors(tensors, cfg, where=str(wpath), prefix=PREFIX, config_where=where_cfg)
    meta: dict[str, Any] = {"format": "peft"}
    for key in ("task_type", "peft_version", "revision", "use_rslora", "fan_in_fan_out"):
        if cfg.get(key) is not None:
            meta[key] = cfg[key]
    if header_meta:
        meta["file_metadata"] = dict(header_meta)
    base = cfg.get("base_model_name_or_path")
    return LoraAdapter(modules, base if isinstance(base, str) and base else None, meta)


def modules_from_peft_tensors(
    tensors: Mapping[str, torch.Tensor],
    cfg: Mapping[str, Any],
    *,
    where: str,
    prefix: str,
    config_where: str,
    check_targets: bool = True,
) -> dict[str, LoraModule]:
    """Group PEFT-style keys ``<prefix><module>.lora_A.weight`` ... into modules with their config scales."""
    parts: dict[str, dict[str, tuple[str, torch.Tensor, str]]] = {}
    base_copies: dict[str, tuple[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(prefix):
            raise FormatError(f"Tensor {key!r} in {where} does not start with {prefix!r}; not a PEFT LoRA key.")
        rest = key[len(prefix):]
        _refuse_variant(key, where)
        if rest.endswith(".base_layer.weight"):  # save_embedding_layers=True: a copy of the base embedding
            base_copies[rest[: -len(".base_layer.weight")]] = (key, t)
            continue
        for suffix, (factor, kind) in _SUFFIXES.items():
            if rest.endswith(suffix) and len(rest) > len(suffix):
                module = rest[: -len(suffix)]
                slot = parts.setdefault(module, {})
                if factor in slot:
                    raise FormatError(f"Tensor {key!r} in {where} repeats factor {factor} of module {module!r}.")
                slot[factor] = (key, t, kind)
                break
        else:
            if "lora_" not in key:
                raise UnsupportedAdapterError(
                    f"Tensor {key!r} in {where} is not a LoRA factor (modules_to_save or another full tensor); "
                    "only pure LoRA adapters can be merged."
                )
            raise FormatError(f"Tensor {key!r} in {where} is not a LoRA key we understand.")
    rslora = bool(cfg.get("use_rslora", False))
    fifo = bool(cfg.get("fan_in_fan_out", False))
    out: dict[str, LoraModule] = {}
    for module, slot in parts.items():
        if set(slot) != {"A", "B"}:
            missing = ({"A", "B"} - set(slot)).pop()
            raise FormatError(f"Module {module!r} in {where} has no lora_{missing} tensor.")
        (ka, A, kind_a), (kb, B, kind_b) = slot["A"], slot["B"]
        if kind_a != kind_b:
            raise FormatError(f"Module {module!r} in {where} mixes {ka!r} and {kb!r}.")
        lc.check_tensor_finite(A, ka, where)
        lc.check_tensor_finite(B, kb, where)
        if check_targets and not lc.target_matches(cfg, module):
            raise FormatError(
                f"Module {module!r} in {where} is not selected by target_modules/exclude_modules of {config_where}; "
                "PEFT would silently ignore its tensors."
            )
        r_cfg, alpha = lc.resolve(cfg, module)
        r_cfg = 8 if r_cfg is None else r_cfg  # LoraConfig defaults
        alpha = 8 if alpha is None else alpha
        r = int(A.shape[0]) if A.ndim >= 1 else 0
        if r != r_cfg:
            raise ShapeMismatchError(
                f"Module {module!r}: {ka!r} in {where} has rank {r} but {config_where} gives r={r_cfg} "
                "(r / rank_pattern)."
            )
        scale = lc.scale_from(alpha, r, rslora, f"Module {module!r} in {config_where}")
        out[module] = lc.make_module(module, A, B, scale=scale, kind=kind_a, transposed=fifo and kind_a == "linear",
                                     where=where, keys=(ka, kb))
    if not out:
        raise FormatError(f"{where} contains no LoRA tensors.")
    for module, (key, t) in base_copies.items():
        m = out.get(module)
        if m is None or m.kind != "embedding" or tuple(t.shape) != m.weight_shape:
            raise UnsupportedAdapterError(
                f"Tensor {key!r} in {where} is a full base weight that is not the embedding of a LoRA module "
                "(modules_to_save or save_embedding_layers on a non-embedding); not supported."
            )
        logger.warning("%s: ignoring %r, the copy of the base embedding that PEFT saves with save_embedding_layers; "
                       "ΔW is applied to the base model's own embedding", where, key)
    return out


def _refuse_variant(key: str, where: str) -> None:
    if "lora_magnitude_vector" in key:
        raise UnsupportedAdapterError(f"Tensor {key!r} in {where} is a DoRA magnitude; DoRA cannot be merged as ΔW.")
    if ".lora_B.bias" in key or ".lora_A.bias" in key:
        raise UnsupportedAdapterError(f"Tensor {key!r} in {where} is a LoRA bias (lora_bias=True); not supported.")
    if "trainable_tokens" in key:
        raise UnsupportedAdapterError(f"Tensor {key!r} in {where} holds trainable tokens; not supported.")
    if ".modules_to_save." in key or key.endswith(".original_module.weight"):
        raise UnsupportedAdapterError(f"Tensor {key!r} in {where} belongs to modules_to_save; not supported.")


def _peft_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft")
    except PackageNotFoundError:  # pragma: no cover
        return None


def write_peft(
    adapter: LoraAdapter,
    out: str | Path,
    *,
    base_model: str | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``adapter`` as a PEFT directory that ``PeftModel.from_pretrained`` loads with the exact scales.

    ``r``/``lora_alpha`` are the most common values, ``rank_pattern``/``alpha_pattern`` (full module paths)
    cover the rest, ``target_modules`` is the sorted list of module paths, ``use_rslora`` is False.
    ``extra_metadata`` goes into the safetensors header. Returns the written files.

    >>> import tempfile
    >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 1.0, (4, 3))
    >>> [p.name for p in write_peft(LoraAdapter({"fc": m}), tempfile.mkdtemp())]
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    d = Path(out)
    if d.exists() and not d.is_dir():
        raise FormatError(f"A PEFT adapter is written into a directory; {d} is a file.")
    mods = adapter.lora_modules("writing a PEFT adapter")
    cfg_math = lc.config_for(mods)
    linear = {k: m.transposed for k, m in mods.items() if m.kind == "linear"}
    fifo = any(linear.values())
    if fifo and not all(linear.values()):
        logger.warning("adapter mixes transposed (Conv1D) and plain linear modules; writing fan_in_fan_out=True "
                       "(PEFT resets it to False for nn.Linear layers)")
    meta = adapter.metadata or {}
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": meta.get("task_type"),
        "base_model_name_or_path": base_model or adapter.base_model,
        "revision": meta.get("revision"),
        "inference_mode": True,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": fifo,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        **cfg_math,
        "peft_version": _peft_version(),
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, m in mods.items():
        A, B = lc.disk_factors(m)
        if m.kind == "embedding":
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = A
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = B
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = A
            tensors[f"{PREFIX}{name}.lora_B.weight"] = B
    header = {"format": "pt", **dict(extra_metadata or {})}
    w = save_file(tensors, d / WEIGHTS_NAME, metadata=header)
    c = atomic_write_bytes(d / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode())
    return [c, w]
