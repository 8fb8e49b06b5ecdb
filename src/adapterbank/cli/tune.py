"""``adapterbank tune``: choose the bank's composition setting by leave-one-out and store it for ``--strategy auto``.

Library modules are imported inside the function, so ``adapterbank --help`` does not import torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from adapterbank.cli.common import PLUGIN_HELP, csv_list, load_plugins
from adapterbank.cli.render import console, json_option, print_json

__all__ = ["build_grid", "tune_cmd"]


def build_grid(strategies: str | None, lam_rel: list[float] | None, tau_rel: list[float] | None,
               lam_frac: list[float] | None = None) -> dict[str, Any]:
    """The tune grid from the command line: the default grid, restricted to ``strategies`` (comma-separated), with
    ``--grid-lam-frac``/``--grid-lam-rel``/``--grid-tau-rel`` replacing the sparse/sim values (λ is set one way).

    >>> build_grid("avg,sparse", [0.5], None)
    {'avg': {}, 'sparse': {'lam_rel': [0.5]}}
    >>> build_grid("sparse", None, None, [0.5, 1.0])
    {'sparse': {'lam_frac': [0.5, 1.0]}}
    """
    from adapterbank.evaluate.tune import DEFAULT_GRID

    names = csv_list(strategies) or list(DEFAULT_GRID)
    grid: dict[str, Any] = {n: dict(DEFAULT_GRID.get(n, {})) for n in names}
    if lam_rel and lam_frac:
        from adapterbank.errors import ParameterError

        raise ParameterError("Give --grid-lam-rel or --grid-lam-frac, not both: sparse's λ is set one way.")
    for strat, pname, vals in (("sparse", "lam_rel", lam_rel), ("sparse", "lam_frac", lam_frac),
                               ("sim", "tau_rel", tau_rel)):
        if vals and strat in grid:
            grid[strat] = {k: v for k, v in grid[strat].items() if strat != "sparse" or not k.startswith("lam")}
            grid[strat][pname] = vals
    return grid


def tune_cmd(
    bank: str = typer.Argument(..., help="The bank: a folder or a postgresql:// URL."),
    evaluator: str = typer.Option(..., "--evaluator", help="The scoring function, as module:function "
                                  "(or path/to/file.py:function): (adapter | None, task) -> {metric: value}."),
    metric: Optional[str] = typer.Option(None, "--metric", help="The metric to choose by (default: the first)."),
    lower_is_better: bool = typer.Option(False, "--lower-is-better", help="The smallest mean wins (losses)."),
    strategies: Optional[str] = typer.Option(None, "--strategies", help="Comma-separated strategies of the grid "
                                             "(default: nearest,avg,sim,lin,sparse; earlier wins ties)."),
    grid_k: str = typer.Option("3,5", "--grid-k", help="k values to try, e.g. '3,5' or '2-6'."),
    grid_lam_frac: Optional[str] = typer.Option(None, "--grid-lam-frac", help="Sparse λ/λ_max values "
                                                "(default 0.25,0.5,0.75,1)."),
    grid_lam_rel: Optional[str] = typer.Option(None, "--grid-lam-rel", help="Sparse λ_rel values instead of "
                                               "--grid-lam-frac."),
    grid_tau_rel: Optional[str] = typer.Option(None, "--grid-tau-rel", help="Sim τ_rel values (default 0.5,1,2)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write results.json/md, index.html, tune.json and "
                                          "tune.md into this folder."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder (default: REPORT/.cache with --report, "
                                         "else none); a rerun computes only what changed."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report the choice without writing it into the bank."),
    strategy_plugin: Optional[list[str]] = typer.Option(None, "--strategy-plugin", help=PLUGIN_HELP),
    json_: bool = json_option(),
) -> None:
    """Choose the composition setting by leave-one-out over the bank's tasks; `compose --strategy auto` uses it."""
    from adapterbank.bank import Bank
    from adapterbank.cli.evaluate import parse_floats, parse_ints
    from adapterbank.evaluate.report import write_report
    from adapterbank.evaluate.tune import tune

    load_plugins(strategy_plugin)
    grid = build_grid(strategies, parse_floats(grid_lam_rel), parse_floats(grid_tau_rel), parse_floats(grid_lam_frac))
    cdir = cache if cache is not None else (report / ".cache" if report is not None else None)
    b = Bank.open(bank)
    try:
        res = tune(b, evaluator, grid=grid,
                   k_values=parse_ints(grid_k) or [], metric=metric, lower_is_better=lower_is_better,
                   cache_dir=cdir, save=not dry_run, progress=sys.stderr.isatty())
    finally:
        b.close()
    if report is not None:
        res.results.meta["bank"] = str(bank)
        write_report(res.results, report, lower_is_better=[res.metric] if lower_is_better else [], plots=False,
                     title="adapterbank — tune (leave-one-out)")
        (report / "tune.json").write_text(json.dumps(res.to_dict(), indent=1))
        (report / "tune.md").write_text(res.markdown())
    if json_:
        return print_json({**res.setting_record(), "saved": not dry_run,
                           "report": str(report) if report is not None else None})
    console.print(res.markdown().split("\n| setting")[0].replace("**", "").strip())
    where = "not written (--dry-run)" if dry_run else f"written into {bank} (compose --strategy auto uses it)"
    console.print(f"Setting {res.best.label} {where}." + (f" Report: [bold]{report}[/bold]" if report else ""))
