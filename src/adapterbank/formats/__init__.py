"""Strict readers and writers for LoRA adapter files: PEFT, kohya/A1111 and diffusers.

Every reader returns an :class:`adapterbank.lora.LoraAdapter` whose module paths are those of the model
the adapter applies to (``model.layers.0.self_attn.q_proj``; diffusion adapters start with the pipeline
component, ``unet.down_blocks.0…``), with the scale resolved per module and ``metadata["format"]`` set.
Readers fail on any key they do not understand, on LoRA variants that are not ΔW = s·B·A (DoRA,
``lora_bias``, ``modules_to_save``, LoHa/LoKr, ...), on NaN/Inf and on malformed safetensors headers
(checked before safetensors sees the file). Pickle files are never unpickled in-process; with
``allow_pickle=True`` they are converted in a subprocess with ``weights_only=True``.

| format      | on disk                                                          | module paths              |
|-------------|------------------------------------------------------------------|---------------------------|
| ``peft``    | directory: ``adapter_config.json`` + ``adapter_model.safetensors`` | relative to the base model |
| ``kohya``   | one ``.safetensors`` with ``lora_unet_…``/``lora_te…`` keys        | ``unet.…``, ``text_encoder.…`` |
| ``diffusers`` | ``pytorch_lora_weights.safetensors`` (file or its directory)   | ``unet.…``, ``transformer.…`` |
| ``grasp_residual`` | directory: ``grasp_residual.json`` + ``.safetensors`` (GRASP residual adapters, not ΔW) | FFN sites |
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from adapterbank._io import validate_file_name
from adapterbank.errors import FormatError, UnknownNameError, UnsafeFileError
from adapterbank.formats.diffusers import WEIGHT_NAME as DIFFUSERS_WEIGHT_NAME
from adapterbank.formats.diffusers import diffusers_file, looks_like_diffusers, read_diffusers, write_diffusers
from adapterbank.formats.grasp_residual import (
    grasp_residual_files,
    is_grasp_residual_dir,
    read_grasp_residual,
    write_grasp_residual,
)
from adapterbank.formats.kohya import is_kohya_key, read_kohya, write_kohya
from adapterbank.formats.peft import CONFIG_NAME as PEFT_CONFIG_NAME
from adapterbank.formats.peft import PREFIX as PEFT_PREFIX
from adapterbank.formats.peft import member, peft_files, read_peft, write_peft
from adapterbank.formats.pickle_convert import convert_pickle
from adapterbank.formats.safetensors_io import check_header, load_file, pickle_kind, save_file
from adapterbank.lora import LoraAdapter

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "KOHYA_DEFAULT_NAME",
    "detect_format",
    "read_adapter",
    "write_adapter",
    "adapter_files",
    "check_header",
    "load_file",
    "save_file",
    "convert_pickle",
]

FORMATS: tuple[str, ...] = ("peft", "kohya", "diffusers", "grasp_residual")
#: File name used when a kohya adapter is written into a directory.
KOHYA_DEFAULT_NAME = "lora.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_format(format: str | None) -> str | None:
    if format is not None and format not in FORMATS:
        raise UnknownNameError(f"Unknown adapter format {format!r}; valid formats are {', '.join(FORMATS)}.")
    return format


def _single_weights_file(d: Path) -> Path:
    """The one adapter weights file in a directory that is neither PEFT nor diffusers."""
    cands = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in (".safetensors", *_PICKLE_SUFFIXES))
    if len(cands) != 1:
        raise FormatError(
            f"Cannot tell the adapter format of directory {d}: it has no {PEFT_CONFIG_NAME} or "
            f"{DIFFUSERS_WEIGHT_NAME} and {len(cands)} weight files ({', '.join(p.name for p in cands[:5])})."
        )
    validate_file_name(cands[0].name, "adapter file name")
    return member(d, cands[0].name)


def _format_of_keys(keys: list[str], where: str) -> str:
    if keys and all(is_kohya_key(k) for k in keys):
        return "kohya"
    if looks_like_diffusers(keys):
        return "diffusers"
    if keys and all(k.startswith(PEFT_PREFIX) for k in keys):
        raise FormatError(f"{where} holds PEFT keys; read the PEFT directory that contains it (with its "
                          f"{PEFT_CONFIG_NAME}), not the file alone.")
    sample = ", ".join(repr(k) for k in keys[:3])
    raise FormatError(f"Cannot tell the adapter format of {where} from its keys ({sample}, ...): expected "
                      "lora_unet_/lora_te keys (kohya) or <component>.<module>.lora_A.weight keys (diffusers).")


def detect_format(path: str | Path) -> str:
    """Which of :data:`FORMATS` the adapter at ``path`` is in (from file names and tensor keys only).

    A directory with ``adapter_config.json`` is ``peft``; ``pytorch_lora_weights.safetensors`` (or a
    file with component-prefixed ``lora_A`` keys) is ``diffusers``; ``lora_unet_``/``lora_te`` keys are
    ``kohya``. A pickle file raises :class:`UnsafeFileError`; anything else :class:`FormatError`.

    >>> import tempfile, torch
    >>> p = Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> _ = save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 1)}, p)
    >>> detect_format(p)
    'kohya'
    """
    p = Path(path)
    if p.is_dir():
        if member(p, PEFT_CONFIG_NAME).is_file():
            return "peft"
        if is_grasp_residual_dir(p):
            return "grasp_residual"
        if member(p, DIFFUSERS_WEIGHT_NAME).is_file() or member(p, "pytorch_lora_weights.bin").is_file():
            return "diffusers"
        p = _single_weights_file(p)
    if not p.is_file():
        raise FormatError(f"No adapter at {p}: it is neither a file nor a directory.")
    if p.name == PEFT_CONFIG_NAME:
        return "peft"
    kind = pickle_kind(p)
    if kind:
        raise UnsafeFileError(f"The file {p} is {kind}; its format cannot be detected without unpickling it. Pass "
                              "allow_pickle=True to read_adapter to convert it in a sandboxed subprocess first.")
    header = check_header(p)
    return _format_of_keys([k for k in header if k != "__metadata__"], str(p))


def read_adapter(
    path: str | Path,
    *,
    format: str | None = None,
    allow_pickle: bool = False,
    module_names: Iterable[str] | None = None,
    **caps: int,
) -> LoraAdapter:
    """Read a LoRA adapter in any of :data:`FORMATS` (detected when ``format`` is ``None``).

    ``module_names`` (kohya only) maps lossy kohya names back to real module paths. ``caps`` bound the
    safetensors header (see :mod:`adapterbank.formats.safetensors_io`). Tensors are checked finite.

    >>> import tempfile, torch
    >>> from adapterbank.lora import LoraModule
    >>> d = Path(tempfile.mkdtemp())
    >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 2.0, (4, 3))
    >>> _ = write_adapter(LoraAdapter({"model.fc": m}, "tiny"), d)
    >>> a = read_adapter(d)
    >>> a.metadata["format"], a.modules["model.fc"].delta()[0, 0].item()
    ('peft', 4.0)
    """
    _check_format(format)
    p = Path(path)
    if not p.exists():
        raise FormatError(f"No adapter at {p}.")
    if p.is_file() and p.name == PEFT_CONFIG_NAME:
        p = p.parent
    fmt = format
    if fmt == "grasp_residual" or (fmt is None and is_grasp_residual_dir(p)):
        return read_grasp_residual(p, **caps)
    if fmt == "peft" or (fmt is None and p.is_dir() and member(p, PEFT_CONFIG_NAME).is_file()):
        return read_peft(p, allow_pickle=allow_pickle, **caps)
    f = p
    if p.is_dir():
        if fmt == "diffusers" or (fmt is None and (member(p, DIFFUSERS_WEIGHT_NAME).is_file()
                                                   or member(p, "pytorch_lora_weights.bin").is_file())):
            f = diffusers_file(p) if member(p, DIFFUSERS_WEIGHT_NAME).is_file() else member(p, "pytorch_lora_weights.bin")
            fmt = "diffusers"
        else:
            f = _single_weights_file(p)
    kind = pickle_kind(f)
    if kind:
        if not allow_pickle:
            raise UnsafeFileError(f"The file {f} is {kind}; pass allow_pickle=True to convert it in a sandboxed "
                                  "subprocess with weights_only=True.")
        with tempfile.TemporaryDirectory(prefix="adapterbank-convert-") as tmp:
            converted = convert_pickle(f, Path(tmp) / "converted.safetensors")
            adapter = _read_safetensors(converted, fmt, module_names, caps)  # tensors live in memory
            adapter.metadata["converted_from"] = str(f)
            return adapter
    if f.suffix in _PICKLE_SUFFIXES:
        logger.debug("%s has a pickle suffix but safetensors content", f)
    return _read_safetensors(f, fmt, module_names, caps)


def _read_safetensors(f: Path, fmt: str | None, module_names: Iterable[str] | None,
                      caps: Mapping[str, int]) -> LoraAdapter:
    if fmt is None:
        header = check_header(f, **caps)
        fmt = _format_of_keys([k for k in header if k != "__metadata__"], str(f))
    if fmt == "kohya":
        return read_kohya(f, module_names=module_names, **caps)
    if fmt == "diffusers":
        return read_diffusers(f, **caps)
    raise FormatError(f"{f} is a single file; a PEFT adapter is a directory with {PEFT_CONFIG_NAME}.")


def write_adapter(
    adapter: LoraAdapter,
    out: str | Path,
    *,
    format: str = "peft",
    base_model: str | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``adapter`` in ``format`` under ``out`` and return the written files.

    ``peft``: ``out`` is a directory. ``diffusers``: a directory (``pytorch_lora_weights.safetensors``
    inside) or a ``.safetensors`` path. ``kohya``: a ``.safetensors`` path or a directory (``lora.safetensors``
    inside). ``extra_metadata`` (str → str) goes into the safetensors header; ``base_model`` overrides
    ``adapter.base_model``. Files are written atomically.

    >>> import tempfile, torch
    >>> from adapterbank.lora import LoraModule
    >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 1.0, (4, 3))
    >>> [p.name for p in write_adapter(LoraAdapter({"unet.conv_in": m}), tempfile.mkdtemp(), format="kohya")]
    ['lora.safetensors']
    """
    if _check_format(format) is None:
        raise UnknownNameError(f"Unknown adapter format None; valid formats are {', '.join(FORMATS)}.")
    if extra_metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in extra_metadata.items()
    ):
        raise FormatError("The 'extra_metadata' parameter of write_adapter must map str to str.")
    if not adapter.modules:
        raise FormatError("Cannot write an adapter with no modules.")
    out = Path(out)
    if format == "grasp_residual":
        return write_grasp_residual(adapter, out, base_model=base_model, extra_metadata=extra_metadata)
    residual = [k for k, m in adapter.modules.items() if m.kind == "residual"]
    if residual:
        raise FormatError(f"Modules {residual[:3]} are GRASP residual adapters, not LoRA weight updates; they can "
                          f"only be written with format='grasp_residual' (asked: {format!r}).")
    if format == "peft":
        return write_peft(adapter, out, base_model=base_model, extra_metadata=extra_metadata)
    if format == "diffusers":
        return write_diffusers(adapter, out, base_model=base_model, extra_metadata=extra_metadata)
    target = out if out.suffix == ".safetensors" else out / KOHYA_DEFAULT_NAME
    return write_kohya(adapter, target, base_model=base_model, extra_metadata=extra_metadata)


def adapter_files(path: str | Path, format: str | None = None) -> dict[str, Path]:
    """The on-disk files that make up the adapter at ``path``: relative name -> path (for bit-for-bit storage).

    >>> import tempfile, torch
    >>> from adapterbank.lora import LoraModule
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = write_adapter(LoraAdapter({"fc": LoraModule(torch.ones(1, 2), torch.ones(2, 1), 1.0, (2, 2))}), d)
    >>> sorted(adapter_files(d))
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    _check_format(format)
    p = Path(path)
    fmt = format or detect_format(p)
    if fmt == "grasp_residual":
        files = grasp_residual_files(p)
    elif fmt == "peft":
        files = peft_files(p.parent if p.is_file() and p.name == PEFT_CONFIG_NAME else p)
    elif p.is_dir():
        if fmt == "diffusers" and member(p, DIFFUSERS_WEIGHT_NAME).is_file():
            f = diffusers_file(p)
        elif fmt == "diffusers" and member(p, "pytorch_lora_weights.bin").is_file():
            f = member(p, "pytorch_lora_weights.bin")
        else:
            f = _single_weights_file(p)
        files = {f.name: f}
    else:
        files = {p.name: p}
    for name in files:
        validate_file_name(name, "adapter file name")
    return files
