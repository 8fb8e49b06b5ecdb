"""Tune a bank: choose the composition setting by leave-one-out over the bank's own tasks (issue 11, item 1).

A *setting* is a strategy, its k and its parameters. The grid is data, ``{strategy: {param: [values]}}``
(a strategy without parameters maps to ``{}``), crossed with ``k_values``; a new parameter of a strategy
(e.g. ``lam_frac``) is one more key, no code. Every setting is scored by the leave-one-out harness
(:func:`~adapterbank.evaluate.evaluate`, cached per call): each target is composed from the *other* adapters,
using only its prototype, and scored by the user's evaluator. Let s(σ, t) be setting σ's score on target t
for the chosen metric (the evaluator's first one by default) and T the targets:

* **in-sample choice**: σ* = argbest_σ (1/|T|) Σ_t s(σ, t) — the best fixed setting in hindsight; the
  runner-up is the best of the others.
* **nested leave-one-out** (the overfitting guard): for each target t, σ*_{−t} = argbest_σ mean_{u ≠ t} s(σ, u)
  is chosen without t, and s(σ*_{−t}, t) is recorded; the nested mean (1/|T|) Σ_t s(σ*_{−t}, t) estimates what
  tuning then composing gives on a task the choice never saw. The in-sample mean is optimistic by construction;
  the gap between the two says how much the choice fits noise. Caveat: the other targets' scores were
  computed with t's adapter in the bank (their pools may hold it), as they are when the bank is used.
* **ties** (within 1e-12, relative) go to the earlier setting in grid order: strategies in the grid's order
  (the default grid lists the simpler first: nearest, avg, sim, lin, sparse), then smaller k, then the
  parameter values in the order given.

Paired bootstrap intervals (:mod:`adapterbank.evaluate.bootstrap`; over test items when the evaluator returns
``per_item`` scores, else over targets): best − runner-up, best − Pre-trained, nested − Pre-trained.

Example::

    res = tune(bank, "my_evals:score", cache_dir=".cache")      # writes the choice into the bank
    res.best.label, res.in_sample, res.nested
    compose(bank, target, strategy="auto")                      # uses it
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterbank._validation import check_k
from adapterbank.compose.compose import AUTO_SETTING
from adapterbank.compose.strategies import get_strategy
from adapterbank.errors import FormatError, LambdaAtHullWarning, ParameterError, UnknownNameError
from adapterbank.evaluate.bootstrap import Interval, stratified_paired_bootstrap
from adapterbank.evaluate.evaluator import Evaluator, evaluator_id, load_evaluator
from adapterbank.evaluate.harness import evaluate
from adapterbank.evaluate.results import N_BOOT, EvalRecord, EvalResults, best_methods

if TYPE_CHECKING:
    from adapterbank.bank import Bank
    from adapterbank.prototypes.space import PrototypeSpace

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_K_VALUES",
    "NESTED",
    "Setting",
    "TuneResult",
    "best_setting",
    "expand_grid",
    "nested_loo",
    "normalize_grid",
    "tune",
]

#: The default grid, simpler strategies first (the tie order). τ_rel and λ_rel around their defaults (1, 0.1).
DEFAULT_GRID: dict[str, dict[str, list[float]]] = {
    # sparse on the natural scale of Eq. 5: λ = F·λ_max (F = 0 would repeat lin; F = 1 is the hull projection)
    "nearest": {}, "avg": {}, "sim": {"tau_rel": [0.5, 1.0, 2.0]}, "lin": {}, "sparse": {"lam_frac": [0.25, 0.5, 0.75, 1.0]},
}
DEFAULT_K_VALUES: tuple[int, ...] = (3, 5)
#: The method name of the nested leave-one-out choice in the merged results' table.
NESTED = "auto_nested"


@dataclass(frozen=True)
class Setting:
    """One point of the grid: a strategy, its k and its parameters (in grid order)."""

    strategy: str
    k: int
    params: tuple[tuple[str, float], ...] = ()

    @property
    def label(self) -> str:
        """``"sim(k=3, tau_rel=0.5)"``: the setting's column name in the tables.

        >>> Setting("sim", 3, (("tau_rel", 0.5),)).label
        'sim(k=3, tau_rel=0.5)'
        """
        return f"{self.strategy}(k={self.k}{''.join(f', {n}={v:g}' for n, v in self.params)})"

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "k": self.k, "params": dict(self.params), "label": self.label}


def normalize_grid(grid: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> dict[str, dict[str, list[float]]]:
    """``grid`` (default :data:`DEFAULT_GRID`) checked against the strategy table: known strategies and parameters,
    values within bounds (duplicates dropped, order kept), as plain ``{strategy: {param: [floats]}}``.

    >>> normalize_grid({"sparse": {"lam_rel": ["0.1", 0.1, 1]}, "avg": {}})
    {'sparse': {'lam_rel': [0.1, 1.0]}, 'avg': {}}
    """
    grid = DEFAULT_GRID if grid is None else grid
    if not isinstance(grid, Mapping) or not grid:
        raise FormatError(f"The 'grid' parameter of tune must map strategies to {{param: [values]}}, e.g. "
                          f"{{'avg': {{}}, 'sparse': {{'lam_rel': [0.01, 0.1]}}}}. Got {grid!r} instead.")
    out: dict[str, dict[str, list[float]]] = {}
    for name, prm in grid.items():
        strat = get_strategy(name)
        if not isinstance(prm, Mapping):
            raise FormatError(f"tune grid: strategy {name!r} must map to {{param: [values]}}. Got {prm!r} instead.")
        out[name] = {}
        for pname, vals in prm.items():
            p = strat.param(str(pname))  # an unknown parameter lists the valid ones
            vals = [vals] if isinstance(vals, (int, float, str)) else list(vals)
            if not vals:
                raise ParameterError(f"tune grid: {name}.{pname} has no values. Give at least one.")
            out[name][p.name] = list(dict.fromkeys(p.check(name, v) for v in vals))
    return out


def expand_grid(grid: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                k_values: Sequence[int] = DEFAULT_K_VALUES) -> list[Setting]:
    """The settings of ``grid`` × ``k_values`` in tie order (grid order, then k ascending, then parameter values
    as given); a strategy whose weights do not depend on k (nearest) is tried at the smallest k only.

    >>> [s.label for s in expand_grid({"avg": {}, "sparse": {"lam_rel": [0.1, 1]}, "nearest": {}}, [5, 3])]
    ['avg(k=3)', 'avg(k=5)', 'sparse(k=3, lam_rel=0.1)', 'sparse(k=3, lam_rel=1)', 'sparse(k=5, lam_rel=0.1)', \
'sparse(k=5, lam_rel=1)', 'nearest(k=3)']
    """
    ks = sorted({check_k(k, "tune") for k in k_values})
    if not ks:
        raise ParameterError("The 'k_values' parameter of tune (--grid-k) must hold at least one k ≥ 1. Got none.")
    out: list[Setting] = []
    for name, prm in normalize_grid(grid).items():
        for k in ks if get_strategy(name).depends_on_k else ks[:1]:
            for combo in itertools.product(*prm.values()):
                out.append(Setting(name, k, tuple(zip(prm, combo))))
    return out


def best_setting(means: Mapping[str, float], order: Sequence[str], lower_is_better: bool = False) -> str | None:
    """The label in ``order`` with the best mean (ties within 1e-12 relative → the earliest); ``None`` if none.

    >>> best_setting({"a": 0.5, "b": 0.7, "c": 0.7}, ["a", "b", "c"]), best_setting({"a": 1.0}, ["a"], True)
    ('b', 'a')
    """
    best = best_methods(means, order, lower_is_better)
    return next((m for m in order if m in best), None)


def nested_loo(scores: Mapping[str, Mapping[str, float]], order: Sequence[str], targets: Sequence[str],
               lower_is_better: bool = False) -> dict[str, str]:
    """``{target t: the setting chosen on the other targets}`` (nested leave-one-out; needs ≥ 2 targets).

    ``scores[label][target]`` is the leave-one-out score of a setting on a target; the choice for t is
    :func:`best_setting` of the means over the targets other than t.

    >>> s = {"x": {"t1": 1.0, "t2": 0.0, "t3": 0.0}, "y": {"t1": 0.0, "t2": 0.4, "t3": 0.4}}
    >>> nested_loo(s, ["x", "y"], ["t1", "t2", "t3"])
    {'t1': 'y', 't2': 'x', 't3': 'x'}
    """
    if len(targets) < 2:
        raise ParameterError(f"Nested leave-one-out needs at least 2 targets. Got {len(targets)}.")
    out: dict[str, str] = {}
    for t in targets:
        rest = [u for u in targets if u != t]
        means = {m: sum(scores[m][u] for u in rest) / len(rest) for m in order if all(u in scores[m] for u in rest)}
        choice = best_setting(means, order, lower_is_better)
        if choice is None:
            raise UnknownNameError(f"Nested leave-one-out: no setting was scored on every target but {t!r}.")
        out[t] = choice
    return out


@dataclass
class TuneResult:
    """What :func:`tune` found. ``scores[label][target]``: leave-one-out score of each setting; ``means``: their
    means over targets (in-sample); ``nested_choice[t]``/``nested_scores[t]``: the setting chosen without t and
    its score on t; ``intervals``: paired bootstrap :class:`~adapterbank.evaluate.bootstrap.Interval` s
    (``best_vs_runner_up``, ``best_vs_pretrained``, ``nested_vs_pretrained``, where they can be formed);
    ``results``: every record, methods named by setting label (plus Pre-trained, SFT and ``auto_nested``)."""

    settings: list[Setting]
    metric: str
    lower_is_better: bool
    targets: list[str]
    scores: dict[str, dict[str, float]]
    means: dict[str, float]
    best: Setting
    runner_up: Setting | None
    nested_choice: dict[str, str]
    nested_scores: dict[str, float]
    baselines: dict[str, float]
    intervals: dict[str, Interval]
    interval_units: dict[str, str]
    results: EvalResults
    evaluator: str
    space: str | None
    grid: dict[str, dict[str, list[float]]]
    k_values: list[int]
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def in_sample(self) -> float:
        """Mean over targets of the chosen setting (the best fixed setting in hindsight)."""
        return self.means[self.best.label]

    @property
    def nested(self) -> float | None:
        """Mean over targets of the nested leave-one-out choice (``None`` with a single target)."""
        return sum(self.nested_scores.values()) / len(self.nested_scores) if self.nested_scores else None

    def best_per_strategy(self) -> dict[str, str]:
        """``{strategy: label of its best setting in hindsight}``."""
        out: dict[str, str] = {}
        for s in dict.fromkeys(x.strategy for x in self.settings):
            order = [x.label for x in self.settings if x.strategy == s]
            b = best_setting(self.means, order, self.lower_is_better)
            if b is not None:
                out[s] = b
        return out

    def setting_record(self) -> dict[str, Any]:
        """The JSON written into the bank under ``compose.auto`` (read by ``compose(strategy="auto")``)."""
        ru = self.runner_up
        return {
            "strategy": self.best.strategy, "params": dict(self.best.params), "k": self.best.k,
            "label": self.best.label, "metric": self.metric, "lower_is_better": self.lower_is_better,
            "in_sample": self.in_sample, "nested": self.nested,
            "runner_up": None if ru is None else {**ru.to_dict(), "mean": self.means[ru.label]},
            "pretrained": self.baselines.get("pretrained"), "sft": self.baselines.get("sft"),
            "n_targets": len(self.targets), "space": self.space, "date": self.created, "evaluator": self.evaluator,
            "grid": self.grid, "k_values": self.k_values,
        }

    def to_dict(self) -> dict[str, Any]:
        """The ``tune.json`` document."""
        return {
            "schema": 1, "setting": self.setting_record(),
            "settings": [s.to_dict() for s in self.settings], "targets": self.targets,
            "means": self.means, "scores": self.scores, "best_per_strategy": self.best_per_strategy(),
            "nested": {"mean": self.nested, "choice": self.nested_choice, "scores": self.nested_scores},
            "baselines": self.baselines,
            "intervals": {k: {**v._asdict(), "unit": self.interval_units[k]} for k, v in self.intervals.items()},
        }

    def markdown(self) -> str:
        """``tune.md``: the choice, in-sample vs nested, the intervals and the per-setting table."""
        low = "lower" if self.lower_is_better else "higher"
        ru = self.runner_up
        lines = [f"# adapterbank tune — {self.metric} ({low} is better)", "",
                 f"Chosen: **{self.best.label}**, in-sample mean {self.in_sample:.4f} (best fixed setting in hindsight)."]
        if ru is not None:
            lines.append(f"Runner-up: {ru.label}, mean {self.means[ru.label]:.4f}.")
        nested = "n/a (one target)" if self.nested is None else f"{self.nested:.4f}"
        lines += [f"Nested leave-one-out mean (choice made without the target): {nested}.",
                  "Baselines: " + ", ".join(f"{k} {v:.4f}" for k, v in self.baselines.items()) + ".", ""]
        for name, iv in self.intervals.items():
            lines.append(f"- {name.replace('_', ' ')}: {iv.diff:+.4f} [{iv.lo:+.4f}, {iv.hi:+.4f}] "
                         f"(95% paired bootstrap over {self.interval_units[name]}s)")
        lines += ["", "| setting | mean | chosen without the target for |", "|:---|---:|:---|"]
        for s in self.settings:
            picked = sorted(t for t, c in self.nested_choice.items() if c == s.label)
            mark = "**" if s == self.best else ""
            lines.append(f"| {mark}{s.label}{mark} | {self.means[s.label]:.4f} | {', '.join(picked)} |")
        return "\n".join(lines) + "\n"


def _interval(res: EvalResults, metric: str, a: str, b: str, n_boot: int, seed: int) -> tuple[Interval, str] | None:
    units = res.paired_units(metric, a, b)
    if units is None:
        return None
    unit, xa, xb, _ = units
    return stratified_paired_bootstrap(xa, xb, n_boot=n_boot, seed=seed), unit


def tune(
    bank: Bank,
    evaluator: Evaluator | str,
    *,
    grid: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    metric: str | None = None,
    lower_is_better: bool = False,
    cache_dir: str | Path | None = None,
    nested: bool = True,
    save: bool = True,
    tasks: Mapping[str, Any] | None = None,
    targets: Sequence[str] | None = None,
    space: PrototypeSpace | str | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    progress: bool = False,
) -> TuneResult:
    """Score every setting of ``grid`` × ``k_values`` by leave-one-out and choose one (see the module docstring).

    Args:
        bank: an open bank whose adapters have prototypes (the targets, in turn).
        evaluator: ``(adapter | None, task) -> {metric: float}`` or ``"module:function"``, as for ``evaluate``.
        grid: ``{strategy: {param: [values]}}``; default :data:`DEFAULT_GRID`.
        k_values: the k to try; default (3, 5).
        metric: the metric to choose by; default the evaluator's first.
        lower_is_better: choose the smallest mean instead of the largest.
        cache_dir: the harness's result cache (a rerun, or a wider grid, only calls the evaluator for what is new).
        nested: compute the nested leave-one-out figure (needs ≥ 2 targets; skipped with one).
        save: write :meth:`TuneResult.setting_record` into the bank (``compose.auto``) for ``strategy="auto"``.
        tasks, targets, space: passed to :func:`~adapterbank.evaluate.evaluate`.
        n_boot, seed: of the paired bootstrap intervals.
        progress: a progress bar per setting.
    """
    ev: Evaluator = load_evaluator(evaluator) if isinstance(evaluator, str) else evaluator
    ev_name = evaluator if isinstance(evaluator, str) and getattr(ev, "cache_key", None) is None else evaluator_id(ev)
    plain_grid = normalize_grid(grid)
    settings = expand_grid(plain_grid, k_values)
    records: list[EvalRecord] = []
    tgt: list[str] = []
    config: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    n_hull = 0
    for i, st in enumerate(settings):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LambdaAtHullWarning)
            res = evaluate(bank, ev, strategies=[st.strategy], k=st.k, params={st.strategy: dict(st.params)} if
                           st.params else None, baselines=("pretrained", "sft") if i == 0 else (),
                           cache_dir=cache_dir, tasks=tasks, targets=targets, space=space, progress=progress)
        for w in caught:
            if issubclass(w.category, LambdaAtHullWarning):
                n_hull += 1
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        if i == 0:
            tgt, config, meta = list(res.targets), dict(res.config), dict(res.meta)
        for r in res.records:
            if r.sweep is None:
                records.append(r if r.is_baseline else EvalRecord.from_dict({**r.to_dict(), "method": st.label}))
        if i:  # the first run's counts came with its meta
            for count in ("evaluator_calls", "cache_hits"):
                meta[count] = meta.get(count, 0) + res.meta.get(count, 0)
    if n_hull:
        warnings.warn(f"sparse: λ ≥ λ_max in {n_hull} of the grid's settings on some target: there the weights are the "
                      "convex-hull projection (no negative weight), so larger λ_rel values tie.",
                      LambdaAtHullWarning, stacklevel=2)
    merged = EvalResults(records=records, targets=tgt, config={**config, "tune": {"grid": plain_grid,
                                                                                   "k_values": sorted(set(k_values))}},
                         meta=meta)
    metrics = merged.metrics
    metric = metric if metric is not None else (metrics[0] if metrics else None)
    if metric is None or metric not in metrics:
        raise UnknownNameError(f"The metric {metric!r} (--metric) is not among the evaluator's metrics: "
                               f"{', '.join(metrics) or 'none'}.")
    table = merged.table(metric)
    order = [s.label for s in settings]
    scores = {m: {t: table[t][m] for t in tgt if m in table[t]} for m in order}
    all_means = merged.means(metric)  # scored on every target only
    means = {m: all_means[m] for m in order if m in all_means}
    best_label = best_setting(means, order, lower_is_better)
    if best_label is None:
        raise UnknownNameError(f"tune: no setting was scored on every target for metric {metric!r}.")
    ru_label = best_setting(means, [m for m in order if m != best_label], lower_is_better)
    by_label = {s.label: s for s in settings}
    choice: dict[str, str] = {}
    nested_scores: dict[str, float] = {}
    if nested and len(tgt) >= 2:
        choice = nested_loo(scores, order, tgt, lower_is_better)
        nested_scores = {t: scores[choice[t]][t] for t in tgt}
        for t in tgt:
            rec = merged.main(t, choice[t])
            if rec is not None:
                merged.records.append(EvalRecord.from_dict({**rec.to_dict(), "method": NESTED}))
    baselines = {b: v for b, v in all_means.items() if b in ("pretrained", "sft")}
    intervals: dict[str, Interval] = {}
    units: dict[str, str] = {}
    pairs = {"best_vs_runner_up": (best_label, ru_label), "best_vs_pretrained": (best_label, "pretrained"),
             "nested_vs_pretrained": (NESTED, "pretrained")}
    for name, (a, b) in pairs.items():
        got = _interval(merged, metric, a, b, n_boot, seed) if b is not None else None
        if got is not None:
            intervals[name], units[name] = got
    out = TuneResult(settings, metric, lower_is_better, tgt, scores, means, by_label[best_label],
                     by_label.get(ru_label) if ru_label else None, choice, nested_scores, baselines, intervals, units,
                     merged, str(ev_name), config.get("space"), plain_grid, sorted(set(k_values)))
    log.info("tune: chose %s (in-sample %.4g, nested %s) over %d settings × %d targets", out.best.label,
             out.in_sample, out.nested, len(settings), len(tgt))
    if save:
        bank.set_setting(AUTO_SETTING, json.loads(json.dumps(out.setting_record())))
    return out
