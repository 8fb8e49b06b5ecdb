"""Option parsing shared by the commands (strategy parameters and plugins, comma-separated lists)."""

from __future__ import annotations

__all__ = ["PARAM_HELP", "PLUGIN_HELP", "csv_list", "load_plugins", "strategy_params"]


def csv_list(s: str | None) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``; ``None`` or empty → ``[]``.

    >>> csv_list("a, b,,c"), csv_list(None)
    (['a', 'b', 'c'], [])
    """
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


PARAM_HELP = ("Strategy parameter NAME=VALUE (repeatable), checked against the strategy table, e.g. "
              "--param lam_rel=0.5; STRATEGY.NAME=VALUE for one strategy, e.g. --param sim.tau_rel=2.")
PLUGIN_HELP = ("module:function (or file.py:function) called before anything else, e.g. to register_strategy() "
               "your own strategy (repeatable).")


def load_plugins(plugins: list[str] | None) -> None:
    """Call each ``--strategy-plugin`` hook (``module:function`` or ``file.py:function``), in order."""
    from adapterbank.evaluate.evaluator import load_callable

    for spec in plugins or []:
        load_callable(spec, "strategy plugin")()


def strategy_params(plugins: list[str] | None, specs: list[str] | None, strategies: list[str] | str,
                    legacy: dict[str, dict[str, float]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Run the --strategy-plugin hooks, then ({strategies}, {strategy: {param: value}}) from --param and the
    older per-parameter flags (``legacy``); a parameter given both ways is refused."""
    from adapterbank.compose.strategies import STRATEGIES, parse_param_specs
    from adapterbank.errors import ParameterError

    load_plugins(plugins)
    names = list(STRATEGIES) if strategies == "all" else list(strategies)
    params = parse_param_specs(specs or [], names)
    for strat, vals in legacy.items():
        for name, value in vals.items():
            if name in params.get(strat, {}):
                raise ParameterError(f"The '{name}' parameter of {strat} is given twice (--param and "
                                     f"--{name.replace('_', '-')}). Give it once.")
            params.setdefault(strat, {})[name] = value
    return names, params
