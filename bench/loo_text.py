"""Benchmark A — leave-one-out composition of text-retrieval LoRAs on a real encoder (all-MiniLM-L6-v2).

Domains are the docstrings of installed Python packages. For each public function/class: query = the
one-line summary, document = the rest of its docstring (first 600 characters). One PEFT LoRA per domain
(r=8 on query/value of layers 3–5) is trained for semantic search (in-batch negatives, symmetric InfoNCE)
on that domain's training split; each domain's prototype is the mean base-encoder embedding (the library's
``default_text_encoder``: all-MiniLM-L6-v2, mean-pooled, normalised) of its training texts (Eq. 1). Then
``adapterbank.evaluate`` holds each domain out in turn, composes an adapter from the others (Avg, Sim,
Lin, Sparse, Nearest) and scores MRR@10 and recall@1 of the held-out domain's test queries against its
test documents; Pre-trained and SFT (the domain's own LoRA) are scored too.

Nothing is tuned on the test splits: the LoRA, optimiser and loss settings were fixed before the first run
and the strategies use their defaults. Two changes were made for run time only: the full size was cut
(steps 100→40, d_len 96→64, prototype texts all→64, fewer sweep points) after its first attempt proved
too slow on the loaded machine, before any full-size score existed; the small size's prototypes went
from 64 to 32 texts to speed up ``adapterbank demo`` (mean MRR@10 of Sparse moved 0.832→0.828).

    python bench/loo_text.py --size small --make-demo-data   # -> bench/results/loo_text_small/, demo_data/
    python bench/loo_text.py --size full --figures bench/figures/loo_text   # -> bench/results/loo_text_full/
    python bench/loo_text.py --size full --selection-only   # issue 11: tune grid, auto, λ fractions, merges

Measured on the project's 2-core machine while other heavy jobs ran (1 torch thread): small 6.4–11 min
wall (~4 CPU-min), full 22.5 min wall (~8.5 CPU-min; training 17 min, evaluation 5 min). ``--make-demo-data``
rewrites ``src/adapterbank/demo_data/``; retraining gives bit-identical adapters (CPU, one thread).

The adapters touch layers 3–5 only, so the hidden states entering layer 3 are computed once per text with
the frozen base and reused in training and scoring (exact; ``adapterbank.demo.MiniLMRetrieval``). One
thread is faster than two on the project's shared 2-core machines (``--threads``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import platform
import random
import re
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("loo_text")

# ----- domains -----------------------------------------------------------------------------------

DOMAINS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (modules to scan, allowed top-level packages of the objects' __module__)
    "numpy": (("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial", "numpy.lib",
               "numpy.char", "numpy.strings", "numpy.testing"), ("numpy",)),
    "scipy": (("scipy.linalg", "scipy.optimize", "scipy.stats", "scipy.signal", "scipy.sparse", "scipy.special",
               "scipy.interpolate", "scipy.integrate", "scipy.spatial", "scipy.ndimage", "scipy.cluster"), ("scipy",)),
    "torch": (("torch", "torch.nn", "torch.nn.functional", "torch.linalg", "torch.fft", "torch.distributions",
               "torch.optim", "torch.utils.data", "torch.autograd", "torch.special", "torch.nn.init",
               "torch.nn.utils", "torch.optim.lr_scheduler"), ("torch",)),
    "sklearn": (("sklearn.linear_model", "sklearn.cluster", "sklearn.decomposition", "sklearn.metrics",
                 "sklearn.preprocessing", "sklearn.model_selection", "sklearn.ensemble", "sklearn.svm",
                 "sklearn.neighbors", "sklearn.feature_extraction.text", "sklearn.manifold", "sklearn.tree",
                 "sklearn.utils", "sklearn.datasets", "sklearn.pipeline", "sklearn.impute",
                 "sklearn.feature_selection", "sklearn.covariance", "sklearn.mixture"), ("sklearn",)),
    "sympy": (("sympy", "sympy.solvers", "sympy.simplify", "sympy.matrices", "sympy.polys", "sympy.integrals",
               "sympy.series", "sympy.functions", "sympy.ntheory", "sympy.combinatorics", "sympy.logic", "sympy.sets",
               "sympy.geometry", "sympy.stats", "sympy.physics.units"), ("sympy",)),
    "stdlib": (("os", "os.path", "re", "json", "collections", "itertools", "functools", "pathlib", "string", "textwrap",
                "datetime", "random", "statistics", "subprocess", "shutil", "logging", "argparse", "urllib.parse",
                "urllib.request", "http.client", "email.message", "csv", "zipfile", "tarfile", "inspect", "typing",
                "asyncio", "threading", "socket", "tempfile", "heapq", "bisect", "difflib", "hashlib", "base64",
                "pickle", "copy", "glob", "fnmatch", "contextlib", "enum", "dataclasses", "unittest", "io", "codecs",
                "decimal", "fractions", "operator", "sqlite3", "xml.etree.ElementTree", "configparser", "calendar",
                "time", "uuid", "struct", "ast", "tokenize", "pprint", "traceback", "warnings", "weakref", "gzip",
                "queue", "multiprocessing", "concurrent.futures", "ipaddress", "smtplib", "html", "html.parser",
                "mimetypes", "locale", "gettext", "timeit", "platform", "sys", "types", "abc", "numbers", "math",
                "cmath", "array", "shlex", "selectors", "signal", "secrets", "zlib", "lzma", "bz2", "imaplib",
                "ftplib", "wave", "colorsys", "plistlib", "netrc", "getpass", "optparse", "cProfile", "pstats"),
               ("<stdlib>",)),
    "matplotlib": (("matplotlib.pyplot", "matplotlib.colors", "matplotlib.axes", "matplotlib.figure",
                    "matplotlib.patches", "matplotlib.ticker", "matplotlib.transforms", "matplotlib.lines",
                    "matplotlib.text", "matplotlib.cm", "matplotlib.dates", "matplotlib.animation",
                    "matplotlib.widgets", "matplotlib.path", "matplotlib.collections"), ("matplotlib",)),
}

SIX = ("numpy", "scipy", "torch", "sklearn", "sympy", "stdlib")
SIZES: dict[str, dict[str, Any]] = {
    # fixed before the first run; nothing is tuned on test. The small size is what the demo ships.
    "small": {"domains": SIX, "max_items": 200, "n_test": 40, "steps": 40, "batch": 16, "q_len": 32, "d_len": 64,
              "proto_n": 32, "sweep_k": [1, 2, 3, 4], "sweep_lam": [0.01, 0.1, 1.0], "k": 5},
    # full: sized to finish in < 45 min while sharing 2 cores with other heavy jobs (~0.4 core for us)
    "full": {"domains": (*SIX, "matplotlib"), "max_items": 400, "n_test": 100, "steps": 40, "batch": 32,
             "q_len": 32, "d_len": 64, "proto_n": 64, "sweep_k": [1, 2, 3], "sweep_lam": [0.01, 1.0], "k": 5},
}
SPLIT = 3  # LoRA on layers SPLIT.. of the 6; the layers below are frozen and their outputs cached
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query", "value"],
        "layers_to_transform": [3, 4, 5]}
LR = 1e-3
SCALE = 20.0  # InfoNCE logit scale (cosine × 20, as sentence-transformers' MultipleNegativesRankingLoss)
DOC_CHARS = 600  # documents are cut to this many characters (the shipped demo data holds exactly these)
SEED = 0
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEMO_DIR = Path(__file__).resolve().parents[1] / "src" / "adapterbank" / "demo_data"


@dataclass(frozen=True)
class Item:
    name: str  # qualified name of the function/class
    query: str  # the one-line summary
    doc: str  # the rest of the docstring


_SIG = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


def _split_doc(doc: str) -> tuple[str, str]:
    paras = [p.strip() for p in inspect.cleandoc(doc).split("\n\n") if p.strip()]
    if paras and _SIG.match(" ".join(paras[0].split())):  # numpy ufuncs etc. start with a signature
        paras = paras[1:]
    if not paras:
        return "", ""
    return " ".join(paras[0].split()), "\n\n".join(paras[1:])


def _stdlib_module(mod: str) -> bool:
    top = mod.split(".")[0]
    return top in sys.stdlib_module_names or top.lstrip("_") in sys.stdlib_module_names


def harvest(domain: str) -> list[Item]:
    """Public callables of the domain's modules with a usable docstring: summary 15–200 chars, body ≥ 80 chars."""
    mods, roots = DOMAINS[domain]
    seen: dict[str, Item] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mn in mods:
            try:
                m = importlib.import_module(mn)
            except Exception as e:  # noqa: BLE001 - optional submodules
                log.info("skip module %s: %s", mn, e)
                continue
            for name in sorted(dir(m)):
                if name.startswith("_"):
                    continue
                try:
                    obj = getattr(m, name)
                except Exception:  # noqa: BLE001
                    continue
                if inspect.ismodule(obj) or not callable(obj):
                    continue
                om = getattr(obj, "__module__", None) or ""
                if not isinstance(om, str):
                    continue
                ok = _stdlib_module(om) if roots == ("<stdlib>",) else om.split(".")[0] in roots
                if not ok:
                    continue
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                head, rest = _split_doc(doc)
                if not (15 <= len(head) <= 200) or len(rest) < 80 or head.endswith(":"):
                    continue
                key = head.lower()
                if key not in seen:
                    seen[key] = Item(f"{mn}.{name}", head, rest[:DOC_CHARS])
    return sorted(seen.values(), key=lambda it: it.name)


