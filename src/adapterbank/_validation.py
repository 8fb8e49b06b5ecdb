"""One place that checks the parameters of every public entry point.

Constraints are data (:class:`Bounds`), and every violation is reported with one template::

    The '<name>' parameter of <owner> must be <what>. Got <value!r> instead.

One error type per kind of violation: :class:`~adapterbank.errors.ParameterError` for a wrong type or a value
out of range, :class:`~adapterbank.errors.NonFiniteError` for NaN/Inf, :class:`~adapterbank.errors.UnknownNameError`
for a name that is not among the choices (the message lists them). ``bool`` is never an int or a number here.

>>> check_int(3, "k", "compose", low=1, high=MAX_K)
3
>>> check_int(0, "k", "compose", low=1, high=MAX_K)
Traceback (most recent call last):
...
adapterbank.errors.ParameterError: The 'k' parameter of compose must be an int in [1, 10000]. Got 0 instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from adapterbank.errors import NonFiniteError, ParameterError, UnknownNameError

__all__ = ["Bounds", "MAX_K", "K", "check_int", "check_number", "check_choice", "check_bool", "check_k", "message"]

MAX_K = 10_000
"""The largest number of neighbours a search (and so compose and evaluate) may ask for."""


def message(name: str, owner: str, what: str, value: Any) -> str:
    """The one message template.

    >>> message("rank", "truncate", "an int ≥ 1", -3)
    "The 'rank' parameter of truncate must be an int ≥ 1. Got -3 instead."
    """
    return f"The '{name}' parameter of {owner} must be {what}. Got {value!r} instead."


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Bounds:
    """A parameter's constraint as data: an ``int`` or a finite ``number`` in ``[low, high]`` (an end is
    excluded when ``low_open``/``high_open``; ``None``: unbounded), ``None`` accepted when ``optional``.

    >>> Bounds("number", 0.0, 1.0, low_open=True, high_open=True).describe()
    'a number in (0, 1)'
    >>> Bounds("int", 1, optional=True).describe()
    'an int ≥ 1 or None'
    """

    kind: Literal["int", "number"]
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        """What a valid value is, in words, as the message template's ``Z``."""
        noun = "an int" if self.kind == "int" else "a number"
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            rng = f" in {'(' if self.low_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if self.high_open else ']'}"
        elif lo is not None:
            rng = f" {'>' if self.low_open else '≥'} {_fmt(lo)}"
        elif hi is not None:
            rng = f" {'<' if self.high_open else '≤'} {_fmt(hi)}"
        else:
            rng = ""
        return noun + rng + (" or None" if self.optional else "")

    def contains(self, v: float) -> bool:
        """Whether the number ``v`` lies within the bounds."""
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.high_open and v == self.high)))

    def check(self, value: Any, name: str, owner: str, *, parse: bool = False) -> Any:
        """``value`` as an ``int``/``float`` within the bounds (or ``None`` when optional); ``parse`` also
        accepts a string that spells a number (command-line values). Raises ParameterError/NonFiniteError."""
        if value is None and self.optional:
            return None
        v: Any = value
        if parse and isinstance(value, str):
            try:
                v = int(value) if self.kind == "int" else float(value)
            except ValueError:
                raise ParameterError(message(name, owner, self.describe(), value)) from None
        if isinstance(v, bool) or not isinstance(v, numbers.Integral if self.kind == "int" else numbers.Real):
            raise ParameterError(message(name, owner, self.describe(), value))
        v = int(v) if self.kind == "int" else float(v)
        if not math.isfinite(v):
            raise NonFiniteError(message(name, owner, "finite", value))
        if not self.contains(v):
            raise ParameterError(message(name, owner, self.describe(), value))
        return v


K = Bounds("int", 1, MAX_K)
"""The constraint on ``k`` (neighbours to retrieve) shared by compose, search, evaluate and the CLI."""


def check_int(value: Any, name: str, owner: str, *, low: int | None = None, high: int | None = None,
              optional: bool = False) -> Any:
    """``value`` as an int in ``[low, high]`` (``None`` passes when ``optional``); else ParameterError.

    >>> check_int(True, "rank", "truncate", low=1)
    Traceback (most recent call last):
    ...
    adapterbank.errors.ParameterError: The 'rank' parameter of truncate must be an int ≥ 1. Got True instead.
    """
    return Bounds("int", low, high, optional=optional).check(value, name, owner)


def check_number(value: Any, name: str, owner: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> Any:
    """``value`` as a finite float within the bounds (``None`` passes when ``optional``).

    >>> check_number(0.5, "ci", "paired_bootstrap", low=0, high=1, low_open=True, high_open=True)
    0.5
    >>> check_number(float("nan"), "tau", "sim")
    Traceback (most recent call last):
    ...
    adapterbank.errors.NonFiniteError: The 'tau' parameter of sim must be finite. Got nan instead.
    """
    return Bounds("number", low, high, low_open, high_open, optional).check(value, name, owner)


def check_k(value: Any, owner: str) -> int:
    """The number of neighbours ``k``: an int in [1, :data:`MAX_K`], the same check everywhere.

    >>> check_k("3", "search")
    Traceback (most recent call last):
    ...
    adapterbank.errors.ParameterError: The 'k' parameter of search must be an int in [1, 10000]. Got '3' instead.
    """
    return K.check(value, "k", owner)


def check_choice(value: Any, name: str, owner: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``; else UnknownNameError listing them.

    >>> check_choice("lin", "strategy", "compose", ["avg", "lin"])
    'lin'
    >>> check_choice("foo", "strategy", "compose", ["avg", "lin"])
    Traceback (most recent call last):
    ...
    adapterbank.errors.UnknownNameError: The 'strategy' parameter of compose must be one of avg, lin. Got 'foo' instead.
    """
    valid = list(choices)
    if not isinstance(value, str) or value not in valid:
        raise UnknownNameError(message(name, owner, f"one of {', '.join(valid) or '(none)'}", value))
    return value


def check_bool(value: Any, name: str, owner: str) -> bool:
    """``value`` if it is a bool (``numpy.bool_`` too); else ParameterError (1 and "yes" are not bools here).

    >>> check_bool(1, "overwrite", "save")
    Traceback (most recent call last):
    ...
    adapterbank.errors.ParameterError: The 'overwrite' parameter of save must be a bool. Got 1 instead.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ParameterError(message(name, owner, "a bool", value))


def is_lora_adapter(obj: object) -> bool:
    """Whether ``obj`` is a :class:`~adapterbank.lora.LoraAdapter`, without importing torch to find out.

    A bank that only searches (the CLI's ``search``) never loads the tensor side; if ``adapterbank.lora`` was
    never imported, nothing can be one of its objects.

    >>> is_lora_adapter("./adapter.safetensors")
    False
    """
    import sys

    lora = sys.modules.get("adapterbank.lora")
    return lora is not None and isinstance(obj, lora.LoraAdapter)
