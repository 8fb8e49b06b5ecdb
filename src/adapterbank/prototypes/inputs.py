"""Streamed inputs for prototypes: files, image folders, lists and plain descriptions, in batches.

Nothing here loads a whole file: JSONL and CSV are read line by line, Parquet through pyarrow's
``iter_batches``, an image folder one image at a time. A text column is ``column`` or the first of
:data:`TEXT_COLUMNS` that the file has; a missing column is a :class:`FormatError` naming the file and
the columns it does have.

| source | items |
|---|---|
| ``*.jsonl`` / ``*.ndjson`` | the text column of each JSON object (or the line itself if it is a JSON string) |
| ``*.csv`` / ``*.tsv`` | the text column of each row |
| ``*.parquet`` / ``*.pq`` | the text column of each row |
| ``*.txt`` | each non-empty line |
| a folder | its images (.png .jpg .jpeg .bmp .webp), sorted by name, as RGB PIL images |
| a list / iterable | its items (mappings: their text column) |
| any other string | itself: one text (a task description) |

Files must be UTF-8 (a UTF-8 BOM is allowed); bytes that are not are a :class:`FormatError` naming the
file and the line. A line of a JSONL/CSV/TXT file may be at most ``max_line_bytes`` long
(:data:`MAX_LINE_BYTES`, 1 MiB, unless the ``ADAPTERBANK_MAX_LINE_BYTES`` environment variable says
otherwise); a longer line is refused with its file and line number, after reading at most that many bytes
of it, so a huge line never fills memory. (Text encoders read only their first ``max_length`` tokens of a
text anyway; see :mod:`adapterbank.prototypes.encoders`.) A Parquet string cell is held to the same cap.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from adapterbank._validation import check_int
from adapterbank.errors import FormatError, ParameterError

__all__ = ["iter_batches", "iter_items", "describe_source", "count_hint", "TEXT_COLUMNS", "IMAGE_SUFFIXES",
           "DATA_SUFFIXES", "MAX_LINE_BYTES", "max_line_bytes_default"]

MAX_LINE_BYTES = 1 << 20
"""Longest line (in bytes) of a JSONL/CSV/TXT input, and longest Parquet text cell, unless overridden."""
MAX_LINE_BYTES_ENV = "ADAPTERBANK_MAX_LINE_BYTES"

TEXT_COLUMNS = ("text", "prompt", "sentence", "input", "question")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_JSONL = (".jsonl", ".ndjson")
_CSV = (".csv", ".tsv")
_PARQUET = (".parquet", ".pq")
_TXT = (".txt",)
DATA_SUFFIXES = _JSONL + _CSV + _PARQUET + _TXT


def _pick_column(columns: list[str], column: str | None, where: str) -> str:
    if column is not None:
        if column not in columns:
            raise FormatError(f"{where}: no column {column!r}. It has columns {columns}.")
        return column
    for c in TEXT_COLUMNS:
        if c in columns:
            return c
    raise FormatError(f"{where}: no text column; expected one of {list(TEXT_COLUMNS)} or column=. "
                      f"It has columns {columns}.")


def _check_value(v: Any, col: str, where: str) -> Any:
    if v is None:
        raise FormatError(f"{where}: column {col!r} is empty (null).")
    return v


def max_line_bytes_default() -> int:
    """:data:`MAX_LINE_BYTES`, or the positive integer in the ``ADAPTERBANK_MAX_LINE_BYTES`` environment variable."""
    raw = os.environ.get(MAX_LINE_BYTES_ENV)
    if raw is None or not raw.strip():
        return MAX_LINE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ParameterError(f"The {MAX_LINE_BYTES_ENV} environment variable must be a positive integer (bytes). "
                             f"Got {raw!r} instead.")
    return value


def _check_cap(max_line_bytes: int | None) -> int:
    if max_line_bytes is None:
        return max_line_bytes_default()
    return check_int(max_line_bytes, "max_line_bytes", "iter_items", low=1)


def _too_long(where: str, cap: int) -> FormatError:
    return FormatError(f"{where}: longer than {cap} bytes, the cap on one line or text. Shorten or split it "
                       f"(text encoders read only their first max_length tokens), or raise the cap with "
                       f"max_line_bytes= or the {MAX_LINE_BYTES_ENV} environment variable.")


def _lines(path: Path, cap: int) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a UTF-8 file, streamed; never holds more than ``cap`` + 1 bytes of a line.

    Raises FormatError naming the file and line for a line over ``cap`` bytes (its end of line not counted)
    or bytes that are not UTF-8.
    """
    with open(path, "rb") as fh:
        lineno = 0
        while raw := fh.readline(cap + 3):  # + "\r\n" and one byte to tell "too long"
            lineno += 1
            body = raw.rstrip(b"\r\n")
            if len(body) > cap or (len(raw) == cap + 3 and not raw.endswith(b"\n")):
                raise _too_long(f"{path}, line {lineno}", cap)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FormatError(f"{path}, line {lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                  f"{e.start + 1}). Save the file as UTF-8.") from e


