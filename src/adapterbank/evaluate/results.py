"""The data an evaluation produces: one :class:`EvalRecord` per scored adapter, gathered in :class:`EvalResults`.

Everything here is plain data with a JSON round trip (``results.json``, schema 1), so a report can be
rebuilt from the file alone and every number travels with its inputs: target, method, k, parameters,
retrieved ids, distances and weights — and, when the evaluator returned them, the per-item scores that
:meth:`EvalResults.comparisons` bootstraps (keys added to schema 1 are optional: older files still load).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from adapterbank.errors import FormatError

log = logging.getLogger(__name__)

__all__ = [
    "RESULTS_SCHEMA",
    "BASELINES",
    "BASELINE_DISPLAY",
    "method_order",
    "EvalRecord",
    "LambdaPath",
    "PrototypeMap",
    "EvalResults",
    "display_name",
    "order_methods",
    "best_methods",
    "Comparison",
    "N_BOOT",
    "CI",
    "SWEEP_PARAMS",
    "sweep_label",
]

RESULTS_SCHEMA = 1

N_BOOT = 2000
"""Bootstrap replicates of the paired intervals in the reports."""
CI = 0.95
"""Coverage of the paired intervals in the reports."""

BASELINES = ("pretrained", "sft")
"""Methods that are not compositions: the base model alone, and the target's own (supervised) adapter."""

SWEEP_PARAMS = {"lam": "lam_rel", "lam_frac": "lam_frac"}
"""The sparse parameter each λ sweep varies (``sweep_lam``: ``lam_rel``; ``sweep_lam_frac``: ``lam_frac`` = λ/λ_max)."""


def sweep_label(sweep: str) -> str:
    """The name of a sweep's x: ``k``, or the sparse parameter it varies.

    >>> sweep_label("k"), sweep_label("lam"), sweep_label("lam_frac")
    ('k', 'lam_rel', 'lam_frac')
    """
    return SWEEP_PARAMS.get(sweep, sweep)


BASELINE_DISPLAY = {"pretrained": "Pre-trained", "sft": "SFT"}
"""Column titles of the baselines; the strategies' come from their rows of the strategy table."""


def method_order() -> tuple[str, ...]:
    """Column order of the score tables: the baselines, then the strategies of
    :data:`~adapterbank.compose.strategies.STRATEGIES` by their ``order`` (Table 1 of the seed paper, with
    Nearest from its Table 5), registered ones after the built-ins.

    >>> method_order()[:7]
    ('pretrained', 'sft', 'nearest', 'avg', 'sim', 'lin', 'sparse')
    """
    from adapterbank.compose.strategies import STRATEGIES

    rows = sorted(enumerate(STRATEGIES.values()), key=lambda x: (x[1].order, x[0]))
    return BASELINES + tuple(s.name for _, s in rows)


def display_name(method: str) -> str:
    """The column title of a method: a baseline's, a strategy's ``display`` from the table, else the name.

    >>> display_name("sparse"), display_name("sft"), display_name("my_strategy")
    ('Sparse', 'SFT', 'my_strategy')
    """
    from adapterbank.compose.strategies import STRATEGIES

    if method in BASELINE_DISPLAY:
        return BASELINE_DISPLAY[method]
    s = STRATEGIES.get(method)
    return s.display if s is not None else method


def order_methods(methods: Iterable[str]) -> list[str]:
    """Known methods in table order, then any others in the order first seen (no duplicates).

    >>> order_methods(["sparse", "foo", "avg", "sft", "avg"])
    ['sft', 'avg', 'sparse', 'foo']
    """
    seen = list(dict.fromkeys(methods))
    order = method_order()
    return [m for m in order if m in seen] + [m for m in seen if m not in order]


