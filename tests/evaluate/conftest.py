"""A tiny bank where the right answer is known: real PEFT LoRAs on a tiny Llama, prototypes in R^8, and a
target whose prototype AND weight update are the same affine combination of three adapters'."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adapterbank.lora import LoraAdapter, combine
from adapterbank.prototypes.space import Prototype, PrototypeSpace

SPACE = PrototypeSpace("toy-encoder", "r1", "mean", False, 8)
SOURCES = ("a", "b", "c", "d", "e")


def delta_score(adapter: LoraAdapter | None, task: Mapping[str, Any]) -> dict[str, float]:
    """Evaluator: how close the adapter's ΔW is to the task's true ΔW (every module of the truth).

    ``score`` = −‖ΔW − ΔW_true‖_F (higher is better); ``rel_error`` = ‖ΔW − ΔW_true‖_F / ‖ΔW_true‖_F.
    """
    true: Mapping[str, torch.Tensor] = task["true"]
    got = adapter.deltas(torch.float64) if adapter is not None else {}
    err2 = 0.0
    ref2 = 0.0
    for name, t in true.items():
        d = got.get(name, torch.zeros_like(t)) - t
        err2 += float((d * d).sum())
        ref2 += float((t * t).sum())
    for name in set(got) - set(true):
        err2 += float((got[name] ** 2).sum())
    return {"score": -math.sqrt(err2), "rel_error": math.sqrt(err2) / math.sqrt(ref2)}


@dataclass
class ToyBank:
    path: Path
    true_weights: dict[str, float]  # weights of the target's combination, by source id
    tasks: dict[str, dict[str, Any]]
    protos: dict[str, np.ndarray]


def build_toy_bank(root: Path, tiny_llama: Callable[[int], Any], peft_adapter: Callable[..., Path],
                   weights: Mapping[str, float], target: str = "t", seed: int = 0) -> ToyBank:
    """Five source adapters a..e (real PEFT folders) with random prototypes, plus ``target`` whose prototype is
    Σ w_i p_i and whose adapter is combine(sources, w) — so its ΔW is exactly Σ w_i ΔW_i."""
    from adapterbank.bank import Bank

    rng = np.random.default_rng(seed)
    base = tiny_llama(0)
    bank = Bank.init(root / "bank")
    protos: dict[str, np.ndarray] = {}
    adapters: dict[str, LoraAdapter] = {}
    # a, b, c near each other; d, e further away but still retrieved with k=5
    centre = rng.normal(size=8)
    for j, name in enumerate(SOURCES):
        spread = 1.0 if name in "abc" else 3.0
        protos[name] = (centre + spread * rng.normal(size=8)).astype(np.float32)
        folder = peft_adapter(base, root / "src" / name, seed=100 + j)
        bank.add(folder, id=name, prototype=Prototype(protos[name], SPACE, 10, f"toy:{name}"))
        adapters[name] = bank.load_adapter(name)
    ids = list(weights)
    w = np.array([weights[i] for i in ids])
    protos[target] = (w @ np.stack([protos[i].astype(np.float64) for i in ids])).astype(np.float32)
    true_adapter = combine([adapters[i] for i in ids], w.tolist())
    bank.add(true_adapter, id=target, base_model="tiny-llama",
             prototype=Prototype(protos[target], SPACE, 10, f"toy:{target}"))
    true = {m: d for m, d in true_adapter.deltas(torch.float64).items()}
    tasks: dict[str, dict[str, Any]] = {target: {"true": true}}
    for name in SOURCES:
        tasks[name] = {"true": adapters[name].deltas(torch.float64)}
    bank.close()
    return ToyBank(root / "bank", dict(weights), tasks, protos)


@pytest.fixture(scope="session")
def toy_bank(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Callable[[int], Any],
             peft_adapter: Callable[..., Path]) -> ToyBank:
    """Target ``t`` = 0.5 a + 0.3 b + 0.2 c: inside the hull of the prototypes."""
    return build_toy_bank(tmp_path_factory.mktemp("toy_in"), tiny_llama, peft_adapter, {"a": 0.5, "b": 0.3, "c": 0.2})


@pytest.fixture(scope="session")
def toy_bank_affine(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Callable[[int], Any],
                    peft_adapter: Callable[..., Path]) -> ToyBank:
    """Target ``t`` = 1.4 a − 0.6 b + 0.2 c: an affine combination outside the hull (a negative weight)."""
    return build_toy_bank(tmp_path_factory.mktemp("toy_aff"), tiny_llama, peft_adapter, {"a": 1.4, "b": -0.6, "c": 0.2},
                          seed=1)


@pytest.fixture(scope="session")
def delta_eval() -> Callable[[LoraAdapter | None, Mapping[str, Any]], dict[str, float]]:
    """The ΔW-distance evaluator (see :func:`delta_score`)."""
    return delta_score


NORM_EVAL = """
import torch
from pathlib import Path

CALLS = Path(__file__).with_suffix(".calls")

def score(adapter, card):
    with CALLS.open("a") as fh:
        fh.write(card.id + "\\n")
    if adapter is None:
        return {"norm": 0.0}
    return {"norm": float(sum(float((d * d).sum()) for d in adapter.deltas(torch.float64).values()) ** 0.5)}
"""


@pytest.fixture
def norm_evaluator(tmp_path: Path) -> Path:
    """A ``file.py`` evaluator (``score``: ‖ΔW‖_F, 0 for Pre-trained) that logs each call's target to ``<file>.calls``."""
    ev = tmp_path / "norm_eval.py"
    ev.write_text(NORM_EVAL)
    return ev
