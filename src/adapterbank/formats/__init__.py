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

The table above is :data:`FORMATS`, a registry of frozen :class:`Format` records (name, detect, read, write,
files, ...). :func:`detect_format`, :func:`read_adapter`, :func:`write_adapter` and :func:`adapter_files`
only iterate it, and the bank (add, load, export) and ``compose`` (output format) go through them, so a
format registered at run time with :func:`register_format` works everywhere with no other edit::

    register_format(Format("toy", "folder with toy.json + toy.safetensors", detect=is_toy_dir,
                           read=read_toy, write=write_toy, files=toy_files))

The built-in formats are registered in this file, in the order detection tries them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapterbank._io import validate_file_name, validate_name
from adapterbank.errors import FormatError, InvalidNameError, UnknownNameError, UnsafeFileError
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
from adapterbank.lora import LoraAdapter, ResidualModule

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "Format",
    "FormatRegistry",
    "get_format",
    "KOHYA_DEFAULT_NAME",
    "register_format",
    "unregister_format",
    "detect_format",
    "read_adapter",
    "write_adapter",
    "adapter_files",
    "check_header",
    "load_file",
    "save_file",
    "convert_pickle",
]

#: File name used when a kohya adapter is written into a directory.
KOHYA_DEFAULT_NAME = "lora.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DIFFUSERS_LEGACY_NAME = "pytorch_lora_weights.bin"


class Reader(Protocol):
    """``read(path, allow_pickle=, module_names=, caps=)``: one adapter in this format -> :class:`LoraAdapter`.

    ``path`` is what the user gave (a folder or a file; for single-file formats always the weights file,
    already converted from pickle when it was one). ``caps`` bound the safetensors header
    (:func:`adapterbank.formats.safetensors_io.check_header`). The reader sets ``metadata["format"]``.
    """

    def __call__(self, path: Path, *, allow_pickle: bool, module_names: Iterable[str] | None,
                 caps: Mapping[str, int]) -> LoraAdapter: ...


class Writer(Protocol):
    """``write(adapter, out, base_model=, extra_metadata=)``: write atomically under ``out``, return the files."""

    def __call__(self, adapter: LoraAdapter, out: Path, *, base_model: str | None,
                 extra_metadata: Mapping[str, str] | None) -> list[Path]: ...


@dataclass(frozen=True)
class Format:
    """One adapter file format: how to recognise, read, write and list it.

    | field | meaning |
    |---|---|
    | ``name`` | what users pass (``format=``, ``--format``) and what a bank card records |
    | ``description`` | one line: the layout on disk (shown in error messages) |
    | ``detect`` | ``(path) -> bool``: is the file or folder at ``path`` in this format, from file names only |
    | ``read`` | a :class:`Reader` |
    | ``write`` | a :class:`Writer` |
    | ``files`` | ``(path) -> {relative name: path}``: the files that make up the adapter (stored bit for bit) |
    | ``detect_keys`` | ``(tensor keys) -> bool`` for single-file formats: is a ``.safetensors`` with these keys one |
    | ``single_file`` | the adapter is one weights file (or the folder holding it); pickles are converted first |
    | ``family`` | the format composites of these adapters are written in by default (default: ``name``) |
    | ``residual`` | holds GRASP :class:`~adapterbank.lora.ResidualModule` s, which no ΔW format can hold |

    Formats of one ``family`` are loaded by the same clients: kohya's family is diffusers
    (``pipe.load_lora_weights``), so a composite of kohya files is written as diffusers. A single-file
    format's pickle file (``.bin``, ``.ckpt``, ...) is converted in a sandboxed subprocess before ``read``.

    Detection tries the formats in :data:`FORMATS` order: ``detect`` first, then (for a single weights
    file) ``detect_keys``; the first that says yes wins.
    """

    name: str
    description: str
    detect: Callable[[Path], bool]
    read: Reader
    write: Writer
    files: Callable[[Path], dict[str, Path]]
    detect_keys: Callable[[list[str]], bool] | None = None
    single_file: bool = False
    family: str = ""
    residual: bool = False

    def __post_init__(self) -> None:
        validate_name(self.name, "format name")
        if self.name == "auto":
            raise InvalidNameError("The format name 'auto' is reserved (it means: follow the sources).")
        for field in ("detect", "read", "write", "files", "detect_keys"):
            fn = getattr(self, field)
            if not callable(fn) and not (field == "detect_keys" and fn is None):
                raise FormatError(f"The {field!r} field of Format {self.name!r} must be callable. "
                                  f"Got {type(fn).__name__} instead.")
        if not self.family:
            object.__setattr__(self, "family", self.name)


