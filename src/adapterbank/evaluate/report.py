"""Reports of an evaluation: ``results.json`` (schema 1), ``results.md``, PNG figures and a static ``index.html``.

``results.md`` follows the seed paper: a Table-1 style score table per metric (rows: targets; columns:
Pre-trained, SFT, Nearest, Avg, Sim, Lin, Sparse; the best zero-shot value of each row in bold) and a
Table-2 style weight table per target (rows: strategies; columns: retrieved adapters).

Under each score table's Mean row, two rows give paired bootstrap intervals
(:meth:`~adapterbank.evaluate.results.EvalResults.comparisons`): each method minus Pre-trained, and each
method minus the best other zero-shot strategy, over the evaluator's per-item scores when it returned
them, else over targets. ``results.json`` holds them under ``"intervals"``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapterbank._io import atomic_write_bytes
from adapterbank.errors import FormatError
from adapterbank.evaluate.results import (
    BASELINES,
    CI,
    N_BOOT,
    Comparison,
    EvalResults,
    best_methods,
    display_name,
    order_methods,
    sweep_label,
)

__all__ = ["write_report", "load_results", "score_rows", "weight_rows", "fmt", "interval_text", "interval_note"]

PLOTS_DIR = "plots"


def fmt(v: float | None) -> str:
    """A number for a table: 4 decimals in the usual range, scientific outside it, an en dash when missing.

    >>> fmt(0.81234), fmt(-1.5e-6), fmt(None), fmt(12345.6)
    ('0.8123', '-1.500e-06', '–', '1.235e+04')
    """
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.4f}"
    return f"{v:.3e}"


def interval_text(c: Comparison, with_reference: bool = False) -> str:
    """A table cell for a comparison: ``Δ [lo, hi]``, then ▲ (better) / ▼ (worse) when the interval excludes 0.

    The three numbers share one format, chosen by the largest (as :func:`fmt`; ``-0.0`` shows as ``+0.0000``).

    >>> interval_text(Comparison("sparse", "avg", 0.02, 0.0004, 0.03, "item", 40, 2, True), with_reference=True)
    '+0.0200 [+0.0004, +0.0300] ▲ vs Avg'
    """
    vals = [c.diff + 0.0, c.lo + 0.0, c.hi + 0.0]
    top = max(abs(v) for v in vals)
    spec = "+.4f" if top == 0 or 1e-3 <= top < 1e4 else "+.3e"
    d, lo, hi = (format(v, spec) for v in vals)
    mark = "" if c.better is None else (" ▲" if c.better else " ▼")
    ref = f" vs {display_name(c.reference)}" if with_reference else ""
    return f"{d} [{lo}, {hi}]{mark}{ref}"


def _ci_label(kind: str, ci: float) -> str:
    return f"Δ vs {'Pre-trained' if kind == 'vs_pretrained' else 'best other'} [{ci:.0%} CI]"


def _score_rows(results: EvalResults, metric: str, lower_is_better: bool,
                comps: Mapping[str, Mapping[str, Comparison]] | None, ci: float
                ) -> tuple[list[str], list[tuple[str, list[tuple[str, bool]]]]]:
    table = results.table(metric)
    cols = [m for m in results.methods if any(m in row for row in table.values())]
    zero_shot = [m for m in cols if m not in BASELINES]
    rows: list[tuple[str, list[tuple[str, bool]]]] = []
    for t in results.targets:
        row = table.get(t, {})
        best = best_methods(row, zero_shot, lower_is_better)
        rows.append((t, [(fmt(row.get(m)), m in best) for m in cols]))
    if len(results.targets) > 1:
        means = results.means(metric)
        best = best_methods(means, zero_shot, lower_is_better)
        rows.append(("Mean", [(fmt(means.get(m)), m in best) for m in cols]))
    for kind in ("vs_pretrained", "vs_best_other"):
        if comps and any(kind in c for c in comps.values()):
            cells = [(interval_text(comps[m][kind], kind == "vs_best_other") if kind in comps.get(m, {}) else "–",
                      False) for m in cols]
            rows.append((_ci_label(kind, ci), cells))
    return cols, rows


def score_rows(results: EvalResults, metric: str, lower_is_better: bool = False, *, intervals: bool = True,
               n_boot: int = N_BOOT, seed: int = 0, ci: float = CI
               ) -> tuple[list[str], list[tuple[str, list[tuple[str, bool]]]]]:
    """The Table-1 cells of one metric: (column methods, [(row label, [(text, bold)])]).

    Rows: one per target, then Mean (with more than one target), then — with ``intervals`` and where they can
    be formed — ``Δ vs Pre-trained [95% CI]`` and ``Δ vs best other [95% CI]``: each column minus the
    reference, with its paired bootstrap interval (:meth:`EvalResults.comparisons`; cells from
    :func:`interval_text`). Bold marks the best *zero-shot* value of a row (a composition strategy; not
    Pre-trained or SFT).

    >>> from adapterbank.evaluate.results import EvalRecord
    >>> recs = [EvalRecord("a", m, 2, {}, {}, [], [], [], "", {"acc": v})
    ...         for m, v in (("sft", 0.9), ("avg", 0.5), ("sparse", 0.7))]
    >>> cols, rows = score_rows(EvalResults(recs, ["a"]), "acc")
    >>> cols, rows
    (['sft', 'avg', 'sparse'], [('a', [('0.9000', False), ('0.5000', False), ('0.7000', True)])])
    """
    comps = results.comparisons(metric, lower_is_better, n_boot=n_boot, seed=seed, ci=ci) if intervals else None
    return _score_rows(results, metric, lower_is_better, comps, ci)


def interval_note(comps: Mapping[str, Mapping[str, Comparison]], *, n_boot: int = N_BOOT, seed: int = 0,
                  ci: float = CI, lower_is_better: bool = False) -> str:
    """One paragraph saying how the Δ rows of a score table were computed (units, B, seed); '' without rows.

    >>> c = Comparison("avg", "pretrained", 0.1, 0.0, 0.2, "target", 6, 6, None)
    >>> interval_note({"avg": {"vs_pretrained": c}})[:60]
    'Δ rows: mean over targets of (column − reference), with its '
    """
    cs = [c for per in comps.values() for c in per.values()]
    if not cs:
        return ""
    units = {c.unit for c in cs}
    n_items = max((c.n_units for c in cs if c.unit == "item"), default=0)
    n_t = max(c.n_targets for c in cs)
    if units == {"item"}:
        how = (f"the evaluator's per-item scores, resampled within each target ({n_items} items in {n_t} "
               f"target{'s' if n_t > 1 else ''})")
    elif units == {"target"}:
        how = f"the {n_t} targets' scores"
    else:
        how = (f"the evaluator's per-item scores, resampled within each target, where both methods have them "
               f"(up to {n_items} items), else the {n_t} targets' scores")
    direction = "lower" if lower_is_better else "higher"
    return (f"Δ rows: mean over targets of (column − reference), with its paired bootstrap {ci:.0%} interval "
            f"(percentile, B={n_boot}, seed {seed}) over {how}. ▲/▼: the interval excludes 0 and the column is "
            f"better/worse ({direction} is better). Best other: the other zero-shot strategy with the best Mean "
            f"(Pre-trained and SFT excluded); for SFT, the best zero-shot strategy.")


def weight_rows(results: EvalResults, target: str) -> tuple[list[tuple[str, float]], list[tuple[str, list[str], str]]]:
    """The Table-2 cells of one target: ([(adapter id, distance)], [(method, weights as text, effective params)])."""
    recs = [results.main(target, m) for m in results.methods if m not in BASELINES]
    recs = [r for r in recs if r is not None]
    dist: dict[str, float] = {}
    for r in recs:
        for i, d in zip(r.ids, r.distances, strict=True):
            dist.setdefault(i, d)
    ids = sorted(dist, key=lambda i: (dist[i], i))
    rows = []
    for r in recs:
        cells = []
        for i in ids:
            w = r.weight_of(i)
            cells.append("–" if w is None else f"{w:+.3f}")
        eff = ", ".join(f"{a}={b:.3g}" for a, b in sorted(r.effective_params.items())) or "–"
        rows.append((r.method, cells, f"{eff}; {r.status}" if r.status else eff))
    return [(i, dist[i]) for i in ids], rows


def _sweep_rows(results: EvalResults, metric: str, sweep: str) -> tuple[list[float], list[tuple[str, list[str]]]]:
    series = results.series(metric, sweep)
    xs = sorted({x for per in series.values() for pts in per.values() for x, _ in pts})
    rows = []
    for m in order_methods(series):
        cells = []
        for x in xs:
            vals = [v for pts in series[m].values() for xx, v in pts if xx == x]
            cells.append(fmt(sum(vals) / len(vals)) if vals else "–")
        rows.append((m, cells))
    return xs, rows


def _xfmt(x: float, sweep: str) -> str:
    return str(int(x)) if sweep == "k" else f"{x:g}"


# ----- Markdown --------------------------------------------------------------------------------

def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align_right_from: int = 1) -> list[str]:
    esc = [h.replace("|", "\\|") for h in header]
    out = ["| " + " | ".join(esc) + " |",
           "|" + "|".join(":---" if j < align_right_from else "---:" for j in range(len(header))) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _markdown(results: EvalResults, low: set[str], plots: Mapping[str, list[Path]], root: Path,
              iv: Mapping[str, Any]) -> str:
    cfg = results.config
    self_note = (" The target's own adapter is **left in the pool** (ablation, seed paper Table 6)."
                 if cfg.get("include_self") else " The target's own adapter is excluded from the pool.")
    lines = [
        "# Leave-one-out evaluation",
        "",
        f"Each target's task is scored with an adapter composed from the other adapters of the bank "
        f"(k={cfg.get('k')}).{self_note} Pre-trained: no adapter. SFT: the target's own adapter (an upper bound). "
        f"**Bold**: the best zero-shot composition per row.",
        "",
        f"- evaluator: `{cfg.get('evaluator')}`",
        f"- strategies: {', '.join(cfg.get('strategies', []))}; parameters: `{json.dumps(cfg.get('params', {}))}`",
        f"- prototype space: `{cfg.get('space')}`",
        f"- created {results.meta.get('created', '?')}; {results.meta.get('evaluator_calls', '?')} evaluator calls, "
        f"{results.meta.get('cache_hits', 0)} from cache",
        "",
    ]
    for metric in results.metrics:
        arrow = "lower is better" if metric in low else "higher is better"
        comps = iv["comparisons"][metric]
        cols, rows = _score_rows(results, metric, metric in low, comps, iv["ci"])
        lines += [f"## {metric} ({arrow})", ""]
        lines += _md_table(["target"] + [display_name(c) for c in cols],
                           [[t] + [f"**{s}**" if b else s for s, b in cells] for t, cells in rows])
        lines.append("")
        note = interval_note(comps, n_boot=iv["n_boot"], seed=iv["seed"], ci=iv["ci"], lower_is_better=metric in low)
        if note:
            lines += [note, ""]
        for sweep in results.sweeps:
            xs, srows = _sweep_rows(results, metric, sweep)
            if not srows:
                continue
            label = sweep_label(sweep)
            lines += [f"### {metric} vs {label} (mean over targets)", ""]
            lines += _md_table(["method"] + [f"{label}={_xfmt(x, sweep)}" for x in xs],
                               [[display_name(m)] + c for m, c in srows])
            lines.append("")
    lines += ["## Weights per target", ""]
    for t in results.targets:
        ids, rows = weight_rows(results, t)
        if not rows:
            continue
        lines += [f"### target {t}", ""]
        lines += _md_table(["strategy"] + [f"{i} (d={d:.3g})" for i, d in ids] + ["parameters; status"],
                           [[display_name(m)] + cells + [p] for m, cells, p in rows])
        lines.append("")
    figs = [p for sec in plots.values() for p in sec]
    if figs:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in figs] + [""]
    return "\n".join(lines)


# ----- HTML ------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.05em}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{padding:.25em .7em;border-bottom:1px solid #e4e4e4;text-align:right;font-variant-numeric:tabular-nums}
th:first-child,td:first-child{text-align:left}thead th{border-bottom:2px solid #888}
tr.mean td{border-top:2px solid #888}td.best{font-weight:700}tr.ci td{font-size:.85em;white-space:nowrap}
p.note{font-size:.85em;color:#444}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}code{background:#f4f4f4;padding:0 .25em;border-radius:3px}
.meta{font-size:.85em;color:#444}
"""


