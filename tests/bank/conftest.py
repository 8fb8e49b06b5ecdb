"""Fixtures of the bank tests: real PEFT adapters of a tiny Llama, prototypes, a bank snapshot helper, and the
real PostgreSQL and S3 servers of tests/bank/servers.py (loaded here once per process as the module
``adapterbank_test_servers``, which the server test modules import)."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adapterbank.lora import LoraAdapter, LoraModule
from adapterbank.prototypes.space import Prototype, PrototypeSpace


def _load_servers() -> Any:
    """tests/bank/servers.py as the module ``adapterbank_test_servers`` (tests/ is not a package)."""
    name = "adapterbank_test_servers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("servers.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


_servers = _load_servers()
pg_server = _servers.pg_server
pg_url = _servers.pg_url
s3_server = _servers.s3_server
s3_url = _servers.s3_url

BASE_ID = "tiny-llama"
SPACE = PrototypeSpace("toy-encoder", "r1", "mean", True, 8)
OTHER_SPACE = PrototypeSpace("other-encoder", None, "cls", False, 4)


def proto(seed: int, space: PrototypeSpace = SPACE) -> Prototype:
    v = np.random.default_rng(seed).standard_normal(space.dim).astype(np.float32)
    return Prototype(v, space, n_samples=10, source=f"seed{seed}")


def random_adapter(seed: int, base_model: str | None = BASE_ID, rank: int = 4) -> LoraAdapter:
    """A LoraAdapter shaped like a PEFT LoRA on the tiny Llama (q_proj 32→32, v_proj 32→16)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for layer in range(2):
        for name, n_out in (("q_proj", 32), ("v_proj", 16)):
            mods[f"model.layers.{layer}.self_attn.{name}"] = LoraModule(
                torch.randn(rank, 32, generator=g) * 0.1, torch.randn(n_out, rank, generator=g) * 0.1, 2.0, (n_out, 32)
            )
    return LoraAdapter(mods, base_model, {})


@pytest.fixture(scope="session")
def peft_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Callable[[int], Any],
              peft_adapter: Callable[..., Path]) -> list[Path]:
    """Four real PEFT adapters (get_peft_model + save_pretrained, random lora_A/lora_B), read-only."""
    root = tmp_path_factory.mktemp("peft")
    base = tiny_llama(0)
    return [peft_adapter(base, root / f"task-{i}", seed=i, base_id=BASE_ID) for i in range(4)]


@pytest.fixture
def peft_copy(tmp_path: Path, peft_dirs: list[Path]) -> Callable[[int, str], Path]:
    """``peft_copy(i, name)``: a writable copy of PEFT adapter ``i`` (to damage in a test)."""

    def make(i: int, name: str = "copy") -> Path:
        dst = tmp_path / "inputs" / name
        shutil.copytree(peft_dirs[i], dst)
        return dst

    return make


def snapshot(root: Path) -> dict[str, Any]:
    """Everything that makes up a bank's state: every catalog row and every file (with its hash)."""
    con = sqlite3.connect(f"file:{root / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        rows = {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall()))  # noqa: S608 - fixed names
                for t in ("meta", "adapters", "files", "prototypes")}
    finally:
        con.close()
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith("catalog.sqlite"):
            continue  # the SQLite files themselves (WAL/SHM) change on reads; their rows are compared above
        if rel == "index" or rel.startswith("index/"):
            continue  # the persisted search index: derived from the catalog, written by searches
        files[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return {"rows": rows, "files": files}


@pytest.fixture(scope="session")
def make_proto() -> Callable[..., Prototype]:
    """``make_proto(seed, space=SPACE)``: a random prototype (the test space has dim 8)."""
    return proto


@pytest.fixture(scope="session")
def make_adapter() -> Callable[..., LoraAdapter]:
    """``make_adapter(seed, base_model="tiny-llama", rank=4)``: a random LoraAdapter for the tiny Llama."""
    return random_adapter


@pytest.fixture(scope="session")
def snap() -> Callable[[Path], dict[str, Any]]:
    """``snap(bank_root)``: catalog rows and file hashes, to prove a failed operation changed nothing."""
    return snapshot


@pytest.fixture(scope="session")
def spaces() -> tuple[PrototypeSpace, PrototypeSpace]:
    return SPACE, OTHER_SPACE


@pytest.fixture
def bank(tmp_path: Path) -> Any:
    from adapterbank.bank import Bank

    b = Bank.init(tmp_path / "bank")
    yield b
    b.close()
