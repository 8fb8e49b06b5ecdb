"""Shared by the tests of the benchmark scripts: import a file of bench/ by its path."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_bench(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` (which puts bench/ on sys.path for its own helpers) as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def load_bench() -> Callable[[str], ModuleType]:
    """``load_bench("bench_compose")`` imports bench/bench_compose.py."""
    return _load_bench
