"""What ``adapterbank evaluate`` calls: open the bank, run the harness, write the report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from adapterbank.evaluate.evaluator import load_evaluator
from adapterbank.evaluate.harness import evaluate
from adapterbank.evaluate.report import write_report
from adapterbank.errors import FormatError
from adapterbank.evaluate.results import EvalResults
from adapterbank.prototypes.space import Prototype

__all__ = ["run_evaluate", "parse_strategies", "parse_floats", "parse_ints", "load_target_prototypes"]


def load_target_prototypes(folder: str | Path) -> dict[str, Prototype]:
    """``{stem: Prototype}`` of every ``*.npy`` in ``folder`` (each needs its ``.npy.json`` space sidecar).

    >>> import tempfile, numpy as np
    >>> from adapterbank.prototypes.space import PrototypeSpace
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = Prototype(np.ones(3, dtype=np.float32), PrototypeSpace("enc", "r", "mean", False, 3)).save(d / "ct-head.npy")
    >>> sorted(load_target_prototypes(d))
    ['ct-head']
    """
    d = Path(folder)
    if not d.is_dir():
        raise FormatError(f"target prototypes: {d} is not a folder of <adapter id>.npy files.")
    out = {p.stem: Prototype.load(p) for p in sorted(d.glob("*.npy"))}
    if not out:
        raise FormatError(f"target prototypes: no .npy files in {d}.")
    return out


def parse_strategies(spec: str | Sequence[str]) -> str | list[str]:
    """``"all"`` or a comma-separated list (validated later against the registry).

    >>> parse_strategies("all"), parse_strategies("avg, sparse")
    ('all', ['avg', 'sparse'])
    """
    if isinstance(spec, str):
        s = spec.strip()
        return "all" if s == "all" else [x.strip() for x in s.split(",") if x.strip()]
    return list(spec)


def parse_ints(spec: str | Sequence[int] | None) -> list[int] | None:
    """``"1,2,3"`` or ``"1-5"`` (inclusive) → ints; ``None``/empty → ``None``.

    >>> parse_ints("1-3,5"), parse_ints(None)
    ([1, 2, 3, 5], None)
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if not isinstance(spec, str):
        return [int(x) for x in spec]
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def parse_floats(spec: str | Sequence[float] | None) -> list[float] | None:
    """``"0.01,0.1,1"`` → floats; ``None``/empty → ``None``.

    >>> parse_floats("0.01, 0.1,1")
    [0.01, 0.1, 1.0]
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if not isinstance(spec, str):
        return [float(x) for x in spec]
    return [float(x) for x in spec.split(",") if x.strip()]


def run_evaluate(
    bank_path: str | Path,
    evaluator_spec: str,
    strategies: str | Sequence[str] = "all",
    k: int = 5,
    out: str | Path = "report",
    include_self: bool = False,
    sweep_k: str | Sequence[int] | None = None,
    sweep_lam: str | Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    *,
    params: Mapping[str, Mapping[str, float]] | None = None,
    lower_is_better: Sequence[str] = (),
    plots: bool = True,
    target_prototypes: str | Path | None = None,
) -> Path:
    """Open ``bank_path``, run :func:`~adapterbank.evaluate.evaluate` with the evaluator ``module:function``,
    write the report into ``out`` and return ``out``.

    The evaluator is loaded before the bank is opened, so a wrong name fails fast. ``target_prototypes`` is a
    folder of ``<adapter id>.npy`` prototype files (with their ``.npy.json`` space sidecars, as written by
    ``adapterbank prototype``): each stands for its target's task instead of the bank prototype.

    Example::

        run_evaluate("bank", "my_evals:score", "all", 5, "report")   # -> PosixPath('report')
    """
    from adapterbank.bank import Bank

    fn = load_evaluator(evaluator_spec)
    tp = load_target_prototypes(target_prototypes) if target_prototypes is not None else None
    bank = Bank.open(Path(bank_path))
    res: EvalResults = evaluate(bank, fn, strategies=parse_strategies(strategies), k=k, params=params,
                                include_self=include_self, sweep_k=parse_ints(sweep_k),
                                sweep_lam=parse_floats(sweep_lam), cache_dir=cache_dir, progress=progress,
                                target_prototypes=tp)
    res.config["evaluator"] = evaluator_spec if getattr(fn, "cache_key", None) is None else res.config["evaluator"]
    res.meta["bank"] = str(bank_path)
    return write_report(res, out, lower_is_better=lower_is_better, plots=plots)
