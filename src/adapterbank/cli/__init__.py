"""The ``adapterbank`` command line (a typer app): parse, validate, call one library function, print a summary.

| module | holds |
|---|---|
| :mod:`~adapterbank.cli.main` | the app, the bank/compose/demo commands, :func:`main` (logging, error exit codes) |
| :mod:`~adapterbank.cli.evaluate` | ``adapterbank evaluate`` (leave-one-out harness and report) |
| :mod:`~adapterbank.cli.grasp` | ``adapterbank grasp train|sample`` (imported when the group is used) |
| :mod:`~adapterbank.cli.render` | consoles, tables (one score-table renderer), JSON output, warnings and errors |
| :mod:`~adapterbank.cli.common` | option parsing shared by several commands |

This package is the only place that configures logging and prints.
"""

from adapterbank.cli.main import app, main

__all__ = ["app", "main"]
