"""Weights (Eq. 2–5) and the composition pipeline (Eq. 6)."""

from __future__ import annotations

from adapterbank.compose.compose import RECIPE_FILE, Composition, compose, versions
from adapterbank.compose.strategies import (
    STRATEGIES,
    Param,
    Strategy,
    WeightResult,
    compute_weights,
    get_strategy,
    register_strategy,
    unregister_strategy,
)

__all__ = ["compose", "Composition", "RECIPE_FILE", "versions", "STRATEGIES", "Strategy", "Param", "WeightResult",
           "compute_weights", "get_strategy", "register_strategy", "unregister_strategy"]
