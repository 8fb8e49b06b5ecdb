"""Leave-one-out evaluation of composition strategies and its reports (docs/design.md §6; seed paper Tables 1–6).

Example::

    from adapterbank.evaluate import evaluate, write_report
    res = evaluate(bank, "my_evals:score", k=5, cache_dir=".cache")
    write_report(res, "report")

Modules: ``harness`` (the leave-one-out loop), ``evaluator`` (loading and checking the user's evaluator),
``cache`` (the per-call result cache), ``results`` (the records and their JSON), ``report``/``plots``
(results.md, index.html, PNGs), ``bootstrap`` (paired intervals).
"""

from __future__ import annotations

from adapterbank.evaluate.bootstrap import Interval, paired_bootstrap
from adapterbank.evaluate.evaluator import Evaluator, check_metrics, check_output, evaluator_id, load_evaluator
from adapterbank.evaluate.harness import ALL_STRATEGIES, evaluate
from adapterbank.evaluate.report import load_results, write_report
from adapterbank.evaluate.results import RESULTS_SCHEMA, Comparison, EvalRecord, EvalResults, LambdaPath, PrototypeMap

__all__ = ["evaluate", "write_report", "load_results", "load_evaluator", "check_metrics", "check_output",
           "evaluator_id", "EvalResults", "EvalRecord", "LambdaPath", "PrototypeMap", "Evaluator", "ALL_STRATEGIES",
           "RESULTS_SCHEMA", "Comparison", "Interval", "paired_bootstrap"]
