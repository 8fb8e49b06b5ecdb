"""The bank: a SQLite catalog + content-addressed safetensors blobs, and exact k-NN search over prototypes."""

from __future__ import annotations

from adapterbank.bank.index import MAX_K, Hit, Index, NumpyIndex
from adapterbank.bank.store import FORMAT_VERSION, Bank, Card, VerifyReport

__all__ = ["Bank", "Card", "VerifyReport", "Hit", "Index", "NumpyIndex", "MAX_K", "FORMAT_VERSION"]
