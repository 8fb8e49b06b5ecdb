"""``adapterbank evaluate``: open the bank, run the leave-one-out harness, write the report, print the tables.

Library modules are imported inside the functions, so ``adapterbank --help`` does not import torch."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from adapterbank.cli.common import PARAM_HELP, PLUGIN_HELP, csv_list, strategy_params
from adapterbank.cli.render import console, err, json_option, print_json, score_table
from adapterbank.errors import FormatError

if TYPE_CHECKING:
    from adapterbank.prototypes.space import Prototype

__all__ = ["evaluate_cmd", "run_evaluate", "parse_strategies", "parse_floats", "parse_ints", "load_target_prototypes"]


def load_target_prototypes(folder: str | Path) -> dict[str, Prototype]:
    """``{stem: Prototype}`` of every ``*.npy`` in ``folder`` (each needs its ``.npy.json`` space sidecar).

    >>> import tempfile, numpy as np
    >>> from adapterbank.prototypes.space import Prototype, PrototypeSpace
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = Prototype(np.ones(3, dtype=np.float32), PrototypeSpace("enc", "r", "mean", False, 3)).save(d / "ct-head.npy")
    >>> sorted(load_target_prototypes(d))
    ['ct-head']
    """
    from adapterbank.prototypes.space import Prototype

    d = Path(folder)
    if not d.is_dir():
        raise FormatError(f"target prototypes: {d} is not a folder of <adapter id>.npy files.")
    out = {p.stem: Prototype.load(p) for p in sorted(d.glob("*.npy"))}
    if not out:
        raise FormatError(f"target prototypes: no .npy files in {d}.")
    return out


def parse_strategies(spec: str | Sequence[str]) -> str | list[str]:
    """``"all"`` or a comma-separated list (validated later against the registry).

    >>> parse_strategies("all"), parse_strategies("avg, sparse")
    ('all', ['avg', 'sparse'])
    """
    if isinstance(spec, str):
        s = spec.strip()
        return "all" if s == "all" else [x.strip() for x in s.split(",") if x.strip()]
    return list(spec)


def parse_ints(spec: str | Sequence[int] | None) -> list[int] | None:
    """``"1,2,3"`` or ``"1-5"`` (inclusive) → ints; ``None``/empty → ``None``.

    >>> parse_ints("1-3,5"), parse_ints(None)
    ([1, 2, 3, 5], None)
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if not isinstance(spec, str):
        return [int(x) for x in spec]
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def parse_floats(spec: str | Sequence[float] | None) -> list[float] | None:
    """``"0.01,0.1,1"`` → floats; ``None``/empty → ``None``.

    >>> parse_floats("0.01, 0.1,1")
    [0.01, 0.1, 1.0]
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if not isinstance(spec, str):
        return [float(x) for x in spec]
    return [float(x) for x in spec.split(",") if x.strip()]


def run_evaluate(
    bank_path: str | Path,
    evaluator_spec: str,
    strategies: str | Sequence[str] = "all",
    k: int = 5,
    out: str | Path = "report",
    include_self: bool = False,
    sweep_k: str | Sequence[int] | None = None,
    sweep_lam: str | Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    *,
    params: Mapping[str, Mapping[str, float]] | None = None,
    lower_is_better: Sequence[str] = (),
    plots: bool = True,
    target_prototypes: str | Path | None = None,
    sweep_lam_frac: str | Sequence[float] | None = None,
) -> Path:
    """Open ``bank_path``, run :func:`~adapterbank.evaluate.evaluate` with the evaluator ``module:function``,
    write the report into ``out`` and return ``out``.

    The evaluator is loaded before the bank is opened, so a wrong name fails fast. ``target_prototypes`` is a
    folder of ``<adapter id>.npy`` prototype files (with their ``.npy.json`` space sidecars, as written by
    ``adapterbank prototype``): each stands for its target's task instead of the bank prototype.

    Example::

        run_evaluate("bank", "my_evals:score", "all", 5, "report")   # -> PosixPath('report')
    """
    from adapterbank.bank import Bank
    from adapterbank.evaluate.evaluator import load_evaluator
    from adapterbank.evaluate.harness import evaluate
    from adapterbank.evaluate.report import write_report

    fn = load_evaluator(evaluator_spec)
    tp = load_target_prototypes(target_prototypes) if target_prototypes is not None else None
    bank = Bank.open(bank_path)
    res = evaluate(bank, fn, strategies=parse_strategies(strategies), k=k, params=params,
                                include_self=include_self, sweep_k=parse_ints(sweep_k),
                                sweep_lam=parse_floats(sweep_lam), sweep_lam_frac=parse_floats(sweep_lam_frac),
                                cache_dir=cache_dir, progress=progress,
                                target_prototypes=tp)
    res.config["evaluator"] = evaluator_spec if getattr(fn, "cache_key", None) is None else res.config["evaluator"]
    res.meta["bank"] = str(bank_path)
    return write_report(res, out, lower_is_better=lower_is_better, plots=plots)


def evaluate_cmd(
    bank: str = typer.Argument(..., help="The bank: a folder or a postgresql:// URL."),
    evaluator: str = typer.Option(..., "--evaluator", help="The scoring function, as module:function "
                                  "(or path/to/file.py:function): (adapter | None, task) -> {metric: value}."),
    strategies: str = typer.Option("all", help="Comma-separated strategies, or 'all'."),
    k: int = typer.Option(5, "-k", help="Adapters retrieved per target."),
    out: Path = typer.Option(Path("report"), "-o", "--out", help="Report folder (results.json/md, PNGs, index.html)."),
    include_self: bool = typer.Option(False, help="Keep each target's own adapter in the pool (Table 6 ablation)."),
    sweep_k: Optional[str] = typer.Option(None, help="Extra k values, e.g. '1-8' or '2,4,8'."),
    sweep_lam: Optional[str] = typer.Option(None, help="Extra λ_rel values for sparse, e.g. '0.01,0.1,1'."),
    sweep_lam_frac: Optional[str] = typer.Option(None, help="Extra λ/λ_max values in [0, 1] for sparse (0: Lin, "
                                                 "1: the hull projection), e.g. '0,0.25,0.5,0.75,1'."),
    lam_rel: Optional[float] = typer.Option(None, help="Sparse: λ relative to the distance scale."),
    lam_frac: Optional[float] = typer.Option(None, help="Sparse: λ = F·λ_max, F in [0, 1] (0: Lin, 1: the hull)."),
    tau_rel: Optional[float] = typer.Option(None, help="Sim: τ relative to the median distance."),
    param: Optional[list[str]] = typer.Option(None, "--param", help=PARAM_HELP),
    strategy_plugin: Optional[list[str]] = typer.Option(None, "--strategy-plugin", help=PLUGIN_HELP),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: OUT/.cache); a rerun computes only what changed."),
    lower_is_better: Optional[str] = typer.Option(None, help="Comma-separated metrics where lower is better."),
    plots: bool = typer.Option(True, help="Write PNG plots."),
    target_prototypes: Optional[Path] = typer.Option(
        None, help="Folder of <adapter id>.npy prototypes (from `adapterbank prototype`) of each target's own "
        "held-out data, used instead of the bank prototype; needed for a meaningful --include-self."),
    json_: bool = json_option(),
) -> None:
    """Leave-one-out: each adapter's task is composed from the others and scored by your evaluator."""
    from adapterbank.evaluate import load_results

    legacy: dict[str, dict[str, float]] = {}
    sparse_legacy = {n: v for n, v in (("lam_rel", lam_rel), ("lam_frac", lam_frac)) if v is not None}
    if sparse_legacy:
        legacy["sparse"] = sparse_legacy
    if tau_rel is not None:
        legacy["sim"] = {"tau_rel": tau_rel}
    strats, params = strategy_params(strategy_plugin, param, parse_strategies(strategies), legacy)
    low = csv_list(lower_is_better)
    if include_self and target_prototypes is None:
        err.print("[yellow]note:[/yellow] with --include-self and no --target-prototypes each target's own adapter "
                  "is at distance 0 from its bank prototype, so Nearest, Lin and Sparse give it all the weight.")
    path = run_evaluate(bank, evaluator, strats, k, out, include_self, sweep_k, sweep_lam,
                        cache if cache is not None else out / ".cache", progress=sys.stderr.isatty(),
                        params=params or None, lower_is_better=low, plots=plots, target_prototypes=target_prototypes,
                        sweep_lam_frac=sweep_lam_frac)
    res = load_results(path / "results.json")
    if json_:
        return print_json({"report": str(path / "index.html"), "results": str(path / "results.json"),
                            "lower_is_better": low, "scores": {m: res.table(m) for m in res.metrics}})
    for metric in res.metrics:
        console.print(score_table(res, metric, f"{metric} ({'lower' if metric in low else 'higher'} is better; "
                                               "bold: best zero-shot)", metric in low))
    console.print(f"Report: [bold]{path / 'index.html'}[/bold]")
