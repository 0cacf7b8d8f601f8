"""Interactive evaluation: NoC metrics, the click-loop evaluator, reports and the CLI."""

# Import the CLI module before binding the name ``evaluate`` to the function: the submodule
# ``samref_jax.evaluation.evaluate`` (entry point of ``samref-eval``) would otherwise replace it.
from samref_jax.evaluation import evaluate as _cli  # noqa: F401  isort: skip
from samref_jax.evaluation.evaluator import evaluate, load_records, run_sample
from samref_jax.evaluation.metrics import iou, miou_curve, noc, nof, summarize
from samref_jax.evaluation.report import compare

__all__ = [
    "compare",
    "evaluate",
    "iou",
    "load_records",
    "miou_curve",
    "noc",
    "nof",
    "run_sample",
    "summarize",
]
