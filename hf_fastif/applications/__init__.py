"""The four applications of FastIF (Guo et al. 2021, §5): HANS error correction, data augmentation with unseen
data, simulatability of influential examples, and the train → test influence graph."""

from .augmentation import PoolArguments, run_augmentation
from .common import HansEvaluator, sgd_step, two_label_loss, write_results
from .correction import STRATEGIES, CorrectionArguments, CorrectionResult, run_correction, select_points
from .prepare import (
    Setup,
    SetupArguments,
    apply_quick,
    compare_with_paper,
    comparison_markdown,
    prepare,
)
from .simulatability import SimulatabilityArguments, SimulatabilityResult, run_simulatability
from .visualize import InfluenceGraphResult, influence_graph, run_visualization

__all__ = [
    "STRATEGIES",
    "CorrectionArguments",
    "CorrectionResult",
    "HansEvaluator",
    "InfluenceGraphResult",
    "PoolArguments",
    "SimulatabilityArguments",
    "SimulatabilityResult",
    "Setup",
    "SetupArguments",
    "apply_quick",
    "compare_with_paper",
    "comparison_markdown",
    "influence_graph",
    "prepare",
    "run_augmentation",
    "run_correction",
    "run_simulatability",
    "run_visualization",
    "select_points",
    "sgd_step",
    "two_label_loss",
    "write_results",
]