class FormatRegistry(Mapping[str, Format]):
    """The formats by name, in detection order. ``FORMATS[name]`` raises :class:`UnknownNameError` (a
    ``KeyError``) listing the valid names; iterating gives the names, ``.values()`` the records.

    >>> list(FORMATS)[:2], FORMATS["kohya"].single_file
    (['peft', 'kohya'], True)
    """

    def __init__(self, formats: Iterable[Format]) -> None:
        self._formats: dict[str, Format] = {}
        for f in formats:
            self.register(f)
        self._built_in = frozenset(self._formats)

    def __getitem__(self, name: str) -> Format:
        try:
            return self._formats[name]
        except (KeyError, TypeError):
            raise UnknownNameError(f"Unknown adapter format {name!r}; valid formats are {', '.join(self)}.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._formats)

    def __len__(self) -> int:
        return len(self._formats)

    def __repr__(self) -> str:
        return f"FormatRegistry({list(self)})"

    def register(self, fmt: Format) -> Format:
        """Add ``fmt`` after the formats already there (detection tries it last); a taken name is refused."""
        if not isinstance(fmt, Format):
            raise FormatError(f"register_format takes a Format. Got {type(fmt).__name__} instead.")
        if fmt.name in self._formats:
            raise InvalidNameError(f"A format named {fmt.name!r} is already registered; formats are "
                                   f"{', '.join(self)}. Unregister it first or pick another name.")
        self._formats[fmt.name] = fmt
        return fmt

    def unregister(self, name: str) -> Format:
        """Remove the format ``name`` (one registered after the built-in ones) and return it."""
        fmt = self[name]
        if name in self._built_in:
            raise InvalidNameError(f"The format {name!r} is built in; only formats registered at run time "
                                   "can be unregistered.")
        del self._formats[name]
        return fmt


# -- the built-in formats -------------------------------------------------------------------------------

def _is_peft(p: Path) -> bool:
    if p.is_dir():
        return member(p, PEFT_CONFIG_NAME).is_file()
    return p.is_file() and p.name == PEFT_CONFIG_NAME


def _peft_root(p: Path) -> Path:
    return p.parent if p.is_file() and p.name == PEFT_CONFIG_NAME else p


def _single_weights_file(d: Path) -> Path:
    """The one adapter weights file in a directory that no format recognises by its file names."""
    cands = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in (".safetensors", *_PICKLE_SUFFIXES))
    if len(cands) != 1:
        raise FormatError(
            f"Cannot tell the adapter format of directory {d}: no format ({', '.join(FORMATS)}) recognises its "
            f"file names (such as {PEFT_CONFIG_NAME} or {DIFFUSERS_WEIGHT_NAME}), and it has {len(cands)} weight "
            f"files ({', '.join(p.name for p in cands[:5])}) where a single-file adapter's folder holds one."
        )
    validate_file_name(cands[0].name, "adapter file name")
    return member(d, cands[0].name)


def _diffusers_weights(d: Path) -> Path:
    if member(d, DIFFUSERS_WEIGHT_NAME).is_file():
        return diffusers_file(d)
    if member(d, _DIFFUSERS_LEGACY_NAME).is_file():
        return member(d, _DIFFUSERS_LEGACY_NAME)
    return _single_weights_file(d)


def _weights_files(locate: Callable[[Path], Path]) -> Callable[[Path], dict[str, Path]]:
    """``files`` of a single-file format: the file itself, or the one that ``locate`` finds in a folder."""
    def files(p: Path) -> dict[str, Path]:
        f = locate(p) if p.is_dir() else p
        return {f.name: f}
    return files


def _write_kohya(adapter: LoraAdapter, out: Path, *, base_model: str | None,
                 extra_metadata: Mapping[str, str] | None) -> list[Path]:
    target = out if out.suffix == ".safetensors" else out / KOHYA_DEFAULT_NAME
    return write_kohya(adapter, target, base_model=base_model, extra_metadata=extra_metadata)


