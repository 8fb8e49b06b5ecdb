"""The user's evaluator: loading it from ``module:function`` (or ``file.py:function``), naming it in cache keys,
and checking what it returns (``{metric: finite float}``, optionally with per-item scores)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapterbank.errors import FormatError, NonFiniteError, UnknownNameError
from adapterbank.lora import LoraAdapter

__all__ = ["Evaluator", "PER_ITEM", "load_evaluator", "load_callable", "evaluator_id", "check_metrics", "check_output"]

Evaluator = Callable[[LoraAdapter | None, Any], Mapping[str, Any]]
"""``(adapter | None, task) -> {metric: float}``, optionally with ``"per_item": {metric: [floats]}``."""

PER_ITEM = "per_item"
"""The reserved key of an evaluator's output that holds per-item scores: ``{metric: [floats]}``."""


def load_evaluator(spec: str) -> Evaluator:
    """Load ``module:function`` (or ``path/to/file.py:function``) and check it is callable.

    Dotted attribute paths work after the colon (``pkg.mod:Class.method``).

    >>> fn = load_evaluator("math:hypot")
    >>> fn(3, 4)
    5.0
    >>> load_evaluator("math:nope")
    Traceback (most recent call last):
    ...
    adapterbank.errors.UnknownNameError: The evaluator 'math:nope' names 'nope', which module 'math' does not define. ...
    """
    return load_callable(spec, "evaluator")


