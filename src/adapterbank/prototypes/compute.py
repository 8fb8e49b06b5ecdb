"""Task prototypes, Eq. 1 of the seed paper: p_T = (1/|D_T|) Σ_{x∈D_T} E(x).

| symbol | here | shape |
|---|---|---|
| D_T | ``source`` (streamed by :func:`iter_batches`) | n samples |
| E(x) | ``encoder.encode(batch)`` (pooled, optionally L2-normalised per sample) | (b, d) float32 |
| Σ E(x) | running sum | (d,) float64 |
| p_T | ``Prototype.vector`` | (d,) float32 |

The sum runs in float64 over batches, so batch boundaries do not change the result beyond float32
rounding of the features. Texts are gathered ``batch_size × SORT_WINDOW`` at a time and encoded in
length-sorted batches of ``batch_size`` (less padding, same sum: the mean is order-free); other items
(images) are encoded batch by batch as they are read.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from adapterbank._validation import check_int
from adapterbank.errors import EncoderError, NonFiniteError, ShapeMismatchError
from adapterbank.prototypes.encoders import is_encoder, load_encoder
from adapterbank.prototypes.inputs import count_hint, describe_source, iter_batches
from adapterbank.prototypes.space import Prototype, PrototypeSpace, check_same_space

logger = logging.getLogger(__name__)

__all__ = ["compute_prototype", "describe", "combine_prototypes", "SORT_WINDOW"]

SORT_WINDOW = 16


def _length_order(chunk: list[Any]) -> list[int]:
    """Indices of ``chunk`` sorted by text length in characters (longest first); identity for non-text items."""
    if chunk and all(isinstance(x, str) for x in chunk):
        return sorted(range(len(chunk)), key=lambda i: -len(chunk[i]))
    return list(range(len(chunk)))


def compute_prototype(encoder: Any, source: Any, *, column: str | None = None, batch_size: int = 32,
                      limit: int | None = None, progress: bool = False, description: str | None = None,
                      space: PrototypeSpace | None = None, max_line_bytes: int | None = None) -> Prototype:
    """The mean feature of the samples in ``source`` (Eq. 1), streamed in batches.

    Args:
        encoder: an encoder (or anything :func:`load_encoder` accepts).
        source: a JSONL/CSV/Parquet/TXT file, a folder of images, a list/iterable of items, or a text.
        column: the text column of a file or of mapping items (default: the first of text, prompt, ...).
        batch_size: samples per forward pass.
        limit: use at most this many samples.
        progress: show a tqdm progress bar on stderr, with the count and an ETA (it stays when done).
        description: the prototype's ``source`` text (default: a short description of ``source``).
        space: when given, the encoder's space must be this one (else PrototypeSpaceError).
        max_line_bytes: the longest line of a JSONL/CSV/TXT file (see :func:`iter_items`; default 1 MiB).

    Raises:
        FormatError: a file that is not UTF-8, a line over ``max_line_bytes``, ... (names the file and line).
        EncoderError: no samples. NonFiniteError: the encoder returned NaN/Inf (names the sample).
        PrototypeSpaceError: ``space`` given and different from the encoder's.

    >>> from adapterbank.prototypes.encoders import CallableEncoder
    >>> enc = CallableEncoder(lambda xs: [[len(x), 0.0] for x in xs], name="len")
    >>> p = compute_prototype(enc, ["ab", "abcd", "abcdef"], batch_size=2)
    >>> p.vector.tolist(), p.n_samples
    ([4.0, 0.0], 3)
    """
    enc = encoder if is_encoder(encoder) else load_encoder(encoder)
    batch_size = check_int(batch_size, "batch_size", "compute_prototype", low=1)
    label = description or describe_source(source, column)
    total_hint = count_hint(source) if progress else None  # the bar's total, so it shows an ETA
    if limit is not None:
        total_hint = limit if total_hint is None else min(limit, total_hint)
    total: np.ndarray | None = None  # Σ E(x), (d,) float64
    n = 0

    def encode_chunk(chunk: list[Any]) -> None:
        nonlocal total, n
        order = _length_order(chunk)
        for start in range(0, len(chunk), batch_size):
            idx = order[start:start + batch_size]
            feats = np.asarray(enc.encode([chunk[i] for i in idx]))  # (b, d) float32
            if feats.ndim != 2 or feats.shape[0] != len(idx):
                raise EncoderError(f"The encoder returned shape {feats.shape} for {len(idx)} samples of {label}.")
            finite = np.isfinite(feats).all(axis=1)  # (b,)
            if not finite.all():
                bad = n - start + idx[int(np.argmin(finite))]  # position in the whole input
                raise NonFiniteError(f"The encoder returned NaN or Inf for sample {bad} of {label}.")
            if total is None:
                total = np.zeros(feats.shape[1], dtype=np.float64)
            elif feats.shape[1] != total.shape[0]:
                raise ShapeMismatchError(f"The encoder returned dim {feats.shape[1]} after dim {total.shape[0]} "
                                         f"on {label}.")
            total += feats.sum(axis=0, dtype=np.float64)
            n += len(idx)
            bar.update(len(idx))

    buf: list[Any] = []  # texts waiting to be length-sorted (at most batch_size × SORT_WINDOW)
    with tqdm(total=total_hint, disable=not progress, unit="sample", desc="prototype", leave=True,
              file=sys.stderr) as bar:
        for batch in iter_batches(source, batch_size, column=column, limit=limit,
                                  max_line_bytes=max_line_bytes):
            if all(isinstance(x, str) for x in batch):
                buf += batch
                if len(buf) >= batch_size * SORT_WINDOW:
                    encode_chunk(buf)
                    buf = []
            else:  # images, arrays, ...: encoded as they come, never buffered
                if buf:
                    encode_chunk(buf)
                    buf = []
                encode_chunk(batch)
        if buf:
            encode_chunk(buf)
        if progress and bar.total != n:  # the hint was off (blank or quoted lines): end at the true count
            bar.total = n
            bar.refresh()
    if total is None or n == 0:
        raise EncoderError(f"No samples in {label}: a prototype needs at least one.")
    sp = enc.space
    if space is not None:
        check_same_space(sp, space, "an encoder and the expected space")
    if sp.dim != total.shape[0]:
        raise ShapeMismatchError(f"The encoder's space says dim {sp.dim} but it returned dim {total.shape[0]}.")
    logger.info("prototype of %d samples from %s in %s", n, label, sp.key)
    return Prototype(total / n, sp, n_samples=n, source=label)


def describe(encoder: Any, text: str, *, space: PrototypeSpace | None = None) -> Prototype:
    """A prototype from a text description (adapters without data): E(text), one sample.

    >>> from adapterbank.prototypes.encoders import CallableEncoder
    >>> enc = CallableEncoder(lambda xs: [[float(len(x.split()))] for x in xs], name="words")
    >>> p = describe(enc, "legal contract summaries")
    >>> p.vector.tolist(), p.source
    ([3.0], 'description: legal contract summaries')
    """
    if not isinstance(text, str) or not text.strip():
        raise EncoderError(f"describe needs a non-empty text description. Got {text!r} instead.")
    label = f"description: {text if len(text) <= 120 else text[:117] + '...'}"
    p = compute_prototype(encoder, [text], batch_size=1, description=label, space=space)
    p.extra["description"] = text
    return p


def combine_prototypes(prototypes: Sequence[Prototype], *, source: str | None = None) -> Prototype:
    """The prototype of the union of the samples behind ``prototypes`` (mean weighted by ``n_samples``).

    Equal to computing one prototype over all the samples (shards, incremental updates). All must share
    one prototype space (else PrototypeSpaceError) and have ``n_samples > 0``.

    >>> sp = PrototypeSpace("toy", None, "mean", False, 2)
    >>> a = Prototype(np.array([0.0, 2.0]), sp, n_samples=1); b = Prototype(np.array([3.0, 2.0]), sp, n_samples=2)
    >>> combine_prototypes([a, b]).vector.tolist()
    [2.0, 2.0]
    """
    if not prototypes:
        raise EncoderError("combine_prototypes needs at least one prototype.")
    sp = prototypes[0].space
    total = np.zeros(sp.dim, dtype=np.float64)
    n = 0
    for i, p in enumerate(prototypes):
        check_same_space(sp, p.space, "prototypes in combine_prototypes")
        if p.n_samples <= 0:
            raise EncoderError(f"Prototype {i} ({p.source or 'unnamed'}) has n_samples={p.n_samples}; "
                               f"combine_prototypes needs the sample counts.")
        total += p.n_samples * p.vector.astype(np.float64)
        n += p.n_samples
    label = source or " + ".join(p.source or "?" for p in prototypes)
    return Prototype(total / n, sp, n_samples=n, source=label)
