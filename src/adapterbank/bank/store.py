"""The embedded bank: a SQLite catalog of cards and prototypes plus content-addressed safetensors blobs.

Layout of a bank directory (docs/design.md §5.1)::

    <bank>/catalog.sqlite          cards, file hashes, prototypes, format_version, version counter
    <bank>/blobs/<sha[:2]>/<sha>   the original adapter files, bit for bit, read-only
    <bank>/tmp/                    staging of adds in progress (and leftovers of crashed ones)

An :meth:`Bank.add` validates the adapter completely before it changes anything: the files are copied
into a private staging folder (hashing them on the way) and *those bytes* are parsed by
:func:`adapterbank.formats.read_adapter`. Then the blobs get their final names, and one SQLite
transaction inserts the card, the file rows and the prototype. A crash leaves either the whole entry
or orphan blobs that :meth:`Bank.verify` reports and :meth:`Bank.gc` deletes; a committed row never
points at a missing blob (the writer re-checks its blobs while it holds the write lock, and blobs are
only deleted under that lock).

Search: one exact :class:`~adapterbank.bank.index.NumpyIndex` per prototype space, built lazily and
rebuilt when the catalog ``version`` (bumped by every write, of any process) has moved.
"""

from __future__ import annotations

import builtins
import datetime as _dt
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from adapterbank._io import (
    atomic_dir,
    atomic_write,
    check_output,
    renamed_paths,
    validate_file_name,
    validate_name,
    writing,
)
from adapterbank._validation import MAX_K, check_k, is_lora_adapter
from adapterbank._versions import versions
from adapterbank.bank.backend import CARD_COLUMNS, BlobBackend, CardRow, CatalogBackend, Entry
from adapterbank.bank.blobs import BlobStore, Staging
from adapterbank.bank.catalog import CATALOG, DEFAULT_LOCK_TIMEOUT, FORMAT_VERSION, REPLACE_HINT, Catalog, jsonable
from adapterbank.bank.index import Hit, Index, NumpyIndex
from adapterbank.errors import (
    AdapterbankError,
    BankError,
    BaseModelMismatchError,
    ConflictError,
    FormatError,
    InvalidNameError,
    NonFiniteError,
    ParameterError,
    PoolSmallerThanKWarning,
    PrototypeSpaceError,
    ShapeMismatchError,
    UnknownNameError,
    UnsafeFileError,
)
from adapterbank.prototypes.space import Prototype, PrototypeSpace

if TYPE_CHECKING:
    from adapterbank.bank.ingest import IngestItem, IngestReport
    from adapterbank.lora import LoraAdapter

log = logging.getLogger(__name__)

__all__ = ["Bank", "Card", "VerifyReport", "FORMAT_VERSION", "is_url"]

#: The environment variable naming the blob store (an fsspec URL) of a new server bank.
BLOBS_ENV = "ADAPTERBANK_BLOBS"
BLOBS_SETTING = "storage.blobs"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: object) -> bool:
    """Whether a bank argument is a URL (server backend) rather than a folder.

    >>> is_url("postgresql://me@db/adapters"), is_url("./bank"), is_url(Path("bank"))
    (True, False, False)
    """
    return isinstance(path, str) and _URL.match(path) is not None


BLOBS = "blobs"
TMP = "tmp"
#: Settings key prefix of the encoder spec of each prototype space (Bank.remember_encoder).
ENCODER_SETTING = "encoder:"
LEGACY_ENCODERS_FILE = "encoders.json"
MAX_TAGS = 64
MAX_TAG_LEN = 100
MAX_TEXT_LEN = 100_000
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


@dataclass(frozen=True)
class Card:
    """What the bank knows about one adapter (a row of the catalog, plus its files and prototype spaces).

    >>> c = Card("a", "tiny-llama", "peft", 4, {"q": 4}, ["q"], None, None, None, ["x"], "2025-01-01T00:00:00+00:00",
    ...          {}, {}, {"adapter_model.safetensors": "ab" * 32}, [])
    >>> c.to_dict()["rank"], c.to_dict()["files"]["adapter_model.safetensors"][:4]
    (4, 'abab')
    """

    id: str
    base_model: str | None
    format: str
    rank: int
    ranks: dict[str, int]
    targets: list[str]
    source: str | None
    description: str | None
    license: str | None
    tags: list[str]
    created: str
    versions: dict[str, str]
    extra: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    prototype_spaces: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    """The outcome of :meth:`Bank.verify`. Orphans (blobs no row points at, crashed writers' temp files)
    are waste, not damage: they do not make ``ok`` false; :meth:`Bank.gc` deletes them."""

    ok: bool
    checked: int
    problems: list[str]
    orphans: list[str] = field(default_factory=list)


def _slug(path: Path) -> str:
    """A default id from a file or folder name: extension dropped, odd characters replaced by '-'."""
    name = path.name
    for suf in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
        if name.endswith(suf) and len(name) > len(suf):
            name = name[: -len(suf)]
    s = re.sub(r"[^A-Za-z0-9._+@=-]+", "-", name)
    s = re.sub(r"\.{2,}", ".", s).lstrip(".-_+@=")
    return s[:200] or "adapter"


