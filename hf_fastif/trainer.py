"""`InfluenceTrainer`: a `Trainer` that can also say which training rows drove a prediction."""

from __future__ import annotations

from datasets import Dataset
from transformers import Trainer

from .arguments import InfluenceArguments
from .builder import build_influence_table
from .influence import compute_influences, default_arguments
from .loss import LossFn
from .table import InfluenceTable


class InfluenceTrainer(Trainer):
    """`Trainer` plus `compute_influences`. Training is exactly the Trainer's; influence math lives in
    `hf_fastif.influence`.

    Args:
        influence_loss_fn: per-example training loss ``(outputs, batch) → (b,)`` (default: from the head).
        influence_measurement_fn: per-example test quantity (default: the loss).
        All other arguments are the Trainer's; ``args`` should be `InfluenceArguments`.
    """

    def __init__(self, *args, influence_loss_fn: LossFn | None = None,
                 influence_measurement_fn: LossFn | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, InfluenceArguments):
            fields = {k: v for k, v in self.args.to_dict().items() if k in InfluenceArguments.__dataclass_fields__
                      and InfluenceArguments.__dataclass_fields__[k].init}
            self.influence_args = default_arguments(**fields)
        else:
            self.influence_args = self.args
        self.influence_loss_fn = influence_loss_fn
        self.influence_measurement_fn = influence_measurement_fn

    def compute_influences(self, test_dataset: Dataset, combine: str = "none", *,
                           candidate_dataset: Dataset | None = None, train_dataset: Dataset | None = None,
                           **kwargs) -> InfluenceTable:
        """Influence of the training rows on ``test_dataset`` (see `hf_fastif.compute_influences`).

        ``combine="mean"`` gives one s_test for the mean loss of the rows (e.g. anchors).
        """
        train = train_dataset if train_dataset is not None else self.train_dataset
        if train is None:
            raise ValueError("This trainer has no train_dataset; pass train_dataset= to compute_influences.")
        model = self.accelerator.unwrap_model(self.model)
        kwargs.setdefault("loss_fn", self.influence_loss_fn)
        kwargs.setdefault("measurement_fn", self.influence_measurement_fn)
        return compute_influences(model, train, test_dataset, self.influence_args, combine=combine,
                                  data_collator=self.data_collator, candidate_dataset=candidate_dataset, **kwargs)

    def build_influence_table(self, test_dataset: Dataset, output_dir: str, *, shard_size: int = 64,
                              **kwargs) -> InfluenceTable:
        """Influence for many test rows, saved shard by shard under ``output_dir`` and resumable
        (see `hf_fastif.build_influence_table`)."""
        kwargs.setdefault("loss_fn", self.influence_loss_fn)
        kwargs.setdefault("measurement_fn", self.influence_measurement_fn)
        return build_influence_table(self.accelerator.unwrap_model(self.model), self.train_dataset, test_dataset,
                                     output_dir, self.influence_args, shard_size=shard_size,
                                     data_collator=self.data_collator, **kwargs)
