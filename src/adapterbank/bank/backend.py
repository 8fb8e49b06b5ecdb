"""The storage interface of a bank: a catalog (cards, files, prototypes, settings) and a blob store.

:class:`~adapterbank.bank.store.Bank` holds all the logic users see (validation, staging and parsing of
adapters, ids, errors, search filters, export, verify, gc); it talks to storage only through the two
protocols below. Two implementations exist (docs/design.md §5):

| backend  | catalog                                          | blobs                                          |
|----------|--------------------------------------------------|------------------------------------------------|
| embedded | :class:`~adapterbank.bank.catalog.Catalog` (SQLite in ``<bank>/catalog.sqlite``) | :class:`~adapterbank.bank.blobs.BlobStore` (``<bank>/blobs``) |
| server   | :class:`~adapterbank.bank.pg.PgCatalog` (PostgreSQL + pgvector)  | :class:`~adapterbank.bank.remote_blobs.FsspecBlobStore` (any fsspec URL, e.g. ``s3://``) |

The contract both honour (tests/bank/test_backend_contract.py checks it on both):

* **One writer section at a time.** :meth:`CatalogBackend.commit`, :meth:`~CatalogBackend.remove`,
  :meth:`~CatalogBackend.set_prototype`, :meth:`~CatalogBackend.set_setting` and
  :meth:`~CatalogBackend.collect_garbage` each run in one transaction that holds the bank's writer lock
  (SQLite ``BEGIN IMMEDIATE``; PostgreSQL a transaction-level advisory lock); all but ``collect_garbage``
  (which changes no row) bump :meth:`version`.
  Nothing half-registered is ever visible to readers.
* **A card never points at a missing blob.** Bank uploads/places every blob *before* ``commit``, and
  ``commit`` calls ``under_lock()`` inside the writer section before it inserts (Bank re-checks its blobs
  there); ``collect_garbage`` deletes blobs only inside the writer section, so no commit can interleave.
* **Blobs hold only complete, hash-verified content** under their final name ``sha256``; reads re-hash.
* **Change log.** Every write that changes the prototypes of a space records (version, space, id) so an
  index persisted at catalog version v can be brought up to date with :meth:`~CatalogBackend.changes_since`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from adapterbank.bank.index import Hit
from adapterbank.prototypes.space import Prototype, PrototypeSpace

__all__ = ["CARD_COLUMNS", "Entry", "CardRow", "CatalogBackend", "BlobBackend", "SpaceMatrix"]

#: The columns of a card row, in order (the ``adapters`` table of both catalogs).
CARD_COLUMNS = ("id", "base_model", "format", "rank", "ranks", "targets", "source", "description", "license",
                "tags", "created", "versions", "extra")


@dataclass(frozen=True)
class Entry:
    """One adapter ready to be committed: its card row (``CARD_COLUMNS`` -> value; ``ranks``, ``targets``,
    ``tags``, ``versions`` and ``extra`` as JSON text), its files ``(name, sha256, size)`` and prototypes."""

    row: Mapping[str, Any]
    files: Sequence[tuple[str, str, int]]
    prototypes: Sequence[Prototype] = ()

    @property
    def id(self) -> str:  # noqa: A003
        return str(self.row["id"])


@dataclass(frozen=True)
class CardRow:
    """A card as stored: the row (``CARD_COLUMNS`` -> value, JSON fields as text), files name -> sha256,
    and the keys of the spaces it has prototypes in (sorted)."""

    row: Mapping[str, Any]
    files: Mapping[str, str]
    spaces: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class SpaceMatrix:
    """All prototypes of one space at one catalog version: ids (sorted), float32 (n, d), filter attributes."""

    version: int
    ids: list[str]
    vectors: np.ndarray
    attrs: list[dict[str, Any]]


@runtime_checkable
class CatalogBackend(Protocol):
    """Cards, file digests, prototypes and settings of a bank, with a version bumped by every write."""

    #: Where the catalog lives, for messages (a path or a URL without its password).
    location: str

    def close(self) -> None: ...

    def version(self) -> int:
        """The catalog version: increases with every committed write, by any process or machine."""
        ...

    def count(self) -> int: ...

    def has(self, id: str) -> bool: ...  # noqa: A002

    def some_ids(self, limit: int) -> list[str]:
        """The first ``limit`` ids in id order (for "the bank has [...]" messages)."""
        ...

    def card(self, id: str) -> CardRow | None:  # noqa: A002
        """One card, or ``None``."""
        ...

    def cards(self, *, base_model: str | None = None, space_key: str | None = None,
              ids: Sequence[str] | None = None) -> list[CardRow]:
        """Cards sorted by id, optionally only of ``base_model``, with a prototype in ``space_key``, or in ``ids``."""
        ...

    def commit(self, entries: Sequence[Entry], *, replace: bool = False,
               under_lock: Callable[[], None] | None = None) -> list[bool]:
        """Insert ``entries`` in one transaction (all or none). An id already present raises
        :class:`~adapterbank.errors.ConflictError` unless ``replace`` (then its old card, files and prototypes
        are replaced). ``under_lock()`` runs inside the writer section before the inserts. Returns, per
        entry, whether it replaced an existing card."""
        ...

    def remove(self, id: str) -> bool:  # noqa: A002
        """Delete a card with its files and prototypes; ``False`` if there was none."""
        ...

    def set_prototype(self, id: str, prototype: Prototype) -> bool:  # noqa: A002
        """Attach (or replace, same space) a prototype; ``False`` if there is no card ``id``."""
        ...

    def prototypes(self, id: str) -> list[Prototype]:  # noqa: A002
        """The prototypes of ``id`` sorted by space key (empty if none or no such card)."""
        ...

    def spaces(self) -> dict[str, PrototypeSpace]:
        """space key -> space of every space with at least one prototype, sorted by key."""
        ...

    def space_matrix(self, space_key: str) -> SpaceMatrix:
        """Every prototype of a space in one consistent snapshot (for building an index)."""
        ...

    def vectors(self, space_key: str, ids: Sequence[str]) -> SpaceMatrix:
        """The current prototypes of ``ids`` in a space (ids without one are left out)."""
        ...

    def changes_since(self, space_key: str, version: int) -> list[str] | None:
        """Ids whose prototype in ``space_key`` changed (added, replaced, removed) after catalog ``version``,
        or ``None`` when the log does not reach back that far (rebuild instead)."""
        ...

    def get_setting(self, key: str) -> str | None: ...

    def set_setting(self, key: str, value: str | None) -> None: ...

    def settings(self, prefix: str) -> dict[str, str]:
        """Every setting whose key starts with ``prefix``: key -> JSON text, sorted by key."""
        ...

    def file_rows(self) -> list[tuple[str, str, str, int]]:
        """Every file row ``(adapter_id, name, sha256, size)`` sorted by adapter id and name."""
        ...

    def integrity_problems(self) -> list[str]:
        """What is wrong inside the catalog itself (engine check, cards without files, bad vectors)."""
        ...

    def collect_garbage(self, delete_unused: Callable[[set[str]], int]) -> int:
        """Call ``delete_unused(used_sha256s)`` inside the writer section; return what it returns."""
        ...

    def search(self, space_key: str, query: np.ndarray, k: int, where: Mapping[str, Any] | None) -> list[Hit] | None:
        """Search done by the engine itself (pgvector), or ``None``: the bank then uses its own index."""
        ...


@runtime_checkable
class BlobBackend(Protocol):
    """Content-addressed storage of adapter files: the final name of a blob is its sha256."""

    location: str

    def staging(self, *, bulk: bool = False) -> Any:
        """A local :class:`~adapterbank.bank.blobs.Staging` folder for files on their way in (a context manager).
        ``bulk``: a batch of many files — its ``sync_mode`` may be ``"batch"``, and then ``sync()`` must be called
        before any of its files is :meth:`put`."""
        ...

    def put(self, staged: Path, sha: str, size: int, token: str) -> None:
        """Store the staged file (already hashed to ``sha``) under its final name, complete or not at all."""
        ...

    def exists(self, sha: str, size: int | None = None) -> bool: ...

    def missing(self, blobs: Mapping[str, int]) -> set[str]:
        """The shas of ``blobs`` (sha -> size) that are absent or of another size (one call for a batch)."""
        ...

    def name(self, sha: str) -> str:
        """Where blob ``sha`` lives (a path or URL), for messages."""
        ...

    def copy_verified(self, sha: str, dst: Path, *, what: str) -> int:
        """Copy a blob to ``dst``, re-hashing it; :class:`~adapterbank.errors.IntegrityError` on damage."""
        ...

    def check(self, sha: str) -> str | None:
        """A description of the damage of a blob (missing, wrong hash, wrong size...), or ``None``."""
        ...

    def size(self, sha: str) -> int | None: ...

    def iter_blobs(self) -> Iterator[str]: ...

    def delete(self, sha: str) -> bool: ...

    def stale_files(self) -> list[str]:
        """Leftovers of crashed writers (temp files, staging folders), as printable names."""
        ...

    def remove_stale(self, name: str) -> None: ...
