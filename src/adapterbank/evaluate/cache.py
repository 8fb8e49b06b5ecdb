"""The evaluation cache: one JSON file per evaluator call, keyed by everything the call depends on.

A key is the SHA-256 of its parts (target, method, k, parameters, evaluator id, the digests of the prototypes
and adapters involved); the file holds the parts too, and a file whose parts differ from the key's is ignored
(recomputed), as is an unreadable one. Without a folder the cache lives in memory for one run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterbank._io import atomic_write_bytes
from adapterbank.evaluate.results import EvalRecord

if TYPE_CHECKING:
    from adapterbank.bank import Card

log = logging.getLogger(__name__)

__all__ = ["CACHE_SCHEMA", "cache_key", "adapter_digest", "ResultCache"]

CACHE_SCHEMA = 1


def cache_key(parts: Mapping[str, Any]) -> str:
    """The SHA-256 of ``parts`` as sorted JSON (non-JSON values by ``str``).

    >>> cache_key({"b": 1, "a": [2]}) == cache_key({"a": [2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def adapter_digest(card: Card) -> str:
    """Content digest of an adapter: a hash of the bank's content hashes of its files (``Card.files``)."""
    return cache_key({"files": dict(card.files)})


class ResultCache:
    """Records by key: in memory, and as ``<key>.json`` files in ``folder`` when one is given."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.memo: dict[str, EvalRecord] = {}
        self.n_hits = 0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.json"

    def lookup(self, key: str, key_parts: Mapping[str, Any]) -> EvalRecord | None:
        """The record stored under ``key`` (marked ``cached``), or ``None``; a file from disk counts as a hit."""
        if key in self.memo:
            return self.memo[key]
        f = self._file(key)
        if f is None or not f.exists():
            return None
        try:
            doc = json.loads(f.read_text())
            if doc.get("schema") != CACHE_SCHEMA or doc.get("key") != json.loads(json.dumps(key_parts, default=str)):
                log.warning("cache file %s does not match its key; recomputing", f)
                return None
            rec = EvalRecord.from_dict(doc["record"], str(f))
        except (ValueError, KeyError, TypeError, OSError) as e:
            log.warning("unreadable cache file %s (%s); recomputing", f, e)
            return None
        rec.cached = True
        self.memo[key] = rec
        self.n_hits += 1
        return rec

    def store(self, key: str, key_parts: Mapping[str, Any], rec: EvalRecord) -> None:
        """Keep ``rec`` under ``key`` (and write its file atomically)."""
        self.memo[key] = rec
        f = self._file(key)
        if f is not None:
            doc = {"schema": CACHE_SCHEMA, "key": key_parts, "record": rec.to_dict()}
            atomic_write_bytes(f, json.dumps(doc, indent=1, default=str).encode())
