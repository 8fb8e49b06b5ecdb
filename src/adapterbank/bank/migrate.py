"""Copy a whole bank to another backend (``adapterbank migrate SRC DST``): cards, prototypes, settings and blobs.

Works in every direction (embedded ↔ server, server ↔ server, embedded ↔ embedded) because it only uses the
storage interface (:mod:`adapterbank.bank.backend`). Blobs are copied first, re-hashed on the way out of SRC
and stored by DST's ``put`` (complete or not at all); then each batch of cards is committed in one DST
transaction that re-checks its blobs, so DST never shows a card whose blob is missing. Resumable: a card
already in DST with the same file digests is skipped; the same id with other content is refused (nothing
is overwritten). At the end DST is verified (every blob re-hashed) and compared with SRC card by card.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapterbank.bank.backend import CARD_COLUMNS, Entry
from adapterbank.bank.store import BLOBS_SETTING, Bank, Card
from adapterbank.errors import BankError, ConflictError

log = logging.getLogger(__name__)

__all__ = ["MigrateReport", "migrate"]

_JSON_FIELDS = ("ranks", "targets", "tags", "versions", "extra")


@dataclass
class MigrateReport:
    """What :func:`migrate` did: ids copied, ids already present (same content), ids refused with the reason,
    blobs copied, settings copied, seconds, and whether DST verified and matched SRC."""

    copied: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    blobs_copied: int = 0
    settings_copied: int = 0
    seconds: float = 0.0
    verified: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verified and not self.refused and not self.problems


def _row(card: Card) -> dict[str, object]:
    d = card.to_dict()
    return {k: json.dumps(d[k], sort_keys=True) if k in _JSON_FIELDS else d[k] for k in CARD_COLUMNS}


def migrate(src: Bank, dst: Bank, *, batch_size: int = 256,
            progress: Callable[[int, int], None] | None = None) -> MigrateReport:
    """Copy every card, prototype, setting and blob of ``src`` into ``dst`` and verify ``dst``.

    >>> import tempfile, numpy as np, torch
    >>> from adapterbank.lora import LoraAdapter, LoraModule
    >>> from adapterbank.prototypes.space import Prototype, PrototypeSpace
    >>> a = Bank.init(tempfile.mkdtemp() + "/a")
    >>> ad = LoraAdapter({"fc": LoraModule(torch.ones(1, 3), torch.ones(2, 1), 1.0, (2, 3))})
    >>> _ = a.add(ad, id="x", base_model="toy", prototype=Prototype(np.ones(2), PrototypeSpace("t", None, "mean", False, 2)))
    >>> b = Bank.init(tempfile.mkdtemp() + "/b")
    >>> rep = migrate(a, b)
    >>> rep.copied, rep.ok, b.get_prototype("x").vector.tolist()
    (['x'], True, [1.0, 1.0])
    >>> migrate(a, b).present                      # a rerun copies nothing
    ['x']
    """
    t0 = time.perf_counter()
    rep = MigrateReport()
    cards = src.list()
    sizes = {(aid, name): size for aid, name, _, size in src._cat.file_rows()}
    done = 0
    for start in range(0, len(cards), max(1, int(batch_size))):
        batch: list[Entry] = []
        for card in cards[start:start + batch_size]:
            old = dst._cat.card(card.id)
            if old is not None:
                if dict(old.files) == card.files:
                    rep.present.append(card.id)
                else:
                    rep.refused.append((card.id, f"{dst.root} already has an adapter {card.id!r} with other files; "
                                                 "remove it there first"))
                continue
            files = [(name, sha, sizes[(card.id, name)]) for name, sha in sorted(card.files.items())]
            batch.append(Entry(_row(card), files, src._cat.prototypes(card.id)))
        if batch:
            rep.blobs_copied += _copy_blobs(src, dst, batch)
            try:
                dst._cat.commit(batch, replace=False, under_lock=lambda b=batch: _check_blobs(dst, b))
                rep.copied += [e.id for e in batch]
            except ConflictError:  # added to DST concurrently: one by one, so only the conflicting ones are refused
                for e in batch:
                    try:
                        dst._cat.commit([e], replace=False, under_lock=lambda e=e: _check_blobs(dst, [e]))
                        rep.copied.append(e.id)
                    except ConflictError as err:
                        rep.refused.append((e.id, str(err)))
        done += len(cards[start:start + batch_size])
        if progress is not None:
            progress(done, len(cards))
    for key, value in src._cat.settings("").items():
        if key != BLOBS_SETTING and dst._cat.get_setting(key) != value:
            dst._cat.set_setting(key, value)
            rep.settings_copied += 1
    for key, spec in src.encoders().items():  # a legacy encoders.json of an embedded SRC
        if key not in dst.encoders():
            dst.remember_encoder(key, spec)
            rep.settings_copied += 1
    vr = dst.verify()
    rep.problems += vr.problems
    want = {c.id: c.files for c in cards}
    got = {c.id: c.files for c in dst.list() if c.id in want}
    rep.problems += [f"{i}: not in {dst.root} after the migration" for i in sorted(set(want) - set(got))]
    rep.problems += [f"{i}: files differ between {src.root} and {dst.root}" for i in sorted(want)
                     if i in got and got[i] != want[i]]
    rep.verified = vr.ok
    rep.seconds = time.perf_counter() - t0
    log.info("migrated %s -> %s: %d copied, %d present, %d refused, %d blobs, %.1f s", src.root, dst.root,
             len(rep.copied), len(rep.present), len(rep.refused), rep.blobs_copied, rep.seconds)
    return rep


def _copy_blobs(src: Bank, dst: Bank, batch: list[Entry]) -> int:
    """Copy the blobs of ``batch`` that DST lacks (re-hashed out of SRC, stored complete by DST)."""
    n = 0
    with dst._blobs.staging() as st, tempfile.TemporaryDirectory(prefix="adapterbank-migrate-") as tmp:
        for e in batch:
            for name, sha, size in e.files:
                if dst._blobs.exists(sha, size):
                    continue
                local = Path(tmp) / sha
                src._blobs.copy_verified(sha, local, what=f"adapter {e.id!r} (file {name!r})")
                staged, sha2, size2 = st.stage_file(local, f"m/{sha}")
                if (sha2, size2) != (sha, size):  # cannot happen unless the disk changed it under us
                    raise BankError(f"Blob {sha} of {e.id!r} changed while it was copied ({sha2}, {size2} bytes).")
                dst._blobs.put(staged, sha, size, st.token)
                local.unlink()
                n += 1
    return n


def _check_blobs(dst: Bank, batch: list[Entry]) -> None:
    """Inside DST's writer section: every blob of the batch is there (a concurrent gc may have removed one)."""
    for e in batch:
        for name, sha, size in e.files:
            if not dst._blobs.exists(sha, size):
                raise BankError(f"Blob {sha} of {e.id!r} (file {name!r}) vanished from {dst.blobs_location} before "
                                "its card was committed (a concurrent gc?); nothing was committed for this batch. "
                                "Run the migration again.")
