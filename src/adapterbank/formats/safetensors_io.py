"""Strict safetensors reading and atomic writing.

The file layout (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N,
N bytes of UTF-8 JSON ``{"name": {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__":
{str: str}}``, then the tensor bytes, offsets relative to the end of the header.

:func:`check_header` parses and validates that header *ourselves* before any tensor is touched: the
safetensors library accepts duplicate JSON keys and spends seconds and hundreds of MB on a header of 10⁵–10⁶
tiny tensors, and an HTTP error page or a pickle saved as ``.safetensors`` must be refused with a message
that says what the file is. :func:`load_file` reads the file once into memory, validates it and builds the
tensors from that buffer (no second read, so the file cannot change between the check and the load).

Caps (keyword arguments of both functions, all overridable):

| cap                  | default   | what it bounds                                    |
|----------------------|-----------|---------------------------------------------------|
| ``max_file_bytes``   | 16 GiB    | the whole file                                    |
| ``max_header_bytes`` | 100 MiB   | the JSON header (N)                               |
| ``max_tensors``      | 100 000   | number of tensors in the header                   |
| ``max_metadata_bytes`` | 16 MiB  | total UTF-8 size of ``__metadata__`` keys+values  |
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from adapterbank._io import atomic_write
from adapterbank.errors import FormatError, UnsafeFileError

logger = logging.getLogger(__name__)

__all__ = [
    "DTYPES",
    "DEFAULT_CAPS",
    "check_header",
    "check_header_bytes",
    "load_file",
    "save_file",
    "save_bytes",
    "sniff_pickle",
    "pickle_kind",
]

MAX_FILE_BYTES = 16 * 2**30
MAX_HEADER_BYTES = 100 * 2**20
MAX_TENSORS = 100_000
MAX_METADATA_BYTES = 16 * 2**20

DEFAULT_CAPS: dict[str, int] = {
    "max_file_bytes": MAX_FILE_BYTES,
    "max_header_bytes": MAX_HEADER_BYTES,
    "max_tensors": MAX_TENSORS,
    "max_metadata_bytes": MAX_METADATA_BYTES,
}

#: safetensors dtype name -> (torch dtype, bytes per element). Only dtypes torch can represent.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
}
_TORCH_TO_NAME = {dt: name for name, (dt, _) in DTYPES.items()}

_PICKLE_HINT = "pass allow_pickle=True to convert it in a sandboxed subprocess with weights_only=True"


def sniff_pickle(head: bytes) -> str | None:
    """Name the pickle-based format that ``head`` (the first bytes of a file) starts with, or ``None``.

    >>> sniff_pickle(b"PK\\x03\\x04rest"), sniff_pickle(b"\\x80\\x04\\x95"), sniff_pickle(b"{}")
    ('a PyTorch zip (pickle) file', 'a pickle file', None)
    """
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip (pickle) file"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle file"
    return None


def pickle_kind(path: str | os.PathLike[str]) -> str | None:
    """Name the pickle format of the file at ``path``, or ``None`` (safetensors or anything else).

    A safetensors file whose 8-byte header length happens to start with ``0x80 0x02..0x05`` is not taken
    for a pickle: the length must then be implausible (beyond the file, or no ``{`` after it).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "w.pt"
    >>> torch.save({"w": torch.ones(1)}, p)
    >>> pickle_kind(p)
    'a PyTorch zip (pickle) file'
    """
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as e:
        raise FormatError(f"Cannot read {path}: {e.strerror or e}.") from None
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return None
    return sniff_pickle(head)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(Exception):
    pass


def _caps(caps: Mapping[str, int]) -> dict[str, int]:
    unknown = set(caps) - set(DEFAULT_CAPS)
    if unknown:
        raise TypeError(f"Unknown safetensors cap(s) {sorted(unknown)}; valid ones are {sorted(DEFAULT_CAPS)}.")
    out = dict(DEFAULT_CAPS)
    out.update(caps)
    return out


def check_header_bytes(
    head: bytes,
    file_size: int,
    *,
    name: str = "<bytes>",
    **caps: int,
) -> dict[str, Any]:
    """Validate a safetensors header given the file's first bytes (at least 8 + N) and its total size.

    Returns the parsed header (tensor entries plus ``"__metadata__"`` when present). See :func:`check_header`.

    >>> hdr = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    >>> blob = struct.pack("<Q", len(hdr)) + hdr + bytes(4)
    >>> check_header_bytes(blob, len(blob))["x"]["shape"]
    [1]
    """
    c = _caps(caps)
    where = f"safetensors file {name}"
    if file_size > c["max_file_bytes"]:
        raise FormatError(f"The {where} is {file_size} bytes; the cap (max_file_bytes) is {c['max_file_bytes']}.")
    if file_size < 8 or len(head) < 8:
        kind = sniff_pickle(head)
        if kind:
            raise UnsafeFileError(f"The file {name} is {kind}; {_PICKLE_HINT}.")
        raise FormatError(f"The {where} is {file_size} bytes long; expected at least the 8-byte header length.")
    (n,) = struct.unpack("<Q", head[:8])
    plausible = n <= file_size - 8 and n >= 2 and head[8:9] == b"{"
    if not plausible:
        kind = sniff_pickle(head)
        if kind:
            raise UnsafeFileError(f"The file {name} is {kind}, not safetensors; {_PICKLE_HINT}.")
    if n > c["max_header_bytes"]:
        raise FormatError(
            f"The {where} declares a header of {n} bytes; the cap (max_header_bytes) is {c['max_header_bytes']}."
        )
    if n > file_size - 8:
        raise FormatError(
            f"The {where} declares a header of {n} bytes but the file has only {file_size - 8} bytes after the "
            "length field (truncated or not a safetensors file)."
        )
    if len(head) < 8 + n:
        raise FormatError(f"The {where} is truncated inside its header ({len(head) - 8} of {n} bytes).")
    raw = head[8 : 8 + n]
    if raw[:1] != b"{":
        raise FormatError(f"The header of {where} must be a JSON object starting with '{{'. Got {raw[:16]!r} instead.")
    # Count entries before parsing: json.loads of a 10^6-entry header costs seconds and memory.
    n_entries = raw.count(b'"data_offsets"')
    if n_entries > c["max_tensors"]:
        raise FormatError(
            f"The {where} declares about {n_entries} tensors; the cap (max_tensors) is {c['max_tensors']}."
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"The header of {where} is not valid UTF-8 (byte {e.start}).") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as e:
        raise FormatError(f"The header of {where} contains the key {e.args[0]!r} more than once.") from None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"The header of {where} is not valid JSON: {e}.") from None
    if not isinstance(header, dict):
        raise FormatError(f"The header of {where} must be a JSON object. Got {type(header).__name__} instead.")
    meta = header.get("__metadata__")
    if meta is not None:
        _check_metadata(meta, where, c["max_metadata_bytes"])
    tensors = [(k, v) for k, v in header.items() if k != "__metadata__"]
    if len(tensors) > c["max_tensors"]:
        raise FormatError(f"The {where} has {len(tensors)} tensors; the cap (max_tensors) is {c['max_tensors']}.")
    data_len = file_size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for key, info in tensors:
        begin, end = _check_entry(key, info, where, data_len)
        spans.append((begin, end, key))
    spans.sort()
    pos = 0
    for begin, end, key in spans:
        if begin < pos:
            raise FormatError(f"Tensor {key!r} in {where} overlaps the previous tensor (offset {begin} < {pos}).")
        if begin > pos:
            raise FormatError(f"Tensor {key!r} in {where} leaves a gap of {begin - pos} bytes before it.")
        pos = end
    if pos != data_len:
        if pos < data_len:
            raise FormatError(
                f"The {where} has {data_len - pos} bytes after its last tensor (trailing garbage); "
                f"expected the data section to be exactly {pos} bytes."
            )
        raise FormatError(f"The {where} is truncated: tensors need {pos} data bytes, the file has {data_len}.")
    return header


def _check_metadata(meta: Any, where: str, cap: int) -> None:
    if not isinstance(meta, dict):
        raise FormatError(f"'__metadata__' in {where} must be a JSON object of strings. Got {type(meta).__name__}.")
    total = 0
    for k, v in meta.items():
        if not isinstance(v, str):
            raise FormatError(
                f"'__metadata__' key {k!r} in {where} must have a string value. Got {type(v).__name__} instead."
            )
        total += len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
        if total > cap:
            raise FormatError(
                f"'__metadata__' in {where} exceeds the cap (max_metadata_bytes={cap}) at key {k!r}."
            )


def _check_entry(key: str, info: Any, where: str, data_len: int) -> tuple[int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        found = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise FormatError(
            f"Tensor {key!r} in {where} must be an object with exactly 'dtype', 'shape', 'data_offsets'. "
            f"Got {found} instead."
        )
    dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        raise FormatError(f"Tensor {key!r} in {where} has unknown dtype {dtype!r}; known: {sorted(DTYPES)}.")
    if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
        raise FormatError(f"Tensor {key!r} in {where} must have a list of non-negative int 'shape'. Got {shape!r}.")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_uint(o) for o in offs):
        raise FormatError(f"Tensor {key!r} in {where} must have 'data_offsets' [begin, end]. Got {offs!r}.")
    begin, end = offs
    if begin > end or end > data_len:
        raise FormatError(
            f"Tensor {key!r} in {where} has data_offsets {offs} outside the data section of {data_len} bytes."
        )
    nbytes = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != nbytes:
        raise FormatError(
            f"Tensor {key!r} in {where} has shape {shape} {dtype} ({nbytes} bytes) but data_offsets span "
            f"{end - begin} bytes."
        )
    return begin, end


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_header(path: str | os.PathLike[str], **caps: int) -> dict[str, Any]:
    """Validate a safetensors file's header without handing the file to safetensors; return the header.

    Refused with :class:`FormatError` (naming the file and key): header length above ``max_header_bytes``,
    above the file size or absurd (2⁶³); a truncated file; non-UTF-8 or non-JSON header; duplicate JSON keys;
    more than ``max_tensors`` tensors; unknown dtypes; shapes that do not match their byte spans; offsets out
    of bounds, overlapping, with gaps or not covering the data exactly (trailing garbage); a ``__metadata__``
    that is not ``{str: str}`` or is larger than ``max_metadata_bytes``. A pickle or PyTorch zip file raises
    :class:`UnsafeFileError` instead. Caps: see the module docstring.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> _ = save_file({"w": torch.zeros(2)}, p, metadata={"format": "pt"})
    >>> check_header(p)["__metadata__"]
    {'format': 'pt'}
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            first = fh.read(8)
            rest = b""
            if len(first) == 8:
                (n,) = struct.unpack("<Q", first)
                if n <= min(_caps(caps)["max_header_bytes"], size - 8):
                    rest = fh.read(n)
    except OSError as e:
        raise FormatError(f"Cannot read safetensors file {path}: {e.strerror or e}.") from None
    return check_header_bytes(first + rest, size, name=str(path), **caps)


def load_file(
    path: str | os.PathLike[str], **caps: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file after :func:`check_header`; return (tensors, header metadata).

    The file is read once; tensors are views on that buffer (unaligned ones are copied).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> _ = save_file({"w": torch.arange(3.0)}, p, metadata={"k": "v"})
    >>> t, meta = load_file(p)
    >>> t["w"].tolist(), meta
    ([0.0, 1.0, 2.0], {'k': 'v'})
    """
    path = Path(path)
    c = _caps(caps)
    try:
        size = path.stat().st_size
        if size > c["max_file_bytes"]:
            raise FormatError(
                f"The safetensors file {path} is {size} bytes; the cap (max_file_bytes) is {c['max_file_bytes']}."
            )
        buf = bytearray(size)
        with open(path, "rb") as fh:
            got = fh.readinto(buf)
    except OSError as e:
        raise FormatError(f"Cannot read safetensors file {path}: {e.strerror or e}.") from None
    if got != size:
        raise FormatError(f"The safetensors file {path} changed size while being read ({got} of {size} bytes).")
    return _tensors_from_buffer(buf, name=str(path), **c)


def _tensors_from_buffer(
    buf: bytearray, *, name: str, **caps: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    n = struct.unpack("<Q", buf[:8])[0] if len(buf) >= 8 else 0
    head = bytes(buf[: 8 + n]) if n <= min(caps["max_header_bytes"], len(buf) - 8) else bytes(buf[:8])
    header = check_header_bytes(head, len(buf), name=name, **caps)
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dt, size = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = (end - begin) // size
        if count == 0:
            out[key] = torch.empty(shape, dtype=dt)
            continue
        t = torch.frombuffer(buf, dtype=dt, count=count, offset=base + begin).reshape(shape)
        if t.data_ptr() % size:
            t = t.clone()
        out[key] = t
    return out, dict(header.get("__metadata__") or {})


def save_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise tensors (+ string metadata) to safetensors bytes, keys sorted, header padded to 8 bytes.

    >>> b = save_bytes({"a": torch.ones(1)})
    >>> struct.unpack("<Q", b[:8])[0] % 8 == 0 and b[8:9] == b"{"
    True
    """
    chunks: list[bytes] = []
    with _Collector(chunks) as fh:
        _write_safetensors(fh, tensors, metadata)
    return b"".join(chunks)


class _Collector:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __enter__(self) -> _Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, b: bytes | memoryview) -> int:
        self.chunks.append(bytes(b))
        return len(b)


def _write_safetensors(fh: Any, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    header: dict[str, Any] = {}
    if metadata:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise FormatError(f"safetensors metadata must map str to str. Got non-string values for {sorted(bad)}.")
        header["__metadata__"] = dict(metadata)
    prepared: list[tuple[str, torch.Tensor]] = []
    offset = 0
    for key in sorted(tensors):
        t = tensors[key]
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"Cannot save {key!r}: expected a torch.Tensor. Got {type(t).__name__} instead.")
        if key == "__metadata__":
            raise FormatError("'__metadata__' is reserved in safetensors and cannot name a tensor.")
        if t.dtype not in _TORCH_TO_NAME:
            raise FormatError(f"Cannot save {key!r}: dtype {t.dtype} has no safetensors equivalent.")
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _TORCH_TO_NAME[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        prepared.append((key, t))
    hdr = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hdr += b" " * (-len(hdr) % 8)
    fh.write(struct.pack("<Q", len(hdr)))
    fh.write(hdr)
    for _, t in prepared:
        if t.numel():
            fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write tensors (+ string metadata) to ``path`` as safetensors, atomically (temp file, fsync, rename).

    Tensors may share memory (unlike ``safetensors.torch.save_file``); each is written as its own copy.

    >>> import tempfile
    >>> p = save_file({"w": torch.ones(2, 2)}, Path(tempfile.mkdtemp()) / "w.safetensors")
    >>> load_file(p)[0]["w"].sum().item()
    4.0
    """

    def write(fh: BinaryIO) -> None:
        _write_safetensors(fh, tensors, metadata)

    return atomic_write(path, write)