def load_callable(spec: str, what: str = "evaluator") -> Callable[..., Any]:
    """Load the callable ``module:function`` (or ``path/to/file.py:function``); ``what`` names it in errors
    (``"evaluator"``, ``"strategy plugin"``).

    >>> load_callable("math:pi", "strategy plugin")
    Traceback (most recent call last):
    ...
    adapterbank.errors.UnknownNameError: The strategy plugin 'math:pi' is not callable: it is a float.
    """
    article = "An" if what[:1] in "aeiou" else "A"
    if not isinstance(spec, str) or spec.count(":") < 1 or not all(spec.rpartition(":")[::2]):
        raise FormatError(f"{article} {what} must be given as 'module:function' (or 'file.py:function'). Got {spec!r} instead.")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise FileNotFoundError(f"The {what} file {str(path)!r} (from {spec!r}) does not exist.")
        name = f"_adapterbank_{what.replace(' ', '_')}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        mspec = importlib.util.spec_from_file_location(name, path)
        if mspec is None or mspec.loader is None:
            raise FormatError(f"The {what} file {str(path)!r} cannot be imported as a Python module.")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module
        mspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise UnknownNameError(
                f"The {what} {spec!r} names module {mod_name!r}, which cannot be imported ({e}). "
                "Put its folder on PYTHONPATH, or give a file: 'path/to/file.py:function'."
            ) from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise UnknownNameError(
                f"The {what} {spec!r} names {attr!r}, which module {mod_name!r} does not define. "
                f"Callables it defines: {', '.join(public[:30]) or 'none'}."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UnknownNameError(f"The {what} {spec!r} is not callable: it is a {type(obj).__name__}.")
    return obj  # type: ignore[no-any-return]


def evaluator_id(evaluator: Callable[..., Any]) -> str:
    """What identifies an evaluator in cache keys: its ``cache_key`` attribute, else ``module:qualname``.

    Give your evaluator a ``cache_key`` (e.g. ``"my_eval:v2"``) and change it when its behaviour changes.

    >>> evaluator_id(len)
    'builtins:len'
    """
    key = getattr(evaluator, "cache_key", None)
    if key is not None:
        return str(key)
    mod = getattr(evaluator, "__module__", None) or type(evaluator).__module__
    qual = getattr(evaluator, "__qualname__", None) or type(evaluator).__qualname__
    return f"{mod}:{qual}"


def check_metrics(out: Any, where: str) -> dict[str, float]:
    """Check an evaluator's output is a non-empty ``{str: finite real}`` and return it as floats.

    ``where`` names the call (target and method) in the error message. A ``"per_item"`` entry is checked
    (:func:`check_output`) and left out.

    >>> check_metrics({"acc": np.float32(0.5), "n": 3}, "target 'a', method 'avg'")
    {'acc': 0.5, 'n': 3.0}
    >>> check_metrics({"acc": float("nan")}, "target 'a', method 'avg'")
    Traceback (most recent call last):
    ...
    adapterbank.errors.NonFiniteError: The evaluator returned a non-finite value for metric 'acc' (target 'a', method 'avg'): nan.
    """
    return check_output(out, where)[0]


def _real(val: Any) -> Any:
    """A 1-element numpy array/scalar or torch tensor as a Python number; anything else unchanged."""
    if isinstance(val, np.generic) or (isinstance(val, np.ndarray) and val.size == 1):
        return val.item()
    if hasattr(val, "numel") and hasattr(val, "item") and val.numel() == 1:  # a 1-element torch tensor
        return val.item()
    return val


def _per_item(name: str, val: Any, metric: float, where: str) -> list[float]:
    """One metric's per-item scores as floats: a non-empty 1-D sequence of finite reals whose mean is the metric."""
    if hasattr(val, "detach") and hasattr(val, "cpu"):  # a torch tensor
        val = val.detach().cpu().numpy()
    if isinstance(val, (str, bytes, Mapping)) or not isinstance(val, (Sequence, np.ndarray)):
        raise FormatError(f"The evaluator returned {type(val).__name__} for {PER_ITEM}[{name!r}] ({where}); it must be "
                          "a list (or 1-D array) of per-item scores.")
    try:
        arr = np.asarray(val, dtype=np.float64)  # (n,) bools count as 0/1
    except (TypeError, ValueError) as e:
        raise FormatError(f"The evaluator returned a non-numeric entry in {PER_ITEM}[{name!r}] ({where}): {e}.") from e
    if arr.ndim != 1 or arr.size == 0:
        raise FormatError(f"The evaluator returned {PER_ITEM}[{name!r}] of shape {arr.shape} ({where}); it must be "
                          "a non-empty 1-D list with one score per test item.")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise NonFiniteError(f"The evaluator returned a non-finite score for item {bad} in {PER_ITEM}[{name!r}] "
                             f"({where}): {arr[bad]}.")
    mean = float(arr.mean())
    if not math.isclose(mean, metric, rel_tol=1e-5, abs_tol=1e-6):
        raise FormatError(f"The evaluator returned {PER_ITEM}[{name!r}] with mean {mean!r} but {name!r} = {metric!r} "
                          f"({where}). Per-item scores must average to the metric; for a metric that is not a mean "
                          f"(F1, AUC, ...) leave it out of {PER_ITEM!r}, and its intervals are taken over targets.")
    return [float(x) for x in arr]


def check_output(out: Any, where: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Check an evaluator's output and split it into ``({metric: float}, {metric: [per-item floats]})``.

    The output is ``{metric: finite real, ...}``, optionally with the reserved key ``"per_item"`` mapping some
    of those metrics to their per-item scores: one finite real (or bool) per test item, in the task's order
    (the same items, in the same order, for every adapter), whose mean is the metric. The reports bootstrap
    over these items, paired across methods.

    >>> check_output({"acc": 0.5, "per_item": {"acc": [True, False]}}, "target 'a', method 'avg'")
    ({'acc': 0.5}, {'acc': [1.0, 0.0]})
    >>> check_output({"acc": 0.5, "per_item": {"f1": [1.0]}}, "target 'a'")
    Traceback (most recent call last):
    ...
    adapterbank.errors.FormatError: The evaluator returned per_item['f1'] (target 'a'), but no metric 'f1'. Metrics: acc.
    """
    if not isinstance(out, Mapping):
        raise FormatError(f"The evaluator must return a dict {{metric: float}} ({where}). "
                          f"Got {type(out).__name__} instead: {out!r:.200}.")
    per_item_in = out.get(PER_ITEM)
    if per_item_in is not None and not isinstance(per_item_in, Mapping):
        raise FormatError(f"The evaluator returned {type(per_item_in).__name__} under {PER_ITEM!r} ({where}); "
                          f"that key is reserved for per-item scores {{metric: [floats]}}. Rename a metric called {PER_ITEM!r}.")
    res: dict[str, float] = {}
    for name, val in out.items():
        if name == PER_ITEM:
            continue
        if not isinstance(name, str) or not name:
            raise FormatError(f"The evaluator returned a metric name {name!r} ({where}); names must be non-empty strings.")
        val = _real(val)
        if isinstance(val, bool) or not isinstance(val, numbers.Real):
            raise FormatError(f"The evaluator returned {type(val).__name__} {val!r:.100} for metric {name!r} ({where}); "
                              "each metric must be a finite real number.")
        f = float(val)
        if not math.isfinite(f):
            raise NonFiniteError(f"The evaluator returned a non-finite value for metric {name!r} ({where}): {f}.")
        res[name] = f
    if not res:
        raise FormatError(f"The evaluator returned an empty dict ({where}); it must return at least one metric.")
    items: dict[str, list[float]] = {}
    for name, val in (per_item_in or {}).items():
        if name not in res:
            raise FormatError(f"The evaluator returned {PER_ITEM}[{name!r}] ({where}), but no metric {name!r}. "
                              f"Metrics: {', '.join(res)}.")
        items[name] = _per_item(name, val, res[name], where)
    return res, items
