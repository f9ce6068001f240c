"""`compute_influences`: parameters → s_test → candidates → scores → `InfluenceTable`, in one call.

The pipeline itself is `hf_fastif.engine.InfluenceEngine`; this function runs it with a short-lived engine, so
nothing is cached between calls (hold an engine, or use `InfluenceTrainer`, to reuse the trunk states and indexes).
"""

from __future__ import annotations

import logging as pylogging
from collections.abc import Callable

from datasets import Dataset
from torch import nn

from .arguments import InfluenceArguments
from .engine import InfluenceEngine
from .knn import FeatureFn
from .loss import LossFn
from .table import InfluenceTable


def default_arguments(**overrides) -> InfluenceArguments:
    """`InfluenceArguments` for use without a Trainer (no output is written to ``output_dir``), made without
    disturbing a live `Trainer` or `Accelerator`: building `TrainingArguments` resets accelerate's shared state
    (transformers' device set-up), after which the Trainer that converted its plain arguments here, or any
    Accelerator of the caller, failed on its next step ("`AcceleratorState` object has no attribute
    `distributed_type`"). That state is put back as it was."""
    from accelerate.state import AcceleratorState, PartialState

    overrides.setdefault("output_dir", "hf_fastif_output")
    overrides.setdefault("report_to", "none")
    saved = [(state, dict(state._shared_state)) for state in (AcceleratorState, PartialState)]
    # under a CPU launch (gloo, accelerate's DistributedType.NO) transformers warns, once per arguments made, to launch
    # with torch.distributed.launch for DDP: these arguments train nothing (48 such lines in a 3-process run)
    quiet = _DropWarning("torch.distributed process group is initialized, but parallel_mode")
    arguments_logger = pylogging.getLogger("transformers.training_args")
    arguments_logger.addFilter(quiet)
    try:
        return InfluenceArguments(**overrides)
    finally:
        arguments_logger.removeFilter(quiet)
        for state, shared in saved:
            if shared:  # (none yet: keep what the arguments set up, as plain TrainingArguments do)
                state._shared_state.clear()
                state._shared_state.update(shared)


class _DropWarning(pylogging.Filter):
    """Drops the log records whose message starts with ``start``."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: pylogging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def compute_influences(
    model: nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    args: InfluenceArguments | None = None,
    *,
    combine: str = "none",
    data_collator: Callable | None = None,
    candidate_dataset: Dataset | None = None,
    loss_fn: LossFn | None = None,
    measurement_fn: LossFn | None = None,
    features: FeatureFn | None = None,
) -> InfluenceTable:
    """Influence of training rows on test rows: ``-∇L(z_train) · (H + λI)⁻¹ ∇L(z_test)``.

    Args:
        model: a transformers model or any module called with a batch dict and returning ``.logits``.
        train_dataset: tokenized training rows with labels; H is the Hessian of their mean loss.
        test_dataset: tokenized test rows with labels.
        args: the ``influence_*`` settings (defaults: `default_arguments`).
        combine: ``"none"``: one s_test per test row; ``"mean"``: one s_test for the mean test loss
            (``test_id`` 0 in the table), the kNN query being the mean test feature.
        data_collator: collates rows (e.g. ``DataCollatorWithPadding``); default: transformers'
            ``default_data_collator``.
        candidate_dataset: rows to score (default ``train_dataset``), e.g. an unseen pool for augmentation;
            ``train_id`` then indexes this dataset.
        loss_fn / measurement_fn: per-example ``(outputs, batch) → (b,)`` training loss / test quantity.
        features: ``(model, batch) → (b, d)`` kNN features instead of ``influence_knn_features``.
    Returns:
        An `InfluenceTable` (negative influence = helpful), identical on every process.
    """
    with InfluenceEngine(model, args, data_collator=data_collator, loss_fn=loss_fn, measurement_fn=measurement_fn,
                         features=features) as engine:
        return engine.compute_influences(train_dataset, test_dataset, combine=combine,
                                         candidate_dataset=candidate_dataset)
