"""Figures of an evaluation (matplotlib, Agg, no global pyplot state): weights, λ-paths, prototype map, sweeps.

Colours are the Okabe–Ito palette (safe for the common colour-vision deficiencies); every method keeps its
colour across figures, and lines also differ by marker so the figures survive greyscale printing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapterbank.errors import AdapterbankError
from adapterbank.evaluate.results import BASELINES, EvalResults, LambdaPath, display_name, order_methods

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["OKABE_ITO", "METHOD_STYLE", "plot_weights", "lambda_path_data", "plot_lambda_path", "plot_prototype_map",
           "plot_sweep", "plot_scores", "write_plots"]

OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")

METHOD_STYLE: dict[str, dict[str, Any]] = {
    "pretrained": {"color": "#999999", "marker": "x", "hatch": ""},
    "sft": {"color": "#000000", "marker": "*", "hatch": ""},
    "nearest": {"color": "#E69F00", "marker": "v", "hatch": ".."},
    "avg": {"color": "#56B4E9", "marker": "s", "hatch": "//"},
    "sim": {"color": "#009E73", "marker": "^", "hatch": "\\\\"},
    "lin": {"color": "#CC79A7", "marker": "D", "hatch": "xx"},
    "sparse": {"color": "#D55E00", "marker": "o", "hatch": ""},
}
_NEG, _POS = "#D55E00", "#0072B2"
_LINESTYLES = ("-", "--", "-.", ":")


def _style(method: str, i: int = 0) -> dict[str, Any]:
    return METHOD_STYLE.get(method, {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": "o", "hatch": ""})


def _figure(w: float, h: float, layout: str | None = "constrained") -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is in the report extra
        raise AdapterbankError("Plots need matplotlib: pip install 'adapterbank[report]'.") from e
    fig = Figure(figsize=(w, h), dpi=150, layout=layout)
    return fig


def _polish(ax: Axes) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(True, axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=150, metadata={"Software": "adapterbank"})
    return path


def _short(s: str, n: int = 18) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def plot_weights(results: EvalResults, target: str, path: Path) -> Path | None:
    """Grouped bars: the weight each strategy gives each retrieved adapter (Table 2 of the seed, as a figure)."""
    recs = [results.main(target, m) for m in results.methods if m not in BASELINES]
    recs = [r for r in recs if r is not None and r.ids]
    if not recs:
        return None
    dist: dict[str, float] = {}
    for r in recs:
        for i, d in zip(r.ids, r.distances, strict=True):
            dist.setdefault(i, d)
    ids = sorted(dist, key=lambda i: (dist[i], i))
    n, m = len(ids), len(recs)
    fig = _figure(max(4.8, 1.0 + 0.55 * n * max(1.0, m / 3)), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / m
    x = np.arange(n)
    for j, r in enumerate(recs):
        st = _style(r.method, j)
        w = [r.weight_of(i) or 0.0 for i in ids]
        ax.bar(x - 0.4 + width * (j + 0.5), w, width, label=display_name(r.method), color=st["color"],
               hatch=st["hatch"], edgecolor="white", linewidth=0.4)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"{_short(i)}\nd={dist[i]:.3g}" for i in ids], fontsize=8)
    ax.set_ylabel("weight $w_i$")
    ax.set_xlabel("retrieved adapter (squared prototype distance $d_i$)")
    self_note = " (own adapter in pool)" if results.config.get("include_self") else ""
    ax.set_title(f"Composition weights for target {target}{self_note}", fontsize=10)
    _polish(ax)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, ncols=min(m, 5), frameon=False, loc="outside lower center")
    return _save(fig, path)


def lambda_path_data(lp: LambdaPath) -> dict[str, Any] | None:
    """What :func:`plot_lambda_path` draws, on the λ/λ_max axis: ``x`` (m,) in [0, 1] sorted, ``weights`` (m, k),
    ``chosen`` (the chosen λ as a fraction of λ_max, at most 1; ``None`` if none), ``chosen_lam`` (absolute),
    ``past_hull`` (the chosen λ was ≥ λ_max), ``lam_max``, ``approx`` (λ_max was not stored — results written
    before it was — and is taken as the smallest λ of the grid whose weights are all ≥ 0) and ``flat``
    (λ_max = 0: Lin's weights are already ≥ 0 and every λ gives them; drawn as constant lines over [0, 1]).

    >>> lp = LambdaPath("t", ["a", "b", "c"], [0.0, 0.5, 1.0], [[-2, 2, 1], [-1, 1.5, 0.5], [0, 1, 0]], 0.25, 1.0)
    >>> d = lambda_path_data(lp)
    >>> d["x"].tolist(), d["chosen"], d["past_hull"]
    ([0.0, 0.5, 1.0], 0.25, False)
    """
    if not lp.lams:
        return None
    lams = np.asarray(lp.lams, dtype=np.float64)  # (m,)
    W = np.asarray(lp.weights, dtype=np.float64)  # (m, k)
    order = np.argsort(lams, kind="stable")
    lams, W = lams[order], W[order]
    lmax, approx = lp.lam_max, lp.lam_max is None
    if lmax is None:
        hull = np.flatnonzero((W >= -1e-12).all(axis=1))
        lmax = float(lams[hull[0]]) if hull.size else float(lams[-1])
    flat = lmax <= 0
    if flat:
        x, W = np.array([0.0, 1.0]), np.stack([W[0], W[0]])
    else:
        keep = lams <= lmax * (1 + 1e-12)  # past λ_max nothing changes: the axis ends at 1
        x, W = np.minimum(lams[keep] / lmax, 1.0), W[keep]
    chosen = past = None
    if lp.chosen_lam is not None:
        past = (not flat) and lp.chosen_lam >= lmax
        chosen = 1.0 if flat and lp.chosen_lam > 0 else (0.0 if flat else min(1.0, lp.chosen_lam / lmax))
    return {"x": x, "weights": W, "ids": list(lp.ids), "chosen": chosen, "chosen_lam": lp.chosen_lam,
            "past_hull": bool(past), "lam_max": float(lmax), "approx": approx, "flat": flat}


def plot_lambda_path(results: EvalResults, target: str, path: Path) -> Path | None:
    """The sparse solution's weights against λ/λ_max (0: Lin, 1: the convex-hull projection), the chosen λ
    marked and absolute λ on the top axis: which adapters enter and leave, and where λ was chosen."""
    lp = results.lambda_paths.get(target)
    data = lambda_path_data(lp) if lp is not None else None
    if data is None:
        return None
    x, W, lmax = data["x"], data["weights"], data["lam_max"]
    fig = _figure(5.4, 3.6)
    ax = fig.add_subplot()
    for j, i in enumerate(data["ids"]):
        ax.plot(x, W[:, j], color=OKABE_ITO[j % len(OKABE_ITO)],
                linestyle=_LINESTYLES[(j // len(OKABE_ITO)) % len(_LINESTYLES)], marker=".", markersize=3,
                linewidth=1.4, label=_short(i, 24))
    ax.axhline(0.0, color="black", linewidth=0.8)
    if data["chosen"] is not None:
        c = data["chosen"]
        what = ("λ_max = 0: every λ gives Lin's weights" if data["flat"] else
                f"chosen λ={data['chosen_lam']:.3g}" + (" ≥ λ_max (hull)" if data["past_hull"] else f" (λ/λ_max={c:.2f})"))
        ax.axvline(c, color="#555555", linestyle="--", linewidth=1.0)
        ax.annotate(what, (c, 1.0), xycoords=("data", "axes fraction"), xytext=(-4 if c > 0.5 else 4, -10),
                    textcoords="offset points", fontsize=7, color="#555555", ha="right" if c > 0.5 else "left",
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.9})
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("λ / λ_max (lam_frac: 0 = Lin, 1 = convex-hull projection)")
    if not data["flat"]:
        top = ax.secondary_xaxis("top", functions=(lambda f: f * lmax, lambda lam: lam / lmax))
        top.set_xlabel(f"absolute λ (λ_max = {lmax:.3g}{', from the grid' if data['approx'] else ''})", fontsize=8)
        top.tick_params(labelsize=7)
    ax.set_ylabel("weight $w_i$")
    ax.set_title(f"Sparse projection λ-path, target {target}", fontsize=10)
    _polish(ax)
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_prototype_map(results: EvalResults, target: str, path: Path) -> Path | None:
    """2-D PCA of all prototypes; per strategy, the target (star) and the chosen adapters (size ∝ |w|, colour = sign)."""
    pm = results.prototype_map
    if pm is None or target not in pm.ids:
        return None
    recs = [results.main(target, m) for m in results.methods if m not in BASELINES]
    recs = [r for r in recs if r is not None and r.ids]
    if not recs:
        return None
    xy = {i: c for i, c in zip(pm.ids, pm.coords, strict=True)}
    allxy = np.asarray(pm.coords)  # (n, 2)
    x_mid = float(allxy[:, 0].min() + 0.8 * np.ptp(allxy[:, 0]))
    ncol = min(len(recs), 3)
    nrow = math.ceil(len(recs) / ncol)
    H = 2.7 * nrow + 0.9
    fig = _figure(3.0 * ncol + 0.3, H, layout=None)  # fixed margins: constrained layout costs seconds here
    fig.subplots_adjust(left=0.6 / (3.0 * ncol + 0.3), right=0.98, top=1 - 0.55 / H, bottom=0.75 / H,
                        wspace=0.12, hspace=0.32)
    grid = fig.subplots(nrow, ncol, sharex=True, sharey=True, squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[len(recs):]:
        ax.set_visible(False)
    axes = axes[: len(recs)]
    for ax, r in zip(axes, recs, strict=True):
        ax.scatter(allxy[:, 0], allxy[:, 1], s=10, color="#bbbbbb", zorder=1, label="bank prototypes")
        wmax = max((abs(w) for w in r.weights), default=1.0) or 1.0
        for i, w in zip(r.ids, r.weights, strict=True):
            if i not in xy or abs(w) < 1e-9:
                continue
            ax.scatter(*xy[i], s=20 + 280 * abs(w) / wmax, color=_POS if w > 0 else _NEG, alpha=0.75,
                       edgecolor="black", linewidth=0.5, zorder=2)
            right = xy[i][0] > x_mid  # labels point inwards so they stay inside the panel
            ax.annotate(f"{_short(i, 16)}\n{w:+.2f}", xy[i], xytext=(-5 if right else 5, 4), textcoords="offset points",
                        fontsize=6, ha="right" if right else "left")
        ax.scatter(*xy[target], marker="*", s=160, color="black", zorder=3)
        ax.set_title(display_name(r.method), fontsize=9, pad=8)
        ax.tick_params(labelsize=7)
        ax.margins(0.22)
        ax.grid(True, color="#eeeeee", linewidth=0.5)
    for j, ax in enumerate(axes):
        if j % ncol == 0:
            ax.set_ylabel(f"PC2 ({100 * pm.explained[1]:.0f}%)", fontsize=8)
        if j + ncol >= len(axes):
            ax.set_xlabel(f"PC1 ({100 * pm.explained[0]:.0f}%)", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="*", color="black", linestyle="", markersize=10, label=f"target {target}"),
               Line2D([], [], marker="o", color=_POS, linestyle="", label="positive weight"),
               Line2D([], [], marker="o", color=_NEG, linestyle="", label="negative weight"),
               Line2D([], [], marker="o", color="#bbbbbb", linestyle="", label="other prototypes")]
    fig.legend(handles=handles, loc="lower center", ncols=4, fontsize=7, frameon=False)
    fig.suptitle(f"Prototype map (PCA) — target {target}; marker area ∝ |weight|", fontsize=10)
    return _save(fig, path)


def plot_sweep(results: EvalResults, metric: str, sweep: str, path: Path, lower_is_better: bool = False) -> Path | None:
    """Mean score over targets against k (``sweep="k"``), relative λ (``sweep="lam"``) or λ/λ_max
    (``sweep="lam_frac"``, linear axis from 0 = Lin to 1 = the hull projection), baselines dashed."""
    series = results.series(metric, sweep)
    if not series:
        return None
    fig = _figure(5.2, 3.4)
    ax = fig.add_subplot()
    xs_all: list[float] = []
    for j, method in enumerate(order_methods(series)):
        per = series[method]
        xs = sorted({x for pts in per.values() for x, _ in pts})
        mean = []
        for x in xs:
            vals = [v for pts in per.values() for xx, v in pts if xx == x]
            mean.append(float(np.mean(vals)))
        st = _style(method, j)
        ax.plot(xs, mean, marker=st["marker"], color=st["color"], linewidth=1.6, label=display_name(method))
        xs_all += xs
    for b in BASELINES:
        vals = [results.table(metric)[t].get(b) for t in results.targets]
        vals2 = [v for v in vals if v is not None]
        if vals2:
            ax.axhline(float(np.mean(vals2)), color=_style(b)["color"], linestyle="--" if b == "sft" else ":",
                       linewidth=1.1, label=f"{display_name(b)} (mean)")
    if sweep == "k":
        ax.set_xlabel("k (adapters retrieved)")
        ax.set_xticks(sorted(set(xs_all)))
        title = f"{metric} vs k"
    elif sweep == "lam_frac":
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("λ / λ_max (lam_frac: 0 = Lin, 1 = convex-hull projection)")
        title = f"{metric} vs λ/λ_max (sparse, k={results.config.get('k')})"
    else:
        if xs_all and min(xs_all) > 0:
            ax.set_xscale("log")
        elif xs_all:
            ax.set_xscale("symlog", linthresh=min([x for x in xs_all if x > 0], default=1e-3))
        ax.set_xlabel("relative λ (lam_rel)")
        title = f"{metric} vs λ (sparse, k={results.config.get('k')})"
    arrow = "↓" if lower_is_better else "↑"
    ax.set_ylabel(f"{metric} ({arrow} better)")
    n = len(results.targets)
    ax.set_title(f"{title}\nmean over {n} held-out target{'s' if n != 1 else ''}", fontsize=10)
    _polish(ax)
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_scores(results: EvalResults, metric: str, path: Path, lower_is_better: bool = False) -> Path | None:
    """Grouped bars of the main table for one metric: targets on x, one bar per method (Table 1 as a figure)."""
    table = results.table(metric)
    methods = [m for m in results.methods if any(m in row for row in table.values())]
    if not methods:
        return None
    targets = results.targets
    n, m = len(targets), len(methods)
    fig = _figure(max(5.0, 1.2 + 0.18 * n * m), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / m
    x = np.arange(n)
    for j, meth in enumerate(methods):
        st = _style(meth, j)
        vals = [table[t].get(meth, math.nan) for t in targets]
        ax.bar(x - 0.4 + width * (j + 0.5), vals, width, label=display_name(meth), color=st["color"],
               hatch=st["hatch"], edgecolor="white", linewidth=0.4)
    ax.set_xticks(x, [_short(t) for t in targets], fontsize=8, rotation=20 if n > 6 else 0)
    ax.set_ylabel(f"{metric} ({'↓' if lower_is_better else '↑'} better)")
    ax.set_xlabel("target (held out)")
    ks = results.config.get("k")
    ax.set_title(f"Leave-one-out {metric} per target (k={ks})", fontsize=10)
    _polish(ax)
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def write_plots(results: EvalResults, out_dir: Path, lower_is_better: Sequence[str] = ()) -> dict[str, list[Path]]:
    """Write every figure under ``out_dir``; returns ``{section: [png paths]}`` (sections: scores, sweeps, targets)."""
    out: dict[str, list[Path]] = {"scores": [], "sweeps": [], "weights": [], "lambda_path": [], "map": []}
    low = set(lower_is_better)
    for metric in results.metrics:
        p = plot_scores(results, metric, out_dir / f"scores_{_safe(metric)}.png", metric in low)
        if p:
            out["scores"].append(p)
        for sweep in results.sweeps:
            p = plot_sweep(results, metric, sweep, out_dir / f"sweep_{sweep}_{_safe(metric)}.png", metric in low)
            if p:
                out["sweeps"].append(p)
    for t in results.targets:
        for key, fn in (("weights", plot_weights), ("lambda_path", plot_lambda_path), ("map", plot_prototype_map)):
            p = fn(results, t, out_dir / f"{key}_{_safe(t)}.png")
            if p:
                out[key].append(p)
    return out
