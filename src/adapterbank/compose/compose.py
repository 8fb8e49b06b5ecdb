"""compose(): retrieve the top-k adapters for a target prototype, weigh them, merge them exactly.

The pipeline of the seed paper (Algorithm 1): prototype p_T → k-NN over the bank (Eq. 2) → weights by a
strategy (Eq. 3–5, or avg / nearest) → ΔW_T = Σ_i w_i ΔW_i (Eq. 6, exact low-rank concatenation) →
optional exact rank truncation → a composite adapter folder with ``composition.json`` (the recipe).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapterbank._io import atomic_dir, atomic_write_bytes
from adapterbank._validation import check_int, check_k
from adapterbank._versions import versions
from adapterbank.compose.merge_methods import get_merge_method, merge_adapters
from adapterbank.compose.strategies import WeightResult, compute_weights, get_strategy
from adapterbank.errors import FormatError, ParameterError, PrototypeSpaceError, UntunedBankWarning
from adapterbank.formats import FORMATS
from adapterbank.lora import LoraAdapter, combine, truncate
from adapterbank.prototypes.space import Prototype

if TYPE_CHECKING:
    from adapterbank.bank import Bank

log = logging.getLogger(__name__)

RECIPE_FILE = "composition.json"
RECIPE_SCHEMA = 1
DEFAULT_K = 5
"""Adapters retrieved when ``k`` is not given (and the strategy is not a tuned ``auto``)."""

#: The bank setting ``adapterbank tune`` writes and ``compose(strategy="auto")`` reads.
AUTO_SETTING = "compose.auto"
#: What ``auto`` means on an untuned bank: Sim with its default τ (τ_rel = 1) at k = 5. Why (BENCHMARKS.md):
#: Sim has the best mean on Benchmark B (0.777 Dice vs Avg 0.774, Sparse 0.715, Lin 0.655) and is within
#: 0.005 MRR of the best on Benchmark A, where every strategy ties; its weights are never negative, so it
#: cannot extrapolate past the retrieved adapters as Lin/Sparse do on B's end-of-axis sites (gamma-dark:
#: Sparse 0.43 vs Pre-trained 0.85), yet unlike Avg it still leans towards the nearest adapters.
AUTO_FALLBACK: dict[str, Any] = {"strategy": "sim", "params": {}, "k": DEFAULT_K}

__all__ = ["Composition", "compose", "default_output_format", "versions", "RECIPE_FILE", "VLLM_MAX_LORA_RANKS"]

#: The ``max_lora_rank`` values vLLM accepts (``MaxLoRARanks`` in vllm/config/lora.py).
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def default_output_format(source_formats: Sequence[str], format: str | None = None) -> str:  # noqa: A002
    """The format a composite of adapters in ``source_formats`` is written in.

    ``format`` ``None`` or ``"auto"``: follow the sources — kohya or diffusers inputs (Stable Diffusion
    pipelines) give ``diffusers``, PEFT inputs ``peft``, GRASP residual inputs ``grasp_residual``; no known
    sources give ``peft``. An explicit ``format`` is returned as is, except ``peft`` for kohya/diffusers
    sources, which is refused: diffusers' ``load_lora_weights`` would ignore the folder without an error.

    >>> default_output_format(["kohya", "diffusers"]), default_output_format(["peft"], "auto")
    ('diffusers', 'peft')
    >>> default_output_format(["kohya"], "kohya")
    'kohya'
    """
    # The output format per family of source formats (``Format.family``: the file the family's client loads).
    # kohya and diffusers adapters are for diffusers pipelines (``pipe.load_lora_weights``), which silently
    # ignores a PEFT folder; PEFT adapters are for ``PeftModel`` / ``AutoPeftModel*``.
    families = sorted({FORMATS[f].family for f in source_formats if f in FORMATS})
    if format is not None and format != "auto":
        if format == "peft" and families == ["diffusers"]:
            raise FormatError(
                f"The composite's sources are {'/'.join(sorted(set(source_formats)))} Stable Diffusion adapters, but "
                "format 'peft' was asked (--format peft): diffusers' pipe.load_lora_weights ignores a PEFT folder "
                "without an error, so the composite would do nothing. Use --format diffusers (the default for these "
                "sources) or kohya."
            )
        return format
    if len(families) > 1:
        raise FormatError(
            f"The composite's sources are in formats {sorted(set(source_formats))}, which different clients load "
            "(PEFT vs diffusers pipelines); pass --format (format=) to choose one."
        )
    return families[0] if families else "peft"


def serving_rank(adapter: LoraAdapter) -> int:
    """The rank a server needs to hold ``adapter``: its largest module rank (vLLM's ``max_lora_rank`` ≥ this)."""
    return max(adapter.ranks.values(), default=0)


@dataclass
class Composition:
    """The result of :func:`compose`: the composite adapter and everything needed to reproduce it."""

    adapter: LoraAdapter
    ids: list[str]
    distances: list[float]
    weights: np.ndarray
    strategy: str
    params: dict[str, float]
    status: str
    objective: float | None
    target: dict[str, Any]
    k: int
    filters: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    truncation_error: dict[str, float] | None = None
    path: tuple[np.ndarray, np.ndarray] | None = None
    source_formats: list[str] = field(default_factory=list)
    max_rank: int | None = None
    merge: str = "linear"
    merge_params: dict[str, Any] = field(default_factory=dict)
    auto: dict[str, Any] | None = None

    def weight_table(self) -> list[tuple[str, float, float]]:
        """(id, distance, weight) rows in retrieval order."""
        return [(i, d, float(w)) for i, d, w in zip(self.ids, self.distances, self.weights, strict=True)]

    def recipe(self) -> dict[str, Any]:
        """The JSON-able recipe written as ``composition.json``."""
        trunc = None
        if self.truncation_error is not None:
            errs = list(self.truncation_error.values())
            trunc = {"rank": self.rank, "max_rank": self.max_rank, "max_rel_fro_error": max(errs, default=0.0),
                     "mean_rel_fro_error": float(np.mean(errs)) if errs else 0.0,
                     "per_module": self.truncation_error}
        out: dict[str, Any] = {
            "schema": RECIPE_SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_model": self.adapter.base_model,
            "target": self.target,
            "retrieval": {"k": self.k, "filters": self.filters, "ids": self.ids, "distances": self.distances},
            "strategy": self.strategy,
            "params": self.params,
            "solver": {"status": self.status, "objective": self.objective},
            "weights": {i: float(w) for i, w in zip(self.ids, self.weights, strict=True)},
            "merge": {"method": self.merge, "params": self.merge_params},
            "rank": self.rank_info(),
            "truncation": trunc,
            "versions": versions(),
        }
        if self.auto is not None:
            out["auto"] = self.auto
        if self.path is not None:
            lams, W = self.path
            out["lambda_path"] = {"lam": lams.tolist(), "weights": W.tolist()}
        return out

    def rank_info(self) -> dict[str, Any]:
        """Ranks for serving: the largest module rank (what ``max_lora_rank`` must hold) and vLLM's setting."""
        r = serving_rank(self.adapter)
        return {"per_module_max": r, "needed_to_serve": r,
                "vllm_max_lora_rank": next((v for v in VLLM_MAX_LORA_RANKS if v >= r), None)}

    def save(self, out: str | Path, *, format: str | None = None, merge_into: str | Path | None = None,  # noqa: A002
             overwrite: bool = False) -> Path:
        """Write the composite adapter (``format``: peft, kohya or diffusers) and ``composition.json`` into ``out``.

        ``format`` ``None`` follows the sources (:func:`default_output_format`): a composite of kohya or
        diffusers adapters is written for diffusers, a composite of PEFT adapters as PEFT.

        With ``merge_into`` (a base model folder of safetensors), also write the full merged weights to
        ``out/merged`` by streaming the base tensor by tensor.

        All or nothing: everything is written into a hidden temp folder beside ``out`` and renamed into place
        at the end, so ``out`` never holds a composite without its ``composition.json``. An existing
        non-empty ``out`` raises :class:`~adapterbank.errors.OutputExistsError` unless ``overwrite=True``
        (the old content then stays until the new one is complete). A failed write raises
        :class:`~adapterbank.errors.OutputWriteError` naming ``out``.
        """
        from adapterbank.formats import write_adapter

        format = default_output_format(self.source_formats, format)
        out = Path(out)
        extra = {"adapterbank_composition": json.dumps({"ids": self.ids, "weights": self.weights.tolist(),
                                                         "strategy": self.strategy})}
        recipe = self.recipe()
        recipe["output"] = {"format": format}
        with atomic_dir(out, overwrite=overwrite, what="the composite") as tmp:
            write_adapter(self.adapter, tmp, format=format, base_model=self.adapter.base_model, extra_metadata=extra)
            if merge_into is not None:
                from adapterbank.merge import merge_into_files

                report = merge_into_files(merge_into, self.adapter, tmp / "merged")
                report["out_dir"] = str(out / "merged")
                recipe["output"]["merged"] = {"base": str(merge_into), "report": _jsonable(report)}
            atomic_write_bytes(tmp / RECIPE_FILE, json.dumps(recipe, indent=2).encode())
        return out


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def compose(
    bank: Bank,
    target: Prototype,
    *,
    k: int | None = None,
    strategy: str = "sparse",
    params: dict[str, float] | None = None,
    base_model: str | None = None,
    tags: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    ids: Sequence[str] | None = None,
    rank: int | None = None,
    max_rank: int | None = None,
    lambda_path: bool = False,
    merge: str = "linear",
    merge_params: dict[str, Any] | None = None,
) -> Composition:
    """Compose one adapter for ``target`` from the bank (Eq. 2–6).

    Retrieval: the ``k`` nearest prototypes in the target's prototype space (squared L2), filtered by
    ``base_model``/``tags``, minus ``exclude`` — or exactly the adapters in ``ids``. Weights: the strategy
    (``avg``, ``sim``, ``lin``, ``sparse``, ``nearest``) with ``params`` (e.g. ``{"lam_rel": 0.1}``); the
    effective parameters are in the result. Merge: exact concatenation, then optional exact truncation
    to ``rank``. ``max_rank`` caps the rank to fit a server's ``max_lora_rank``: only modules above it
    are truncated (exactly, :func:`~adapterbank.lora.truncate`), and only their errors are reported.
    Retrieved adapters must share one base model. ``k`` ``None``: 5 (:data:`DEFAULT_K`).

    ``strategy="auto"``: the setting ``adapterbank tune`` chose for this bank by leave-one-out (stored in the bank
    under :data:`AUTO_SETTING`): its strategy, its parameters, and its k unless ``k`` is given (an explicit ``k``
    wins; the tuned parameters are kept). ``params`` cannot be combined with ``auto`` (choose a strategy to set
    them). An untuned bank falls back to :data:`AUTO_FALLBACK` (Sim, default τ, k = 5) with an
    :class:`~adapterbank.errors.UntunedBankWarning`. Only the target's prototype is used either way. The recipe's
    ``"auto"`` entry says what ``auto`` resolved to and whence.

    ``merge`` decides how the weighted ΔW_i are combined per module (``linear``: Eq. 6 exactly; ``ties``,
    ``dare_linear``, ``dare_ties``, ``magnitude_prune`` with ``merge_params`` such as ``{"density": 0.2}``:
    :mod:`adapterbank.compose.merge_methods`). Those are streamed module by module and re-factored by an exact
    SVD at rank min(Σ r_i, n_out, n_in), or ``rank``/``max_rank``; every module's error is reported.

    Example (a bank with prototypes in the space of ``target``)::

        comp = compose(bank, target, k=5, strategy="sparse")
        comp.save("./composite")
    """
    auto = None
    if strategy == "auto":
        strategy, params, k, auto = _resolve_auto(bank, params, k)
    get_strategy(strategy)  # an unknown name fails before any file is read
    k = DEFAULT_K if k is None else k
    merge_eff = get_merge_method(merge).resolve(merge_params)
    if not isinstance(target, Prototype):
        raise TypeError(f"compose() needs a Prototype as target. Got {type(target).__name__} instead.")
    k = check_k(k, "compose")
    rank = check_int(rank, "rank", "compose", low=1, optional=True)
    max_rank = check_int(max_rank, "max_rank", "compose", low=1, optional=True)
    if max_rank is not None and rank is not None:
        raise ParameterError("Give either 'rank' (--rank) or 'max_rank' (--max-rank), not both: both cap the rank.")
    excl = list(exclude)
    if ids is not None:
        ids = list(dict.fromkeys(ids))
        protos = [bank.get_prototype(i, target.space) for i in ids]
        hits = sorted(((i, target.distance2(p)) for i, p in zip(ids, protos, strict=True)), key=lambda h: (h[1], h[0]))
        P = np.stack([protos[ids.index(i)].vector for i, _ in hits])
    else:
        found = bank.search(target, k=k, base_model=base_model, tags=tags, exclude=excl)
        if not found:
            raise PrototypeSpaceError(
                f"No adapter in the bank has a prototype in space {target.space.key!r}"
                + (f" with base model {base_model!r}" if base_model else "")
                + (f" and tags {list(tags)}" if tags else "") + "."
            )
        hits = [(h.id, float(h.distance)) for h in found]
        P = np.stack([bank.get_prototype(i, target.space).vector for i, _ in hits])
    hit_ids = [i for i, _ in hits]
    dists = [d for _, d in hits]
    t = target.vector.astype(np.float64)
    res: WeightResult = compute_weights(strategy, t, P.astype(np.float64), **(params or {}))
    path = None
    if lambda_path:
        from adapterbank.compose.solvers import sparse_path

        path = sparse_path(P.astype(np.float64), t)
    log.info("strategy %s over %s: weights %s (params %s)", strategy, hit_ids, res.weights, res.params)
    adapters = [bank.load_adapter(i) for i in hit_ids]
    errs = None
    if merge != "linear":  # dense per module, then re-factored: the rank cap applies to every module
        merged, errs = merge_adapters(adapters, res.weights.tolist(), merge, merge_eff, rank=rank or max_rank)
    else:
        merged = combine(adapters, res.weights.tolist())
        if rank is not None:
            merged, errs = truncate(merged, rank)
        elif max_rank is not None:  # rank and max_rank exclude each other (checked above)
            above = [name for name, r in merged.ranks.items() if r > max_rank]
            merged, all_errs = truncate(merged, max_rank)
            errs = {name: all_errs[name] for name in above}
            log.info("max_rank %d: truncated %d modules above it", max_rank, len(above))
    merged.metadata["format"] = "composite"
    return Composition(
        adapter=merged, ids=hit_ids, distances=dists, weights=np.asarray(res.weights, dtype=np.float64),
        strategy=strategy, params=dict(res.params), status=res.status, objective=res.objective,
        target={"source": target.source, "space": target.space.to_dict(), "n_samples": target.n_samples,
                "digest": target.digest()},
        k=k if ids is None else len(hit_ids),
        filters={"base_model": base_model, "tags": list(tags) if tags else None, "exclude": excl,
                 "ids": list(ids) if ids is not None else None},
        rank=rank if max_rank is None else max_rank, truncation_error=errs, path=path,
        source_formats=[str(a.metadata.get("format")) for a in adapters], max_rank=max_rank, auto=auto,
        merge=merge, merge_params=merge_eff,
    )


def _resolve_auto(bank: Bank, params: dict[str, float] | None, k: int | None
                  ) -> tuple[str, dict[str, float], int, dict[str, Any]]:
    """(strategy, params, k, the recipe's ``auto`` entry) of ``compose(strategy="auto")``."""
    if params:
        raise ParameterError(f"strategy 'auto' takes its parameters from the bank's tuned setting; got params "
                             f"{dict(params)!r} too (--param/--lam-rel/--tau-rel ...). Give a strategy "
                             "(--strategy sparse, ...) to set parameters yourself, or drop them.")
    tuned = bank.get_setting(AUTO_SETTING)
    if tuned is None:
        warnings.warn(f"strategy 'auto': the bank {bank.root} has not been tuned (run `adapterbank tune "
                      f"{bank.root} --evaluator module:function`); using the fallback: sim with its default τ at "
                      f"k={DEFAULT_K if k is None else k}.", UntunedBankWarning, stacklevel=3)
        src, setting = "fallback (untuned bank)", AUTO_FALLBACK
    else:
        src, setting = f"bank setting {AUTO_SETTING!r}", tuned
    strategy = str(setting["strategy"])
    prm = {str(a): float(b) for a, b in dict(setting.get("params") or {}).items()}
    kk = int(setting["k"]) if k is None else k
    entry = {"source": src, "strategy": strategy, "params": prm, "k": kk,
             "k_from": "the setting" if k is None else "explicit k"}
    if tuned is not None:
        entry["tuned"] = {n: tuned.get(n) for n in ("date", "evaluator", "metric", "lower_is_better", "in_sample",
                                                    "nested", "runner_up") if n in tuned}
    log.info("strategy auto -> %s %s, k=%d (%s)", strategy, prm, kk, src)
    return strategy, prm, kk, entry
