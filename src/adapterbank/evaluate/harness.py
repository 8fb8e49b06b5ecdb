"""Leave-one-out evaluation (docs/design.md §6; seed paper, Tables 1–6).

Each adapter of the bank that has a prototype is, in turn, the *target*: its prototype is the target
prototype p_T, its own adapter is removed from the pool (``exclude=[target]``; or left in with
``include_self`` — the seed's Table 6 ablation), the other adapters are retrieved and weighed by every
strategy of the table (Eq. 3–5, avg, nearest, and any registered one) and merged exactly (Eq. 6), and the
user's evaluator scores the composite on the target's task. Pre-trained (``adapter=None``) and SFT (the
target's own adapter) are scored too. Retrieval runs once per target (at the largest k asked for); every
strategy then composes from those ids (``compose(ids=...)``).

The evaluator is any callable ``(adapter: LoraAdapter | None, task) -> {metric: float}``; ``task`` is
``tasks[target]`` when a mapping is given, else the target's bank card. It may add the reserved key
``"per_item": {metric: [one score per test item]}`` (see :func:`check_output`): the reports then give
paired bootstrap intervals over items instead of over targets. Results are cached per
(target, method, k, params, evaluator, digests of the prototypes and adapters involved) as JSON files
(:mod:`adapterbank.evaluate.cache`), so a rerun only calls the evaluator for what changed. Loading and
checking the evaluator: :mod:`adapterbank.evaluate.evaluator`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapterbank import errors as _errors
from adapterbank._validation import Bounds, K, check_k
from adapterbank.compose.strategies import STRATEGIES, get_strategy
from adapterbank.errors import AdapterbankError, FormatError, UnknownNameError
from adapterbank.evaluate.cache import CACHE_SCHEMA, ResultCache, adapter_digest, cache_key
from adapterbank.evaluate.evaluator import (
    PER_ITEM,
    Evaluator,
    check_metrics,
    check_output,
    evaluator_id,
    load_evaluator,
)
from adapterbank.evaluate.results import (
    BASELINES,
    EvalRecord,
    EvalResults,
    LambdaPath,
    PrototypeMap,
)
from adapterbank.lora import LoraAdapter

if TYPE_CHECKING:
    from adapterbank.bank import Bank, Hit
    from adapterbank.prototypes.space import Prototype, PrototypeSpace

log = logging.getLogger(__name__)

# load_evaluator, check_metrics, check_output, PER_ITEM, evaluator_id and Evaluator live in
# adapterbank.evaluate.evaluator; they are re-exported here for code that imported them from the harness.
__all__ = ["evaluate", "load_evaluator", "check_metrics", "check_output", "PER_ITEM", "evaluator_id", "pca_2d",
           "Evaluator", "ALL_STRATEGIES"]

PATH_FRACTIONS = np.union1d(np.linspace(0.0, 1.0, 41), np.geomspace(1e-3, 1.0, 31))
"""λ/λ_max of the λ-path's points: even steps for the plot's linear axis, geometric ones for the kinks near 0."""

ALL_STRATEGIES = tuple(STRATEGIES)
"""The built-in strategies (a snapshot at import). ``evaluate(strategies="all")``, the default, reads
:data:`~adapterbank.compose.strategies.STRATEGIES` at call time, so registered strategies are included."""

# The error an evaluator's own failure is reported as.
_EvaluationError = _errors.EvaluationError


# ----- small numerics --------------------------------------------------------------------------

def pca_2d(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``X`` (n, d) projected on their first two principal axes, and the explained-variance ratios.

    Signs are fixed (the largest-magnitude loading of each axis is positive), so the map is deterministic.

    >>> Y, ev = pca_2d(np.array([[0.0, 0, 0], [2, 0, 0], [0, 1, 0], [2, 1, 0]]))
    >>> Y.shape, np.round(ev, 3).tolist()
    ((4, 2), [0.8, 0.2])
    """
    X = np.asarray(X, dtype=np.float64)  # (n, d)
    n = X.shape[0]
    Xc = X - X.mean(axis=0, keepdims=True)
    if n < 2 or not np.any(Xc):
        return np.zeros((n, 2)), np.zeros(2)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)  # vt: (min(n,d), d)
    comps = vt[:2]
    for i in range(comps.shape[0]):
        if comps[i, np.argmax(np.abs(comps[i]))] < 0:
            comps[i] = -comps[i]
    Y = Xc @ comps.T  # (n, ≤2)
    var = s**2
    ev = var[:2] / var.sum()
    if Y.shape[1] < 2:  # d == 1 or n == 2 with one axis
        Y = np.concatenate([Y, np.zeros((n, 2 - Y.shape[1]))], axis=1)
        ev = np.concatenate([ev, np.zeros(2 - ev.shape[0])])
    return Y, ev


