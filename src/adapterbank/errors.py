"""Every error adapterbank raises on purpose.

Each class also inherits the matching built-in, so ``except ValueError`` keeps working for callers
that do not know about adapterbank. Messages say which file, which key, what was expected and what was
found: ``The 'rank' parameter of truncate must be an int ≥ 1. Got -3 instead.`` (one template, see
:mod:`adapterbank._validation`).
"""

from __future__ import annotations


class AdapterbankError(Exception):
    """Base class of all adapterbank errors."""


class FormatError(AdapterbankError, ValueError):
    """An adapter or prototype file is not in a format we understand (unknown key, bad header, ...)."""


class UnsupportedAdapterError(FormatError):
    """A valid file of a LoRA variant we refuse to merge (DoRA, lora_bias, modules_to_save, LoHa, ...)."""


class UnsafeFileError(AdapterbankError, PermissionError):
    """A file we will not read without an explicit opt-in (pickle), or a path/name that escapes."""


class ShapeMismatchError(AdapterbankError, ValueError):
    """Tensors or prototypes whose shapes do not agree (rank, d_in/d_out, prototype dim)."""


class BaseModelMismatchError(AdapterbankError, ValueError):
    """Adapters (or an adapter and a model) made for different base models."""


class PrototypeSpaceError(AdapterbankError, ValueError):
    """Prototypes from different prototype spaces (encoder, pooling, normalisation, dim) were mixed."""


class NonFiniteError(AdapterbankError, ValueError):
    """NaN or Inf in weights, prototypes or solver inputs."""


class UnknownNameError(AdapterbankError, KeyError):
    """An unknown strategy, format, adapter id, ... The message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InvalidNameError(AdapterbankError, ValueError):
    """An id or name with a path separator, ``..``, NUL, a leading dot/dash or absurd length."""


class BankError(AdapterbankError, RuntimeError):
    """The bank directory is missing, locked, of a newer format, or damaged."""


class IntegrityError(BankError):
    """A blob's content no longer matches its hash, or the catalog points at a missing blob."""


class ConflictError(BankError):
    """Two writers changed the same entry; the loser gets this and nothing else is lost."""


class SolverError(AdapterbankError, ArithmeticError):
    """A weight solver could not produce an answer (should not happen for finite inputs)."""


class EncoderError(AdapterbankError, ValueError):
    """An encoder could not be loaded or returned unusable features."""


class ParameterError(AdapterbankError, ValueError):
    """A parameter is out of its valid range or of the wrong type (k, rank, batch size, λ, τ, ...)."""


class EvaluationError(AdapterbankError, RuntimeError):
    """A user-supplied evaluator failed or returned something that is not ``{metric: finite float}``."""


class OutputExistsError(AdapterbankError, FileExistsError):
    """The output path already exists and overwriting was not asked for."""


class OutputWriteError(AdapterbankError, OSError):
    """Writing an output (a composite, an export, merged weights, the bank itself) failed in the operating
    system: disk full, file too large, read-only folder, permission denied, a path under a regular file.
    ``errno`` and ``filename`` are those of the original :class:`OSError`; nothing half-written is left."""

    def __str__(self) -> str:  # OSError would print "[Errno n] ..." once errno is set
        return str(self.args[0]) if self.args else ""


__all__ = [n for n in dir() if n.endswith("Error")]


class AdapterbankWarning(UserWarning):
    """Base class of the warnings adapterbank gives on purpose (the command line prints them as one line)."""


class PoolSmallerThanKWarning(AdapterbankWarning):
    """Fewer adapters matched than the ``k`` asked for; the smaller pool was used."""


class KohyaTextEncoderWarning(AdapterbankWarning):
    """A kohya file holds text-encoder LoRAs, which diffusers' own kohya loader mishandles.

    diffusers' kohya converter renames CLIP attention keys to its legacy ``to_q_lora`` spelling and keys
    their per-module alphas under that spelling, so they do not reach PEFT's config: with per-module alphas
    text-encoder attention LoRAs load with the wrong scale (measured with diffusers 0.42), and they have been
    seen dropped (a diffusers bug; our
    reading of the file is right). The diffusers format (``--format diffusers``) has no such problem.
    """


class LambdaAtHullWarning(AdapterbankWarning):
    """The sparse strategy's λ is at or above λ_max: its weights are the projection onto the convex hull of the
    retrieved prototypes (no negative weight), and a larger λ changes nothing."""


class UntunedBankWarning(AdapterbankWarning):
    """``compose(strategy="auto")`` on a bank that ``adapterbank tune`` has not tuned: the documented fallback
    (``sim`` with its default τ at k = 5, see :data:`adapterbank.compose.compose.AUTO_FALLBACK`) was used."""