def _looks_like_path(s: str) -> bool:
    """A string with no whitespace that has a path separator or a data/image suffix."""
    if not s or any(c.isspace() for c in s):
        return False
    return os.sep in s or "/" in s or s.lower().endswith(DATA_SUFFIXES + IMAGE_SUFFIXES)


def _jsonl_items(path: Path, column: str | None, cap: int) -> Iterator[Any]:
    col: str | None = None
    for lineno, line in _lines(path, cap):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise FormatError(f"{where}: not valid JSON ({e}).") from e
        if isinstance(rec, str) and column is None:
            yield rec
            continue
        if not isinstance(rec, dict):
            raise FormatError(f"{where}: expected a JSON object (or a string). Got {type(rec).__name__}.")
        if col is None:
            col = _pick_column(list(rec), column, where)
        if col not in rec:
            raise FormatError(f"{where}: no column {col!r}. It has columns {list(rec)}.")
        yield _check_value(rec[col], col, where)


def _csv_items(path: Path, column: str | None, cap: int) -> Iterator[Any]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader((line for _, line in _lines(path, cap)), delimiter=delim)
    csv.field_size_limit(max(csv.field_size_limit(), cap))  # only ever raised: the default 128 KiB < the cap
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise FormatError(f"{path}: not a valid CSV header ({e}).") from e
    if not header:
        return
    col = _pick_column(list(header), column, str(path))
    try:
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            v = _check_value(row.get(col), col, where)
            if isinstance(v, str) and len(v) > cap:  # a quoted field over many lines
                raise _too_long(where, cap)
            yield v
    except csv.Error as e:
        raise FormatError(f"{path}, line {reader.line_num}: not valid CSV ({e}).") from e


def _parquet_items(path: Path, column: str | None, read_rows: int, cap: int) -> Iterator[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise FormatError(f"{path}: reading Parquet needs pyarrow (pip install 'adapterbank[data]').") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a bad file
        raise FormatError(f"{path}: not a valid Parquet file ({e}).") from e
    col = _pick_column(list(pf.schema_arrow.names), column, str(path))
    row = 0
    for rb in pf.iter_batches(batch_size=max(1, read_rows), columns=[col]):
        for v in rb.column(0).to_pylist():
            where = f"{path}, row {row}"
            if isinstance(v, str) and len(v) > cap // 4 and len(v.encode("utf-8")) > cap:  # ≤ 4 bytes a char
                raise _too_long(where, cap)
            yield _check_value(v, col, where)
            row += 1


def _txt_items(path: Path, cap: int) -> Iterator[str]:
    for _, line in _lines(path, cap):
        if line.strip():
            yield line.rstrip("\r\n")


def _image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)


def _image_items(folder: Path) -> Iterator[Any]:
    from PIL import Image

    for p in _image_files(folder):
        try:
            with Image.open(p) as im:
                yield im.convert("RGB")
        except OSError as e:
            raise FormatError(f"{p}: not a readable image ({e}).") from e


def _record_items(items: Iterable[Any], column: str | None) -> Iterator[Any]:
    col: str | None = None
    for i, x in enumerate(items):
        if isinstance(x, Mapping):
            where = f"item {i} of the input"
            if col is None:
                col = _pick_column(list(x), column, where)
            if col not in x:
                raise FormatError(f"{where}: no column {col!r}. It has columns {list(x)}.")
            yield _check_value(x[col], col, where)
        else:
            yield x


def _file_items(path: Path, column: str | None, read_rows: int, cap: int) -> Iterator[Any]:
    suf = path.suffix.lower()
    if suf in _JSONL:
        return _jsonl_items(path, column, cap)
    if suf in _CSV:
        return _csv_items(path, column, cap)
    if suf in _PARQUET:
        return _parquet_items(path, column, read_rows, cap)
    if suf in _TXT:
        return _txt_items(path, cap)
    if suf in IMAGE_SUFFIXES:
        return _image_items_one(path)
    raise FormatError(f"{path}: unknown input file type {suf!r}; expected one of "
                      f"{list(DATA_SUFFIXES + IMAGE_SUFFIXES)} or a folder of images.")


def _image_items_one(path: Path) -> Iterator[Any]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            yield im.convert("RGB")
    except OSError as e:
        raise FormatError(f"{path}: not a readable image ({e}).") from e