# ----- the harness -----------------------------------------------------------------------------

def _norm_strategies(strategies: Sequence[str] | str) -> list[str]:
    if isinstance(strategies, str):
        strategies = list(STRATEGIES) if strategies == "all" else [s.strip() for s in strategies.split(",") if s.strip()]
    out = list(dict.fromkeys(strategies))
    for s in out:
        if s not in STRATEGIES:
            raise UnknownNameError(f"Unknown strategy {s!r}. Valid strategies: {', '.join(STRATEGIES)} (or 'all').")
    if not out:
        raise UnknownNameError(f"No strategy given. Valid strategies: {', '.join(STRATEGIES)} (or 'all').")
    return out


def _norm_params(params: Mapping[str, Any] | None, strategies: Sequence[str]) -> dict[str, dict[str, float]]:
    if not params:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name, p in params.items():
        if name not in STRATEGIES or not isinstance(p, Mapping):
            raise FormatError(
                "The 'params' parameter of evaluate must map a strategy name to its parameters, e.g. "
                f"{{'sparse': {{'lam_rel': 0.1}}, 'sim': {{'tau_rel': 1.0}}}}. Got key {name!r} -> {p!r} instead. "
                f"Valid strategies: {', '.join(STRATEGIES)}."
            )
        vals: dict[str, float] = {}
        for a, b in p.items():
            prm = get_strategy(name).param(str(a))  # an unknown parameter name lists the valid ones
            vals[str(a)] = float(prm.bounds.check(b, prm.name, name))
        get_strategy(name).check_exclusive(vals)  # e.g. lam_rel and lam_frac: refused before any evaluator call
        out[name] = vals
    return out


def _check_each(bounds: Bounds, name: str, vals: Sequence[float] | None) -> list[Any]:
    """The distinct values of the sweep ``name``, sorted, each checked against ``bounds``."""
    return sorted({bounds.check(v, name, "evaluate") for v in (vals or ())})