def split_items(items: list[Item], n_test: int, max_items: int, seed: int) -> tuple[list[Item], list[Item]]:
    """A seeded shuffle, at most ``max_items``; the first ``n_test`` are the test split (never trained on)."""
    rng = random.Random(seed)
    items = list(items)
    rng.shuffle(items)
    items = items[:max_items]
    n_test = min(n_test, len(items) // 3)
    return items[n_test:], items[:n_test]


def proto_text(it: Item) -> str:
    """The text a prototype sees for one training item (Eq. 1)."""
    return f"{it.query}\n{it.doc}"


# ----- training ----------------------------------------------------------------------------------

def train_lora(scorer: Any, train: list[Item], steps: int, batch: int, out: Path, seed: int) -> dict[str, Any]:
    """One PEFT LoRA for semantic search: symmetric InfoNCE over in-batch negatives, on cached layer-3 inputs."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    sq = scorer.lower([it.query for it in train], scorer.q_len)  # [(T_i, 384)]
    sd = scorer.lower([it.doc for it in train], scorer.d_len)
    t_cache = time.perf_counter() - t0
    model = get_peft_model(copy.deepcopy(scorer.base), LoraConfig(**LORA))
    model.train()
    layers = list(model.base_model.model.encoder.layer[scorer.split:])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / steps))
    order: list[int] = []
    losses = []
    for _step in range(steps):
        if len(order) < batch:
            idx = list(range(len(train)))
            rng.shuffle(idx)
            order += idx
        b, order = order[:batch], order[batch:]
        q = scorer.upper([sq[i] for i in b], layers)  # (b, 384) unit rows
        d = scorer.upper([sd[i] for i in b], layers)
        logits = SCALE * q @ d.T  # (b, b)
        target = torch.arange(len(b))
        loss = 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                      + torch.nn.functional.cross_entropy(logits.T, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (_step + 1) % 20 == 0:
            log.info("  step %d/%d: loss %.3f (%.0f s)", _step + 1, steps, np.mean(losses[-20:]),
                     time.perf_counter() - t0)
    model.eval()
    model.peft_config["default"].base_model_name_or_path = BASE_ID
    model.save_pretrained(out)
    return {"steps": steps, "batch": batch, "first_loss": float(np.mean(losses[:5])),
            "last_loss": float(np.mean(losses[-5:])), "cache_seconds": round(t_cache, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def check_cache_exact(scorer: Any, texts: list[str]) -> float:
    """max |cached-path embedding − full-forward embedding| on the base model (must be ~1e-6)."""
    scorer.load(None)
    with torch.inference_mode():
        a = scorer.upper(scorer.lower(texts, scorer.d_len))
        b = scorer.embed(texts, scorer.d_len)
    return float((a - b).abs().max())


# ----- paired statistics -------------------------------------------------------------------------

def paired_methods() -> tuple[str, ...]:
    """The baselines and every strategy of the table, in column order."""
    from adapterbank.evaluate.results import method_order

    return method_order()


def paired_bootstrap(bank: Any, scorer: Any, tasks: dict[str, dict[str, list[str]]], k: int, n_boot: int = 10_000,
                     seed: int = 0) -> dict[str, Any]:
    """Per-query reciprocal ranks (MRR@10 terms) of every method on every target, and paired bootstrap 95%
    intervals of mean(Sparse − X) over all test queries, resampled within each target."""
    from adapterbank.compose import compose

    methods = paired_methods()
    rr: dict[str, dict[str, np.ndarray]] = {}
    for t, task in tasks.items():
        p_t = bank.get_prototype(t)
        rr[t] = {}
        for m in methods:
            if m == "pretrained":
                ad = None
            elif m == "sft":
                ad = bank.load_adapter(t)
            else:
                ad = compose(bank, p_t, k=k, strategy=m, exclude=[t]).adapter
            rank = scorer.ranks(ad, task).numpy()
            rr[t][m] = np.where(rank <= 10, 1.0 / rank, 0.0)  # (n,)
    rng = np.random.default_rng(seed)
    idx = {t: rng.integers(0, len(v["sparse"]), size=(n_boot, len(v["sparse"]))) for t, v in rr.items()}
    out: dict[str, Any] = {"n_queries": int(sum(len(v["sparse"]) for v in rr.values())), "n_boot": n_boot,
                           "mean": {m: float(np.mean(np.concatenate([rr[t][m] for t in rr]))) for m in methods},
                           "sparse_minus": {}}
    for m in methods:
        if m == "sparse":
            continue
        diffs = {t: rr[t]["sparse"] - rr[t][m] for t in rr}  # (n,) per target
        n = sum(len(d) for d in diffs.values())
        boot = sum(d[idx[t]].sum(1) for t, d in diffs.items()) / n  # (n_boot,)
        mean = float(sum(d.sum() for d in diffs.values()) / n)
        wins = int(sum((d > 0).sum() for d in diffs.values()))
        losses = int(sum((d < 0).sum() for d in diffs.values()))
        ci = [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
        out["sparse_minus"][m] = {"mean": mean, "ci95": ci, "queries_better": wins, "queries_worse": losses}
    return out


def paired_markdown(st: dict[str, Any]) -> str:
    from adapterbank.evaluate.results import display_name

    intro = (f"All {st['n_queries']} held-out test queries of all targets pooled; per query the reciprocal rank "
             f"(0 beyond rank 10). 95% interval: paired bootstrap ({st['n_boot']} resamples within each target).")
    lines = ["# Paired comparison of Sparse with every other method (MRR@10)", "", intro, "",
             "| method | mean MRR@10 | Sparse − method | 95% interval | queries Sparse better / worse |",
             "|:---|---:|---:|---:|---:|"]
    for m, d in st["sparse_minus"].items():
        lo, hi = d["ci95"]
        lines.append(f"| {display_name(m)} | {st['mean'][m]:.4f} | {d['mean']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                     f"{d['queries_better']} / {d['queries_worse']} |")
    lines.append(f"| Sparse | {st['mean']['sparse']:.4f} | | | |")
    return "\n".join(lines) + "\n"


# ----- demo data ---------------------------------------------------------------------------------

DEMO_README = '''"""Data of ``adapterbank demo``: six trained LoRAs of all-MiniLM-L6-v2 and their domains' splits.

Made by ``{command}``
(Benchmark A at its small size; ``manifest.json`` holds the recipe, versions and training losses).
Per domain ({domains}):

- ``adapter_config.json``, ``adapter_model.safetensors``: a PEFT LoRA (r=8, query/value of layers 3-5)
  trained for semantic search over the domain's docstrings (query: one-line summary, document: the rest);
- ``train.jsonl``: ``{{"text", "name"}}`` the training items (summary, newline, document), used for prototypes;
- ``test.jsonl``: ``{{"query", "doc", "name"}}`` the held-out pairs, never trained on.

The texts are docstrings of the packages installed when the data was made (versions in the manifest);
shipping them makes the demo independent of what is installed on the user's machine.
"""
'''


def write_demo_data(out: Path, data: dict[str, tuple[list[Item], list[Item]]], adapters: Path, cfg: dict[str, Any],
                    digest: str, train_info: dict[str, Any], command: str) -> None:
    """The adapters (PEFT files), the train texts and test pairs (JSONL) and a manifest, for ``adapterbank demo``."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "__init__.py").write_text(DEMO_README.format(command=command, domains=", ".join(data)))
    for dom, (train, test) in data.items():
        d = out / dom
        d.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(adapters / dom / f, d / f)
        (d / "train.jsonl").write_text("".join(json.dumps({"text": proto_text(it), "name": it.name}) + "\n"
                                               for it in train), encoding="utf-8")
        (d / "test.jsonl").write_text("".join(json.dumps({"query": it.query, "doc": it.doc, "name": it.name}) + "\n"
                                              for it in test), encoding="utf-8")
    versions = {m: importlib.import_module(m).__version__ for m in ("numpy", "scipy", "torch", "sklearn", "sympy",
                                                                     "transformers", "peft")}
    manifest = {
        "made_by": command, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": BASE_ID, "domains": list(data), "data_digest": digest, "python": platform.python_version(),
        "versions": versions,
        "config": {"q_len": cfg["q_len"], "d_len": cfg["d_len"], "split": SPLIT, "proto_n": cfg["proto_n"],
                   "steps": cfg["steps"], "batch": cfg["batch"], "lora": LORA, "lr": LR, "scale": SCALE,
                   "doc_chars": DOC_CHARS, "max_items": cfg["max_items"], "n_test": cfg["n_test"], "seed": SEED},
        "train": train_info,
        "n": {d: {"train": len(tr), "test": len(te)} for d, (tr, te) in data.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log.info("demo data written to %s", out)


# ----- main --------------------------------------------------------------------------------------

if str(Path(__file__).resolve().parent) not in sys.path:  # also when imported by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine, quiet_logging  # noqa: E402


def stage_selection(bank_dir: Path, tasks: dict[str, dict[str, list[str]]], cfg: dict[str, Any], out: Path,
                    size: str) -> Path:
    """Composition selection (issue 11): the tune grid, auto (nested leave-one-out), the λ-fraction sweep and the
    merge methods over the same bank and tasks, with per-query scores for paired intervals. -> selection.md."""
    from adapterbank.bank import Bank
    from adapterbank.demo import MiniLMRetrieval

    from _selection import run_selection, write_selection

    scorer = MiniLMRetrieval(q_len=cfg["q_len"], d_len=cfg["d_len"], split=SPLIT, per_item=True)
    t0 = time.perf_counter()
    bank = Bank.open(bank_dir)
    try:
        sel = run_selection(bank, scorer, tasks, main_k=cfg["k"], cache_dir=out / "cache", metric="mrr@10")
    finally:
        bank.close()
    sel.seconds["total"] = round(time.perf_counter() - t0, 1)
    md = write_selection(sel, out / "selection", f"Benchmark A ({size}): composition selection")
    log.info("selection table in %s (%.0f s)", md, sel.seconds["total"])
    return md


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("-o", "--out", type=Path, default=None, help="default: bench/results/loo_text_SIZE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retrain", action="store_true", help="train the LoRAs again even if the bank exists")
    ap.add_argument("--make-demo-data", nargs="?", const=DEMO_DIR, type=Path, default=None, metavar="DIR",
                    help=f"also write the adapters and splits for 'adapterbank demo' (default {DEMO_DIR})")
    ap.add_argument("--figures", type=Path, default=None, help="copy results.md and the PNGs into this folder")
    ap.add_argument("--selection", action="store_true",
                    help="also run the composition-selection stage (issue 11: tune grid, auto, λ fractions, merges)")
    ap.add_argument("--selection-only", action="store_true",
                    help="train or reuse the bank, then run only the composition-selection stage")
    args = ap.parse_args(argv)
    quiet_logging("sentence_transformers")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    cfg = SIZES[args.size]
    out: Path = args.out or Path(__file__).resolve().parent / "results" / f"loo_text_{args.size}"
    out.mkdir(parents=True, exist_ok=True)
    cli_args = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join(shlex.quote(a) for a in ["python", "bench/loo_text.py", *cli_args])
    t_all = time.perf_counter()

    from adapterbank.bank import Bank
    from adapterbank.demo import MiniLMRetrieval
    from adapterbank.evaluate import evaluate, write_report
    from adapterbank.prototypes import compute_prototype, default_text_encoder

    # 1. data
    data: dict[str, tuple[list[Item], list[Item]]] = {}
    for dom in cfg["domains"]:
        items = harvest(dom)
        seed = int(hashlib.sha256(dom.encode()).hexdigest()[:8], 16) ^ SEED
        data[dom] = split_items(items, cfg["n_test"], cfg["max_items"], seed)
        log.info("%s: %d items harvested, %d train, %d test", dom, len(items), len(data[dom][0]), len(data[dom][1]))
    digest = hashlib.sha256(json.dumps({d: [[asdict(i) for i in s] for s in v] for d, v in data.items()},
                                       sort_keys=True).encode()).hexdigest()
    (out / "data.json").write_text(json.dumps(
        {"digest": digest, "domains": {d: {"train": [i.name for i in tr], "test": [i.name for i in te]}
                                       for d, (tr, te) in data.items()}}, indent=1))

    # 2. LoRAs and the bank (reused when the data digest and config are unchanged)
    scorer = MiniLMRetrieval(q_len=cfg["q_len"], d_len=cfg["d_len"], split=SPLIT)
    err = check_cache_exact(scorer, [it.doc for it in data[cfg["domains"][0]][1][:16]])
    log.info("cached-layer path vs full forward: max |Δ| = %.1e", err)
    if err > 1e-4:
        raise SystemExit(f"the cached-layer path disagrees with the full forward ({err:.1e})")
    bank_dir = out / "bank"
    train_cfg = {a: b for a, b in cfg.items() if a not in ("k", "sweep_k", "sweep_lam")}  # evaluation-only keys
    stamp = {"digest": digest, "size": args.size, "lora": LORA, "lr": LR, "cfg": train_cfg, "scale": SCALE,
             "split": SPLIT}
    stamp_file = out / "bank.stamp.json"
    train_info: dict[str, Any] = {}
    fresh = (args.retrain or not stamp_file.exists()
             or json.loads(stamp_file.read_text()).get("stamp") != json.loads(json.dumps(stamp)))
    if fresh:
        if bank_dir.exists():
            shutil.rmtree(bank_dir)
        bank = Bank.init(bank_dir)
        enc = default_text_encoder()
        for j, (dom, (train, _test)) in enumerate(data.items()):
            folder = out / "adapters" / dom
            info = train_lora(scorer, train, cfg["steps"], cfg["batch"], folder, seed=SEED + j)
            t0 = time.perf_counter()
            n_p = min(cfg["proto_n"], len(train))
            proto = compute_prototype(enc, [proto_text(it) for it in train[:n_p]], batch_size=32,
                                      description=f"docstrings of {dom} (train split, first {n_p})")
            info["proto_seconds"] = round(time.perf_counter() - t0, 1)
            bank.add(folder, id=dom, prototype=proto, tags=["docstrings"],
                     description=f"semantic search over {dom} docs")
            train_info[dom] = info
            log.info("trained %s: loss %.3f -> %.3f in %.0f s (+%.0f s prototype)", dom, info["first_loss"],
                     info["last_loss"], info["seconds"], info["proto_seconds"])
        bank.close()
        stamp_file.write_text(json.dumps({"stamp": stamp, "train": train_info}, indent=1))
    else:
        train_info = json.loads(stamp_file.read_text()).get("train", {})
        log.info("reusing the bank in %s", bank_dir)
    t_train = time.perf_counter() - t_all
    if args.make_demo_data is not None:
        write_demo_data(args.make_demo_data, data, out / "adapters", cfg, digest, train_info, command)

    tasks = {dom: {"queries": [i.query for i in te], "docs": [i.doc for i in te]} for dom, (_tr, te) in data.items()}
    if args.selection_only:
        stage_selection(bank_dir, tasks, cfg, out, args.size)
        log.info("done in %.0f s", time.perf_counter() - t_all)
        return 0

    # 3. leave-one-out evaluation
    t0 = time.perf_counter()
    bank = Bank.open(bank_dir)
    res = evaluate(bank, scorer, strategies="all", k=cfg["k"], tasks=tasks, sweep_k=cfg["sweep_k"],
                   sweep_lam=cfg["sweep_lam"], cache_dir=out / "cache", progress=sys.stderr.isatty())
    paired = paired_bootstrap(bank, scorer, tasks, cfg["k"])
    bank.close()
    t_eval = time.perf_counter() - t0
    res.meta.update({
        "benchmark": "A: loo_text", "command": command,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "size": args.size, "config": {**cfg, "lora": LORA, "lr": LR, "scale": SCALE, "split": SPLIT,
                                      "doc_chars": DOC_CHARS, "base": BASE_ID, "base_path": str(scorer.model_dir)},
        "data_digest": digest, "train": train_info, "train_seconds": round(t_train, 1),
        "eval_seconds": round(t_eval, 1), "total_seconds": round(time.perf_counter() - t_all, 1),
        "n_test": {d: len(te) for d, (_tr, te) in data.items()},
        "n_train": {d: len(tr) for d, (tr, _te) in data.items()},
    })
    res.meta["paired_mrr10"] = paired
    report = write_report(res, out / "report", title=f"Benchmark A — leave-one-out text retrieval ({args.size})")
    (report / "paired.md").write_text(paired_markdown(paired))
    (report / "paired.json").write_text(json.dumps(paired, indent=1))
    log.info("\n%s", paired_markdown(paired))
    for metric in res.metrics:
        table = res.table(metric)
        cols = res.methods
        log.info("%s  %s", metric.ljust(10), " ".join(c.rjust(10) for c in cols))
        for t in res.targets:
            log.info("%s  %s", t.ljust(10), " ".join(f"{table[t].get(c, math.nan):10.4f}" for c in cols))
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        shutil.copy2(report / "results.md", args.figures / "results.md")
        shutil.copy2(report / "paired.md", args.figures / "paired.md")
        (args.figures / "plots").mkdir(exist_ok=True)
        for png in sorted((report / "plots").glob("*.png")):  # results.md links plots/NAME.png
            shutil.copy2(png, args.figures / "plots" / png.name)
        log.info("copied results.md and the PNGs to %s", args.figures)
    if args.selection:
        stage_selection(bank_dir, tasks, cfg, out, args.size)
    log.info("report in %s (train %.0f s, evaluate %.0f s, %.0f s in all)", report, t_train, t_eval,
             time.perf_counter() - t_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
