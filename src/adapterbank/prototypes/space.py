"""Prototype spaces and prototypes (Eq. 1): p_T = (1/|D_T|) Σ_{x∈D_T} E(x).

A prototype is only comparable with prototypes of the same *space*: same encoder and revision, same
pooling, same normalisation, same dimension. Every prototype carries its space; mixing is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapterbank._io import atomic_write, atomic_write_bytes
from adapterbank.errors import FormatError, NonFiniteError, PrototypeSpaceError, ShapeMismatchError

__all__ = ["PrototypeSpace", "Prototype", "check_same_space"]


@dataclass(frozen=True)
class PrototypeSpace:
    """Where a prototype lives: (encoder id, revision, pooling, per-sample normalisation, dim).

    >>> s = PrototypeSpace("all-MiniLM-L6-v2", "abc123", "mean", True, 384)
    >>> s.key
    'all-MiniLM-L6-v2@abc123|mean|l2|384'
    >>> PrototypeSpace.from_dict(s.to_dict()) == s
    True
    """

    encoder: str
    revision: str | None
    pooling: str
    normalize: bool
    dim: int

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise ShapeMismatchError(f"A prototype space's dim must be a positive int. Got {self.dim!r} instead.")

    @property
    def key(self) -> str:
        """A stable string naming the space (used in the bank and in files)."""
        rev = self.revision or "unversioned"
        return f"{self.encoder}@{rev}|{self.pooling}|{'l2' if self.normalize else 'raw'}|{self.dim}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrototypeSpace:
        try:
            return cls(str(d["encoder"]), d.get("revision"), str(d["pooling"]), bool(d["normalize"]), int(d["dim"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(
                f"A prototype space needs keys encoder, revision, pooling, normalize, dim. Got {d!r} ({e})."
            ) from e


def check_same_space(a: PrototypeSpace, b: PrototypeSpace, what: str = "prototypes") -> None:
    """Raise :class:`PrototypeSpaceError` unless the two spaces are the same."""
    if a != b:
        raise PrototypeSpaceError(f"Cannot mix {what} from different prototype spaces: {a.key!r} vs {b.key!r}.")


@dataclass
class Prototype:
    """A task prototype: a (dim,) float32 vector and the space it lives in.

    Saved as ``NAME.npy`` (the vector, plain numpy) plus ``NAME.npy.json`` (space, n_samples, source).

    >>> sp = PrototypeSpace("toy", None, "mean", False, 3)
    >>> p = Prototype(np.array([1.0, 2.0, 3.0]), sp, n_samples=2, source="inline")
    >>> p.vector.dtype, p.dim
    (dtype('float32'), 3)
    """

    vector: np.ndarray
    space: PrototypeSpace
    n_samples: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = np.asarray(self.vector, dtype=np.float32)
        if v.ndim != 1:
            raise ShapeMismatchError(f"A prototype must be a 1-D vector. Got shape {v.shape} instead.")
        if v.shape[0] != self.space.dim:
            raise ShapeMismatchError(
                f"Prototype has dim {v.shape[0]} but its space {self.space.key!r} says {self.space.dim}."
            )
        if not np.isfinite(v).all():
            raise NonFiniteError(f"Prototype ({self.source or 'unnamed'}) contains NaN or Inf.")
        self.vector = v

    @property
    def dim(self) -> int:
        return int(self.vector.shape[0])

    def digest(self) -> str:
        """sha256 of the vector bytes and the space key (identifies a prototype in caches and recipes)."""
        h = hashlib.sha256(self.space.key.encode())
        h.update(self.vector.tobytes())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.space.to_dict(), "n_samples": self.n_samples, "source": self.source, "extra": self.extra}

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.npy) and ``path.json`` atomically."""
        path = Path(path)
        if path.suffix != ".npy":
            path = path.with_name(path.name + ".npy")
        atomic_write(path, lambda fh: np.save(fh, self.vector, allow_pickle=False))
        atomic_write_bytes(Path(f"{path}.json"), json.dumps(self.to_dict(), indent=2).encode())
        return path

    @classmethod
    def load(cls, path: str | Path, space: PrototypeSpace | None = None) -> Prototype:
        """Read a prototype written by :meth:`save`. A bare ``.npy`` needs ``space=``."""
        path = Path(path)
        side = Path(f"{path}.json")
        try:
            vec = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise
        except (ValueError, OSError) as e:
            raise FormatError(f"{path}: not a numpy .npy prototype file ({e}).") from e
        if side.exists():
            try:
                meta = json.loads(side.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise FormatError(f"{side}: not valid JSON ({e}).") from e
            sp = PrototypeSpace.from_dict(meta.get("space", {}))
            if space is not None:
                check_same_space(sp, space)
            return cls(vec, sp, int(meta.get("n_samples", 0)), str(meta.get("source", str(path))), meta.get("extra", {}))
        if space is None:
            raise FormatError(f"{path}: no sidecar {side.name} naming its prototype space; pass space= explicitly.")
        return cls(vec, space, 0, str(path))

    def distance2(self, other: Prototype) -> float:
        check_same_space(self.space, other.space)
        d = self.vector.astype(np.float64) - other.vector.astype(np.float64)
        out = float(d @ d)
        if not math.isfinite(out):
            raise NonFiniteError("Squared distance between prototypes is not finite.")
        return out
