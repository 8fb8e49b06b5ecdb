"""Compose 5 LLaMA-3-8B-shaped rank-16 LoRA adapters: adapterbank's exact path against raw safetensors I/O.

Adapters: 7 projections × ``--layers`` (default 32) layers, rank 16, α 32, synthetic random fp32 factors,
(d_out, d_in): q_proj/o_proj 4096×4096, k_proj/v_proj 1024×4096, gate_proj/up_proj 14336×4096, down_proj
4096×14336 — about 168 MB each at 32 layers, written as PEFT directories.

Steps, side by side in one run:

* (a) anchor — ``safetensors.torch.load_file`` of the 5 adapter files and ``save_file`` of all their tensors
  (the same bytes, concatenated) into one file; warm (after a first read) and, when this process may write
  ``/proc/sys/vm/drop_caches`` (root), cold. Also the anchor with an ``fsync`` (ours fsyncs every file).
* (b) ours — read the 5 adapters (PEFT reader) → ``combine(adapters, weights)`` → write the rank-80
  composite as a PEFT directory. Goal ≤ 1.5× anchor.
* (c) ``truncate(composite, 16)`` over the whole model (QR of the factors + SVD of the 80×80 core).
  Goal ≤ 20 s.
* (d) PEFT ``add_weighted_adapter(combination_type="svd")`` cost: per matrix, PEFT forms every adapter's dense
  ΔW_i (``get_delta_weight``), sums them (``task_arithmetic``) and runs ``torch.linalg.svd(full_matrices=True)``.
  We run exactly those operations on one matrix per distinct shape (q: 4096×4096, k: 1024×4096, gate:
  14336×4096; down is gate transposed, same cost) and EXTRAPOLATE to the 7 × layers matrices. The relative
  Frobenius error ‖ΔW − ΔW_16‖_F/‖ΔW‖_F of PEFT-svd and of ours is compared on those matrices against the
  dense ΔW in float64.
* (e) peak RSS of each step (``VmHWM`` of ``/proc/self/status``, reset per step through
  ``/proc/self/clear_refs``; falls back to ``ru_maxrss``). The dense ΔW of the whole model would be
  7·10⁹ floats (28 GB at 32 layers): the composite path's peak shows it never exists.

Torch threads: 1 and 2 are timed on the truncation of one layer and the faster is used (``--threads``
overrides). Temporary files live under ``--tmp`` (default /tmp/bench_compose) and are deleted at the end.

    python bench/bench_compose.py [--layers 32] [--repeats 2] [--svd q_proj,k_proj,gate_proj] [--out ...]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapterbank.formats import read_adapter, write_adapter
from adapterbank.lora import LoraAdapter, LoraModule, combine, lora_scale, truncate

if str(Path(__file__).resolve().parent) not in sys.path:  # also when imported by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

IO = "adapterbank.formats.read_adapter/write_adapter"

SHAPES: dict[str, tuple[str, tuple[int, int]]] = {  # proj -> (parent, (d_out, d_in))
    "q_proj": ("self_attn", (4096, 4096)),
    "k_proj": ("self_attn", (1024, 4096)),
    "v_proj": ("self_attn", (1024, 4096)),
    "o_proj": ("self_attn", (4096, 4096)),
    "gate_proj": ("mlp", (14336, 4096)),
    "up_proj": ("mlp", (14336, 4096)),
    "down_proj": ("mlp", (4096, 14336)),
}
RANK, ALPHA, K = 16, 32.0, 5
WEIGHTS = [0.4, 0.3, -0.2, 0.35, 0.15]  # sum 1, one negative: what the sparse/lin solvers produce


# ------------------------------------------------------------------------------------------------ utils
def _hwm_ok() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


HWM_RESET = _hwm_ok()


def reset_peak() -> None:
    if HWM_RESET:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")


def peak_mb() -> float:
    """Peak RSS since the last reset_peak() (VmHWM), or the process's lifetime peak (ru_maxrss)."""
    if HWM_RESET:
        m = re.search(r"VmHWM:\s*(\d+)\s*kB", Path("/proc/self/status").read_text())
        if m:
            return int(m.group(1)) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    m = re.search(r"VmRSS:\s*(\d+)\s*kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) / 1024.0 if m else float("nan")


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], Any]) -> tuple[float, float, float, Any]:
    """(seconds, peak RSS MB during fn, RSS MB before fn, result)."""
    gc.collect()
    before = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    return dt, peak_mb(), before, out


def write_peft(a: LoraAdapter, out: Path) -> None:
    """The adapter as a PEFT directory (``adapterbank.formats.write_adapter``)."""
    write_adapter(a, out, format="peft")