def _check_text(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise FormatError(f"The {what!r} of an adapter must be a string. Got {type(value).__name__} instead.")
    if len(value) > MAX_TEXT_LEN or "\x00" in value:
        raise FormatError(f"The {what!r} of an adapter must be under {MAX_TEXT_LEN} characters without NUL bytes.")
    return value


def _check_tags(tags: Sequence[str] | str | None) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    out: list[str] = []
    for t in tags:
        if not isinstance(t, str) or not t.strip() or len(t) > MAX_TAG_LEN or any(ord(ch) < 32 for ch in t):
            raise InvalidNameError(
                f"A tag must be a non-empty string of at most {MAX_TAG_LEN} printable characters. Got {t!r} instead."
            )
        if t not in out:
            out.append(t)
    if len(out) > MAX_TAGS:
        raise InvalidNameError(f"An adapter may carry at most {MAX_TAGS} tags. Got {len(out)}.")
    return out


def _check_rel_name(name: str, where: str) -> str:
    """A file name inside an adapter: relative, '/'-separated, every component a safe name."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or "\\" in name:
        raise InvalidNameError(f"{where}: file name {name!r} must be a relative path.")
    for p in parts:
        validate_file_name(p, "file name")
    return "/".join(parts)


@dataclass(frozen=True)
class _AddRequest:
    """The checked arguments of one add (:meth:`Bank._request`), before any file is read or staged."""

    source: Path | LoraAdapter
    id: str
    prototype: Prototype | None
    description: str | None
    tags: list[str]
    license: str | None
    source_url: str | None
    base_model: str | None
    format: str | None
    allow_pickle: bool

    @property
    def src_path(self) -> Path | None:
        return self.source if isinstance(self.source, Path) else None


def _card(cr: CardRow) -> Card:
    r = {k: cr.row[k] for k in CARD_COLUMNS}
    for k in ("ranks", "targets", "tags", "versions", "extra"):
        r[k] = json.loads(r[k])
    return Card(**r, files=dict(cr.files), prototype_spaces=list(cr.spaces))


class Bank:
    """A bank of LoRA adapters with task prototypes, stored in one directory.

    >>> import tempfile, torch
    >>> from adapterbank.lora import LoraAdapter, LoraModule
    >>> bank = Bank.init(tempfile.mkdtemp() + "/bank")
    >>> space = PrototypeSpace("toy", None, "mean", False, 2)
    >>> for i, v in enumerate([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]]):
    ...     ad = LoraAdapter({"fc": LoraModule(torch.ones(1, 3) * (i + 1), torch.ones(2, 1), 1.0, (2, 3))})
    ...     _ = bank.add(ad, id=f"a{i}", base_model="toy-base", prototype=Prototype(np.array(v), space))
    >>> [(h.id, round(h.distance, 4)) for h in bank.search(np.array([0.9, 0.0]), k=2)]
    [('a1', 0.01), ('a0', 0.81)]
    >>> bank.load_adapter("a2").modules["fc"].A[0, 0].item(), bank.verify().ok
    (3.0, True)
    """

    #: The :class:`~adapterbank.bank.index.Index` built per prototype space (swap in an ANN backend here).
    index_factory: Callable[[], Index] = NumpyIndex
    #: Embedded banks: "auto" (exact below ``adapterbank.bank.ann.ANN_MIN_ROWS`` rows, usearch HNSW above when
    #: installed), "exact" or "ann" (needs ``pip install 'adapterbank[ann]'``).
    index_kind: str = "auto"

    def __init__(self, root: Path | str, catalog: CatalogBackend, blobs: BlobBackend | None = None) -> None:
        #: The bank's folder (embedded) or its catalog URL without the password (server backend).
        self.root = root
        self._cat = catalog
        self._blobs: Any = blobs if blobs is not None else BlobStore(Path(root) / BLOBS, Path(root) / TMP)
        self._indexes: dict[str, tuple[int, Index]] = {}
        self._spaces_cache: tuple[int, dict[str, PrototypeSpace]] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    @classmethod
    def init(cls, path: str | Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT, blobs: str | None = None) -> Bank:
        """Create an empty bank in ``path``: a new or empty directory (embedded backend), or a
        ``postgresql://`` URL (server backend: catalog and prototypes in PostgreSQL + pgvector, blobs at the
        fsspec URL ``blobs``, default ``$ADAPTERBANK_BLOBS``, recorded in the catalog). ``lock_timeout``: see
        :meth:`open`.

        >>> import tempfile
        >>> Bank.init(tempfile.mkdtemp()).list()
        []
        """
        if is_url(path):
            return cls._server(str(path), create=True, blobs=blobs, lock_timeout=lock_timeout)
        if blobs is not None:
            raise ParameterError("blobs= is for the server backend (a postgresql:// bank); an embedded bank keeps its "
                                 f"blobs in {Path(path) / BLOBS}.")
        root = Path(path)
        if (root / CATALOG).exists():
            raise BankError(f"{root} is already a bank; open it with Bank.open.")
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise BankError(f"Cannot create a bank in {root}: it exists and is not an empty directory.")
        with writing(root, what="the bank", nothing="no bank was created"):
            root.mkdir(parents=True, exist_ok=True)
            (root / BLOBS).mkdir(exist_ok=True)
            (root / TMP).mkdir(exist_ok=True)
        cat = Catalog.create(root / CATALOG, lock_timeout=lock_timeout)
        log.info("created bank at %s (format_version %d)", root, FORMAT_VERSION)
        return cls(root, cat)

    @classmethod
    def open(cls, path: str | Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT, blobs: str | None = None) -> Bank:
        """Open an existing bank (a folder or a ``postgresql://`` URL); :class:`BankError` if it is missing, not a
        bank or of a newer format. A server bank's blobs are at the URL recorded by :meth:`init` (``blobs=``
        overrides it, e.g. another endpoint of the same bucket).

        ``lock_timeout``: how many seconds a write (add, remove, gc, ...) waits while another process is
        writing to the bank (a warning is logged after one second) before it fails with :class:`BankError`.

        >>> import tempfile
        >>> Bank.open(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        adapterbank.errors.BankError: ... is not a bank: it has no catalog.sqlite.
        """
        if is_url(path):
            return cls._server(str(path), create=False, blobs=blobs, lock_timeout=lock_timeout)
        root = Path(path)
        if not root.is_dir():
            raise BankError(f"No bank at {root}: the directory does not exist.")
        if not (root / CATALOG).is_file():
            raise BankError(f"{root} is not a bank: it has no {CATALOG}.")
        bank = cls(root, Catalog.open(root / CATALOG, lock_timeout=lock_timeout))
        for sub in (BLOBS, TMP):
            if not (root / sub).is_dir():
                with writing(root, what="to the bank", nothing="the bank was not opened"):
                    (root / sub).mkdir(exist_ok=True)
        return bank

    @classmethod
    def _server(cls, url: str, *, create: bool, blobs: str | None, lock_timeout: float) -> Bank:
        """The server backend: :class:`~adapterbank.bank.pg.PgCatalog` + :class:`~adapterbank.bank.remote_blobs.FsspecBlobStore`."""
        # psycopg and fsspec are imported only when these connect (BankError naming the 'server' extra if absent)
        from adapterbank.bank.pg import PgCatalog, redact_url
        from adapterbank.bank.remote_blobs import FsspecBlobStore

        scheme = url.split("://", 1)[0].lower()
        if scheme not in ("postgresql", "postgres"):
            raise BankError(f"Unknown bank URL scheme {scheme!r} in {redact_url(url)}: a bank is a folder (embedded) or "
                            "a postgresql:// URL (server backend).")
        if create:
            blobs = blobs or os.environ.get(BLOBS_ENV)
            if not blobs:
                raise BankError(f"Where should the weights of {redact_url(url)} live? Set {BLOBS_ENV} to an fsspec URL "
                                f"(e.g. s3://bucket/adapterbank; S3 credentials and endpoint from the usual AWS_* "
                                f"variables) or pass blobs=.")
            store = FsspecBlobStore(blobs)  # fails on a bad URL before the catalog is created
            cat = PgCatalog.create(url, lock_timeout=lock_timeout)
            cat.set_setting(BLOBS_SETTING, json.dumps(blobs))
        else:
            cat = PgCatalog.open(url, lock_timeout=lock_timeout)
            recorded = cat.get_setting(BLOBS_SETTING)
            blobs = blobs or (json.loads(recorded) if recorded else None) or os.environ.get(BLOBS_ENV)
            if not blobs:
                cat.close()
                raise BankError(f"The bank {redact_url(url)} records no blob store; set {BLOBS_ENV} or pass blobs=.")
            store = FsspecBlobStore(blobs)
        return cls(cat.location, cat, store)

    def close(self) -> None:
        self._cat.close()

    def __enter__(self) -> Bank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bank({str(self.root)!r})"

    @property
    def _local_dir(self) -> Path:
        """The local folder an add writes into: the bank folder, or (server backend) the staging folder."""
        return self.root if isinstance(self.root, Path) else self._staging_dir

    @property
    def _staging_dir(self) -> Path:
        st = getattr(self._blobs, "staging_dir", None) or getattr(self._blobs, "tmp", None)
        return Path(st) if st is not None else Path(tempfile.gettempdir())

    @property
    def blobs_location(self) -> str:
        """Where the blobs are: ``<bank>/blobs`` or the object-store URL."""
        return self._blobs.location

    @property
    def version(self) -> int:
        """The catalog version: increases with every committed write, by any process."""
        return self._cat.version()

    def __len__(self) -> int:
        return self._cat.count()

    def __contains__(self, id: object) -> bool:  # noqa: A002
        return isinstance(id, str) and self._cat.has(id)

    # -- adding -----------------------------------------------------------------------------------
    def add(
        self,
        source: str | Path | LoraAdapter,
        *,
        id: str | None = None,  # noqa: A002
        prototype: Prototype | None = None,
        description: str | None = None,
        tags: Sequence[str] = (),
        license: str | None = None,  # noqa: A002
        source_url: str | None = None,
        base_model: str | None = None,
        format: str | None = None,  # noqa: A002
        allow_pickle: bool = False,
        replace: bool = False,
    ) -> Card:
        """Add an adapter (a PEFT/diffusers folder, a kohya file, or a :class:`LoraAdapter`) to the bank.

        Everything is validated before the bank changes: the id (default: a slug of the file or folder
        name), tags, the prototype, every tensor (by :func:`adapterbank.formats.read_adapter` on the very
        bytes that will be stored), the base model (``base_model=`` must agree with the adapter's own).
        The original files are stored bit for bit; a :class:`LoraAdapter` is stored as PEFT files, and a
        legacy pickle file (only with ``allow_pickle=True``) is stored converted to PEFT safetensors.
        An existing id raises :class:`ConflictError` unless ``replace=True``. See the class docstring
        for an example; :meth:`add_many` adds many adapters at once (the same checks, one code path).
        """
        req = self._request(source, id=id, prototype=prototype, description=description, tags=tags,
                            license=license, source_url=source_url, base_model=base_model, format=format,
                            allow_pickle=allow_pickle)
        if not replace and req.id in self:
            raise ConflictError(f"The bank already has an adapter with id {req.id!r}; {REPLACE_HINT}.")
        with writing(self._local_dir, what="to the bank", nothing="nothing was added", hide=self._staging_dir), \
                self._blobs.staging() as st:
            entry, staged = self._prepare(st, req)
            exists, = self._commit(st, [(entry, staged)], replace=replace)
        row = entry.row
        log.info("added %s (%s, base %s, rank %d, %d files)", req.id, row["format"], row["base_model"], row["rank"],
                 len(staged))
        if exists:
            self._delete_unreferenced()
        return self.get(req.id)

    def add_many(
        self,
        items: Iterable[IngestItem],
        *,
        replace: bool = False,
        batch_size: int = 256,
        workers: int | None = None,
        encoder: Any = None,
        progress: Callable[[int], None] | None = None,
        allow_pickle: bool = False,
    ) -> IngestReport:
        """Add many adapters: staged, hashed and validated by ``workers`` threads, committed one catalog
        transaction per ``batch_size`` items, descriptions encoded ``batch_size`` at a time by ``encoder``.

        A bad item is refused with its reason and the run goes on; an id the bank already has with the same
        files is skipped as already present (so a rerun after a crash resumes), with other files it is
        refused unless ``replace=True``. See :func:`adapterbank.bank.ingest.ingest` for the details.

        >>> import tempfile, torch
        >>> from adapterbank.bank.ingest import IngestItem
        >>> from adapterbank.lora import LoraAdapter, LoraModule
        >>> bank = Bank.init(tempfile.mkdtemp() + "/bank")
        >>> ad = LoraAdapter({"fc": LoraModule(torch.ones(1, 3), torch.ones(2, 1), 1.0, (2, 3))}, "toy-base")
        >>> rep = bank.add_many([IngestItem(ad, id="a"), IngestItem(ad, id="b"), IngestItem("nowhere.safetensors")])
        >>> rep.added, rep.refused[0].reason
        (['a', 'b'], 'No adapter at nowhere.safetensors.')
        >>> bank.add_many([IngestItem(ad, id="a")]).present
        ['a']
        """
        from adapterbank.bank.ingest import ingest

        return ingest(self, items, replace=replace, batch_size=batch_size, workers=workers, encoder=encoder,
                      progress=progress, allow_pickle=allow_pickle)

    def _request(
        self, source: str | Path | LoraAdapter, *, id: str | None, prototype: Prototype | None,  # noqa: A002
        description: str | None, tags: Sequence[str] | str | None, license: str | None,  # noqa: A002
        source_url: str | None, base_model: str | None, format: str | None, allow_pickle: bool,  # noqa: A002
    ) -> _AddRequest:
        """The checked arguments of one add (reads nothing but whether the source exists; no catalog access)."""
        from adapterbank import formats

        if id is not None:
            validate_name(id)
        tag_list = _check_tags(tags)
        description = _check_text(description, "description")
        license = _check_text(license, "license")
        source_url = _check_text(source_url, "source_url")
        base_model = _check_text(base_model, "base_model")
        if prototype is not None and not isinstance(prototype, Prototype):
            raise FormatError(f"The 'prototype' of add must be a Prototype. Got {type(prototype).__name__} instead.")
        if format is not None:
            formats.get_format(format)  # an unknown name raises UnknownNameError listing the valid ones
        if is_lora_adapter(source):
            if id is None:
                raise InvalidNameError("An 'id' is required when adding a LoraAdapter object (it has no file name).")
            src: Path | LoraAdapter = source
        elif isinstance(source, (str, Path)):
            src = Path(source)
            if not src.exists():
                raise FileNotFoundError(f"No adapter at {src}.")
            id = id if id is not None else validate_name(_slug(src.resolve()))
        else:
            raise FormatError(f"add() takes a path or a LoraAdapter. Got {type(source).__name__} instead.")
        return _AddRequest(src, id, prototype, description, tag_list, license, source_url, base_model, format,
                           allow_pickle)

    def _prepare(self, st: Staging, req: _AddRequest, sub: str = "", versions_json: str | None = None,
                 ) -> tuple[Entry, dict[str, tuple[Path, str, int]]]:
        """Stage the adapter's files (copied, hashed, fsynced) under ``<staging>/<sub>``, parse *those* bytes and
        build its catalog entry: ``(Entry, rel name -> (staged path, sha256, size))``. Touches no catalog, so
        several threads may prepare into one staging folder (each under its own ``sub``). ``versions_json``:
        the card's ``versions`` (default: :func:`versions` now; it reads package metadata, ~4 ms)."""
        files_sub, conv_sub = (sub, f"{sub}-conv") if sub else ("files", "conv")
        src_path = req.src_path
        if is_lora_adapter(req.source):
            bm_given = self._resolve_base_model(req.source.base_model, req.base_model, req.id)
            fmt, layout, staged, adapter = self._stage_object(st, req.source, bm_given, sub=files_sub)
        else:
            fmt, layout, staged, adapter = self._stage_path(st, req.source, req.format, req.allow_pickle,
                                                            sub=files_sub)
        converted = adapter.metadata.pop("converted_from", None) is not None
        extra: dict[str, Any] = {"layout": layout, "metadata": jsonable(adapter.metadata)}
        if converted or any(PurePosixPath(r).suffix.lower() in _PICKLE_SUFFIXES for r in staged):
            # Legacy pickle, converted on explicit opt-in: store the safetensors conversion, never the pickle.
            bm_conv = self._resolve_base_model(adapter.base_model, req.base_model, src_path)
            _, _, staged, _ = self._stage_object(st, adapter, bm_conv, sub=conv_sub)
            extra.update(converted_from=fmt, layout="dir")
            fmt = "peft"
        bm = self._resolve_base_model(adapter.base_model, req.base_model, src_path or req.id)
        ranks = adapter.ranks
        if not ranks:
            raise FormatError(f"{src_path or req.id}: the adapter has no LoRA modules.")
        extra["size"] = sum(s for _, _, s in staged.values())
        extra["n_params"] = adapter.n_params
        row = {
            "id": req.id, "base_model": bm, "format": fmt, "rank": max(ranks.values()),
            "ranks": json.dumps(ranks, sort_keys=True), "targets": json.dumps(sorted(ranks)),
            "source": req.source_url if req.source_url is not None else (str(src_path.resolve()) if src_path else None),
            "description": req.description, "license": req.license, "tags": json.dumps(req.tags),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions_json or json.dumps(versions(), sort_keys=True), "extra": json.dumps(extra, sort_keys=True),
        }
        entry = Entry(row, [(rel, sha, size) for rel, (_, sha, size) in staged.items()],
                      [] if req.prototype is None else [req.prototype])
        return entry, staged

    def _commit(self, st: Staging, batch: Sequence[tuple[Entry, Mapping[str, tuple[Path, str, int]]]], *,
                replace: bool, placed: bool = False) -> builtins.list[bool]:
        """Give the staged blobs their final names (outside the writer lock; ``placed``: the caller did), then
        commit the entries in one transaction that first re-checks the blobs (a concurrent gc may have removed
        one placed here)."""
        blobs = {sha: (p, size) for _, staged in batch for p, sha, size in staged.values()}
        if not placed:
            for sha, (p, size) in blobs.items():
                self._blobs.put(p, sha, size, st.token)

        def recheck() -> None:
            for sha in sorted(self._blobs.missing({sha: size for sha, (_, size) in blobs.items()})):
                p, size = blobs[sha]
                self._blobs.put(p, sha, size, st.token)

        return self._cat.commit([e for e, _ in batch], replace=replace, under_lock=recheck)

    @staticmethod
    def _stage_path(st: Staging, src: Path, format: str | None,  # noqa: A002
                    allow_pickle: bool, sub: str = "files",
                    ) -> tuple[str, str, dict[str, tuple[Path, str, int]], LoraAdapter]:
        """Copy the adapter's original files into ``<staging>/<sub>`` (hashing them) and parse *those* bytes."""
        from adapterbank import formats

        given = src
        fmt = format
        if fmt is None:
            try:
                fmt = formats.detect_format(src)
            except UnsafeFileError:
                if not allow_pickle:
                    raise
                # A legacy pickle: its format is only known after the sandboxed conversion below. Stage the
                # file under its own name ("kohya" and "diffusers" both take the single weights file).
        files = formats.adapter_files(src, fmt or "kohya")
        single = fmt is None or formats.get_format(fmt).single_file
        layout = "file" if src.is_file() and single else "dir"
        if not single and src.is_file():
            src = src.parent  # e.g. adapter_config.json given: the adapter is its folder
        staged = {}
        for rel, p in files.items():
            rel = _check_rel_name(rel, str(src))
            staged[rel] = st.stage_file(Path(p), f"{sub}/{rel}")
        read_root = st.dir / sub / (src.name if layout == "file" else "")
        try:
            adapter = formats.read_adapter(read_root, format=fmt, allow_pickle=allow_pickle)  # checks finite
        except AdapterbankError as e:  # name the user's files, not our staging copy of them
            renamed = renamed_paths(e, {read_root: given, st.dir / sub: src if layout == "dir" else src.parent})
            if renamed is e:
                raise
            raise renamed from e.__cause__
        fmt = fmt or str(adapter.metadata.get("format", "kohya"))
        return fmt, layout, staged, adapter

    @staticmethod
    def _stage_object(st: Staging, adapter: LoraAdapter, base_model: str | None, sub: str = "files",
                      ) -> tuple[str, str, dict[str, tuple[Path, str, int]], LoraAdapter]:
        """Write ``adapter`` as PEFT files into staging and read them back (what load_adapter will see)."""
        from adapterbank import formats

        out = st.dir / f"{sub}-written"
        formats.write_adapter(adapter, out, format="peft", base_model=base_model)
        staged = {}
        for rel, p in formats.adapter_files(out, "peft").items():
            rel = _check_rel_name(rel, str(out))
            staged[rel] = st.stage_file(p, f"{sub}/{rel}")
        back = formats.read_adapter(st.dir / sub, format="peft")  # checks finite
        return "peft", "dir", staged, back

    @staticmethod
    def _resolve_base_model(from_adapter: str | None, given: str | None, where: object) -> str | None:
        if given is not None and from_adapter and given != from_adapter:
            raise BaseModelMismatchError(
                f"{where}: the adapter says its base model is {from_adapter!r} but base_model={given!r} was given."
            )
        return given if given is not None else (from_adapter or None)


    # -- reading cards ----------------------------------------------------------------------------
    def get(self, id: str) -> Card:  # noqa: A002
        """The card of adapter ``id``; :class:`UnknownNameError` if there is none."""
        cr = self._cat.card(id) if isinstance(id, str) else None
        if cr is None:
            raise self._unknown(id)
        return _card(cr)

    def _unknown(self, id: object) -> UnknownNameError:  # noqa: A002
        ids = self._cat.some_ids(21)
        more = ", ..." if len(ids) > 20 else ""
        return UnknownNameError(f"No adapter with id {id!r} in the bank; it has {ids[:20]}{more}.")

    def list(
        self, *, base_model: str | None = None, tags: Sequence[str] | None = None,
        space: PrototypeSpace | str | None = None,
    ) -> builtins.list[Card]:
        """Cards sorted by id, optionally only those of ``base_model``, carrying all ``tags``, or having a
        prototype in ``space``.

        >>> import tempfile
        >>> Bank.init(tempfile.mkdtemp()).list(base_model="x' OR 1=1 --")
        []
        """
        want = set(_check_tags(tags)) if tags else set()
        cards = [_card(cr) for cr in self._cat.cards(
            base_model=base_model, space_key=None if space is None else
            space.key if isinstance(space, PrototypeSpace) else str(space))]
        return [cd for cd in cards if want <= set(cd.tags)]

    def remove(self, id: str) -> None:  # noqa: A002
        """Delete adapter ``id`` (card, files, prototypes) and the blobs no other adapter uses."""
        if not self._cat.remove(id):
            raise self._unknown(id)
        log.info("removed %s", id)
        self._delete_unreferenced()

    def _delete_unreferenced(self) -> int:
        """Delete blobs no file row points at, under the write lock (so no add can be committing them)."""
        def delete_unused(used: set[str]) -> int:
            return sum(1 for sha in builtins.list(self._blobs.iter_blobs()) if sha not in used and self._blobs.delete(sha))

        return self._cat.collect_garbage(delete_unused)

    # -- adapters out -----------------------------------------------------------------------------
    def _copy_files(self, card: Card, dst: Path) -> None:
        for rel, sha in card.files.items():
            self._blobs.copy_verified(sha, dst / rel, what=f"adapter {card.id!r} (file {rel!r})")

    def load_adapter(self, id: str) -> LoraAdapter:  # noqa: A002
        """Read adapter ``id`` from its blobs (every byte re-hashed: :class:`IntegrityError` on damage)."""
        from adapterbank import formats

        card = self.get(id)
        with tempfile.TemporaryDirectory(prefix="adapterbank-load-") as tmp:
            root = Path(tmp)
            with writing(root, what=f"a temporary copy of adapter {id!r} to", nothing="the adapter was not loaded",
                         hint="(TMPDIR chooses the temp folder.)"):
                self._copy_files(card, root)
            target = root
            if card.extra.get("layout") == "file" and len(card.files) >= 1:
                target = root / self._main_file(card)
            adapter = formats.read_adapter(target, format=card.format)
        if adapter.base_model is None:
            adapter.base_model = card.base_model
        adapter.metadata.setdefault("bank_id", card.id)
        return adapter

    @staticmethod
    def _main_file(card: Card) -> str:
        names = [n for n in card.files if n.endswith(".safetensors")] or sorted(card.files)
        return sorted(names)[0]

    def export(self, id: str, out: str | Path, *, format: str | None = None,  # noqa: A002
               overwrite: bool = False) -> Path:
        """Write adapter ``id`` to ``out``. ``format=None`` (or the stored format) copies the original
        files bit for bit (hash-checked); another format converts through :func:`formats.write_adapter`.

        A folder adapter is written into the folder ``out``; a single-file adapter is written to ``out``
        if it ends in ``.safetensors``, else into the folder ``out`` under its original name. Returns the
        path to hand to :func:`adapterbank.formats.read_adapter`.

        All or nothing (a folder is written under a temp name and renamed into place; a file likewise).
        An existing ``out`` (a file, or a non-empty folder) raises :class:`OutputExistsError` unless
        ``overwrite=True``; a failed write raises :class:`~adapterbank.errors.OutputWriteError`.
        """
        from adapterbank import formats

        card = self.get(id)
        out = Path(out)
        fmt = None if format is None else formats.get_format(format)  # unknown: UnknownNameError listing the valid ones
        same = format is None or format == card.format
        single = card.extra.get("layout") == "file" and len(card.files) == 1
        if out.suffix == ".safetensors" and (single if same else fmt.single_file):
            check_output(out, overwrite=overwrite, kind="file")
            with writing(out):
                if same:
                    (rel, sha), = card.files.items()
                    with tempfile.TemporaryDirectory(prefix="adapterbank-export-") as tmp:
                        self._blobs.copy_verified(sha, Path(tmp) / "f", what=f"adapter {card.id!r} (file {rel!r})")
                        atomic_write(out, lambda fh: fh.write((Path(tmp) / "f").read_bytes()))
                else:
                    formats.write_adapter(self.load_adapter(id), out, format=format, base_model=card.base_model)
            log.info("exported %s to %s", id, out)
            return out
        adapter = None if same else self.load_adapter(id)
        with atomic_dir(out, overwrite=overwrite, what="the export") as tmp:
            if adapter is None:
                self._copy_files(card, tmp)
                written = [tmp / self._main_file(card)] if card.extra.get("layout") == "file" else []
            else:
                written = formats.write_adapter(adapter, tmp, format=format, base_model=card.base_model)
                # a single file in a folder its reader does not recognise (kohya): return the file
                if not (len(written) == 1 and Path(written[0]).suffix == ".safetensors" and fmt.single_file
                        and not fmt.detect(tmp)):
                    written = []
        log.info("exported %s%s to %s", id, "" if same else f" as {format}", out)
        return out / Path(written[0]).relative_to(tmp) if written else out

    # -- prototypes -------------------------------------------------------------------------------
    def set_prototype(self, id: str, prototype: Prototype) -> None:  # noqa: A002
        """Attach ``prototype`` to adapter ``id`` (replacing its prototype in the same space)."""
        if not isinstance(prototype, Prototype):
            raise FormatError(f"set_prototype needs a Prototype. Got {type(prototype).__name__} instead.")
        if not self._cat.set_prototype(id, prototype):
            raise self._unknown(id)

    def get_prototype(self, id: str, space: PrototypeSpace | str | None = None) -> Prototype:  # noqa: A002
        """The prototype of ``id`` in ``space`` (``None``: its only prototype)."""
        key = space.key if isinstance(space, PrototypeSpace) else space
        protos = self._cat.prototypes(id)
        if not protos and id not in self:
            raise self._unknown(id)
        if key is not None:
            protos = [p for p in protos if p.space.key == key]
        if not protos:
            raise UnknownNameError(f"Adapter {id!r} has no prototype" + (f" in space {key!r}." if key else "."))
        if len(protos) > 1:
            raise PrototypeSpaceError(
                f"Adapter {id!r} has prototypes in several spaces {[p.space.key for p in protos]}; pass space=."
            )
        return protos[0]

    # -- settings ---------------------------------------------------------------------------------
    @staticmethod
    def _check_setting_key(key: object) -> str:
        if not isinstance(key, str) or not key.strip() or len(key) > 1000:
            raise ParameterError(f"The 'key' parameter of Bank.set_setting/get_setting must be a non-empty string of "
                                 f"at most 1000 characters (e.g. 'compose.auto'). Got {key!r} instead.")
        return key

    def set_setting(self, key: str, value: Any) -> None:
        """Store the JSON-able ``value`` under ``key`` in the catalog's ``settings`` table (``None`` deletes it).

        One write transaction that bumps :attr:`version`. ``adapterbank tune`` stores the setting
        ``compose(strategy="auto")`` uses under ``"compose.auto"``.

        >>> import tempfile
        >>> bank = Bank.init(tempfile.mkdtemp())
        >>> bank.set_setting("compose.auto", {"strategy": "sim", "k": 3})
        >>> bank.get_setting("compose.auto"), bank.get_setting("missing", "none")
        ({'strategy': 'sim', 'k': 3}, 'none')
        """
        key = self._check_setting_key(key)
        try:
            text = None if value is None else json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise FormatError(f"Bank.set_setting({key!r}, ...): the value must be JSON (dicts, lists, strings, finite "
                              f"numbers, booleans, None). Got {type(value).__name__}: {e}.") from None
        self._cat.set_setting(key, text)

    def get_setting(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key`` by :meth:`set_setting`, or ``default``."""
        text = self._cat.get_setting(self._check_setting_key(key))
        return default if text is None else json.loads(text)

    def remember_encoder(self, space_key: str, spec: str) -> None:
        """Record that the prototypes of ``space_key`` are made by the encoder ``spec`` (what ``--encoder`` was),
        so later commands default to it. One setting per space (``encoder:<space key>``) in the catalog, so
        concurrent writers of different spaces never lose each other's record and the server backend keeps it.

        >>> import tempfile
        >>> bank = Bank.init(tempfile.mkdtemp())
        >>> bank.remember_encoder("minilm@r1|mean|l2|384", "default")
        >>> bank.encoders()
        {'minilm@r1|mean|l2|384': 'default'}
        """
        if not isinstance(spec, str) or not spec:
            raise ParameterError(f"remember_encoder: the encoder spec must be a non-empty string. Got {spec!r}.")
        if self.encoders().get(space_key) != spec:
            self.set_setting(ENCODER_SETTING + space_key, spec)

    def encoders(self) -> dict[str, str]:
        """space key -> encoder spec, as recorded by :meth:`remember_encoder`. Banks written before this was kept in
        the catalog have it in ``<bank>/encoders.json`` (written by the CLI); that file is still read, the catalog
        wins."""
        out: dict[str, str] = {}
        legacy = Path(self.root) / LEGACY_ENCODERS_FILE if isinstance(self.root, Path) else None
        if legacy is not None and legacy.is_file():
            try:
                data = json.loads(legacy.read_text())
            except (OSError, ValueError) as e:
                raise BankError(f"{legacy}: cannot read the recorded encoders ({e}); delete the file and pass "
                                f"--encoder.") from None
            out.update({str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {})
        out.update({k[len(ENCODER_SETTING):]: json.loads(v) for k, v in self._cat.settings(ENCODER_SETTING).items()})
        return dict(sorted(out.items()))

    def spaces(self) -> builtins.list[PrototypeSpace]:
        """The prototype spaces present in the bank, sorted by key."""
        return builtins.list(self._space_map().values())

    def _space_map(self) -> dict[str, PrototypeSpace]:
        """space key -> space, cached per catalog version (a search must not scan the prototypes table)."""
        cached = self._spaces_cache
        if cached is not None and cached[0] == self._cat.version():  # the hot path: one tiny SELECT
            return cached[1]
        version = self._cat.version()
        out = self._cat.spaces()  # a write in between only makes the next call reload
        self._spaces_cache = (version, out)
        return out

    # -- search -----------------------------------------------------------------------------------
    def _resolve_space(self, query: Prototype | np.ndarray, space: PrototypeSpace | str | None) -> str | None:
        spaces = self._space_map()
        if isinstance(query, Prototype):
            if space is not None:
                key = space.key if isinstance(space, PrototypeSpace) else str(space)
                if key != query.space.key:
                    raise PrototypeSpaceError(
                        f"The query prototype is in space {query.space.key!r} but space={key!r} was asked for."
                    )
            return query.space.key if query.space.key in spaces else None
        if space is None:
            if len(spaces) > 1:
                raise PrototypeSpaceError(
                    f"The bank holds prototypes in {len(spaces)} spaces {sorted(spaces)}; pass space= with a vector query."
                )
            return next(iter(spaces), None)
        key = space.key if isinstance(space, PrototypeSpace) else str(space)
        if key not in spaces:
            if isinstance(space, PrototypeSpace):
                return None
            raise UnknownNameError(f"No prototypes in space {key!r}; the bank has {sorted(spaces)}.")
        return key

    def index(self, space: PrototypeSpace | str) -> Index:
        """The (cached) search index of one prototype space, rebuilt if the catalog changed since."""
        key = space.key if isinstance(space, PrototypeSpace) else str(space)
        cached = self._indexes.get(key)
        if cached is not None and cached[0] == self._cat.version():  # the hot path: one tiny SELECT
            return cached[1]
        if isinstance(self.root, Path) and self.index_factory is NumpyIndex:
            # embedded: the index persisted under <bank>/index, memory-mapped, patched from the change log
            from adapterbank.bank.persisted import INDEX_DIR, load_index

            idx = load_index(self.root / INDEX_DIR, key, self._cat, self.index_kind,
                             current=None if cached is None else cached[1])
            self._indexes[key] = (int(idx.catalog_version), idx)
            return idx
        m = self._cat.space_matrix(key)
        idx = self.index_factory()
        idx.build(m.ids, m.vectors, m.attrs)
        self._indexes[key] = (m.version, idx)
        log.debug("built index for space %s: %d rows (catalog version %d)", key, len(m.ids), m.version)
        return idx

    def search(
        self,
        query: Prototype | np.ndarray,
        k: int = 5,
        *,
        space: PrototypeSpace | str | None = None,
        base_model: str | None = None,
        tags: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> builtins.list[Hit]:
        """The ``k`` adapters whose prototypes are nearest to ``query`` (Eq. 2, squared L2, ascending,
        ties broken by id), optionally only of ``base_model``, with all ``tags``, not in ``exclude``.

        A :class:`Prototype` query searches its own space (``space=`` must agree); a vector query needs
        ``space=`` when the bank has several spaces. Fewer than ``k`` hits come back when fewer match, with a
        :class:`~adapterbank.errors.PoolSmallerThanKWarning`.
        """
        k = check_k(k, "search")
        if isinstance(query, Prototype):
            vec = query.vector
        else:
            vec = np.asarray(query, dtype=np.float32)
            if vec.ndim != 1:
                raise ShapeMismatchError(f"A search query must be a 1-D vector. Got shape {vec.shape} instead.")
            if not np.isfinite(vec).all():
                raise NonFiniteError("The search query contains NaN or Inf.")
        excl = {str(e) for e in exclude}
        key = self._resolve_space(query, space)
        if key is None:
            return []
        where: dict[str, Any] = {}
        if base_model is not None:
            where["base_model"] = base_model
        if tags:
            where["tags"] = _check_tags(tags)
        hits = self._cat.search(key, vec, min(k + len(excl), MAX_K), where or None)  # the engine's own search
        if hits is None:
            idx = self.index(key)
            if idx.dim is not None and vec.shape[0] != idx.dim:
                raise ShapeMismatchError(f"The query has dim {vec.shape[0]} but space {key!r} has dim {idx.dim}.")
            hits = idx.search(vec, min(k + len(excl), max(len(idx), 1), MAX_K), where=where or None)
        out = [h for h in hits if h.id not in excl][:k]
        if len(out) < k:
            warnings.warn(f"k={k} but only {len(out)} adapter(s) in space {key!r} match the filters; used {len(out)}.",
                          PoolSmallerThanKWarning, stacklevel=2)
        return out

    # -- integrity --------------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Re-hash every blob, check every row points at an intact blob, list orphans and temp leftovers."""
        problems = self._cat.integrity_problems()
        rows = self._cat.file_rows()
        by_sha: dict[str, builtins.list[str]] = {}
        sizes: dict[str, int] = {}
        for aid, name, sha, size in rows:
            by_sha.setdefault(sha, []).append(f"{aid}/{name}")
            sizes[sha] = size
        for sha, users in sorted(by_sha.items()):
            damage = self._blobs.check(sha)
            if damage is None and self._blobs.size(sha) != sizes[sha]:
                damage = f"blob {sha} has the wrong size"
            if damage:
                problems.append(f"{damage}; used by {users}")
        orphans = [self._blobs.name(s) for s in self._blobs.iter_blobs() if s not in by_sha]
        orphans += [str(p) for p in self._blobs.stale_files()]
        for p in problems:
            log.warning("verify %s: %s", self.root, p)
        return VerifyReport(ok=not problems, checked=len(by_sha), problems=problems, orphans=orphans)

    def gc(self) -> int:
        """Delete orphan blobs and crashed writers' temp files; return how many were removed."""
        n = self._delete_unreferenced()
        for p in self._blobs.stale_files():
            self._blobs.remove_stale(p)
            n += 1
        if n:
            log.info("gc %s: removed %d orphan blobs / temp files", self.root, n)
        return n
