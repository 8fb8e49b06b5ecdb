"""Stream a base model's safetensors weights and write W = W₀ + ΔW (Eq. 6 applied), shard by shard.

:func:`merge_into_files` never loads the model: it reads one tensor at a time with ``safe_open``, adds the
dense ΔW of the adapter module that maps to it (computed per module in fp32, fp64 kept, then cast back)
and streams it straight into the output shard. Peak memory is one base tensor, its fp32 copy and one dense
ΔW — never a shard, never the whole model's ΔW.

Layout of ``base`` (what is read, what is written under ``out_dir``):

| base                                             | weights read                  | written                     |
|--------------------------------------------------|-------------------------------|-----------------------------|
| ``x.safetensors`` (a file)                       | that file                     | ``out_dir/x.safetensors``   |
| a folder with ``*.safetensors.index.json``       | the shards its ``weight_map`` names | same shard names + index (``total_size`` updated) |
| a folder with one ``*.safetensors``              | that file                     | same name                   |

From a folder every other regular file that is not a weight file (``config.json``, ``generation_config.json``,
tokenizer files, ...) up to 64 MiB is copied; weight files in other formats (``.bin``, ``.pt``, ...) and
unlisted ``.safetensors`` variants are not, since they would hold the unmerged weights.

Key mapping (:func:`default_key`): module path ``m`` → the first of these that is a tensor of the base:
``f"{m}.weight"``; the same without a ``"<folder name>."`` prefix when ``base`` is a folder named like the
module's pipeline component (``unet.down_blocks.0…`` → ``down_blocks.0….weight`` inside ``.../unet/``), and
without ``text_model.`` for a flattened CLIP text encoder; and, for a transformers model folder
(``config.json`` with ``architectures``), the checkpoint key that transformers itself loads into the
parameter ``f"{m}.weight"`` — its checkpoint conversion mapping (transformers 5 renames modules in memory,
e.g. ViT's ``vit.layers.0.attention.q_proj`` is saved as ``vit.encoder.layer.0.attention.attention.query``)
and its ``base_model_prefix`` handling (an adapter made on ``ViTModel`` merges into a
``ViTForImageClassification`` and back). Pass ``key=`` for anything else.

A diffusers pipeline folder (``model_index.json`` with ``unet/``, ``text_encoder/`` ...) is merged component by
component: every component the adapter touches is merged into its own subfolder of ``out_dir``, every other
component and top-level file is copied as is, so ``DiffusionPipeline.from_pretrained(out_dir)`` loads the
merged pipeline. Given a component folder alone (``.../unet``), modules of other components are left out and
listed in the report (``skipped_modules``) with a warning.

Everything is checked before the first byte is written (every module finds its tensor with the right shape,
factors are finite, headers are valid); the output is assembled in a hidden staging folder beside
``out_dir`` (:func:`adapterbank._io.atomic_dir`) and renamed into place at the end, so a failure or a
``kill -9`` leaves no partial ``out_dir`` behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from adapterbank._io import atomic_dir, atomic_write, check_output, validate_name
from adapterbank.errors import (
    FormatError,
    ShapeMismatchError,
    UnknownNameError,
    UnsupportedAdapterError,
)
from adapterbank.formats._lora_config import config_path
from adapterbank.formats.diffusers import COMPONENTS as PIPELINE_COMPONENTS
from adapterbank.formats.safetensors_io import DTYPES, check_header
from adapterbank.lora import LoraAdapter, LoraModule

logger = logging.getLogger(__name__)

__all__ = ["merge_into_files", "default_key", "transformers_key_map", "ModelKeyMap", "WEIGHT_SUFFIXES"]

#: Files that hold weights: never copied from the base folder (they would be the unmerged weights).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx", ".pkl")
#: Preferred names when a folder holds several candidates (transformers, diffusers).
_STANDARD_STEMS = ("model", "diffusion_pytorch_model")
MAX_COPY_BYTES = 64 * 2**20
#: Base shards are trusted more than downloaded adapters, but their headers are still checked.
_BASE_CAPS = {"max_file_bytes": 2**40}
_OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_DTYPE_NAME = {dt: name for name, (dt, _) in DTYPES.items()}


@dataclass
class _Shard:
    src: Path
    name: str  # file name written under out_dir
    header: dict[str, Any]
    order: list[str] = field(default_factory=list)  # tensor names in output order


@dataclass(frozen=True)
class ModelKeyMap:
    """How transformers maps checkpoint keys to parameter names when it loads a model folder."""

    to_checkpoint: dict[str, str]  # parameter name (after renaming) -> checkpoint key (pure renames only)
    converted: frozenset[str]  # parameter names built by a WeightConverter (fused/split): no 1:1 tensor
    base_model_prefix: str


def default_key(module: str, tensors: set[str] | frozenset[str], component: str | None = None,
                model_map: ModelKeyMap | None = None) -> str:
    """The tensor key of ``module`` in a base whose tensors are ``tensors`` (see the module docstring).

    >>> default_key("model.layers.0.self_attn.q_proj", {"model.layers.0.self_attn.q_proj.weight"})
    'model.layers.0.self_attn.q_proj.weight'
    >>> default_key("unet.conv_in", {"conv_in.weight"}, component="unet")
    'conv_in.weight'
    >>> default_key("text_encoder.text_model.encoder.layers.0.mlp.fc1", {"encoder.layers.0.mlp.fc1.weight"},
    ...             component="text_encoder")
    'encoder.layers.0.mlp.fc1.weight'
    """
    names = [module]
    if component and module.startswith(f"{component}."):
        rest = module[len(component) + 1:]
        names += [rest, config_path(component, rest)]
    for n in dict.fromkeys(names):
        if f"{n}.weight" in tensors:
            return f"{n}.weight"
    if model_map is not None:
        bmp = model_map.base_model_prefix
        for n in dict.fromkeys(names):
            for cand in dict.fromkeys([n, f"{bmp}.{n}" if bmp else n, n.removeprefix(f"{bmp}.") if bmp else n]):
                k = model_map.to_checkpoint.get(f"{cand}.weight")
                if k is not None and k in tensors:
                    return k
                if f"{cand}.weight" in model_map.converted:
                    raise UnsupportedAdapterError(
                        f"Adapter module {module!r}: transformers builds its weight {cand}.weight from several "
                        "checkpoint tensors (a fused or split weight), so ΔW cannot be added to one tensor of the "
                        "base files. Merge in memory (adapterbank.lora.merge_into on the loaded model's state_dict) "
                        "and save_pretrained instead."
                    )
    return f"{module}.weight"


def transformers_key_map(base: Path, checkpoint_keys: frozenset[str]) -> ModelKeyMap | None:
    """The parameter-name → checkpoint-key map transformers applies when loading the model folder ``base``.

    Uses the folder's ``config.json`` (``architectures``) to build the model on the meta device (no memory,
    no weights read) and transformers' own checkpoint conversion mapping and ``base_model_prefix`` rules.
    ``None`` when ``base`` is not a transformers model folder or transformers has no such machinery.
    """
    cfg_path = base / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str) or "model_type" not in raw:
        return None
    try:
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers < 5: checkpoint keys are the module names
        return None
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        logger.warning("%s names architecture %r, which this transformers does not have; using checkpoint keys "
                       "as module names", cfg_path, archs[0])
        return None
    config = transformers.AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = cls(config)
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if not isinstance(c, WeightRenaming)]
    meta_sd = model.state_dict()
    to_ckpt: dict[str, str] = {}
    converted: set[str] = set()
    for ck in sorted(checkpoint_keys):
        name, conv = rename_source_key(ck, renamings, converters, model.base_model_prefix, meta_sd)
        if conv is None:
            to_ckpt.setdefault(name, ck)
        else:
            converted.add(name)
    logger.debug("%s: transformers maps %d checkpoint keys (%d renamed)", base, len(to_ckpt),
                 sum(k != v for k, v in to_ckpt.items()))
    return ModelKeyMap(to_ckpt, frozenset(converted), model.base_model_prefix or "")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _OUT_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _OUT_DTYPES:
        return _OUT_DTYPES[dtype.removeprefix("torch.")]
    raise UnknownNameError(
        f"The 'dtype' parameter of merge_into_files must be one of {sorted(_OUT_DTYPES)} or None. Got {dtype!r} instead."
    )


def _pick(cands: list[Path], suffix: str, base: Path) -> Path:
    if len(cands) == 1:
        return cands[0]
    std = [p for p in cands if p.name in {f"{s}{suffix}" for s in _STANDARD_STEMS}]
    if len(std) == 1:
        return std[0]
    raise FormatError(
        f"The base folder {base} holds several weight sets {sorted(p.name for p in cands)}; expected one "
        f"(or one named {' or '.join(s + suffix for s in _STANDARD_STEMS)}). Pass the file itself."
    )


def _discover(base: Path) -> tuple[list[_Shard], Path | None, dict[str, Any] | None, list[Path]]:
    """Shards to read, the index file (and its parsed JSON) if sharded, and the extra files to copy."""
    if base.is_file():
        if not base.name.endswith(".safetensors"):
            raise FormatError(f"The base weights {base} must be a .safetensors file or a folder holding one.")
        return [_Shard(base, base.name, check_header(base, **_BASE_CAPS))], None, None, []
    if not base.is_dir():
        raise FormatError(f"The base weights {base} do not exist.")
    entries = sorted(p for p in base.iterdir() if p.is_file() and not p.name.startswith("."))
    indexes = [p for p in entries if p.name.endswith(".safetensors.index.json")]
    index_path: Path | None = None
    index: dict[str, Any] | None = None
    if indexes:
        index_path = _pick(indexes, ".safetensors.index.json", base)
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FormatError(f"Cannot read the shard index {index_path}: {e}.") from None
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise FormatError(f"The shard index {index_path} must hold a 'weight_map' object of str -> str.")
        names = list(dict.fromkeys(wmap.values()))
        shards = []
        for n in names:
            validate_name(n, what=f"shard file name in {index_path.name}")
            p = base / n
            if not p.is_file():
                raise FormatError(f"The shard index {index_path} names {n!r}, which is not a file in {base}.")
            shards.append(_Shard(p, n, check_header(p, **_BASE_CAPS)))
        for k, n in wmap.items():
            hdr = next(s.header for s in shards if s.name == n)
            if k not in hdr:
                raise FormatError(f"The shard index {index_path} puts tensor {k!r} in {n!r}, which does not hold it.")
    else:
        files = [p for p in entries if p.name.endswith(".safetensors")]
        if not files:
            raise FormatError(
                f"The base folder {base} holds no .safetensors weights; found {[p.name for p in entries]}."
            )
        p = _pick(files, ".safetensors", base)
        shards = [_Shard(p, p.name, check_header(p, **_BASE_CAPS))]
    extras = [p for p in entries if p != index_path and not p.name.lower().endswith(WEIGHT_SUFFIXES)]
    return shards, index_path, index, extras


def _merged_tensor(w0: torch.Tensor, m: LoraModule, out_dtype: torch.dtype) -> tuple[torch.Tensor, float, float]:
    """W₀ + ΔW in fp32 (fp64 kept) cast to ``out_dtype``; also max|ΔW| and ‖ΔW‖_F."""
    cdt = torch.float64 if w0.dtype == torch.float64 else torch.float32
    A, B = m.A.to(cdt), m.B.to(cdt)
    # the one dense ΔW, laid out like the base weight's matrix view
    d = A.T @ B.T if m.transposed else B @ A  # (n_in, n_out) if transposed else (n_out, n_in)
    d.mul_(m.scale)
    max_abs = float(torch.linalg.vector_norm(d, ord=math.inf)) if d.numel() else 0.0
    fro = float(torch.linalg.vector_norm(d)) if d.numel() else 0.0
    d.add_(w0.reshape(d.shape).to(cdt))
    return d.reshape(w0.shape).to(out_dtype), max_abs, fro


def _header_bytes(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _plan_shard(shard: _Shard, out_dtype: torch.dtype | None) -> tuple[dict[str, Any], int]:
    """Output header (same tensors, maybe recast) and data size; order: element size desc, then input offset."""
    src = shard.header
    names = [k for k in src if k != "__metadata__"]
    new: dict[str, tuple[str, list[int]]] = {}
    for k in names:
        dname, shape = src[k]["dtype"], src[k]["shape"]
        if out_dtype is not None and DTYPES[dname][0].is_floating_point:
            dname = _DTYPE_NAME[out_dtype]
        new[k] = (dname, shape)
    shard.order = sorted(names, key=lambda k: (-DTYPES[new[k][0]][1], src[k]["data_offsets"][0], k))
    out: dict[str, Any] = {}
    if "__metadata__" in src:
        out["__metadata__"] = src["__metadata__"]
    pos = 0
    for k in shard.order:
        dname, shape = new[k]
        n = math.prod(shape) * DTYPES[dname][1]
        out[k] = {"dtype": dname, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return out, pos


def merge_into_files(
    base: str | os.PathLike[str],
    adapter: LoraAdapter,
    out_dir: str | os.PathLike[str],
    *,
    key: Callable[[str], str] | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the base model with the adapter merged in, W^m = W₀^m + ΔW^m, streaming tensor by tensor.

    Args:
        base: a ``.safetensors`` file, or a model folder (single file or sharded with a
            ``*.safetensors.index.json``), see the module docstring.
        adapter: the LoRA to merge (any scale, rank, transposed/conv/embedding modules).
        out_dir: folder to create; it must not exist or be empty, unless ``overwrite``.
        key: module path → tensor key; default :func:`default_key` (``f"{m}.weight"``, component prefix
            stripped when ``base`` is that component's folder).
        dtype: cast every floating tensor of the output to this (``torch.bfloat16`` or ``"bfloat16"``, ...);
            ``None`` keeps each tensor's dtype. ``torch_dtype``/``dtype`` in a copied ``config.json`` follow.
        overwrite: replace a non-empty ``out_dir`` (its old content stays until the new one is complete).

    Returns:
        A report: ``files`` (written shards), ``copied`` (other files), ``modules_merged``, ``tensors``,
        ``bytes`` (tensor data written), ``keys`` (module → tensor), ``delta_max_abs`` and ``delta_fro``
        (per module, of ΔW in fp32), ``seconds``.

    Raises:
        ShapeMismatchError: a module whose tensor is missing (named) or has another shape.
        NonFiniteError: NaN/Inf in the adapter's factors.
        FormatError: unreadable or ambiguous base weights.
        OutputExistsError: ``out_dir`` exists and is not empty (a ``FileExistsError``), without ``overwrite``.
        OutputWriteError: the operating system refused a write (disk full, read-only, ...); an ``OSError``.
        UnsupportedAdapterError: the adapter holds GRASP residual modules.

    >>> import tempfile
    >>> from safetensors.torch import save_file, load_file
    >>> d = Path(tempfile.mkdtemp())
    >>> save_file({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.ones(2)}, d / "model.safetensors")
    >>> a = LoraAdapter({"fc": LoraModule(torch.eye(2), torch.eye(2), 3.0, (2, 2))})
    >>> rep = merge_into_files(d, a, d / "merged")
    >>> rep["modules_merged"], load_file(d / "merged" / "model.safetensors")["fc.weight"].diagonal().tolist()
    (1, [3.0, 3.0])
    """
    t0 = time.perf_counter()
    base_p, out = Path(base), Path(out_dir)
    out_dtype = _resolve_dtype(dtype)
    adapter.lora_modules("merging into base weights")  # a GRASP residual module has no ΔW: refused, named
    adapter.check_finite()
    if base_p.is_dir() and (base_p / PIPELINE_INDEX).is_file():
        return _merge_pipeline(base_p, adapter, out, key=key, dtype=out_dtype, t0=t0, overwrite=overwrite)
    component = base_p.name if base_p.is_dir() else None
    adapter, skipped = _own_component(adapter, component, base_p)
    shards, index_path, index, extras = _discover(base_p)
    check_output(out, overwrite=overwrite)  # before the planning: refuse early

    # --- plan: every module -> (shard, tensor key), checked before anything is written
    where: dict[str, _Shard] = {}
    for s in shards:
        for k in s.header:
            if k == "__metadata__":
                continue
            if k in where:
                raise FormatError(f"Tensor {k!r} is in both {where[k].src} and {s.src}.")
            where[k] = s
    all_keys = frozenset(where)
    if key is None:
        model_map = transformers_key_map(base_p, all_keys) if base_p.is_dir() else None
        keyfn = lambda m: default_key(m, all_keys, component, model_map)  # noqa: E731
    else:
        keyfn = key
    plan: dict[str, str] = {}  # tensor key -> module path
    keys: dict[str, str] = {}
    for name, m in adapter.modules.items():
        k = keyfn(name)
        if k not in where:
            raise ShapeMismatchError(
                f"Adapter module {name!r} maps to tensor {k!r}, which is not in the base weights {base_p} "
                f"({len(where)} tensors)."
            )
        info = where[k].header[k]
        if tuple(info["shape"]) != m.weight_shape:
            raise ShapeMismatchError(
                f"Base tensor {k!r} in {where[k].src} has shape {tuple(info['shape'])}, adapter module {name!r} "
                f"expects {m.weight_shape}."
            )
        if not DTYPES[info["dtype"]][0].is_floating_point:
            raise ShapeMismatchError(f"Base tensor {k!r} in {where[k].src} is {info['dtype']}, not floating point.")
        if k in plan:
            raise ShapeMismatchError(f"Adapter modules {plan[k]!r} and {name!r} both map to tensor {k!r}.")
        plan[k], keys[name] = name, k

    # --- write into a staging folder beside out_dir, rename at the end
    report: dict[str, Any] = {
        "base": str(base_p), "out_dir": str(out), "files": [], "copied": [], "skipped": [],
        "modules_merged": len(plan), "tensors": 0, "bytes": 0, "dtype": str(out_dtype) if out_dtype else None,
        "keys": keys, "delta_max_abs": {}, "delta_fro": {}, "skipped_modules": skipped,
    }
    with atomic_dir(out, overwrite=overwrite, what="the merged model") as staging:
        for s in shards:
            header, nbytes = _plan_shard(s, out_dtype)
            report["bytes"] += _write_shard(s, header, nbytes, plan, adapter, staging, report)
            report["files"].append(s.name)
            logger.info("merged %s (%d bytes)", s.name, nbytes)
        if index_path is not None and index is not None:
            idx = dict(index)
            idx["metadata"] = dict(idx.get("metadata") or {}, total_size=report["bytes"])
            data = (json.dumps(idx, indent=2, sort_keys=True) + "\n").encode("utf-8")
            atomic_write(staging / index_path.name, lambda fh: fh.write(data))
            report["files"].append(index_path.name)
        for p in extras:
            _copy_extra(p, staging, out_dtype, report)
    report["seconds"] = time.perf_counter() - t0
    return report