class _Runner:
    """State of one :func:`evaluate` call: bank, evaluator, cache, retrievals, counters."""

    def __init__(self, bank: Bank, evaluator: Evaluator, cache_dir: Path | None, include_self: bool,
                 space: PrototypeSpace | None) -> None:
        self.bank = bank
        self.evaluator = evaluator
        self.ev_id = evaluator_id(evaluator)
        self.cache = ResultCache(cache_dir)
        self.include_self = include_self
        self.space = space
        self.cards = {c.id: c for c in bank.list()}
        self.digests: dict[str, str] = {}
        self.protos: dict[str, Prototype] = {}
        self.pools: dict[str, list[Hit]] = {}
        self.pool_k: dict[str, int] = {}
        self.searched_k: dict[str, int] = {}
        self.composite_scores: dict[tuple[Any, ...], tuple[dict[str, float], dict[str, list[float]]]] = {}
        self.target_protos: dict[str, Prototype] = {}
        self.n_calls = 0
        self.n_searches = 0
        self.at_hull: list[str] = []  # compositions whose sparse λ was ≥ λ_max

    # -- bank access
    def proto(self, adapter_id: str) -> Prototype:
        if adapter_id not in self.protos:
            self.protos[adapter_id] = self.bank.get_prototype(adapter_id, self.space)
        return self.protos[adapter_id]

    def target_proto(self, target: str) -> Prototype:
        """The prototype that stands for the target's task: ``target_prototypes[target]`` if given, else its own."""
        return self.target_protos[target] if target in self.target_protos else self.proto(target)

    def has_proto(self, adapter_id: str) -> bool:
        return self.space is not None and self.space.key in self.cards[adapter_id].prototype_spaces

    def digest(self, adapter_id: str) -> str:
        if adapter_id not in self.digests:
            self.digests[adapter_id] = adapter_digest(self.cards[adapter_id])
        return self.digests[adapter_id]

    def plan_retrieval(self, target: str, k: int) -> None:
        """Make the one search for ``target`` ask for at least ``k`` adapters (the largest k of the run)."""
        self.pool_k[target] = max(k, self.pool_k.get(target, 0))

    def pool(self, target: str, k: int) -> list[Hit]:
        """The ``k`` nearest adapters to the target's prototype (minus the target unless ``include_self``).

        One search per target, at the largest k planned: results are sorted by (distance, id), so the k nearest
        are a prefix of the K nearest for any K ≥ k.
        """
        if self.searched_k.get(target, 0) < k:
            want = max(k, self.pool_k.get(target, 0))
            exclude = [] if self.include_self else [target]
            self.pools[target] = self.bank.search(self.target_proto(target), k=want,
                                                  base_model=self.cards[target].base_model, exclude=exclude)
            self.searched_k[target] = want
            self.n_searches += 1
        return self.pools[target][:k]

    @property
    def n_cached(self) -> int:
        return self.cache.n_hits

    # -- scoring
    def score(self, adapter: LoraAdapter | None, task: Any, target: str, method: str
              ) -> tuple[dict[str, float], dict[str, list[float]], float]:
        """The evaluator's metrics, per-item scores and wall time for one call."""
        where = f"target {target!r}, method {method!r}"
        t0 = time.perf_counter()
        try:
            out = self.evaluator(adapter, task)
        except Exception as e:  # the user's code: wrap with context, keep the cause
            raise _EvaluationError(f"The evaluator {self.ev_id} raised {type(e).__name__} on {where}: {e}") from e
        dt = time.perf_counter() - t0
        self.n_calls += 1
        return (*check_output(out, where), dt)

    def baseline(self, target: str, method: str, task: Any) -> EvalRecord:
        parts: dict[str, Any] = {"v": CACHE_SCHEMA, "target": target, "method": method, "evaluator": self.ev_id,
                                 "base_model": self.cards[target].base_model}
        if method == "sft":
            parts["adapter"] = self.digest(target)
        key = cache_key(parts)
        hit = self.cache.lookup(key, parts)
        if hit is not None:
            return _copy(hit, sweep=None)
        adapter = self.bank.load_adapter(target) if method == "sft" else None
        metrics, items, dt = self.score(adapter, task, target, method)
        rec = EvalRecord(target, method, None, {}, {}, [target] if method == "sft" else [],
                         [0.0] if method == "sft" else [], [1.0] if method == "sft" else [], "baseline", metrics,
                         include_self=self.include_self, seconds=dt, per_item=items)
        self.cache.store(key, parts, rec)
        return rec

    def composition(self, target: str, method: str, k: int, params: dict[str, float], task: Any,
                    sweep: str | None) -> EvalRecord:
        from adapterbank.compose import compose

        p_t = self.target_proto(target)
        ids = [h.id for h in self.pool(target, k)]
        parts = {"v": CACHE_SCHEMA, "target": target, "method": method, "k": k, "params": params,
                 "include_self": self.include_self, "evaluator": self.ev_id, "target_prototype": p_t.digest(),
                 "pool": [[i, self.digest(i), self.proto(i).digest()] for i in ids]}
        key = cache_key(parts)
        hit = self.cache.lookup(key, parts)
        if hit is not None:
            return _copy(hit, sweep=sweep)
        if not ids:
            raise _errors.PrototypeSpaceError(f"No adapter to compose target {target!r} from: no other adapter has "
                                              f"a prototype in space {p_t.space.key!r} and base model "
                                              f"{self.cards[target].base_model!r}.")
        with warnings.catch_warnings(record=True) as caught:  # λ ≥ λ_max: counted, then told once per evaluate()
            warnings.simplefilter("always", _errors.LambdaAtHullWarning)
            comp = compose(self.bank, p_t, k=k, strategy=method, params=params or None, ids=ids)
        for w in caught:
            if issubclass(w.category, _errors.LambdaAtHullWarning):
                self.at_hull.append(f"{target} ({method}, k={k}{''.join(f', {n}={v:g}' for n, v in params.items())})")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        # The composite is determined by its (adapter, weight) pairs: strategies that agree exactly (all of them
        # at k=1; Sparse and Lin when λ_max = 0) are scored once per run.
        same = (target, tuple((i, self.digest(i), float(w)) for i, w in zip(comp.ids, comp.weights) if w != 0.0))
        if same in self.composite_scores:
            metrics, items = (dict(x) for x in self.composite_scores[same])
            dt = 0.0
        else:
            metrics, items, dt = self.score(comp.adapter, task, target, method)
            self.composite_scores[same] = (dict(metrics), dict(items))
        rec = EvalRecord(target, method, k, dict(params), {a: float(b) for a, b in comp.params.items()},
                         list(comp.ids), [float(d) for d in comp.distances], [float(w) for w in comp.weights],
                         str(comp.status), metrics, sweep=sweep, include_self=self.include_self, seconds=dt,
                         per_item=items)
        self.cache.store(key, parts, _copy(rec, sweep=None))
        return rec

    def lambda_path(self, target: str, k: int, chosen: float | None) -> LambdaPath | None:
        """The sparse weights along λ = F·λ_max for F on :data:`PATH_FRACTIONS` (λ = 0 alone when λ_max = 0)."""
        from adapterbank.compose.solvers import lambda_max, sparse_path

        ids = [h.id for h in self.pool(target, k)]
        if len(ids) < 2:
            return None
        P = np.stack([self.proto(i).vector for i in ids]).astype(np.float64)  # (k, d)
        t = self.target_proto(target).vector.astype(np.float64)  # (d,)
        lmax = lambda_max(P, t)
        lams, W = sparse_path(P, t, PATH_FRACTIONS * lmax if lmax > 0 else np.zeros(1))  # (m,), (m, k)
        return LambdaPath(target, ids, [float(x) for x in np.asarray(lams)],
                          [[float(x) for x in row] for row in np.asarray(W)], chosen, float(lmax))

    def prototype_map(self) -> PrototypeMap | None:
        ids = sorted(i for i in self.cards if self.has_proto(i))
        if len(ids) < 2:
            return None
        X = np.stack([self.proto(i).vector for i in ids])
        Y, ev = pca_2d(X)
        sp = self.proto(ids[0]).space.key
        return PrototypeMap(ids, [[float(a), float(b)] for a, b in Y], [float(x) for x in ev], sp)