def module_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{SHAPES[proj][0]}.{proj}"


def make_adapter(seed: int, layers: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    mods: dict[str, LoraModule] = {}
    for i in range(layers):
        for proj, (_, (d_out, d_in)) in SHAPES.items():
            A = torch.randn(RANK, d_in, generator=g) / math.sqrt(d_in)  # (r, d_in), Kaiming-like
            B = torch.randn(d_out, RANK, generator=g) * 0.01  # (d_out, r), trained-B-like magnitude
            mods[module_name(i, proj)] = LoraModule(A, B, lora_scale(ALPHA, RANK), (d_out, d_in))
    return LoraAdapter(mods, "meta-llama/Meta-Llama-3-8B")


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------ steps
def anchor(files: list[Path], out: Path, fsync: bool) -> int:
    tensors: dict[str, torch.Tensor] = {}
    for i, f in enumerate(files):
        for k, v in load_file(f).items():
            tensors[f"a{i}.{k}"] = v
    save_file(tensors, out)
    if fsync:
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    n = sum(t.numel() * t.element_size() for t in tensors.values())
    out.unlink()
    return n


def ours(dirs: list[Path], out: Path, read: Callable[[Path], LoraAdapter], write: Callable[[LoraAdapter, Path], Any],
         parts: dict[str, float]) -> LoraAdapter:
    t0 = time.perf_counter()
    adapters = [read(d) for d in dirs]
    t1 = time.perf_counter()
    comp = combine(adapters, WEIGHTS)
    del adapters
    t2 = time.perf_counter()
    write(comp, out)
    t3 = time.perf_counter()
    parts.update(read=t1 - t0, combine=t2 - t1, write=t3 - t2)
    return comp


def peft_svd(mods: list[LoraModule], weights: list[float], new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT ``_svd_generalized_task_arithmetic_weighted_adapter`` for combination_type="svd", clamp=None."""
    delta_weight = [m.scale * (m.B @ m.A) for m in mods]  # get_delta_weight: dense (d_out, d_in) each
    w = torch.tensor(weights)
    # task_arithmetic: weighted sum over the stacked deltas
    stacked = torch.stack(delta_weight, dim=0)
    delta = (stacked * w.view(-1, *([1] * (stacked.ndim - 1)))).sum(dim=0)
    del stacked, delta_weight
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    U = U[:, :new_rank] @ torch.diag(S[:new_rank])
    return Vh[:new_rank, :].clone(), U.clone()  # (A, B) of the new adapter


def rel_err_dense(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.norm(ref - approx) / torch.linalg.norm(ref))


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--svd", default="q_proj,k_proj,gate_proj", help="one matrix per listed projection ('' = skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = time 1 and 2, use the faster")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/bench_compose"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compose.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary files")
    args = ap.parse_args(argv)

    tmp: Path = args.tmp
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    read, write = read_adapter, write_peft
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    res: dict[str, Any] = {"machine": machine(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
        ram_gib=round(mem, 1)), "config": {
        "layers": args.layers, "rank": RANK, "alpha": ALPHA, "adapters": K, "weights": WEIGHTS,
        "shapes": {k: v[1] for k, v in SHAPES.items()}, "io": IO, "repeats": args.repeats,
        "peak_rss_method": "VmHWM reset via /proc/self/clear_refs" if HWM_RESET else "ru_maxrss (lifetime)",
    }}
    try:
        # ---- inputs
        t0 = time.perf_counter()
        dirs = []
        for i in range(K):
            a = make_adapter(100 + i, args.layers)
            d = tmp / f"adapter{i}"
            write(a, d)
            dirs.append(d)
            del a
        files = [d / "adapter_model.safetensors" for d in dirs]
        in_bytes = [f.stat().st_size for f in files]
        res["inputs"] = {"bytes_each": in_bytes, "mb_each": round(in_bytes[0] / 1e6, 1),
                         "setup_s": round(time.perf_counter() - t0, 1)}

        # ---- threads: truncation of one layer with 1 and 2 threads
        probe = combine([read(d) for d in dirs[:K]], WEIGHTS)
        layer0 = LoraAdapter({k: m for k, m in probe.modules.items() if k.startswith("model.layers.0.")})
        del probe
        tt: dict[int, float] = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            truncate(layer0, RANK)
            tt[n] = min(timeit_once(lambda: truncate(layer0, RANK)) for _ in range(3))
        best = args.threads or min(tt, key=lambda n: tt[n])
        torch.set_num_threads(best)
        res["threads"] = {"truncate_one_layer_s": {str(k): round(v, 4) for k, v in tt.items()}, "used": best}
        del layer0

        # ---- (a) anchor and (b) ours, warm, interleaved
        for f in files:  # first read: warm the page cache
            load_file(f)
        comp_dir = tmp / "composite"
        a_times, af_times, o_times, o_parts = [], [], [], []
        a_peak = o_peak = a_base = o_base = 0.0
        comp: LoraAdapter | None = None
        for _ in range(args.repeats):
            dt, pk, b0, nbytes = timed(lambda: anchor(files, tmp / "anchor.safetensors", fsync=False))
            a_times.append(dt)
            a_peak, a_base = max(a_peak, pk), b0
            dt, _, _, _ = timed(lambda: anchor(files, tmp / "anchor.safetensors", fsync=True))
            af_times.append(dt)
            if comp_dir.exists():
                shutil.rmtree(comp_dir)
            comp = None
            parts: dict[str, float] = {}
            dt, pk, b0, comp = timed(lambda: ours(dirs, comp_dir, read, write, parts))
            o_times.append(dt)
            o_parts.append(parts)
            o_peak, o_base = max(o_peak, pk), b0
        assert comp is not None
        a_med, af_med, o_med = statistics.median(a_times), statistics.median(af_times), statistics.median(o_times)
        res["anchor_warm"] = {"s": a_times, "median_s": a_med, "bytes": nbytes, "peak_rss_mb": a_peak,
                              "rss_before_mb": a_base}
        res["anchor_warm_fsync"] = {"s": af_times, "median_s": af_med}
        res["ours_warm"] = {"s": o_times, "median_s": o_med, "parts": o_parts, "peak_rss_mb": o_peak,
                            "rss_before_mb": o_base, "composite_bytes": dir_bytes(comp_dir),
                            "composite_rank": next(iter(comp.modules.values())).rank,
                            "ratio_vs_anchor": o_med / a_med, "ratio_vs_anchor_fsync": o_med / af_med}

        # ---- cold (page cache dropped before each)
        if drop_caches():
            dt_a, _, _, _ = timed(lambda: anchor(files, tmp / "anchor.safetensors", fsync=False))
            shutil.rmtree(comp_dir)
            drop_caches()
            parts = {}
            dt_o, _, _, comp = timed(lambda: ours(dirs, comp_dir, read, write, parts))
            res["cold"] = {"anchor_s": dt_a, "ours_s": dt_o, "ours_parts": parts, "ratio": dt_o / dt_a}
        else:
            res["cold"] = {"skipped": "cannot write /proc/sys/vm/drop_caches (not root?)"}

        # ---- (c) truncate the whole composite to rank 16
        dt, pk, b0, (trunc, errs) = timed(lambda: truncate(comp, RANK))
        e = list(errs.values())
        res["truncate"] = {"s": dt, "peak_rss_mb": pk, "rss_before_mb": b0, "modules": len(errs),
                           "rel_err_mean": statistics.fmean(e), "rel_err_min": min(e), "rel_err_max": max(e)}

        # ---- (d) PEFT svd path on one matrix per shape, extrapolated; error comparison
        svd_rows: dict[str, Any] = {}
        adapters = [read(d) for d in dirs]
        for proj in [p for p in args.svd.split(",") if p]:
            name = module_name(0, proj)
            mods = [a.modules[name] for a in adapters]
            dt, pk, b0, (A16, B16) = timed(lambda: peft_svd(mods, WEIGHTS, RANK))
            ref = sum(w * m.delta(torch.float64) for w, m in zip(WEIGHTS, mods))  # exact ΔW, float64
            ours_m = trunc.modules[name]
            row = {
                "shape": list(SHAPES[proj][1]), "peft_svd_s": dt, "peft_peak_rss_mb": pk, "rss_before_mb": b0,
                "peft_rel_err": rel_err_dense(ref, (B16.double() @ A16.double())),
                "ours_rel_err": rel_err_dense(ref, ours_m.delta(torch.float64)),
                "ours_reported_err": errs[name],
            }
            svd_rows[proj] = row
            del A16, B16, ref
            gc.collect()
        del adapters
        if svd_rows:
            # Shapes not timed are estimated from the largest timed one by the flop count of a full SVD
            # (R-SVD, U and V both full: 4m²n + 8mn² + 9n³ for m ≥ n, Golub & Van Loan) — an EXTRAPOLATION.
            def flops(shape: tuple[int, int]) -> float:
                m_, n_ = max(shape), min(shape)
                return 4 * m_ * m_ * n_ + 8 * m_ * n_ * n_ + 9 * n_ ** 3

            ref_proj = max(svd_rows, key=lambda k: flops(SHAPES[k][1]))
            per: dict[str, dict[str, Any]] = {}
            for proj, (_, shape) in SHAPES.items():
                same = [k for k in svd_rows if sorted(SHAPES[k][1]) == sorted(shape)]
                if same:
                    per[proj] = {"s": svd_rows[same[0]]["peft_svd_s"], "how": f"timed ({same[0]})"}
                else:
                    est = svd_rows[ref_proj]["peft_svd_s"] * flops(shape) / flops(SHAPES[ref_proj][1])
                    per[proj] = {"s": est, "how": f"flop-scaled from {ref_proj}"}
            total = args.layers * sum(v["s"] for v in per.values())
            res["peft_svd"] = {"matrices": svd_rows, "per_projection": per, "extrapolated_whole_model_s": total,
                               "extrapolated_from": "per projection × layers (EXTRAPOLATED, not run)",
                               "threads": torch.get_num_threads(),
                               "ours_truncate_s": res["truncate"]["s"], "speedup": total / res["truncate"]["s"]}
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(markdown(res))
    return res


def timeit_once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def markdown(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["config"]
    lines = [
        f"### compose: {K} × LLaMA-3-8B-shaped rank-{RANK} adapters, {c['layers']} layers "
        f"({r['inputs']['mb_each']} MB each)",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · {m['ram_gib']} GiB · torch {m['torch']} · "
        f"threads {r['threads']['used']} (truncate 1 layer: {r['threads']['truncate_one_layer_s']}) · I/O: {c['io']}",
        "",
        "| step | time (s) | peak RSS (MB) | note |",
        "|---|---|---|---|",
    ]
    a, af, o = r["anchor_warm"], r["anchor_warm_fsync"], r["ours_warm"]
    lines.append(f"| (a) anchor load_file×5 + save_file, warm | {a['median_s']:.2f} | {a['peak_rss_mb']:.0f} | "
                 f"{a['bytes'] / 1e6:.0f} MB written |")
    lines.append(f"| (a') anchor + fsync, warm | {af['median_s']:.2f} | | |")
    p = o["parts"][-1]
    lines.append(f"| (b) ours read×5 → combine → write PEFT, warm | {o['median_s']:.2f} | {o['peak_rss_mb']:.0f} | "
                 f"read {p['read']:.2f} + combine {p['combine']:.2f} + write {p['write']:.2f}; "
                 f"**{o['ratio_vs_anchor']:.2f}× anchor** ({o['ratio_vs_anchor_fsync']:.2f}× anchor+fsync); goal ≤ 1.5× |")
    cold = r["cold"]
    if "ratio" in cold:
        lines.append(f"| cold: anchor / ours | {cold['anchor_s']:.2f} / {cold['ours_s']:.2f} | | "
                     f"{cold['ratio']:.2f}× (page cache dropped) |")
    else:
        lines.append(f"| cold | — | | {cold['skipped']} |")
    t = r["truncate"]
    lines.append(f"| (c) truncate(composite, 16), whole model | {t['s']:.2f} | {t['peak_rss_mb']:.0f} | "
                 f"{t['modules']} modules, rel. error {t['rel_err_min']:.3f}–{t['rel_err_max']:.3f}; goal ≤ 20 s |")
    if "peft_svd" in r:
        ps = r["peft_svd"]
        for proj, row in ps["matrices"].items():
            lines.append(f"| (d) PEFT svd, one {proj} {row['shape'][0]}×{row['shape'][1]} | {row['peft_svd_s']:.2f} | "
                         f"{row['peft_peak_rss_mb']:.0f} | rel. error PEFT {row['peft_rel_err']:.6f} vs ours "
                         f"{row['ours_rel_err']:.6f} (reported {row['ours_reported_err']:.6f}) |")
        if ps["extrapolated_whole_model_s"]:
            how = ", ".join(f"{k}: {v['s']:.0f} s {v['how']}" for k, v in ps["per_projection"].items())
            lines.append(f"| (d) PEFT svd, whole model (EXTRAPOLATED: {how}) | {ps['extrapolated_whole_model_s']:.0f} | | "
                         f"ours {ps['ours_truncate_s']:.2f} s: {ps['speedup']:.0f}× faster |")
    lines.append("")
    lines.append(f"Peak RSS: {c['peak_rss_method']}; the dense ΔW of the whole model would be "
                 f"{c['layers'] * sum(a * b for a, b in c['shapes'].values()) * 4 / 1e9:.1f} GB.")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