def iter_items(source: Any, *, column: str | None = None, read_rows: int = 1024,
               max_line_bytes: int | None = None) -> Iterator[Any]:
    """The items of ``source`` one at a time (see the module docstring for what a source can be).

    ``max_line_bytes`` caps one line of a JSONL/CSV/TXT file (and one Parquet text cell); None means
    :func:`max_line_bytes_default` (1 MiB unless ``ADAPTERBANK_MAX_LINE_BYTES`` is set).

    >>> list(iter_items([{"text": "a"}, {"text": "b"}]))
    ['a', 'b']
    >>> list(iter_items("a short task description"))
    ['a short task description']
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        if p.is_dir():
            return _image_items(p)
        if p.is_file():
            return _file_items(p, column, read_rows, _check_cap(max_line_bytes))
        if isinstance(source, str) and not _looks_like_path(source):
            if not source.strip():
                return iter(())
            return iter([source])
        raise FileNotFoundError(f"Input {os.fspath(source)!r} does not exist (expected a file, a folder of images, "
                                f"or a text description with spaces).")
    if isinstance(source, (bytes, bytearray)):
        raise FormatError("A bytes object is not an input; decode it to text or pass a file path.")
    try:
        from PIL import Image

        if isinstance(source, Image.Image):
            return iter([source])
    except ImportError:  # pragma: no cover
        pass
    if isinstance(source, Mapping):
        raise FormatError(f"A mapping is not an input; pass a list of records. Got keys {list(source)[:10]}.")
    if isinstance(source, Iterable):
        return _record_items(source, column)
    raise FormatError(f"Cannot read samples from a {type(source).__name__}: expected a JSONL/CSV/Parquet/TXT file, "
                      "a folder of images, a list or iterable of items, or a text description.")


def iter_batches(source: Any, batch_size: int, *, column: str | None = None, limit: int | None = None,
                 max_line_bytes: int | None = None) -> Iterator[list[Any]]:
    """Lists of at most ``batch_size`` items from ``source``, streamed; at most ``limit`` items in all.

    ``max_line_bytes``: as in :func:`iter_items`.

    >>> list(iter_batches(["a", "b", "c", "d", "e"], 2, limit=3))
    [['a', 'b'], ['c']]
    """
    batch_size = check_int(batch_size, "batch_size", "iter_batches", low=1)
    limit = check_int(limit, "limit", "iter_batches", low=0, optional=True)
    items = iter_items(source, column=column, read_rows=batch_size, max_line_bytes=max_line_bytes)
    if limit is not None:
        items = itertools.islice(items, limit)
    while batch := list(itertools.islice(items, batch_size)):
        yield batch


def describe_source(source: Any, column: str | None = None) -> str:
    """A short description of ``source`` for a prototype's ``source`` field.

    >>> describe_source(["x", "y"])
    '2 inline items'
    >>> describe_source("summarise legal contracts")
    'description: summarise legal contracts'
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        if p.is_dir():
            return f"{p} (images)"
        if p.exists():
            return f"{p}" + (f" [column={column}]" if column else "")
        s = os.fspath(source)
        return f"description: {s if len(s) <= 120 else s[:117] + '...'}"
    if isinstance(source, (list, tuple)):
        return f"{len(source)} inline items"
    return f"{type(source).__name__} of items"


def count_hint(source: Any) -> int | None:
    """About how many items ``source`` has, cheaply (for a progress bar's total); ``None`` when unknown.

    Text files count their non-blank lines (a CSV/TSV file less its header; a quoted newline counts twice),
    Parquet files their rows from the footer, folders their images, lists their length. Reads a text file
    once in 1 MiB blocks, whatever its line lengths.

    >>> count_hint(["a", "b"]), count_hint("a task description")
    (2, None)
    """
    if isinstance(source, (list, tuple)):
        return len(source)
    if not isinstance(source, (str, os.PathLike)):
        return None
    p = Path(source).expanduser()
    try:
        if p.is_dir():
            return len(_image_files(p))
        suf = p.suffix.lower()
        if not p.is_file() or suf not in DATA_SUFFIXES:
            return None
        if suf in _PARQUET:
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(p).metadata.num_rows)
        n, open_line = 0, False  # open_line: the line read so far (not yet ended) has a non-blank byte
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                parts = block.split(b"\n")
                for part in parts[:-1]:
                    n += open_line or bool(part.strip())
                    open_line = False
                open_line = open_line or bool(parts[-1].strip())
        n += open_line
        return max(0, n - 1) if suf in _CSV else n
    except (OSError, ImportError, ValueError):
        return None

