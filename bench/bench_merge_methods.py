"""Merge methods (TIES, DARE, magnitude pruning) on 5 LLaMA-3-8B-shaped rank-16 LoRAs: ours against PEFT's dense path.

The adapters are those of ``bench_compose.py`` (7 projections × ``--layers`` layers, rank 16, α 32, synthetic fp32
factors; q/o 4096×4096, k/v 1024×4096, gate/up 14336×4096, down 4096×14336), held in memory.

* ours — ``merge_adapters(adapters, weights, method, {"density": ρ})`` over the whole model: module by module, the
  5 dense ΔW_i of one module, the method, then the exact SVD (``full_matrices=False``) truncated at R = Σ r_i = 80.
  Time and peak RSS above the adapters (``VmHWM`` reset per step; ``ru_maxrss`` fallback).
* PEFT — the operations of ``add_weighted_adapter(combination_type="<method>_svd", svd_rank=80)`` per matrix:
  ``get_delta_weight`` for each adapter, ``peft.utils.merge_utils.<method>`` on the list, ``torch.linalg.svd``
  (PEFT's default ``full_matrices=True``), keep 80. Run on one matrix per distinct shape (q, k, gate, down) and
  EXTRAPOLATED to the 7 × layers matrices. Not counted: PEFT needs the base model loaded and the new adapter
  injected into it (16 GB in bf16 at 8B) before it merges anything.
* equal result — on those matrices, ‖ΔW_ours − ΔW_PEFT‖_F / ‖ΔW_PEFT‖_F at rank 80, with the same density and,
  for DARE, the same Bernoulli draws (PEFT's global RNG after ``torch.manual_seed(s)``; ours a generator seeded
  ``s``). TIES-type methods use equal weights (PEFT 1, ours 1/5: our TIES is scale-free in w, PEFT's divides by
  the count); the others use bench_compose's weights (one negative).

    python bench/bench_merge_methods.py [--layers 32] [--methods ties,dare_ties] [--density 0.5] [--out r.json]

Running the full 8B shape takes tens of minutes per method on a few cores (224 dense SVDs); ``--layers 2`` is the
quick check. The per-module peak does not depend on ``--layers`` (the largest module is the same).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

import torch

from adapterbank.compose.merge_methods import MERGE_METHODS, refactor, merge_adapters
from adapterbank.lora import LoraModule

if str(Path(__file__).resolve().parent) not in sys.path:  # also when imported by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402
from bench_compose import K, RANK, SHAPES, WEIGHTS, make_adapter, module_name, rel_err_dense, timed  # noqa: E402

PEFT_SHAPES = ("q_proj", "k_proj", "gate_proj", "down_proj")  # one of each distinct cost (v = k, o = q, up = gate)
SEED = 1234


def weights_for(method: str) -> tuple[list[float], list[float]]:
    """(ours, PEFT's) weights: equal for TIES-type methods (see the module docstring), bench_compose's otherwise."""
    return ([1 / K] * K, [1.0] * K) if method.endswith("ties") else (list(WEIGHTS), list(WEIGHTS))


def peft_dense_path(mods: list[LoraModule], weights: list[float], method: str, density: float,
                    new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT ``_svd_generalized_task_arithmetic_weighted_adapter`` for ``<method>_svd`` (clamp None)."""
    from peft.utils import merge_utils

    delta_weight = [m.scale * (m.B @ m.A) for m in mods]  # get_delta_weight: dense (d_out, d_in) each
    w = torch.tensor(weights)
    kw: dict[str, Any] = {"density": density} | ({"majority_sign_method": "total"} if method.endswith("ties") else {})
    delta = getattr(merge_utils, method)(delta_weight, w, **kw)
    del delta_weight
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    return Vh[:new_rank, :].clone(), (U[:, :new_rank] @ torch.diag(S[:new_rank])).clone()  # (A, B)


def ours_one(mods: list[LoraModule], weights: list[float], method: str, density: float, new_rank: int) -> torch.Tensor:
    """Our method on one module with a generator seeded like PEFT's global RNG: the rank-``new_rank`` dense ΔW."""
    deltas = torch.stack([m.scale * (m.B @ m.A) for m in mods])  # (k, d_out, d_in)
    m = MERGE_METHODS[method]
    kw = {k: v for k, v in m.resolve({"density": density}).items() if k != "seed"}
    if "seed" in {p.name for p in m.params}:
        kw["generator"] = torch.Generator().manual_seed(SEED)
    B, A, _ = refactor(m.fn(deltas, torch.tensor(weights), **kw), new_rank)
    return B @ A


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--methods", default="ties", help="comma-separated merge methods (not linear)")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--peft-shapes", default=",".join(PEFT_SHAPES))
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = [make_adapter(seed, args.layers) for seed in range(K)]
    new_rank = K * RANK
    n_mats = 7 * args.layers
    result: dict[str, Any] = {"date": _dt.date.today().isoformat(), "layers": args.layers, "density": args.density,
                              "machine": machine(), "methods": {}}
    for method in args.methods.split(","):
        w_ours, w_peft = weights_for(method)
        secs, peak, before, (_, errs) = timed(lambda: merge_adapters(adapters, w_ours, method,  # noqa: B023
                                                                     {"density": args.density}))
        row: dict[str, Any] = {"ours_s": secs, "ours_peak_above_start_mb": peak - before,
                               "ours_max_trunc_error": max(errs.values()), "peft": {}}
        print(f"{method}: ours {secs:.1f} s over {n_mats} matrices, peak +{peak - before:.0f} MB", flush=True)
        peft_total = 0.0
        for proj in args.peft_shapes.split(","):
            mods = [a.modules[module_name(0, proj)] for a in adapters]
            assert all(isinstance(m, LoraModule) for m in mods)  # noqa: S101
            torch.manual_seed(SEED)
            p_s, p_peak, p_before, (A, B) = timed(
                lambda: peft_dense_path(mods, w_peft, method, args.density, new_rank))  # noqa: B023
            want = B.double() @ A.double()
            got = ours_one(mods, w_ours, method, args.density, new_rank).double()
            shapes = args.peft_shapes.split(",")
            # o=q, v=k, up=gate; down is gate transposed: gate stands in for it when down is not measured
            count = args.layers * (2 if proj in ("q_proj", "k_proj") else 1)
            if proj == "gate_proj":
                count = args.layers * (2 if "down_proj" in shapes else 3)
            peft_total += p_s * count
            row["peft"][proj] = {"s": p_s, "peak_above_start_mb": p_peak - p_before, "count": count,
                                 "rel_diff_to_ours": rel_err_dense(want, got)}
        row["peft_extrapolated_s"] = peft_total
        row["speedup"] = peft_total / secs
        result["methods"][method] = row
        print(f"{method}: ours {secs:.1f} s (peak +{peak - before:.0f} MB, max trunc. error "
              f"{row['ours_max_trunc_error']:.3f}); PEFT dense path {peft_total:.1f} s extrapolated "
              f"({n_mats} matrices) → {row['speedup']:.2f}×; max rel. diff ours vs PEFT "
              f"{max(v['rel_diff_to_ours'] for v in row['peft'].values()):.2e}")
        for proj, v in row["peft"].items():
            print(f"  PEFT {proj} {SHAPES[proj][1]}: {v['s']:.2f} s, peak +{v['peak_above_start_mb']:.0f} MB, "
                  f"×{v['count']}, rel. diff {v['rel_diff_to_ours']:.2e}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
