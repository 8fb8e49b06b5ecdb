"""bench/bench_merge_methods.py: its PEFT dense path and our one-module merge agree on a small module, per method
(the benchmark's 'equal result' column), and it reuses bench_compose's adapters."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from adapterbank.lora import LoraModule


@pytest.fixture(scope="module")
def bm(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("bench_merge_methods")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "magnitude_prune"])
def test_peft_dense_path_equals_ours_on_a_small_module(bm: ModuleType, method: str) -> None:
    g = torch.Generator().manual_seed(0)
    mods = [LoraModule(torch.randn(2, 16, generator=g), torch.randn(24, 2, generator=g), 1.5, (24, 16))
            for _ in range(bm.K)]
    w_ours, w_peft = bm.weights_for(method)
    torch.manual_seed(bm.SEED)
    A, B = bm.peft_dense_path(mods, w_peft, method, 0.4, 8)
    got = bm.ours_one(mods, w_ours, method, 0.4, 8)
    assert float((got - B @ A).norm()) <= 1e-5 * float((B @ A).norm())


def test_adapters_are_bench_compose_ones(bm: ModuleType) -> None:
    import bench_compose

    assert bm.make_adapter is bench_compose.make_adapter and bm.SHAPES is bench_compose.SHAPES