PEFT = Format(
    "peft", f"folder with {PEFT_CONFIG_NAME} + adapter_model.safetensors (PeftModel, vLLM)",
    detect=_is_peft,
    read=lambda p, *, allow_pickle, module_names, caps: read_peft(_peft_root(p), allow_pickle=allow_pickle, **caps),
    write=lambda a, out, *, base_model, extra_metadata: write_peft(a, out, base_model=base_model,
                                                                  extra_metadata=extra_metadata),
    files=lambda p: peft_files(_peft_root(p)),
)
KOHYA = Format(
    "kohya", "one .safetensors with lora_unet_/lora_te keys (kohya-ss, A1111, ComfyUI)",
    detect=lambda p: False,  # only by its keys
    read=lambda p, *, allow_pickle, module_names, caps: read_kohya(p, module_names=module_names, **caps),
    write=_write_kohya,
    files=_weights_files(_single_weights_file),
    detect_keys=lambda keys: bool(keys) and all(is_kohya_key(k) for k in keys),
    single_file=True,
    family="diffusers",
)
DIFFUSERS = Format(
    "diffusers", f"{DIFFUSERS_WEIGHT_NAME} (file or its folder) with <component>.<module>.lora_A.weight keys",
    detect=lambda p: p.is_dir() and (member(p, DIFFUSERS_WEIGHT_NAME).is_file()
                                     or member(p, _DIFFUSERS_LEGACY_NAME).is_file()),
    read=lambda p, *, allow_pickle, module_names, caps: read_diffusers(p, **caps),
    write=lambda a, out, *, base_model, extra_metadata: write_diffusers(a, out, base_model=base_model,
                                                                       extra_metadata=extra_metadata),
    files=_weights_files(_diffusers_weights),
    detect_keys=looks_like_diffusers,
    single_file=True,
)
GRASP_RESIDUAL = Format(
    "grasp_residual", "folder with grasp_residual.json + grasp_residual.safetensors (GRASP residual adapters)",
    detect=is_grasp_residual_dir,
    read=lambda p, *, allow_pickle, module_names, caps: read_grasp_residual(p, **caps),
    write=lambda a, out, *, base_model, extra_metadata: write_grasp_residual(a, out, base_model=base_model,
                                                                            extra_metadata=extra_metadata),
    files=grasp_residual_files,
    residual=True,
)

#: Every format adapterbank reads and writes, in detection order. Iterating gives the names.
FORMATS = FormatRegistry((PEFT, KOHYA, DIFFUSERS, GRASP_RESIDUAL))


def register_format(fmt: Format) -> Format:
    """Register ``fmt`` at run time; from then on every reader, writer, the bank and ``compose`` know it.

    The name must be new (a taken name raises :class:`InvalidNameError`; nothing is overwritten).
    Detection tries it after the formats already registered. See :class:`Format` for the fields.

    >>> f = register_format(Format("doc-toy", "never detected", detect=lambda p: False, read=PEFT.read,
    ...                            write=PEFT.write, files=PEFT.files))
    >>> "doc-toy" in FORMATS, unregister_format("doc-toy") is f, "doc-toy" in FORMATS
    (True, True, False)
    """
    return FORMATS.register(fmt)


def unregister_format(name: str) -> Format:
    """Remove the format ``name`` (registered with :func:`register_format`) and return its record."""
    return FORMATS.unregister(name)


def get_format(name: str) -> Format:
    """The record of format ``name``; :class:`UnknownNameError` (a ``KeyError``) listing the valid names.

    >>> get_format("kohya").family
    'diffusers'
    """
    return FORMATS[name]


def _get(format: str | None) -> Format | None:  # noqa: A002
    return None if format is None else FORMATS[format]


# -- dispatch ---------------------------------------------------------------------------------------------

def _by_names(p: Path) -> Format | None:
    """The first format that recognises ``p`` from its file names."""
    return next((f for f in FORMATS.values() if f.detect(p)), None)


