"""Everything the command line shows: consoles, tables, JSON output and how warnings and errors print.

One renderer for every score table (``evaluate`` and ``demo`` both call :func:`score_table`).
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapterbank.errors import AdapterbankWarning, PoolSmallerThanKWarning

__all__ = ["console", "err", "json_option", "print_json", "weights_table", "card_table", "score_table",
           "show_warning", "print_error"]


class _Console(Console):
    """A rich Console that never wraps a line or cuts a table cell when its stream is not a terminal.

    Rich fits output into 80 columns when piped, cutting numbers to ``36.39…``; a pipe or a log gets every
    digit instead (tables take their natural width, long lines stay one line).
    """

    def print(self, *objects: Any, **kw: Any) -> None:
        if self.is_terminal:
            return super().print(*objects, **kw)
        kw.setdefault("soft_wrap", True)
        saved, self.width = self._width, 1 << 16  # tables take their content's width, never padded to this
        try:
            super().print(*objects, **kw)
        finally:
            self._width = saved

console = _Console()
err = _Console(stderr=True, soft_wrap=True)  # an error or a note is one line, whatever the terminal width


def json_option() -> Any:
    return typer.Option(False, "--json", help="Print machine-readable JSON on stdout (and nothing else there).")


def print_json(doc: Any) -> None:
    """``doc`` alone on stdout as plain JSON (``--json``): no colour, no wrapping; messages go to stderr."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def weights_table(title: str, rows: list[tuple[str, float, float]]) -> Table:
    t = Table(title=title)
    t.add_column("adapter")
    t.add_column("distance", justify="right")
    t.add_column("weight", justify="right")
    for i, d, w in rows:
        t.add_row(i, f"{d:.4g}", f"[bold]{w:+.4f}[/bold]" if abs(w) > 1e-9 else f"{w:+.4f}")
    return t


def card_table(cards: list[Any]) -> Table:
    t = Table()
    for c in ("id", "base model", "format", "rank", "targets", "tags", "prototype spaces"):
        t.add_column(c)
    for c in cards:
        t.add_row(c.id, str(c.base_model), c.format, str(c.rank), str(len(c.targets)), ",".join(c.tags),
                  "\n".join(c.prototype_spaces))
    return t


def score_table(results: Any, metric: str, title: str, lower_is_better: bool = False) -> Table:
    """One metric's leave-one-out scores: a row per target, a column per method (bold: best zero-shot), then
    the mean and the interval rows of :func:`adapterbank.evaluate.report.score_rows`."""
    from adapterbank.evaluate.report import score_rows
    from adapterbank.evaluate.results import display_name

    cols, rows = score_rows(results, metric, lower_is_better)
    t = Table(title=title)
    t.add_column("target")
    for c in cols:
        t.add_column(display_name(c), justify="right")
    for label, cells in rows:
        t.add_row(label, *[f"[bold]{txt}[/bold]" if bold else txt for txt, bold in cells])
    return t


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """adapterbank's own warnings as one line on stderr (``note: ...``); others as Python shows them."""
    if issubclass(category, AdapterbankWarning):
        label = "note" if issubclass(category, PoolSmallerThanKWarning) else "warning"
        err.print(f"[yellow]{label}:[/yellow] {escape(str(message))}", highlight=False)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning




def print_error(e: BaseException | str) -> None:
    """``error: ...`` as one line on stderr (never wrapped, markup escaped)."""
    err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