PIPELINE_INDEX = "model_index.json"


def _own_component(adapter: LoraAdapter, component: str | None, base: Path) -> tuple[LoraAdapter, list[str]]:
    """For a pipeline component folder: the adapter's modules of that component, and the others' names."""
    if component not in PIPELINE_COMPONENTS:
        return adapter, []
    mine = {k: m for k, m in adapter.modules.items() if not k.startswith(tuple(f"{c}." for c in PIPELINE_COMPONENTS))
            or k.startswith(f"{component}.")}
    if not mine or len(mine) == len(adapter.modules):
        return adapter, []  # nothing of this component: the key check below names the first module
    skipped = sorted(set(adapter.modules) - set(mine))
    logger.warning("%s is the %r component alone: %d adapter modules of other components (%s, ...) are not merged; "
                   "pass the pipeline folder (with %s) to merge them too", base, component, len(skipped), skipped[0],
                   PIPELINE_INDEX)
    return LoraAdapter(mine, adapter.base_model, dict(adapter.metadata)), skipped


def _pipeline_components(base: Path) -> list[str]:
    try:
        index = json.loads((base / PIPELINE_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"Cannot read the pipeline index {base / PIPELINE_INDEX}: {e}.") from None
    if not isinstance(index, dict):
        raise FormatError(f"The pipeline index {base / PIPELINE_INDEX} must be a JSON object.")
    return sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                  and v[0] is not None and (base / k).is_dir())