def _format_of_keys(keys: list[str], where: str) -> Format:
    for f in FORMATS.values():
        if f.detect_keys is not None and f.detect_keys(keys):
            return f
    if keys and all(k.startswith(PEFT_PREFIX) for k in keys):
        raise FormatError(f"{where} holds PEFT keys; read the PEFT directory that contains it (with its "
                          f"{PEFT_CONFIG_NAME}), not the file alone.")
    sample = ", ".join(repr(k) for k in keys[:3])
    expected = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values() if f.detect_keys is not None)
    raise FormatError(f"Cannot tell the adapter format of {where} from its keys ({sample}, ...): expected "
                      f"{expected}.")


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
    fmt = _by_names(p)
    if fmt is not None:
        return fmt.name
    if p.is_dir():
        p = _single_weights_file(p)
    if not p.is_file():
        raise FormatError(f"No adapter at {p}: it is neither a file nor a directory.")
    kind = pickle_kind(p)
    if kind:
        raise UnsafeFileError(f"The file {p} is {kind}; its format cannot be detected without unpickling it. Pass "
                              "allow_pickle=True to read_adapter to convert it in a sandboxed subprocess first.")
    header = check_header(p)
    return _format_of_keys([k for k in header if k != "__metadata__"], str(p)).name


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
    adapter = _read_adapter(Path(path), _get(format), allow_pickle, module_names, caps)
    if adapter.metadata.get("format") not in _CHECK_FINITE_ON_READ:
        adapter.check_finite()  # a registered plugin format: its reader may not check
    return adapter


#: The built-in readers check every tensor finite as they build it (formats/_lora_config.check_tensor_finite).
_CHECK_FINITE_ON_READ = frozenset({"peft", "kohya", "diffusers", "grasp_residual"})


def _read_adapter(p: Path, fmt: Format | None, allow_pickle: bool, module_names: Iterable[str] | None,
                  caps: Mapping[str, int]) -> LoraAdapter:
    if not p.exists():
        raise FormatError(f"No adapter at {p}.")
    fmt = fmt or _by_names(p)
    if fmt is not None and not fmt.single_file:
        return fmt.read(p, allow_pickle=allow_pickle, module_names=module_names, caps=caps)
    # A single weights file: the file given, or the one in the folder.
    f = p
    if p.is_dir():
        f = next(iter(fmt.files(p).values())) if fmt is not None else _single_weights_file(p)
    kind = pickle_kind(f)
    if kind:
        if not allow_pickle:
            raise UnsafeFileError(f"The file {f} is {kind}; pass allow_pickle=True to convert it in a sandboxed "
                                  "subprocess with weights_only=True.")
        with tempfile.TemporaryDirectory(prefix="adapterbank-convert-") as tmp:
            converted = convert_pickle(f, Path(tmp) / "converted.safetensors")
            adapter = _read_single(converted, fmt, module_names, caps)  # tensors live in memory
            adapter.metadata["converted_from"] = str(f)
            return adapter
    if f.suffix in _PICKLE_SUFFIXES:
        logger.debug("%s has a pickle suffix but safetensors content", f)
    return _read_single(f, fmt, module_names, caps)


def _read_single(f: Path, fmt: Format | None, module_names: Iterable[str] | None,
                 caps: Mapping[str, int]) -> LoraAdapter:
    if fmt is None:
        header = check_header(f, **caps)
        fmt = _format_of_keys([k for k in header if k != "__metadata__"], str(f))
    return fmt.read(f, allow_pickle=False, module_names=module_names, caps=caps)


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
    fmt = FORMATS[format]
    if extra_metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in extra_metadata.items()
    ):
        raise FormatError("The 'extra_metadata' parameter of write_adapter must map str to str.")
    if not adapter.modules:
        raise FormatError("Cannot write an adapter with no modules.")
    residual = [k for k, m in adapter.modules.items() if isinstance(m, ResidualModule)]
    if residual and not fmt.residual:
        holders = " or ".join(f"format={f.name!r}" for f in FORMATS.values() if f.residual)
        raise FormatError(f"Modules {residual[:3]} are GRASP residual adapters, not LoRA weight updates; they can "
                          f"only be written with {holders} (asked: {format!r}).")
    return fmt.write(adapter, Path(out), base_model=base_model, extra_metadata=extra_metadata)


def adapter_files(path: str | Path, format: str | None = None) -> dict[str, Path]:
    """The on-disk files that make up the adapter at ``path``: relative name -> path (for bit-for-bit storage).

    >>> import tempfile, torch
    >>> from adapterbank.lora import LoraModule
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = write_adapter(LoraAdapter({"fc": LoraModule(torch.ones(1, 2), torch.ones(2, 1), 1.0, (2, 2))}), d)
    >>> sorted(adapter_files(d))
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    fmt = _get(format)
    p = Path(path)
    files = (fmt or FORMATS[detect_format(p)]).files(p)
    for name in files:
        validate_file_name(name, "adapter file name")
    return files
