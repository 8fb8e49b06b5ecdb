"""The data an evaluation produces: one :class:`EvalRecord` per scored adapter, gathered in :class:`EvalResults`.

Everything here is plain data with a JSON round trip (``results.json``, schema 1), so a report can be
rebuilt from the file alone and every number travels with its inputs: target, method, k, parameters,
retrieved ids, distances and weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from adapterbank.errors import FormatError

__all__ = [
    "RESULTS_SCHEMA",
    "BASELINES",
    "METHOD_ORDER",
    "DISPLAY",
    "EvalRecord",
    "LambdaPath",
    "PrototypeMap",
    "EvalResults",
    "display_name",
    "order_methods",
    "best_methods",
]

RESULTS_SCHEMA = 1

BASELINES = ("pretrained", "sft")
"""Methods that are not compositions: the base model alone, and the target's own (supervised) adapter."""

METHOD_ORDER = ("pretrained", "sft", "nearest", "avg", "sim", "lin", "sparse")
"""Column order of the score tables (Table 1 of the seed paper, with Nearest from its Table 5)."""

DISPLAY = {"pretrained": "Pre-trained", "sft": "SFT", "nearest": "Nearest", "avg": "Avg", "sim": "Sim",
           "lin": "Lin", "sparse": "Sparse"}


def display_name(method: str) -> str:
    """The column title of a method.

    >>> display_name("sparse"), display_name("my_strategy")
    ('Sparse', 'my_strategy')
    """
    return DISPLAY.get(method, method)


def order_methods(methods: Iterable[str]) -> list[str]:
    """Known methods in table order, then any others in the order first seen (no duplicates).

    >>> order_methods(["sparse", "foo", "avg", "sft", "avg"])
    ['sft', 'avg', 'sparse', 'foo']
    """
    seen = list(dict.fromkeys(methods))
    return [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]