def _copy(rec: EvalRecord, *, sweep: str | None) -> EvalRecord:
    return EvalRecord.from_dict({**rec.to_dict(), "sweep": sweep})


def evaluate(
    bank: Bank,
    evaluator: Evaluator | str,
    *,
    strategies: Sequence[str] | str = "all",
    k: int = 5,
    params: Mapping[str, Mapping[str, float]] | None = None,
    targets: Sequence[str] | None = None,
    include_self: bool = False,
    baselines: Sequence[str] = BASELINES,
    sweep_k: Sequence[int] | None = None,
    sweep_lam: Sequence[float] | None = None,
    sweep_lam_frac: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    tasks: Mapping[str, Any] | None = None,
    space: PrototypeSpace | str | None = None,
    target_prototypes: Mapping[str, Prototype] | None = None,
) -> EvalResults:
    """Leave-one-out evaluation of every composition strategy on every adapter's task.

    For each target (default: every adapter with a prototype, sorted by id; with ``tasks``, those in it):
    retrieve the ``k`` nearest *other* adapters (the target is excluded unless ``include_self``), weigh them
    with each strategy, merge exactly, and call ``evaluator(composite, task)``. Baselines: ``"pretrained"``
    calls ``evaluator(None, task)``, ``"sft"`` calls it with the target's own adapter.

    Args:
        bank: an open :class:`~adapterbank.bank.Bank`.
        evaluator: ``(adapter | None, task) -> {metric: float}``, or a ``"module:function"`` spec. It may add
            ``"per_item": {metric: [one score per test item]}`` (mean = the metric; see :func:`check_output`), so
            the reports' paired intervals resample items instead of targets.
        strategies: strategy names, or ``"all"``: every strategy of
            :data:`~adapterbank.compose.strategies.STRATEGIES` at call time (registered ones included).
        k: adapters retrieved per target for the main table.
        params: per-strategy parameters, e.g. ``{"sparse": {"lam_rel": 0.1}, "sim": {"tau_rel": 1.0}}``.
        targets: ids to hold out in turn.
        include_self: keep the target's own adapter in the pool (seed paper, Table 6).
        baselines: which of ``"pretrained"``, ``"sft"`` to score.
        sweep_k: extra k values; every strategy whose weights depend on k (all but ``nearest``) is scored at each
            (score-vs-k series).
        sweep_lam: ``lam_rel`` values for ``sparse`` at ``k`` (score-vs-λ series).
        sweep_lam_frac: ``lam_frac`` values in [0, 1] for ``sparse`` at ``k`` (λ = lam_frac·λ_max of each target's
            retrieval; 0 is Lin, 1 the convex-hull projection): the score-vs-λ/λ_max series.
        cache_dir: folder of JSON cache files; a rerun only calls the evaluator for what changed. The key holds
            the evaluator's ``cache_key`` attribute (or ``module:qualname``) — change it when the evaluator or
            its tasks change.
        progress: show a tqdm progress bar (stderr).
        tasks: ``{target id: task}`` handed to the evaluator; default: the target's card.
        space: the prototype space (or its key) to evaluate in; needed when the bank holds several.
        target_prototypes: ``{target id: Prototype}`` to retrieve and weigh with instead of the target's own bank
            prototype — e.g. from the target's unlabeled or validation data. Needed for a meaningful
            ``include_self`` ablation: with the bank prototype the target's own adapter sits at distance 0 and
            Nearest, Lin and Sparse give it all the weight by construction.

    Returns:
        :class:`EvalResults`: every record with its inputs, the sparse λ-paths and a PCA map of the prototypes.

    Example (a bank whose adapters have prototypes)::

        res = evaluate(bank, "my_evals:score", k=3, cache_dir=".cache")
        res.table("accuracy")["task-a"]["sparse"]
    """
    from adapterbank.compose import versions

    ev: Evaluator = load_evaluator(evaluator) if isinstance(evaluator, str) else evaluator
    if not callable(ev):
        raise FormatError(f"The 'evaluator' parameter of evaluate must be callable or 'module:function'. "
                          f"Got {type(ev).__name__} instead.")
    strats = _norm_strategies(strategies)
    k = check_k(k, "evaluate")
    bl = list(dict.fromkeys(baselines or ()))
    for b in bl:
        if b not in BASELINES:
            raise UnknownNameError(f"Unknown baseline {b!r}. Valid baselines: {', '.join(BASELINES)}.")
    prm = _norm_params(params, strats)
    ks = _check_each(K, "sweep_k", sweep_k)
    lams = _check_each(Bounds("number", 0.0), "sweep_lam", sweep_lam)
    fracs = _check_each(get_strategy("sparse").param("lam_frac").bounds, "sweep_lam_frac", sweep_lam_frac)
    cdir = Path(cache_dir) if cache_dir is not None else None

    spaces = {sp.key: sp for sp in bank.spaces()}
    if isinstance(space, str):
        if space not in spaces:
            raise UnknownNameError(f"No prototypes in space {space!r}; the bank has {', '.join(sorted(spaces)) or 'none'}.")
        space = spaces[space]
    elif space is None:
        if len(spaces) > 1:
            raise _errors.PrototypeSpaceError(
                f"The bank holds prototypes in {len(spaces)} spaces ({', '.join(sorted(spaces))}); pass space= "
                "to choose the one to evaluate in.")
        space = next(iter(spaces.values()), None)
    from adapterbank.prototypes.space import Prototype as _Prototype

    run = _Runner(bank, ev, cdir, include_self, space)
    for t, p in (target_prototypes or {}).items():
        if not isinstance(p, _Prototype):
            raise FormatError(f"target_prototypes[{t!r}] must be a Prototype. Got {type(p).__name__} instead.")
        if space is not None and p.space.key != space.key:
            raise _errors.PrototypeSpaceError(f"target_prototypes[{t!r}] is in space {p.space.key!r}, but the "
                                              f"evaluation runs in {space.key!r}.")
        run.target_protos[t] = p
    with_proto = sorted(i for i in run.cards if run.has_proto(i))
    if targets is None:
        tgt = [i for i in with_proto if tasks is None or i in tasks]
        skipped = sorted(set(with_proto) - set(tgt))
        if skipped:
            log.info("no task given for %s; not used as targets", skipped)
    else:
        tgt = list(dict.fromkeys(targets))
        for t in tgt:
            if t not in run.cards:
                raise UnknownNameError(f"Target {t!r} is not in the bank. Adapters: {', '.join(sorted(run.cards))}.")
            if t not in with_proto:
                raise UnknownNameError(f"Target {t!r} has no prototype{' in space ' + space.key if space else ''}; "
                                       f"adapters with one: {', '.join(with_proto) or 'none'}.")
            if tasks is not None and t not in tasks:
                raise UnknownNameError(f"Target {t!r} has no entry in 'tasks'. Tasks given: {', '.join(map(str, tasks))}.")
    if not tgt:
        raise UnknownNameError("No target to evaluate: no adapter in the bank has a prototype"
                               + (" and a task" if tasks is not None else "") + ".")

    jobs: list[tuple[str, str, int | None, dict[str, float], str | None]] = []
    for t in tgt:
        jobs += [(t, b, None, {}, None) for b in bl]
        jobs += [(t, s, k, prm.get(s, {}), None) for s in strats]
        jobs += [(t, s, kk, prm.get(s, {}), "k") for kk in ks for s in strats if get_strategy(s).depends_on_k]
        run.plan_retrieval(t, max([k, *ks]))  # one search per target, at the largest k
        base_sparse = {a: b for a, b in prm.get("sparse", {}).items() if a not in ("lam", "lam_rel", "lam_frac")}
        jobs += [(t, "sparse", k, {**base_sparse, "lam_rel": lam}, "lam") for lam in lams]
        jobs += [(t, "sparse", k, {**base_sparse, "lam_frac": f}, "lam_frac") for f in fracs]

    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    records: list[EvalRecord] = []
    for t, method, kk, p, sweep in tqdm(jobs, desc="evaluate", unit="eval", disable=not progress):
        task = tasks[t] if tasks is not None else run.cards[t]
        if kk is None:
            records.append(run.baseline(t, method, task))
        else:
            records.append(run.composition(t, method, kk, p, task, sweep))

    paths: dict[str, LambdaPath] = {}
    for t in tgt:
        sp = next((r for r in records if r.target == t and r.method == "sparse" and r.sweep is None), None)
        chosen = sp.effective_params.get("lam") if sp is not None else None
        try:
            lp = run.lambda_path(t, k, chosen)
        except (AdapterbankError, ImportError, ValueError, np.linalg.LinAlgError) as e:
            log.warning("no λ-path for target %s: %s", t, e)
            lp = None
        if lp is not None:
            paths[t] = lp

    config = {"strategies": strats, "k": k, "params": prm, "include_self": include_self, "baselines": bl,
              "sweep_k": ks, "sweep_lam": lams, "sweep_lam_frac": fracs, "evaluator": run.ev_id,
              "space": run.space.key if run.space is not None else None, "targets": tgt}
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
            "bank": str(bank.root), "n_adapters": len(run.cards),
            "evaluator_calls": run.n_calls, "cache_hits": run.n_cached, "retrievals": run.n_searches,
            "seconds": round(time.perf_counter() - t_start, 3)}
    log.info("evaluated %d targets: %d evaluator calls, %d cache hits", len(tgt), run.n_calls, run.n_cached)
    if run.at_hull:
        warnings.warn(f"sparse: λ ≥ λ_max in {len(run.at_hull)} composition(s) ({', '.join(run.at_hull[:5])}"
                      f"{', ...' if len(run.at_hull) > 5 else ''}): their weights are the projection onto the convex "
                      "hull of the retrieved prototypes (no negative weight); the records hold lam and lam_max.",
                      _errors.LambdaAtHullWarning, stacklevel=2)
    return EvalResults(records=records, targets=tgt, config=config, lambda_paths=paths,
                       prototype_map=run.prototype_map(), meta=meta)