def _h(s: object) -> str:
    return html.escape(str(s), quote=True)


def _html_table(header: Sequence[str], rows: Sequence[tuple[str, Sequence[tuple[str, bool]]]],
                mean_label: str | None = None) -> str:
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_h(c)}</th>" for c in header) + "</tr></thead>", "<tbody>"]
    for label, cells in rows:
        cls = ' class="mean"' if mean_label is not None and label == mean_label else ""
        cls = ' class="ci"' if mean_label is not None and label.startswith("Δ vs ") else cls
        tds = "".join(f'<td class="best">{_h(s)}</td>' if b else f"<td>{_h(s)}</td>" for s, b in cells)
        out.append(f"<tr{cls}><td>{_h(label)}</td>{tds}</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def _fig(p: Path, root: Path, caption: str) -> str:
    return (f'<figure><img src="{_h(p.relative_to(root).as_posix())}" alt="{_h(caption)}" loading="lazy">'
            f"<figcaption>{_h(caption)}</figcaption></figure>")


def _html(results: EvalResults, low: set[str], plots: Mapping[str, list[Path]], root: Path, title: str,
          iv: Mapping[str, Any]) -> str:
    cfg, meta = results.config, results.meta
    self_note = ("The target's own adapter is <b>left in the pool</b> (ablation, seed paper Table 6)."
                 if cfg.get("include_self") else "The target's own adapter is excluded from the pool.")
    body = [f"<h1>{_h(title)}</h1>",
            f"<p>Each target's task is scored with an adapter composed from the other adapters of the bank "
            f"(k={_h(cfg.get('k'))}). {self_note} Pre-trained: no adapter. SFT: the target's own adapter (an upper "
            f"bound). <b>Bold</b>: the best zero-shot composition per row.</p>",
            '<ul class="meta">',
            f"<li>evaluator: <code>{_h(cfg.get('evaluator'))}</code></li>",
            f"<li>strategies: {_h(', '.join(cfg.get('strategies', [])))}; parameters: "
            f"<code>{_h(json.dumps(cfg.get('params', {})))}</code></li>",
            f"<li>prototype space: <code>{_h(cfg.get('space'))}</code>; bank: <code>{_h(meta.get('bank', ''))}</code></li>",
            f"<li>created {_h(meta.get('created', '?'))}; {_h(meta.get('evaluator_calls', '?'))} evaluator calls, "
            f"{_h(meta.get('cache_hits', 0))} from cache; versions: "
            f"<code>{_h(', '.join(f'{a} {b}' for a, b in dict(meta.get('versions', {})).items()))}</code></li>",
            "</ul>",
            '<p>Data: <a href="results.json">results.json</a> · <a href="results.md">results.md</a></p>']
    by_name = {p.name: p for sec in plots.values() for p in sec}
    for metric in results.metrics:
        arrow = "lower is better" if metric in low else "higher is better"
        comps = iv["comparisons"][metric]
        cols, rows = _score_rows(results, metric, metric in low, comps, iv["ci"])
        body.append(f"<h2>{_h(metric)} ({arrow})</h2>")
        body.append(_html_table(["target"] + [display_name(c) for c in cols], rows, "Mean"))
        note = interval_note(comps, n_boot=iv["n_boot"], seed=iv["seed"], ci=iv["ci"], lower_is_better=metric in low)
        if note:
            body.append(f'<p class="note">{_h(note)}</p>')
        for p in plots.get("scores", []):
            if p.stem == f"scores_{_safe_name(metric)}":
                body.append(_fig(p, root, f"{metric} per target and method"))
        for sweep in results.sweeps:
            xs, srows = _sweep_rows(results, metric, sweep)
            if not srows:
                continue
            label = sweep_label(sweep)
            body.append(f"<h3>{_h(metric)} vs {label} (mean over targets)</h3>")
            body.append(_html_table(["method"] + [f"{label}={_xfmt(x, sweep)}" for x in xs],
                                    [(display_name(m), [(c, False) for c in cells]) for m, cells in srows]))
            p = by_name.get(f"sweep_{sweep}_{_safe_name(metric)}.png")
            if p is not None:
                body.append(_fig(p, root, f"{metric} vs {label}"))
    body.append("<h2>Per target: weights, λ-path, prototype map</h2>")
    for t in results.targets:
        ids, rows = weight_rows(results, t)
        body.append(f"<h3>target {_h(t)}</h3>")
        if rows:
            body.append(_html_table(["strategy"] + [f"{i} (d={d:.3g})" for i, d in ids] + ["parameters; status"],
                                    [(display_name(m), [(c, False) for c in cells] + [(p, False)])
                                     for m, cells, p in rows]))
        for key, cap in (("weights", "weights per strategy"), ("lambda_path", "sparse λ-path"),
                         ("map", "prototype map (PCA)")):
            p = by_name.get(f"{key}_{_safe_name(t)}.png")
            if p is not None:
                body.append(_fig(p, root, f"{t}: {cap}"))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{_h(title)}</title>\n"
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


# ----- entry points ----------------------------------------------------------------------------

def write_report(results: EvalResults, out_dir: str | Path, *, lower_is_better: Sequence[str] = (),
                 plots: bool = True, title: str = "adapterbank — leave-one-out evaluation",
                 n_boot: int = N_BOOT, seed: int = 0, ci: float = CI) -> Path:
    """Write ``results.json``, ``results.md``, ``plots/*.png`` and ``index.html`` into ``out_dir``; return it.

    ``lower_is_better`` names metrics where smaller wins (losses, distances), for the bold marks, axes and the
    choice of the best other strategy. ``n_boot``, ``seed`` and ``ci`` set the paired bootstrap intervals
    (:meth:`EvalResults.comparisons`), written to ``results.json`` as ``"intervals"``::

        {"n_boot": 2000, "seed": 0, "ci": 0.95, "method": ..., "statistic": ...,
         "metrics": {metric: {method: {"vs_pretrained": {"method", "reference", "diff", "lo", "hi", "unit",
                                                         "n_units", "n_targets", "better"},
                                       "vs_best_other": {...}}}}}

    >>> import tempfile
    >>> from adapterbank.evaluate.results import EvalRecord
    >>> res = EvalResults([EvalRecord("a", "avg", 2, {}, {}, ["b", "c"], [1.0, 2.0], [0.5, 0.5], "ok",
    ...                               {"acc": 0.7})], ["a"], {"k": 2})
    >>> d = write_report(res, tempfile.mkdtemp(), plots=False)
    >>> sorted(p.name for p in d.iterdir())
    ['index.html', 'results.json', 'results.md']
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    low = set(lower_is_better)
    unknown = low - set(results.metrics)
    if unknown:
        raise FormatError(f"The 'lower_is_better' parameter of write_report names unknown metrics {sorted(unknown)}. "
                          f"Metrics: {', '.join(results.metrics)}.")
    comps = {m: results.comparisons(m, m in low, n_boot=n_boot, seed=seed, ci=ci) for m in results.metrics}
    iv: dict[str, Any] = {"n_boot": n_boot, "seed": seed, "ci": ci, "comparisons": comps}
    doc = results.to_dict()
    doc["report"] = {"lower_is_better": sorted(low)}
    doc["intervals"] = {
        "method": "paired bootstrap, percentile interval (adapterbank.evaluate.bootstrap)",
        "statistic": "mean over targets of the per-target mean difference (method − reference)",
        "n_boot": n_boot, "seed": seed, "ci": ci,
        "metrics": {m: {meth: {k: c.to_dict() for k, c in per.items()} for meth, per in cm.items()}
                    for m, cm in comps.items()},
    }
    atomic_write_bytes(out / "results.json", json.dumps(doc, indent=1).encode())
    figs: dict[str, list[Path]] = {}
    if plots:
        from adapterbank.evaluate.plots import write_plots

        figs = write_plots(results, out / PLOTS_DIR, sorted(low))
    atomic_write_bytes(out / "results.md", _markdown(results, low, figs, out, iv).encode())
    atomic_write_bytes(out / "index.html", _html(results, low, figs, out, title, iv).encode())
    return out


def load_results(path: str | Path) -> EvalResults:
    """Read ``results.json`` (a file, or the report folder holding it) back into :class:`EvalResults`."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        doc: Any = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{p}: not valid JSON ({e}).") from e
    return EvalResults.from_dict(doc, str(p))