@dataclass
class EvalRecord:
    """One evaluator call: the scores of one adapter (or of the base model) on one target task.

    Attributes:
        target: id of the held-out adapter whose task is scored.
        method: ``pretrained``, ``sft`` or a composition strategy (``avg``, ``sim``, ``lin``, ``sparse``, ``nearest``).
        k: how many adapters were asked for (``None`` for the baselines).
        params: the strategy parameters asked for (e.g. ``{"lam_rel": 0.1}``).
        effective_params: the parameters the solver used (e.g. the absolute λ).
        ids, distances, weights: retrieved adapters in retrieval order, squared prototype distances, weights.
        status: the solver's status (``optimal``, ``min_norm``, ...) or ``baseline``.
        metrics: what the evaluator returned, as floats.
        sweep: ``None`` for the main table, ``"k"`` or ``"lam"`` for points of a sweep.
        include_self: whether the target's own adapter was left in the pool (seed paper, Table 6).
        cached: whether the metrics came from the cache rather than a fresh evaluator call.
        seconds: wall time of the evaluator call that produced the metrics.
    """

    target: str
    method: str
    k: int | None
    params: dict[str, float]
    effective_params: dict[str, float]
    ids: list[str]
    distances: list[float]
    weights: list[float]
    status: str
    metrics: dict[str, float]
    sweep: str | None = None
    include_self: bool = False
    cached: bool = False
    seconds: float = 0.0

    @property
    def is_baseline(self) -> bool:
        return self.method in BASELINES

    def weight_of(self, adapter_id: str) -> float | None:
        """The weight given to ``adapter_id``, or ``None`` if it was not retrieved."""
        for i, w in zip(self.ids, self.weights, strict=True):
            if i == adapter_id:
                return w
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "results") -> EvalRecord:
        try:
            return cls(
                target=str(d["target"]), method=str(d["method"]),
                k=None if d.get("k") is None else int(d["k"]),
                params={str(a): float(b) for a, b in dict(d.get("params") or {}).items()},
                effective_params={str(a): float(b) for a, b in dict(d.get("effective_params") or {}).items()},
                ids=[str(x) for x in d.get("ids") or []],
                distances=[float(x) for x in d.get("distances") or []],
                weights=[float(x) for x in d.get("weights") or []],
                status=str(d.get("status", "")),
                metrics={str(a): float(b) for a, b in dict(d["metrics"]).items()},
                sweep=d.get("sweep"), include_self=bool(d.get("include_self", False)),
                cached=bool(d.get("cached", False)), seconds=float(d.get("seconds", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: an evaluation record is missing a key or has a bad value ({e!r}): {d!r}") from e


@dataclass
class LambdaPath:
    """The whole λ-path of the sparse solution for one target: weights (m, k) at λ values (m,)."""

    target: str
    ids: list[str]
    lams: list[float]
    weights: list[list[float]]
    chosen_lam: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LambdaPath:
        return cls(str(d["target"]), [str(x) for x in d["ids"]], [float(x) for x in d["lams"]],
                   [[float(x) for x in row] for row in d["weights"]],
                   None if d.get("chosen_lam") is None else float(d["chosen_lam"]))


@dataclass
class PrototypeMap:
    """2-D PCA coordinates of every prototype of the evaluated space (for the map plot)."""

    ids: list[str]
    coords: list[list[float]]
    explained: list[float]
    space: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrototypeMap:
        return cls([str(x) for x in d["ids"]], [[float(x) for x in c] for c in d["coords"]],
                   [float(x) for x in d["explained"]], str(d.get("space", "")))


@dataclass
class EvalResults:
    """All records of one leave-one-out evaluation, its configuration and what the plots need.

    >>> r = EvalResults(records=[EvalRecord("a", "avg", 2, {}, {}, ["b", "c"], [1.0, 2.0], [0.5, 0.5], "ok",
    ...                                     {"acc": 0.7})], targets=["a"], config={"k": 2})
    >>> r.metrics, r.table("acc")
    (['acc'], {'a': {'avg': 0.7}})
    >>> EvalResults.from_dict(r.to_dict()).table("acc") == r.table("acc")
    True
    """

    records: list[EvalRecord]
    targets: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    lambda_paths: dict[str, LambdaPath] = field(default_factory=dict)
    prototype_map: PrototypeMap | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ----- queries -----------------------------------------------------------------------------
    @property
    def metrics(self) -> list[str]:
        """Metric names in the order first returned by the evaluator."""
        out: dict[str, None] = {}
        for r in self.records:
            out.update(dict.fromkeys(r.metrics))
        return list(out)

    @property
    def methods(self) -> list[str]:
        """Methods of the main table, in column order."""
        return order_methods(r.method for r in self.records if r.sweep is None)

    def main(self, target: str, method: str) -> EvalRecord | None:
        """The main-table record of (target, method), if any."""
        for r in self.records:
            if r.sweep is None and r.target == target and r.method == method:
                return r
        return None

    def table(self, metric: str) -> dict[str, dict[str, float]]:
        """``{target: {method: value}}`` of the main table for one metric (missing cells left out)."""
        out: dict[str, dict[str, float]] = {t: {} for t in self.targets}
        for r in self.records:
            if r.sweep is None and metric in r.metrics:
                out.setdefault(r.target, {})[r.method] = r.metrics[metric]
        return out

    def series(self, metric: str, sweep: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
        """Sweep points ``{method: {target: [(x, value), ...]}}`` sorted by x; x = k or requested ``lam_rel``."""
        out: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for r in self.records:
            if r.sweep != sweep or metric not in r.metrics:
                continue
            x = float(r.k) if sweep == "k" else float(r.params.get("lam_rel", math.nan))
            out.setdefault(r.method, {}).setdefault(r.target, []).append((x, r.metrics[metric]))
        for per in out.values():
            for t in per:
                per[t].sort()
        return out

    @property
    def sweeps(self) -> list[str]:
        return list(dict.fromkeys(r.sweep for r in self.records if r.sweep is not None))

    # ----- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` document (``{"schema": 1, ...}``)."""
        return {
            "schema": RESULTS_SCHEMA,
            "meta": self.meta,
            "config": self.config,
            "targets": list(self.targets),
            "metrics": self.metrics,
            "methods": self.methods,
            "records": [r.to_dict() for r in self.records],
            "lambda_paths": {t: p.to_dict() for t, p in self.lambda_paths.items()},
            "prototype_map": self.prototype_map.to_dict() if self.prototype_map else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "results.json") -> EvalResults:
        """Read a ``results.json`` document; refuses unknown schema versions."""
        if not isinstance(d, Mapping) or d.get("schema") != RESULTS_SCHEMA:
            found = d.get("schema") if isinstance(d, Mapping) else type(d).__name__
            raise FormatError(f"{where}: expected an evaluation results document with schema {RESULTS_SCHEMA}. "
                              f"Got schema {found!r} instead.")
        try:
            recs = [EvalRecord.from_dict(r, where) for r in d["records"]]
            paths = {str(t): LambdaPath.from_dict(p) for t, p in dict(d.get("lambda_paths") or {}).items()}
            pm = d.get("prototype_map")
            return cls(records=recs, targets=[str(t) for t in d["targets"]], config=dict(d.get("config") or {}),
                       lambda_paths=paths, prototype_map=PrototypeMap.from_dict(pm) if pm else None,
                       meta=dict(d.get("meta") or {}))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"{where}: malformed evaluation results ({e!r}).") from e


def best_methods(row: Mapping[str, float], candidates: Sequence[str], lower_is_better: bool = False) -> set[str]:
    """The methods among ``candidates`` with the best value in ``row`` (ties all win).

    >>> sorted(best_methods({"sft": 9.0, "avg": 0.5, "sparse": 0.7, "lin": 0.7}, ["avg", "lin", "sparse"]))
    ['lin', 'sparse']
    """
    vals = {m: row[m] for m in candidates if m in row and math.isfinite(row[m])}
    if not vals:
        return set()
    best = min(vals.values()) if lower_is_better else max(vals.values())
    tol = 1e-12 * max(1.0, abs(best))
    return {m for m, v in vals.items() if abs(v - best) <= tol}
