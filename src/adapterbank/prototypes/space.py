"""Prototype spaces and prototypes (Eq. 1): p_T = (1/|D_T|) Σ_{x∈D_T} E(x).

A prototype is only comparable with prototypes of the same *space*: same encoder and revision, same
pooling, same normalisation, same dimension, same maximum tokens per text. Every prototype carries its
space; mixing is refused.

``max_length`` is the number of tokens a text encoder reads per text (the rest is cut off). Spaces
written before it was recorded have no ``max_length``; they read as :data:`DEFAULT_MAX_LENGTH` (the
old fixed default), so a bank built then still matches the default encoder today: the space key names
the maximum length only when it differs from that default.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapterbank._io import atomic_write, atomic_write_bytes
from adapterbank.errors import FormatError, NonFiniteError, PrototypeSpaceError, ShapeMismatchError

__all__ = ["PrototypeSpace", "Prototype", "check_same_space", "DEFAULT_MAX_LENGTH"]

DEFAULT_MAX_LENGTH = 256
"""Tokens per text that text encoders read unless told otherwise (and what a space without a recorded
``max_length`` means)."""


@dataclass(frozen=True, eq=False)
class PrototypeSpace:
    """Where a prototype lives: (encoder id, revision, pooling, per-sample normalisation, dim, max tokens).

    ``max_length`` is None for encoders without a token limit (images, callables) and for spaces recorded
    before it was; None and :data:`DEFAULT_MAX_LENGTH` are the same space.

    >>> s = PrototypeSpace("all-MiniLM-L6-v2", "abc123", "mean", True, 384, max_length=256)
    >>> s.key
    'all-MiniLM-L6-v2@abc123|mean|l2|384'
    >>> PrototypeSpace.from_dict(s.to_dict()) == s == PrototypeSpace("all-MiniLM-L6-v2", "abc123", "mean", True, 384)
    True
    >>> PrototypeSpace("all-MiniLM-L6-v2", "abc123", "mean", True, 384, max_length=512).key
    'all-MiniLM-L6-v2@abc123|mean|l2|384|max512'
    """

    encoder: str
    revision: str | None
    pooling: str
    normalize: bool
    dim: int
    max_length: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise ShapeMismatchError(f"A prototype space's dim must be a positive int. Got {self.dim!r} instead.")
        if self.max_length is not None and (not isinstance(self.max_length, int) or isinstance(self.max_length, bool)
                                            or self.max_length <= 0):
            raise FormatError(f"A prototype space's max_length must be a positive int or None. "
                              f"Got {self.max_length!r} instead.")

    def _identity(self) -> tuple[Any, ...]:
        return (self.encoder, self.revision, self.pooling, self.normalize, self.dim,
                self.max_length or DEFAULT_MAX_LENGTH)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrototypeSpace):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    @property
    def key(self) -> str:
        """A stable string naming the space (used in the bank and in files); ``|maxN`` unless N is the default."""
        rev = self.revision or "unversioned"
        key = f"{self.encoder}@{rev}|{self.pooling}|{'l2' if self.normalize else 'raw'}|{self.dim}"
        if self.max_length not in (None, DEFAULT_MAX_LENGTH):
            key += f"|max{self.max_length}"
        return key

    @staticmethod
    def max_length_of_key(key: str) -> int | None:
        """The ``max_length`` a :attr:`key` records, or ``None`` when it is the default (no ``|maxN`` part).

        >>> PrototypeSpace.max_length_of_key("enc@r|mean|l2|384|max512"), PrototypeSpace.max_length_of_key("enc@r|mean|l2|384")
        (512, None)
        """
        m = re.search(r"\|max(\d+)$", key)
        return int(m.group(1)) if m else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrototypeSpace:
        """The space recorded by :meth:`to_dict`; a missing ``max_length`` is None (the old default)."""
        try:
            ml = d.get("max_length")
            return cls(str(d["encoder"]), d.get("revision"), str(d["pooling"]), bool(d["normalize"]), int(d["dim"]),
                       ml)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise FormatError(
                f"A prototype space needs keys encoder, revision, pooling, normalize, dim (and optionally "
                f"max_length). Got {d!r} ({e})."
            ) from e


def check_same_space(a: PrototypeSpace, b: PrototypeSpace, what: str = "prototypes") -> None:
    """Raise :class:`PrototypeSpaceError` unless the two spaces are the same."""
    if a != b:
        raise PrototypeSpaceError(f"Cannot mix {what} from different prototype spaces: {a.key!r} vs {b.key!r}.")


def _as_vector(v: Any, space: PrototypeSpace, where: str) -> np.ndarray:
    """``v`` as a finite (space.dim,) float32 vector, or an error that starts with ``where``."""
    arr = np.asarray(v)
    if arr.dtype.kind not in "fiu":  # complex would lose its imaginary part; bool/str/object are not features
        raise FormatError(f"{where}: a prototype must hold real numbers (float32 or float64). Got dtype "
                          f"{arr.dtype} instead; save the real feature vector.")
    if arr.ndim != 1:
        raise ShapeMismatchError(f"{where}: a prototype must be a 1-D vector. Got shape {arr.shape} instead.")
    if arr.shape[0] != space.dim:
        raise ShapeMismatchError(f"{where}: the prototype has dim {arr.shape[0]} but its space {space.key!r} "
                                 f"says {space.dim}.")
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(out))  # also catches float64 values beyond float32's range
    if bad.size:
        raise NonFiniteError(f"{where}: the prototype contains NaN or Inf ({bad.size} of {out.shape[0]} values, "
                             f"first at index {int(bad[0])}).")
    return out


def _read_sidecar(side: Path) -> tuple[PrototypeSpace, int, str, dict[str, Any]]:
    """(space, n_samples, source, extra) from a ``.npy.json`` sidecar; FormatError names the file and key."""
    try:
        meta = json.loads(side.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{side}: not valid JSON ({e}).") from e
    if not isinstance(meta, dict):
        raise FormatError(f"{side}: a prototype sidecar must be a JSON object with keys space, n_samples, source. "
                          f"Got a JSON {type(meta).__name__} instead.")
    if not isinstance(meta.get("space"), dict):
        raise FormatError(f"{side}: key 'space' must be a JSON object (encoder, revision, pooling, normalize, dim). "
                          f"Got {meta.get('space')!r} instead.")
    try:
        sp = PrototypeSpace.from_dict(meta["space"])
    except (FormatError, ShapeMismatchError) as e:
        raise FormatError(f"{side}: key 'space': {e}") from e
    n = meta.get("n_samples", 0)
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise FormatError(f"{side}: key 'n_samples' must be a non-negative integer. Got {n!r} instead.")
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise FormatError(f"{side}: key 'extra' must be a JSON object. Got {extra!r} instead.")
    source = meta.get("source", "")
    return sp, n, "" if source is None else str(source), extra


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
        self.vector = _as_vector(self.vector, self.space, f"Prototype ({self.source or 'unnamed'})")

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
        """Read a prototype written by :meth:`save`. A bare ``.npy`` needs ``space=``.

        Raises:
            FormatError: not an .npy file, a vector that is not real numbers (complex, bool, text, ...), or a
                sidecar that is not a JSON object with ``space`` (an object), ``n_samples`` (an int ≥ 0),
                ``source`` and ``extra`` (an object). Every message names ``path`` or its sidecar.
            ShapeMismatchError / NonFiniteError: a vector that is not (dim,) or holds NaN/Inf (names ``path``).
        """
        path = Path(path)
        side = Path(f"{path}.json")
        try:
            vec = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise
        except (ValueError, OSError) as e:
            raise FormatError(f"{path}: not a numpy .npy prototype file ({e}).") from e
        if not side.exists():
            if space is None:
                raise FormatError(f"{path}: no sidecar {side.name} naming its prototype space; pass space= explicitly.")
            return cls(_as_vector(vec, space, str(path)), space, 0, str(path))
        sp, n_samples, source, extra = _read_sidecar(side)
        if space is not None:
            check_same_space(sp, space)
        return cls(_as_vector(vec, sp, str(path)), sp, n_samples, source or str(path), extra)

    def distance2(self, other: Prototype) -> float:
        check_same_space(self.space, other.space)
        d = self.vector.astype(np.float64) - other.vector.astype(np.float64)
        out = float(d @ d)
        if not math.isfinite(out):
            raise NonFiniteError("Squared distance between prototypes is not finite.")
        return out
