"""The four applications of FastIF (Guo et al. 2021, §5): HANS error correction, data augmentation with unseen
data, simulatability of influential examples, and the train → test influence graph.

Each takes ``(model, data, args, protocol)``: the model, an `ApplicationData`, the `InfluenceArguments` and its
protocol's arguments (`CorrectionArguments`, `SimulatabilityArguments`, `VisualizationArguments`), passed whole.
"""

from .augmentation import PoolArguments, run_augmentation
from .common import ApplicationData, HansEvaluator, predict, sgd_step, two_label_loss, write_results
from .correction import STRATEGIES, CorrectionArguments, CorrectionResult, run_correction, select_points
from .prepare import ModelDataArguments, Setup, parse_recipe, prepare, recipe_defaults
from .report import compare_with_paper, comparison_markdown, finished_runs_kept, write_report
from .simulatability import SimulatabilityArguments, SimulatabilityResult, build_simulator, run_simulatability
from .visualize import (
    InfluenceGraphResult,
    VisualizationArguments,
    check_visualization,
    influence_graph,
    run_visualization,
)

__all__ = [
    "STRATEGIES",
    "ApplicationData",
    "CorrectionArguments",
    "CorrectionResult",
    "HansEvaluator",
    "InfluenceGraphResult",
    "ModelDataArguments",
    "PoolArguments",
    "Setup",
    "SimulatabilityArguments",
    "SimulatabilityResult",
    "VisualizationArguments",
    "build_simulator",
    "check_visualization",
    "compare_with_paper",
    "comparison_markdown",
    "finished_runs_kept",
    "influence_graph",
    "parse_recipe",
    "predict",
    "prepare",
    "recipe_defaults",
    "run_augmentation",
    "run_correction",
    "run_simulatability",
    "run_visualization",
    "select_points",
    "sgd_step",
    "two_label_loss",
    "write_report",
    "write_results",
]