@dataclass
class EvalRecord:
    """One evaluator call: the scores of one adapter (or of the base model) on one target task.

    Attributes:
        target: id of the held-out adapter whose task is scored.
        method: ``pretrained``, ``sft`` or the name of a composition strategy (a row of ``STRATEGIES``).
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
        per_item: ``{metric: [score of item 0, item 1, ...]}`` when the evaluator returned per-item scores
            (their mean is the metric; items in the task's order, the same for every method).
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
    per_item: dict[str, list[float]] = field(default_factory=dict)

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
                per_item={str(a): [float(x) for x in b] for a, b in dict(d.get("per_item") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: an evaluation record is missing a key or has a bad value ({e!r}): {d!r}") from e


@dataclass
class LambdaPath:
    """The whole λ-path of the sparse solution for one target: weights (m, k) at λ values (m,), the λ that
    was chosen (the main table's) and λ_max (``None`` in results written before it was stored)."""

    target: str
    ids: list[str]
    lams: list[float]
    weights: list[list[float]]
    chosen_lam: float | None = None
    lam_max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LambdaPath:
        return cls(str(d["target"]), [str(x) for x in d["ids"]], [float(x) for x in d["lams"]],
                   [[float(x) for x in row] for row in d["weights"]],
                   None if d.get("chosen_lam") is None else float(d["chosen_lam"]),
                   None if d.get("lam_max") is None else float(d["lam_max"]))


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
class Comparison:
    """One method against a reference on one metric: Δ = mean(method) − mean(reference) and its paired interval.

    Δ is the mean over targets of the per-target difference (the difference of the score table's Mean row);
    the interval is the paired bootstrap percentile interval (:mod:`adapterbank.evaluate.bootstrap`).

    Attributes:
        method, reference: what is compared (Δ in the metric's own units; positive: method scored higher).
        diff, lo, hi: Δ and its interval.
        unit: ``"item"`` — the evaluator's per-item scores, resampled within each target — or ``"target"``.
        n_units: items (all targets together) or targets resampled.
        n_targets: targets both methods were scored on.
        better: ``True``/``False`` when the interval excludes 0 and the method is better/worse (respecting
            lower-is-better); ``None`` when it holds 0.
    """

    method: str
    reference: str
    diff: float
    lo: float
    hi: float
    unit: str
    n_units: int
    n_targets: int
    better: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Comparison:
        b = d.get("better")
        return cls(str(d["method"]), str(d["reference"]), float(d["diff"]), float(d["lo"]), float(d["hi"]),
                   str(d["unit"]), int(d["n_units"]), int(d["n_targets"]), None if b is None else bool(b))


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
        """Sweep points ``{method: {target: [(x, value), ...]}}`` sorted by x; x = k, or the requested ``lam_rel``
        (``sweep="lam"``) or ``lam_frac`` (``sweep="lam_frac"``): see :data:`SWEEP_PARAMS`."""
        out: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for r in self.records:
            if r.sweep != sweep or metric not in r.metrics:
                continue
            x = float(r.k) if sweep == "k" else float(r.params.get(sweep_label(sweep), math.nan))
            out.setdefault(r.method, {}).setdefault(r.target, []).append((x, r.metrics[metric]))
        for per in out.values():
            for t in per:
                per[t].sort()
        return out

    def means(self, metric: str) -> dict[str, float]:
        """Mean over targets of each main-table method scored on every target (the Mean row)."""
        table = self.table(metric)
        out: dict[str, float] = {}
        for m in self.methods:
            vals = [table[t][m] for t in self.targets if m in table.get(t, {})]
            if vals and len(vals) == len(self.targets):
                out[m] = sum(vals) / len(vals)
        return out

    def paired_units(self, metric: str, method: str, reference: str
                     ) -> tuple[str, list[list[float]], list[list[float]], int] | None:
        """The paired samples to bootstrap ``method`` against ``reference``: (unit, groups of a, groups of b, targets).

        Per-item scores (one group per target) when both methods have them on every common target with the same
        number of items; else the targets' scores (one group), when there are at least two targets; else ``None``.
        """
        main = {(r.target, r.method): r for r in self.records if r.sweep is None and metric in r.metrics}
        common = [t for t in self.targets if (t, method) in main and (t, reference) in main]
        if not common:
            return None
        ra, rb = [main[(t, method)] for t in common], [main[(t, reference)] for t in common]
        ia, ib = [r.per_item.get(metric) for r in ra], [r.per_item.get(metric) for r in rb]
        if (all(x is not None and y is not None and len(x) == len(y) for x, y in zip(ia, ib))
                and any(len(x) >= 2 for x in ia if x is not None)):
            return "item", [list(x) for x in ia if x is not None], [list(y) for y in ib if y is not None], len(common)
        if any(x is not None for x in ia + ib):
            log.info("%s vs %s on %s: per-item scores missing or of different lengths on some target; "
                     "bootstrapping over targets", method, reference, metric)
        if len(common) < 2:
            return None
        return "target", [[r.metrics[metric] for r in ra]], [[r.metrics[metric] for r in rb]], len(common)

    def comparisons(self, metric: str, lower_is_better: bool = False, *, n_boot: int = N_BOOT, seed: int = 0,
                    ci: float = CI) -> dict[str, dict[str, Comparison]]:
        """``{method: {"vs_pretrained": Comparison, "vs_best_other": Comparison}}`` for one metric.

        ``vs_pretrained``: every method but Pre-trained against Pre-trained. ``vs_best_other``: each zero-shot
        strategy against the other zero-shot strategy with the best Mean (Pre-trained and SFT are not candidates:
        one is the floor, the other an oracle that sees the target's own adapter); SFT against the best
        zero-shot strategy (the oracle gap). Ties go to the first in column order. A key is missing when no
        interval can be formed (a single target without per-item scores). Deterministic for a ``seed``.
        """
        from adapterbank.evaluate.bootstrap import stratified_paired_bootstrap

        table = self.table(metric)
        cols = [m for m in self.methods if any(m in row for row in table.values())]
        means = self.means(metric)
        zero_shot = [m for m in cols if m not in BASELINES]
        out: dict[str, dict[str, Comparison]] = {}
        for m in cols:
            refs: dict[str, str] = {}
            if m != "pretrained" and "pretrained" in cols:
                refs["vs_pretrained"] = "pretrained"
            if m == "sft" or m in zero_shot:
                others = [o for o in zero_shot if o != m]
                best = best_methods(means, others, lower_is_better)
                if best:
                    refs["vs_best_other"] = next(o for o in others if o in best)
            for key, ref in refs.items():
                units = self.paired_units(metric, m, ref)
                if units is None:
                    continue
                unit, a, b, n_t = units
                d, lo, hi = stratified_paired_bootstrap(a, b, n_boot=n_boot, seed=seed, ci=ci)
                better = None if lo <= 0.0 <= hi else (d > 0) != lower_is_better
                out.setdefault(m, {})[key] = Comparison(m, ref, d, lo, hi, unit, sum(len(x) for x in a), n_t, better)
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
