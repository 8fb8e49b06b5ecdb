"""Bulk ingest: many adapters into a bank in one run (:meth:`Bank.add_many`, ``adapterbank add BANK SOURCE...``).

Every item goes through the code path of :meth:`Bank.add` (``Bank._request`` checks the arguments,
``Bank._prepare`` stages, hashes and parses the files, ``Bank._commit`` places the blobs and commits).
Per batch of ``batch_size`` items:

| step | where | what |
|---|---|---|
| 1 | main thread | check each item's arguments; look up which of the batch's ids the bank has (one query) |
| 2 | ``workers`` threads | stage (copy + sha256, no fsync yet) and parse each adapter; for an id the bank has, only hash its files first |
| 3 | main thread | meanwhile: encode the batch's new descriptions in one ``encoder.encode(texts)``; then ``samples`` |
| 4 | main thread | a durability barrier for the batch's staged files (``syncfs``, else an fsync per file), place the blobs, a barrier for their folders |
| 5 | main thread | one catalog transaction for the batch (per item only if a concurrent writer took one of its ids) |

The workers stage batch ``b`` (and ``b + 1``) while the main thread encodes batch ``b``, then commits it. Threads
pay off although parsing holds the GIL: file I/O and hashlib release it. One barrier per batch instead of one
fsync per file (2.3 ms each here) is what makes a bulk ingest several times faster than a loop of ``Bank.add``;
a server bank's blobs are uploaded by the workers (each upload re-hashes its file, so its staging needs no fsync).

Resume: an id the bank already has with the same files (names and sha256) is *already present* and skipped, so
a rerun after a crash or ``kill -9`` adds exactly what is missing; a crash leaves at most orphan blobs of the
uncommitted batch (``Bank.verify`` lists them, ``Bank.gc`` deletes them). An id the bank has with other files is
refused unless ``replace=True`` (an unchanged adapter is never rewritten, even then).
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapterbank._io import writing
from adapterbank._validation import check_int, is_lora_adapter
from adapterbank._versions import versions
from adapterbank.bank.backend import Entry
from adapterbank.bank.blobs import sha256_file
from adapterbank.bank.catalog import REPLACE_HINT
from adapterbank.errors import (
    AdapterbankError,
    ConflictError,
    EncoderError,
    FormatError,
    NonFiniteError,
    OutputWriteError,
    ParameterError,
    ShapeMismatchError,
)
from adapterbank.prototypes.space import Prototype, PrototypeSpace, check_same_space

if TYPE_CHECKING:
    from adapterbank.bank.blobs import Staging
    from adapterbank.bank.store import Bank, _AddRequest
    from adapterbank.lora import LoraAdapter

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_WORKERS", "MANIFEST_KEYS", "IngestItem", "IngestReport", "Refusal", "describe_many",
           "expand_sources", "ingest", "read_manifest"]

#: Worker threads by default: staging waits on fsync, so more threads than cores pay off (bench/bench_ingest.py).
DEFAULT_WORKERS = min(16, 4 * (os.cpu_count() or 1))
#: The keys a ``--manifest`` row may have (``base`` is the base model id, as ``--base``).
MANIFEST_KEYS = ("source", "id", "description", "samples", "tags", "base", "license", "source_url", "format")
_Staged = dict[str, tuple[Path, str, int]]


@dataclass(frozen=True)
class IngestItem:
    """One adapter to add: the arguments of :meth:`Bank.add`, plus ``samples`` (a prototype is computed from
    them with the run's encoder) and ``description`` (encoded into a prototype when the run has an encoder and
    the item has neither ``prototype`` nor ``samples``; always stored on the card).

    >>> IngestItem("loras/style.safetensors", description="watercolour style").id is None
    True
    """

    source: str | Path | LoraAdapter
    id: str | None = None
    description: str | None = None
    samples: Any = None
    tags: Sequence[str] = ()
    base_model: str | None = None
    license: str | None = None
    source_url: str | None = None
    format: str | None = None
    prototype: Prototype | None = None


@dataclass(frozen=True)
class Refusal:
    """An item that was not added: its source, its id (if it got one), the error class and its message."""

    source: str
    id: str | None
    error: str
    reason: str


@dataclass
class IngestReport:
    """What :meth:`Bank.add_many` did. ``added`` includes the ids in ``replaced``; ``encoded``: prototypes made
    by the run's encoder (descriptions and samples).

    >>> r = IngestReport(added=["a", "b"], present=["c"], elapsed_s=2.0)
    >>> r.ok, r.total, r.rate, r.summary()
    (True, 3, 1.5, 'added 2, already present 1, refused 0 in 2.0 s (1.5 adapters/s)')
    """

    added: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    encoded: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.refused

    @property
    def total(self) -> int:
        return len(self.added) + len(self.present) + len(self.refused)

    @property
    def rate(self) -> float:
        """Items handled per second (added, already present or refused)."""
        return self.total / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        return (f"added {len(self.added)}, already present {len(self.present)}, refused {len(self.refused)} in "
                f"{self.elapsed_s:.1f} s ({self.rate:.1f} adapters/s)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ok=self.ok, total=self.total, rate=self.rate)
        return d


# -- items in, one result per item ------------------------------------------------------------------------

@dataclass
class _Result:
    """The outcome of preparing one item (in a worker thread)."""

    kind: str  # "add", "present" or "refused"
    item: IngestItem
    req: _AddRequest | None = None
    entry: Entry | None = None
    staged: _Staged | None = None
    refusal: Refusal | None = None


@dataclass
class _Batch:
    st: Staging
    items: list[IngestItem]
    futures: list[cf.Future[_Result] | _Result] = field(default_factory=list)
    placed: set[str] = field(default_factory=set)  # blobs a worker of this batch placed (or is placing)
    to_encode: list[int] = field(default_factory=list)  # items whose description is encoded while they are staged
    lock: threading.Lock = field(default_factory=threading.Lock)


def _source_name(source: object, aid: str | None = None) -> str:
    if is_lora_adapter(source):
        return f"LoraAdapter {aid!r}" if aid is not None else "a LoraAdapter"
    return os.fspath(source)  # type: ignore[call-overload, no-any-return]


def _refusal(item: IngestItem, aid: str | None, e: BaseException) -> Refusal:
    """The refusal of ``item`` for error ``e``; its reason always names the source."""
    name = _source_name(item.source, aid)
    if isinstance(e, OSError) and not isinstance(e, AdapterbankError) and e.strerror and e.filename is not None:
        msg = f"{e.filename}: {e.strerror}"  # an operating-system error in its own words, as the CLI prints it
    else:
        msg = str(e) or type(e).__name__
    if name not in msg and not (is_lora_adapter(item.source) and aid is not None and repr(aid) in msg):
        msg = f"{name}: {msg}"
    return Refusal(name, aid, type(e).__name__, msg)


def _batches(items: Iterable[IngestItem], size: int, key: Callable[[IngestItem], str | None],
             ) -> Iterator[list[IngestItem]]:
    """``items`` in lists of at most ``size``; an id seen earlier in the current list starts the next one, so
    one transaction never holds an id twice (the later item then meets the earlier one as an existing id)."""
    batch: list[IngestItem] = []
    ids: set[str] = set()
    for it in items:
        k = key(it)
        if len(batch) >= size or (k is not None and k in ids):
            yield batch
            batch, ids = [], set()
        batch.append(it)
        if k is not None:
            ids.add(k)
    if batch:
        yield batch


def _item_id(it: IngestItem) -> str | None:
    """The id an item will get (for batching only; the real check is Bank._request's)."""
    if not isinstance(it, IngestItem):
        return None  # refused by the batch
    if it.id is not None:
        return it.id
    if isinstance(it.source, (str, Path)):
        from adapterbank.bank.store import _slug

        try:
            return _slug(Path(it.source).resolve())
        except (OSError, RuntimeError):
            return None
    return None


def _same_files(req: _AddRequest, files: Mapping[str, str]) -> bool | None:
    """Whether the adapter file(s) of ``req`` are exactly ``files`` (name -> sha256), by hashing them in place
    (no copy, no parse); ``None`` when that cannot be told this way (a LoraAdapter, a pickle, an error)."""
    from adapterbank import formats
    from adapterbank.bank.store import _check_rel_name

    src = req.src_path
    if src is None:
        return None
    try:
        fmt = req.format or formats.detect_format(src)
        found = {_check_rel_name(rel, str(src)): sha256_file(p)[0] for rel, p in formats.adapter_files(src, fmt).items()}
    except (AdapterbankError, OSError):
        return None  # _prepare will say what is wrong
    return found == dict(files)


def _prepare_one(bank: Bank, b: _Batch, sub: str, item: IngestItem, req: _AddRequest,
                 existing: Mapping[str, str] | None, existing_source: str | None, replace: bool,
                 versions_json: str) -> _Result:
    """Stage, parse and place one item (a worker thread); decide add / already present / refused."""

    def conflict() -> _Result:
        e = ConflictError(f"The bank already has an adapter with id {req.id!r} with other files (from "
                          f"{existing_source}); {REPLACE_HINT}.")
        return _Result("refused", item, req, refusal=_refusal(item, req.id, e))

    if existing is not None:
        same = _same_files(req, existing)
        if same:
            return _Result("present", item, req)
        if same is False and not replace:
            return conflict()
    try:
        with writing(bank._local_dir, what="to the bank", nothing="nothing more was added", hide=bank._staging_dir):
            entry, staged = bank._prepare(b.st, req, sub, versions_json)
            if (existing is None or replace) and b.st.sync_mode != "batch":
                _place(bank, b, staged)  # else after the batch's sync barrier (finish)
    except OutputWriteError:
        raise  # the bank's disk: the run stops (what is committed stays; rerun to resume)
    except (AdapterbankError, OSError) as e:
        return _Result("refused", item, req, refusal=_refusal(item, req.id, e))
    if existing is not None:
        if {rel: sha for rel, sha, _ in entry.files} == dict(existing):
            return _Result("present", item, req)
        if not replace:
            return conflict()
    return _Result("add", item, req, entry, staged)


def _place(bank: Bank, b: _Batch, staged: _Staged) -> set[Path]:
    """Give the staged blobs their final names, each sha once per batch (a worker thread, or the main thread after
    the batch's sync barrier; Bank._commit re-checks them under the writer lock). A batch-synced staging places
    without an fsync per blob folder: it returns the folders, which the caller syncs in one barrier."""
    with b.lock:
        mine = [(p, sha, size) for p, sha, size in staged.values() if sha not in b.placed]
        b.placed.update(sha for _, sha, _ in mine)
    if b.st.sync_mode == "batch":
        return {bank._blobs.place(p, sha, b.st.token, durable=False) for p, sha, _ in mine}
    for p, sha, size in mine:
        bank._blobs.put(p, sha, size, b.st.token)
    return set()


# -- descriptions, encoded in batches ---------------------------------------------------------------------

def _description_label(text: str) -> str:
    """The ``source`` that :func:`adapterbank.prototypes.describe` gives a description's prototype."""
    return f"description: {text if len(text) <= 120 else text[:117] + '...'}"


def describe_many(encoder: Any, texts: Sequence[str], *, space: PrototypeSpace | None = None,
                  ) -> list[Prototype | EncoderError]:
    """:func:`adapterbank.prototypes.describe` of every text with ONE ``encoder.encode(texts)`` call: each
    prototype is built from its row exactly as ``describe`` builds it from its one-text batch (float64 sum of one
    row, divided by 1, stored float32; same source label and ``extra``). A text ``describe`` would refuse (empty,
    not a string), or whose row is not finite, gets its error in its place instead.

    >>> from adapterbank.prototypes import describe
    >>> from adapterbank.prototypes.encoders import CallableEncoder
    >>> enc = CallableEncoder(lambda xs: [[float(len(x.split())), 1.0] for x in xs], name="words")
    >>> ps = describe_many(enc, ["legal contract summaries", ""])
    >>> one = describe(enc, "legal contract summaries")
    >>> ps[0].vector.tobytes() == one.vector.tobytes(), ps[0].source == one.source, type(ps[1]).__name__
    (True, True, 'EncoderError')
    """
    from adapterbank.prototypes.encoders import is_encoder, load_encoder

    enc = encoder if is_encoder(encoder) else load_encoder(encoder)
    out: list[Prototype | EncoderError] = []
    ok = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    for i, t in enumerate(texts):
        out.append(EncoderError(f"describe needs a non-empty text description. Got {t!r} instead."))
    if not ok:
        return out
    feats = np.asarray(enc.encode([texts[i] for i in ok]))  # (b, d) float32
    if feats.ndim != 2 or feats.shape[0] != len(ok):
        raise EncoderError(f"The encoder returned shape {feats.shape} for {len(ok)} descriptions.")
    sp = enc.space
    if space is not None:
        check_same_space(sp, space, "an encoder and the expected space")
    if sp.dim != feats.shape[1]:
        raise ShapeMismatchError(f"The encoder's space says dim {sp.dim} but it returned dim {feats.shape[1]}.")
    for row, i in zip(feats, ok, strict=True):
        label = _description_label(texts[i])
        if not np.isfinite(row).all():
            out[i] = NonFiniteError(f"The encoder returned NaN or Inf for sample 0 of {label}.")
            continue
        total = np.zeros(feats.shape[1], dtype=np.float64)  # as compute_prototype: Σ E(x) in float64, n = 1
        total += row[None, :].sum(axis=0, dtype=np.float64)
        p = Prototype(total / 1, sp, n_samples=1, source=label)
        p.extra["description"] = texts[i]
        out[i] = p
    return out


# -- the run ----------------------------------------------------------------------------------------------

def ingest(bank: Bank, items: Iterable[IngestItem], *, replace: bool = False, batch_size: int = 256,
           workers: int | None = None, encoder: Any = None, progress: Callable[[int], None] | None = None,
           allow_pickle: bool = False) -> IngestReport:
    """Add ``items`` to ``bank`` (the engine of :meth:`Bank.add_many`; see the module docstring).

    Args:
        items: :class:`IngestItem` rows (any iterable; read one batch ahead).
        replace: replace an id the bank has with other files (else that item is refused).
        batch_size: items per catalog transaction and per ``encoder.encode`` call.
        workers: staging threads (default :data:`DEFAULT_WORKERS`).
        encoder: encodes descriptions (and ``samples``) into prototypes; ``None``: descriptions are only stored,
            and an item with ``samples`` is refused.
        progress: called with the number of items finished, after every batch.
        allow_pickle: convert legacy pickle files (see :meth:`Bank.add`).

    Raises:
        OutputWriteError: the bank's storage failed (disk full, ...); the batches committed before stay.
        ParameterError: a bad ``batch_size`` or ``workers``.

    >>> import tempfile, torch
    >>> from adapterbank.bank import Bank
    >>> from adapterbank.lora import LoraAdapter, LoraModule
    >>> bank = Bank.init(tempfile.mkdtemp())
    >>> ad = LoraAdapter({"fc": LoraModule(torch.ones(1, 3), torch.ones(2, 1), 1.0, (2, 3))})
    >>> ingest(bank, [IngestItem(ad, id=f"a{i}") for i in range(5)], batch_size=2).added
    ['a0', 'a1', 'a2', 'a3', 'a4']
    """

    batch_size = check_int(batch_size, "batch_size", "add_many", low=1)
    workers = check_int(workers, "workers", "add_many", low=1, optional=True) or DEFAULT_WORKERS
    if encoder is not None:
        from adapterbank.prototypes.encoders import is_encoder, load_encoder

        encoder = encoder if is_encoder(encoder) else load_encoder(encoder)
    t0 = time.perf_counter()
    report = IngestReport()
    versions_json = json.dumps(versions(), sort_keys=True)
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapterbank-ingest")

    def start(items_b: list[IngestItem]) -> _Batch:
        """Check the items, look up their ids (one query for the batch), and hand the staging to the workers."""
        b = _Batch(bank._blobs.staging(bulk=True), items_b)
        try:
            checked: list[_AddRequest | _Result] = []
            for it in items_b:
                if not isinstance(it, IngestItem):
                    raise ParameterError(f"add_many takes IngestItem rows. Got {type(it).__name__} instead.")
                try:
                    req = bank._request(it.source, id=it.id, prototype=it.prototype, description=it.description,
                                        tags=it.tags, license=it.license, source_url=it.source_url,
                                        base_model=it.base_model, format=it.format, allow_pickle=allow_pickle)
                    if it.samples is not None and encoder is None and it.prototype is None:
                        raise ParameterError("samples were given but the run has no encoder to compute their "
                                             "prototype; pass encoder=.")
                    checked.append(req)
                except (AdapterbankError, OSError) as e:
                    checked.append(_Result("refused", it, refusal=_refusal(it, it.id, e)))
            wanted = [c.id for c in checked if not isinstance(c, _Result)]
            found = {cr.row["id"]: cr for cr in bank._cat.cards(ids=wanted)} if wanted else {}
            for k, (it, req) in enumerate(zip(items_b, checked, strict=True)):
                if isinstance(req, _Result):
                    b.futures.append(req)
                    continue
                cr = found.get(req.id)
                if (encoder is not None and it.description is not None and it.prototype is None
                        and it.samples is None and (cr is None or replace)):
                    b.to_encode.append(k)
                b.futures.append(pool.submit(_prepare_one, bank, b, str(k), it, req,
                                             None if cr is None else cr.files, None if cr is None else cr.row["source"],
                                             replace, versions_json))
        except BaseException:
            _drop(b)
            raise
        return b

    def finish(b: _Batch) -> None:
        """Wait for the workers, make the prototypes, commit the batch, record the outcomes."""
        try:
            # the descriptions are encoded while the workers stage their adapters (an item refused by staging
            # wastes its encoding; an already present one is not encoded: its id was in the bank at the lookup)
            early = dict(zip(b.to_encode, describe_many(encoder, [b.items[k].description for k in b.to_encode]),
                             strict=True)) if b.to_encode else {}
            results = [f.result() if isinstance(f, cf.Future) else f for f in b.futures]
            _make_prototypes([(k, r) for k, r in enumerate(results) if r.kind == "add"], encoder, report, early)
            to_add = [r for r in results if r.kind == "add"]
            with writing(bank._local_dir, what="to the bank", nothing="nothing more was added",
                         hide=bank._staging_dir):
                if b.st.sync_mode == "batch" and to_add:
                    b.st.sync()  # one barrier for the batch's bytes: only durable content gets a final name
                    folders = set().union(*(_place(bank, b, r.staged) for r in to_add))  # type: ignore[arg-type]
                    b.st.sync(folders)  # and one for the names, before the catalog refers to them
                _commit_batch(bank, b.st, to_add, replace, report)
        except BaseException:
            _drop(b)
            raise
        pool.submit(b.st.close)  # deleting the staged copies (hard links of the blobs) costs more than it seems
        nonlocal stray
        stray = stray or any(r.kind == "refused" and r.staged is not None for r in results)
        for r in results:
            if r.kind == "present":
                report.present.append(r.req.id)  # type: ignore[union-attr]
            elif r.kind == "refused":
                report.refused.append(r.refusal)  # type: ignore[arg-type]
                log.info("refused %s", r.refusal.reason)  # type: ignore[union-attr]
        if progress is not None:
            progress(len(b.items))

    open_batches: list[_Batch] = []
    stray = False  # blobs placed for items refused afterwards (their prototype failed, a concurrent conflict)
    try:
        for items_b in _batches(items, batch_size, _item_id):
            open_batches.append(start(items_b))  # the workers stage it while the previous one is committed
            if len(open_batches) > 1:
                finish(open_batches.pop(0))
        while open_batches:
            finish(open_batches.pop(0))
    finally:
        for b in open_batches:  # an error stopped the run: drop what was staged and not committed
            _drop(b)
        pool.shutdown(wait=True)
    if report.replaced or stray:
        bank._delete_unreferenced()
    report.elapsed_s = time.perf_counter() - t0
    log.info("add_many %s: %s", bank.root, report.summary())
    return report


def _drop(b: _Batch) -> None:
    """Cancel a batch's work that has not started, wait for the rest, delete its staging folder."""
    futs = [f for f in b.futures if isinstance(f, cf.Future)]
    for f in futs:
        f.cancel()
    cf.wait(futs)
    b.st.close()


def _make_prototypes(to_add: list[tuple[int, _Result]], encoder: Any, report: IngestReport,
                     early: Mapping[int, Prototype | EncoderError]) -> None:
    """Give each item to add its prototype: its own, from its samples, or from its description (``early``: encoded
    already, by batch position; the others in one encode call). An item whose prototype fails is refused."""
    from adapterbank.prototypes import compute_prototype

    if encoder is None:
        return
    texts: list[tuple[_Result, str]] = []
    for k, r in to_add:
        it = r.item
        if it.prototype is not None:
            continue
        if k in early:
            p = early[k]
            if isinstance(p, Prototype):
                _attach(r, p, report)
            else:
                r.kind, r.refusal = "refused", _refusal(it, r.req.id if r.req else None, p)
            continue
        if it.samples is not None:
            try:
                p = compute_prototype(encoder, it.samples, description=it.description)
            except (AdapterbankError, OSError) as e:
                r.kind, r.refusal = "refused", _refusal(it, r.req.id if r.req else None, e)
                continue
            _attach(r, p, report)
        elif it.description is not None:
            texts.append((r, it.description))
    if texts:
        protos = describe_many(encoder, [t for _, t in texts])
        for (r, _), p in zip(texts, protos, strict=True):
            if isinstance(p, Prototype):
                _attach(r, p, report)
            else:
                r.kind, r.refusal = "refused", _refusal(r.item, r.req.id if r.req else None, p)


def _attach(r: _Result, p: Prototype, report: IngestReport) -> None:
    assert r.entry is not None
    r.entry = Entry(r.entry.row, r.entry.files, [p])
    report.encoded += 1


def _commit_batch(bank: Bank, st: Staging, to_add: list[_Result], replace: bool, report: IngestReport) -> None:
    """One transaction for the batch; if a concurrent writer took one of its ids since the lookup (ConflictError),
    one transaction per item, so only that item is refused (or found already present)."""
    if not to_add:
        return
    pairs = [(r.entry, r.staged) for r in to_add]
    try:
        replaced = bank._commit(st, pairs, replace=replace, placed=True)  # type: ignore[arg-type]
        done = list(zip(to_add, replaced, strict=True))
    except ConflictError:
        log.info("a concurrent writer added one of this batch's ids: committing its %d items one by one", len(to_add))
        done = []
        for r in to_add:
            try:
                rep, = bank._commit(st, [(r.entry, r.staged)], replace=replace, placed=True)  # type: ignore[list-item]
                done.append((r, rep))
            except ConflictError as e:
                cr = bank._cat.card(r.entry.id)  # type: ignore[union-attr]
                if cr is not None and dict(cr.files) == {rel: sha for rel, sha, _ in r.entry.files}:  # type: ignore[union-attr]
                    r.kind = "present"
                else:
                    r.kind, r.refusal = "refused", _refusal(r.item, r.entry.id, e)  # type: ignore[union-attr]
    for r, rep in done:
        report.added.append(r.entry.id)  # type: ignore[union-attr]
        if rep:
            report.replaced.append(r.entry.id)  # type: ignore[union-attr]


# -- sources: paths, folders, globs, manifests ------------------------------------------------------------

def _is_adapter_dir(d: Path) -> bool:
    """A folder some format recognises by its file names (PEFT's adapter_config.json, diffusers' weights, ...)."""
    from adapterbank.formats import FORMATS

    return any(f.detect(d) for f in FORMATS.values())


def _scan(d: Path) -> list[Path]:
    """The adapters under folder ``d``: folders a format recognises by name (not entered), and every other
    ``.safetensors`` file (kohya/diffusers single files). Hidden names and symlinked folders are skipped."""
    out: list[Path] = []
    for root, dirs, files in os.walk(d):
        r = Path(root)
        if r != d and _is_adapter_dir(r):
            out.append(r)
            dirs[:] = []
            continue
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [r / f for f in sorted(files) if f.endswith(".safetensors") and not f.startswith(".")]
    return out


def expand_sources(sources: Iterable[str | Path]) -> list[Path]:
    """The adapters named by ``sources``: a file or an adapter folder as is; another folder scanned for adapters
    (PEFT folders, ``.safetensors`` files); a glob pattern (``*``, ``?``, ``[``; ``**`` recurses) expanded, for
    shells that do not. A path that does not exist is kept (adding it reports it). Duplicates are dropped.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("a.safetensors", "sub/b.safetensors", "peft/adapter_config.json", "notes.txt"):
    ...     (d / name).parent.mkdir(parents=True, exist_ok=True); _ = (d / name).write_text("x")
    >>> [p.relative_to(d).as_posix() for p in expand_sources([d, d / "*.safetensors"])]
    ['a.safetensors', 'peft', 'sub/b.safetensors']
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for s in sources:
        p = Path(s).expanduser()
        if not p.exists() and glob.has_magic(str(p)):
            matches = [Path(m) for m in sorted(glob.glob(str(p), recursive=True))]
            paths = [q for m in matches for q in ([m] if m.is_file() or _is_adapter_dir(m) else _scan(m))]
            if not matches:
                paths = [p]
        elif p.is_dir() and not _is_adapter_dir(p):
            paths = _scan(p)
        else:
            paths = [p]
        for q in paths:
            key = q.resolve() if q.exists() else q
            if key not in seen:
                seen.add(key)
                out.append(q)
    return out


def _opt_str(row: Mapping[str, Any], key: str, where: str) -> str | None:
    v = row.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise FormatError(f"{where}: key {key!r} must be a non-empty string. Got {v!r} instead.")
    return v


def read_manifest(path: str | Path, *, defaults: Mapping[str, Any] | None = None) -> list[IngestItem]:
    """The items of a JSONL manifest, one adapter per line: ``{"source": ..., "id"?, "description"?,
    "samples"?, "tags"? (a list or "a,b"), "base"?, "license"?, "source_url"?, "format"?}``. Relative ``source``
    and ``samples`` paths are resolved against the manifest's folder; blank lines are skipped. ``defaults``
    (keys of :class:`IngestItem`) fill what a row leaves out (``tags`` are added to the row's).

    Raises:
        FormatError: a line that is not a JSON object of those keys with string values, naming the file and line.

    >>> import tempfile, pathlib
    >>> m = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
    >>> _ = m.write_text('{"source": "a.safetensors", "description": "pixel art", "tags": "x,y"}\\n')
    >>> it, = read_manifest(m)
    >>> it.source == m.parent / "a.safetensors", it.description, it.tags
    (True, 'pixel art', ['x', 'y'])
    >>> _ = m.write_text('{"source": "a.safetensors", "descripton": "typo"}\\n')
    >>> read_manifest(m)
    Traceback (most recent call last):
    ...
    adapterbank.errors.FormatError: ...m.jsonl, line 1: unknown key 'descripton'; a row has keys source, id, ...
    """
    path = Path(path)
    base = path.parent
    defaults = dict(defaults or {})
    out: list[IngestItem] = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            where = f"{path}, line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FormatError(f"{where}: not UTF-8 ({e}).") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise FormatError(f"{where}: not valid JSON ({e}).") from None
            if not isinstance(row, dict):
                raise FormatError(f"{where}: a row must be a JSON object with a 'source'. Got {type(row).__name__}.")
            unknown = sorted(set(row) - set(MANIFEST_KEYS))
            if unknown:
                raise FormatError(f"{where}: unknown key {unknown[0]!r}; a row has keys {', '.join(MANIFEST_KEYS)}.")
            source = _opt_str(row, "source", where)
            if source is None:
                raise FormatError(f"{where}: the row has no 'source' (the adapter's file or folder).")
            samples = _opt_str(row, "samples", where)
            tags = row.get("tags")
            if isinstance(tags, str):
                tags = [t.strip() for t in tags.split(",") if t.strip()]
            elif tags is None:
                tags = []
            elif not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
                raise FormatError(f"{where}: key 'tags' must be a list of strings or 'a,b'. Got {tags!r} instead.")
            tags = list(tags) + [t for t in defaults.get("tags", ()) if t not in tags]
            out.append(IngestItem(
                source=base / Path(source).expanduser(),
                id=_opt_str(row, "id", where),
                description=_opt_str(row, "description", where) or defaults.get("description"),
                samples=None if samples is None else base / Path(samples).expanduser(),
                tags=tags,
                base_model=_opt_str(row, "base", where) or defaults.get("base_model"),
                license=_opt_str(row, "license", where) or defaults.get("license"),
                source_url=_opt_str(row, "source_url", where) or defaults.get("source_url"),
                format=_opt_str(row, "format", where) or defaults.get("format"),
            ))
    return out
