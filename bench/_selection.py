"""Composition selection on a benchmark's bank (issue 11, item 4): tune grid, λ-fraction sweep, merge methods.

Shared by Benchmark A (``loo_text.py``) and Benchmark B (``loo_segmentation.py``), over the script's own bank,
evaluator and tasks (the evaluator should return ``per_item`` scores, so the intervals resample test items):

1. :func:`adapterbank.evaluate.tune.tune` with its default grid (k ∈ {3, 5}; nearest, avg, sim τ_rel ∈ {0.5, 1, 2},
   lin, sparse lam_frac ∈ {0.25, 0.5, 0.75, 1}): every fixed setting's per-target scores and mean, the best fixed
   setting in hindsight (in-sample) and ``auto`` (nested leave-one-out: the setting for target t is chosen on
   the other targets only).
2. The λ-fraction sweep of Sparse at the benchmark's main k: lam_frac ∈ {0, 0.25, 0.5, 0.75, 1}.
3. The merge methods (ties, dare_ties, dare_linear, magnitude_prune, default parameters) with the weights of the
   best fixed setting in hindsight (its strategy, k and parameters; ``linear`` with those weights is that
   setting's own column).

Everything goes through the harness's result cache (``cache_dir``): the merge-method scores are stored with
:class:`~adapterbank.evaluate.cache.ResultCache` under their own keys, so a rerun recomputes nothing.
:func:`selection_markdown` writes the per-benchmark table (mean, paired bootstrap interval vs Pre-trained,
fraction of the Pre-trained → SFT gap closed) and the per-target check of ``auto``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.selection")

LAM_FRACS = (0.0, 0.25, 0.5, 0.75, 1.0)
MERGES = ("ties", "dare_ties", "dare_linear", "magnitude_prune")
NESTED_LABEL = "auto (nested LOO)"
_MERGE_SCHEMA = 1


@dataclass
class Selection:
    """What :func:`run_selection` measured (``scores[column][target]``; columns in table order)."""

    metric: str
    main_k: int
    targets: list[str]
    settings: list[str]  # every fixed setting's label, grid order
    scores: dict[str, dict[str, float]]  # settings, "pretrained", "sft", NESTED_LABEL, sweep and merge columns
    per_item: dict[str, dict[str, list[float]]]  # same columns: {target: item scores} where known
    best: str  # best fixed setting in hindsight
    runner_up: str | None
    nested_choice: dict[str, str]
    sweep: list[str]  # the λ-fraction sweep's column names
    merges: list[str]  # the merge columns' names
    merge_source: str  # the setting whose weights the merge methods use
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def mean(self, col: str) -> float:
        v = self.scores[col]
        return float(np.mean([v[t] for t in self.targets]))

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "main_k": self.main_k, "targets": self.targets, "settings": self.settings,
                "scores": self.scores, "means": {c: self.mean(c) for c in self.scores}, "best": self.best,
                "runner_up": self.runner_up, "nested_choice": self.nested_choice, "sweep": self.sweep,
                "merges": self.merges, "merge_source": self.merge_source, "seconds": self.seconds,
                "calls": self.calls}


def _sweep_label(f: float) -> str:
    return f"sparse(lam_frac={f:g}) sweep"


def _merge_label(m: str, source: str) -> str:
    return f"{m} [{source}]"


def run_selection(bank: Any, evaluator: Any, tasks: Mapping[str, Any], *, main_k: int, cache_dir: Path,
                  metric: str | None = None, grid: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                  k_values: Sequence[int] | None = None, lam_fracs: Sequence[float] = LAM_FRACS,
                  merges: Sequence[str] = MERGES, space: Any = None) -> Selection:
    """Stages 1–3 of the module docstring on ``bank`` (targets: the keys of ``tasks``), cached in ``cache_dir``."""
    from adapterbank.compose import compose
    from adapterbank.compose.merge_methods import get_merge_method
    from adapterbank.evaluate import evaluate
    from adapterbank.evaluate.cache import ResultCache, adapter_digest, cache_key
    from adapterbank.evaluate.evaluator import check_output, evaluator_id
    from adapterbank.evaluate.results import EvalRecord
    from adapterbank.evaluate.tune import DEFAULT_K_VALUES, tune

    t0 = time.perf_counter()
    tr = tune(bank, evaluator, grid=grid, k_values=DEFAULT_K_VALUES if k_values is None else k_values,
              metric=metric, cache_dir=cache_dir, save=False, tasks=tasks, space=space)
    metric = tr.metric
    t_tune = time.perf_counter() - t0
    targets = list(tr.targets)
    main = {(r.target, r.method): r for r in tr.results.records if r.sweep is None}
    scores: dict[str, dict[str, float]] = {}
    per_item: dict[str, dict[str, list[float]]] = {}

    def put(col: str, t: str, rec: Any) -> None:
        scores.setdefault(col, {})[t] = float(rec.metrics[metric])
        if metric in rec.per_item:
            per_item.setdefault(col, {})[t] = list(rec.per_item[metric])

    for t in targets:
        for col in ["pretrained", "sft", *[s.label for s in tr.settings]]:
            put(col, t, main[(t, col)])
        put(NESTED_LABEL, t, main[(t, tr.nested_choice[t])])

    # 2. λ-fraction sweep of Sparse at the main k
    t1 = time.perf_counter()
    sw = evaluate(bank, evaluator, strategies=["sparse"], k=main_k, tasks=tasks, baselines=(),
                  sweep_lam_frac=list(lam_fracs), cache_dir=cache_dir, space=space)
    sweep_cols = []
    for f in sorted({float(x) for x in lam_fracs}):
        col = _sweep_label(f)
        sweep_cols.append(col)
        for r in sw.records:
            if r.sweep == "lam_frac" and math.isclose(float(r.params.get("lam_frac", -1.0)), f):
                put(col, r.target, r)
    t_sweep = time.perf_counter() - t1

    # 3. merge methods with the best fixed setting's weights
    t2 = time.perf_counter()
    src = tr.best
    cache = ResultCache(Path(cache_dir) / "merge_methods")
    ev_id = evaluator_id(evaluator)
    n_calls = 0
    cards = {c.id: c for c in bank.list()}
    methods = {m: get_merge_method(m).resolve(None) for m in merges}  # each method's default parameters
    merge_cols = [_merge_label(m, src.label) for m in merges]
    for t in targets:
        p_t = bank.get_prototype(t, space)
        # retrieval and weights do not depend on the merge method: one linear composition gives the cache key,
        # and a method's (dense, SVD-refactored) composite is built only when its score is not cached
        base = compose(bank, p_t, k=src.k, strategy=src.strategy, params=dict(src.params) or None, exclude=[t])
        proto_key = cache_key({"v": np.asarray(p_t.vector, dtype=np.float64).round(10).tolist()})
        for (m, mp), col in zip(methods.items(), merge_cols, strict=True):
            parts = {"schema": _MERGE_SCHEMA, "target": t, "merge": m, "merge_params": mp, "setting": src.label,
                     "ids": list(base.ids), "weights": [round(float(w), 12) for w in base.weights],
                     "adapters": [adapter_digest(cards[i]) for i in base.ids], "evaluator": ev_id,
                     "prototype": proto_key}
            key = cache_key(parts)
            rec = cache.lookup(key, parts)
            if rec is None:
                comp = compose(bank, p_t, k=src.k, strategy=src.strategy, params=dict(src.params) or None,
                               exclude=[t], merge=m, merge_params=mp)
                t3 = time.perf_counter()
                got, items = check_output(evaluator(comp.adapter, tasks[t]), f"target {t!r}, merge {m!r}")
                n_calls += 1
                rec = EvalRecord(target=t, method=col, k=src.k, params=dict(src.params), effective_params=dict(comp.params),
                                 ids=list(comp.ids), distances=[float(d) for d in comp.distances],
                                 weights=[float(w) for w in comp.weights], status=comp.status,
                                 metrics=got, seconds=time.perf_counter() - t3, per_item=items)
                cache.store(key, parts, rec)
            put(col, t, rec)
    for m, col in zip(merges, merge_cols, strict=True):
        log.info("merge %s [%s]: mean %s %.4f", m, src.label, metric, float(np.mean([scores[col][t] for t in targets])))
    t_merge = time.perf_counter() - t2
    return Selection(metric, main_k, targets, [s.label for s in tr.settings], scores, per_item, src.label,
                     None if tr.runner_up is None else tr.runner_up.label, dict(tr.nested_choice), sweep_cols,
                     merge_cols, src.label,
                     seconds={"tune": round(t_tune, 1), "sweep": round(t_sweep, 1), "merge": round(t_merge, 1)},
                     calls={"tune_evaluator_calls": int(tr.results.meta.get("evaluator_calls", 0)),
                            "tune_cache_hits": int(tr.results.meta.get("cache_hits", 0)),
                            "sweep_evaluator_calls": int(sw.meta.get("evaluator_calls", 0)),
                            "merge_evaluator_calls": n_calls})


def gap_closed(sel: Selection, col: str) -> float:
    """(mean(col) − mean(Pre-trained)) / (mean(SFT) − mean(Pre-trained))."""
    pre, sft = sel.mean("pretrained"), sel.mean("sft")
    return (sel.mean(col) - pre) / (sft - pre) if sft != pre else math.nan


def paired(sel: Selection, a: str, b: str, n_boot: int = 2000, seed: int = 0) -> tuple[Any, str]:
    """Paired bootstrap of column ``a`` − column ``b``: over test items within targets when both have per-item
    scores, else over targets. -> (Interval, unit)."""
    from adapterbank.evaluate.bootstrap import stratified_paired_bootstrap

    pa, pb = sel.per_item.get(a, {}), sel.per_item.get(b, {})
    if all(t in pa and t in pb and len(pa[t]) == len(pb[t]) for t in sel.targets):
        return stratified_paired_bootstrap([pa[t] for t in sel.targets], [pb[t] for t in sel.targets],
                                           n_boot=n_boot, seed=seed), "item"
    return stratified_paired_bootstrap([[sel.scores[a][t] for t in sel.targets]],
                                       [[sel.scores[b][t] for t in sel.targets]], n_boot=n_boot, seed=seed), "target"


def auto_check(sel: Selection) -> list[dict[str, Any]]:
    """Targets where auto (nested) falls below Pre-trained while some fixed setting stays above it."""
    out = []
    for t in sel.targets:
        pre = sel.scores["pretrained"][t]
        above = [s for s in sel.settings if sel.scores[s][t] > pre]
        if sel.scores[NESTED_LABEL][t] < pre and above:
            best = max(above, key=lambda s: sel.scores[s][t])
            out.append({"target": t, "auto": sel.scores[NESTED_LABEL][t], "pretrained": pre,
                        "auto_choice": sel.nested_choice[t], "best_fixed_here": best,
                        "best_fixed_score": sel.scores[best][t]})
    return out


def selection_markdown(sel: Selection, title: str, n_boot: int = 2000) -> str:
    """The per-benchmark table and the goal checks (Markdown)."""
    from adapterbank.evaluate.bootstrap import stratified_paired_bootstrap

    # every setting at the main k (Nearest: at the grid's smallest k, where tune scores it); the full grid below
    by_strat: dict[str, list[str]] = {}
    for s in sel.settings:
        by_strat.setdefault(s.split("(")[0], []).append(s)
    fixed_rows = []
    for labels in by_strat.values():
        at_k = [s for s in labels if f"k={sel.main_k}" in s] or labels
        fixed_rows += at_k
    means = {c: sel.mean(c) for c in sel.scores}
    rows = [("Pre-trained", "pretrained"), *[(s, s) for s in fixed_rows],
            (f"best fixed in hindsight: {sel.best}", sel.best), (NESTED_LABEL, NESTED_LABEL),
            *[(c, c) for c in sel.sweep], *[(c, c) for c in sel.merges], ("SFT (oracle)", "sft")]
    units = set()
    lines = [f"### {title}", "",
             (f"Metric: {sel.metric} (mean over {len(sel.targets)} targets). Interval: 95% paired bootstrap of "
              f"(row − Pre-trained), {n_boot} resamples. Gap closed: (row − Pre-trained) / (SFT − Pre-trained) of the "
              "means."),
             "", "| setting | mean | Δ vs Pre-trained [95% CI] | gap closed |", "|:---|---:|---:|---:|"]
    for name, col in rows:
        if col == "pretrained":
            lines.append(f"| {name} | {means[col]:.4f} | — | 0.00 |")
            continue
        iv, unit = paired(sel, col, "pretrained", n_boot=n_boot)
        units.add(unit)
        bold = "**" if col in (sel.best, NESTED_LABEL) else ""
        lines.append(f"| {bold}{name}{bold} | {means[col]:.4f} | {iv.diff:+.4f} [{iv.lo:+.4f}, {iv.hi:+.4f}] | "
                     f"{gap_closed(sel, col):.2f} |")
    lines += ["", f"Bootstrap unit: {', '.join(sorted(units))} (resampled within each target).", ""]
    # goals
    d, _ = paired(sel, NESTED_LABEL, sel.best, n_boot=n_boot)
    dtg = stratified_paired_bootstrap([[sel.scores[NESTED_LABEL][t] for t in sel.targets]],
                                      [[sel.scores[sel.best][t] for t in sel.targets]], n_boot=n_boot)
    tie = d.lo <= 0.0 <= d.hi or d.diff >= 0
    bad = auto_check(sel)
    lines += [
        (f"- auto (nested) − best fixed in hindsight: {d.diff:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}] → "
         f"{'best-or-tie (interval holds 0 or auto ahead)' if tie else 'NOT a tie: auto is below'} "
         f"(resampling the {len(sel.targets)} targets instead: [{dtg.lo:+.4f}, {dtg.hi:+.4f}])."),
        (f"- gap closed by auto (nested): {gap_closed(sel, NESTED_LABEL):.2f}; best fixed in hindsight: "
         f"{gap_closed(sel, sel.best):.2f}."),
        ("- targets where auto (nested) falls below Pre-trained while some fixed setting stays above it: "
         + ("none." if not bad else "; ".join(
             f"{b['target']} (auto chose {b['auto_choice']}: {b['auto']:.4f} < Pre-trained {b['pretrained']:.4f}; "
             f"{b['best_fixed_here']} {b['best_fixed_score']:.4f})" for b in bad) + ".")),
        *[f"- {c} − linear with the same weights ({sel.merge_source}): {iv.diff:+.4f} [{iv.lo:+.4f}, {iv.hi:+.4f}]"
          for c in sel.merges for iv in [paired(sel, c, sel.merge_source, n_boot=n_boot)[0]]],
        "",
        "Per target (auto's choice was made on the other targets only):", "",
        "| target | Pre-trained | auto (nested) | auto chose | best fixed in hindsight | SFT |", "|:---|---:|---:|:---|---:|---:|",
    ]
    for t in sel.targets:
        lines.append(f"| {t} | {sel.scores['pretrained'][t]:.4f} | {sel.scores[NESTED_LABEL][t]:.4f} | "
                     f"{sel.nested_choice[t]} | {sel.scores[sel.best][t]:.4f} | {sel.scores['sft'][t]:.4f} |")
    lines += ["", "Every fixed setting of the grid (mean over targets):", "", "| setting | mean | gap closed |",
              "|:---|---:|---:|"]
    for s in sel.settings:
        lines.append(f"| {s} | {means[s]:.4f} | {gap_closed(sel, s):.2f} |")
    lines += ["", f"Runner-up in hindsight: {sel.runner_up}. Merge methods use the weights of {sel.merge_source} "
              "(the best fixed setting in hindsight); their `linear` counterpart is that row. Seconds: "
              + ", ".join(f"{k} {v:.0f}" for k, v in sel.seconds.items()) + "; calls: "
              + ", ".join(f"{k} {v}" for k, v in sel.calls.items()) + ".", ""]
    return "\n".join(lines)


def write_selection(sel: Selection, out: Path, title: str) -> Path:
    """``selection.json`` and ``selection.md`` in ``out``: the markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.json").write_text(json.dumps(sel.to_dict(), indent=1))
    md = out / "selection.md"
    md.write_text(selection_markdown(sel, title))
    return md
