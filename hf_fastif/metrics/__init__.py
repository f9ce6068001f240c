"""`evaluate` metric modules shipped with hf_fastif, loadable offline by path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate

HANS_ACCURACY_PATH: str = str(Path(__file__).resolve().parent / "hans_accuracy")
"""Local path of the hans_accuracy metric, for `evaluate.load(HANS_ACCURACY_PATH)`."""


def load_hans_accuracy(**kwargs: Any) -> evaluate.EvaluationModule:
    """Load the per-heuristic HANS accuracy metric from this package (no download).

    Args:
        **kwargs: passed on to `evaluate.load` (e.g. `keep_in_memory=True`, `cache_dir`, `experiment_id`).

    Returns:
        The metric; call `.compute(predictions=..., references=..., heuristics=...)`; it returns
        `accuracy`, `accuracy_<heuristic>` and `accuracy_<heuristic>_<entailment|non_entailment>`.
    """
    import evaluate  # imported here: importing evaluate takes seconds

    return evaluate.load(HANS_ACCURACY_PATH, **kwargs)


__all__ = ["HANS_ACCURACY_PATH", "load_hans_accuracy"]
