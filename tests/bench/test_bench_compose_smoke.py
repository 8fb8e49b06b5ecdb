"""bench/bench_compose.py uses the library's PEFT reader/writer (no fallback I/O of its own) and the shared
machine record of bench/_machine.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def bc(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("bench_compose")


def test_adapters_go_through_the_library_formats(bc: ModuleType, tmp_path: Path) -> None:
    from adapterbank.formats import detect_format, read_adapter

    assert not hasattr(bc, "io_backend") and not hasattr(bc, "_raw_read") and bc.read_adapter is read_adapter
    a = bc.make_adapter(0, layers=1)
    out = tmp_path / "a"
    bc.write_peft(a, out)
    assert detect_format(out) == "peft"
    back = read_adapter(out)
    assert set(back.modules) == set(a.modules) and len(a.modules) == 7
    m = "model.layers.0.mlp.down_proj"
    torch.testing.assert_close(back.modules[m].A, a.modules[m].A)
    torch.testing.assert_close(back.modules[m].B, a.modules[m].B)
    assert back.modules[m].scale == pytest.approx(a.modules[m].scale)


def test_machine_record_is_the_shared_one(bc: ModuleType) -> None:
    import _machine

    assert bc.machine is _machine.machine