def _merge_pipeline(base: Path, adapter: LoraAdapter, out: Path, *, key: Callable[[str], str] | None,
                    dtype: torch.dtype | None, t0: float, overwrite: bool) -> dict[str, Any]:
    """Merge each component the adapter touches into ``out/<component>``; copy the rest of the pipeline."""
    comps = _pipeline_components(base)
    by_comp: dict[str, dict[str, LoraModule]] = {}
    for name, m in adapter.modules.items():
        comp = name.split(".", 1)[0]
        if comp not in comps:
            raise ShapeMismatchError(
                f"Adapter module {name!r} does not start with a component of the pipeline {base} "
                f"({', '.join(comps)}); module paths of a pipeline adapter start with its component (unet., ...)."
            )
        by_comp.setdefault(comp, {})[name] = m
    report: dict[str, Any] = {"base": str(base), "out_dir": str(out), "components": {}, "copied": [],
                              "modules_merged": 0, "keys": {}, "delta_max_abs": {}, "delta_fro": {}}
    with atomic_dir(out, overwrite=overwrite, what="the merged pipeline") as staging:
        for entry in sorted(base.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.name in by_comp:
                sub = LoraAdapter(by_comp[entry.name], adapter.base_model, dict(adapter.metadata))
                rep = merge_into_files(entry, sub, staging / entry.name, key=key, dtype=dtype)
                rep["out_dir"] = str(out / entry.name)
                report["components"][entry.name] = rep
                report["modules_merged"] += rep["modules_merged"]
                for k in ("keys", "delta_max_abs", "delta_fro"):
                    report[k].update(rep[k])
            elif entry.is_dir():
                shutil.copytree(entry, staging / entry.name, symlinks=False)
                report["copied"].append(entry.name + "/")
            elif entry.is_file():
                shutil.copy2(entry, staging / entry.name)
                report["copied"].append(entry.name)
    report["seconds"] = time.perf_counter() - t0
    logger.info("merged components %s of %s; copied %s", sorted(by_comp), base, report["copied"])
    return report


def _write_shard(
    s: _Shard, header: dict[str, Any], nbytes: int, plan: dict[str, str], adapter: LoraAdapter, staging: Path,
    report: dict[str, Any],
) -> int:
    def write(fh: BinaryIO) -> None:
        fh.write(_header_bytes(header))
        written = 0
        with safe_open(s.src, framework="pt") as f:
            for k in s.order:
                t = f.get_tensor(k)
                dname = header[k]["dtype"]
                want = DTYPES[dname][0]
                if k in plan:
                    mod = plan[k]
                    t, report["delta_max_abs"][mod], report["delta_fro"][mod] = _merged_tensor(
                        t, adapter.modules[mod], want
                    )
                elif t.dtype != want:
                    t = t.to(want)
                if list(t.shape) != header[k]["shape"]:
                    raise FormatError(f"Tensor {k!r} in {s.src} has shape {list(t.shape)}, its header says otherwise.")
                t = t.contiguous().reshape(-1)
                if t.numel():
                    fh.write(t.view(torch.uint8).numpy().data)
                written += t.numel() * t.element_size()
                report["tensors"] += 1
        if written != nbytes:
            raise FormatError(f"Wrote {written} data bytes for {s.src.name}, expected {nbytes}.")

    atomic_write(staging / s.name, write)
    return nbytes


def _copy_extra(p: Path, staging: Path, out_dtype: torch.dtype | None, report: dict[str, Any]) -> None:
    size = p.stat().st_size
    if size > MAX_COPY_BYTES:
        logger.warning("not copying %s: %d bytes is above the %d-byte cap for extra files", p, size, MAX_COPY_BYTES)
        report["skipped"].append(p.name)
        return
    data = p.read_bytes()
    if out_dtype is not None and p.name == "config.json":
        try:
            cfg = json.loads(data)
        except ValueError:
            cfg = None
        if isinstance(cfg, dict) and ({"torch_dtype", "dtype"} & set(cfg)):
            for k in ("torch_dtype", "dtype"):
                if k in cfg:
                    cfg[k] = str(out_dtype).removeprefix("torch.")
            data = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode("utf-8")
    atomic_write(staging / p.name, lambda fh: fh.write(data))
    report["copied"].append(p.name)
