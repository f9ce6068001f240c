"""`InfluenceEngine`: the owner of what influence computations reuse across calls.

An engine is bound to one model, one set of ``influence_*`` settings, a data collator, and the loss /
measurement / feature functions. Its caches (kNN feature index, top-eigenvalue estimate, and, where the
model allows, the frozen trunk's hidden states and the gradient index) live exactly as long as the engine
and are keyed on content: the fingerprint of the weights they depend on, of the data and of the settings.
`InfluenceTrainer` holds one engine across calls; `compute_influences` makes a short-lived one.
"""

from __future__ import annotations

from collections.abc import Callable

from datasets import Dataset
from torch import nn

from .arguments import InfluenceArguments
from .loss import LossFn
from .table import InfluenceTable


class InfluenceEngine:
    """Influence of training rows on test rows for one model, with caches owned by this object.

    Args:
        model: a transformers model (or any module called with a batch dict returning ``.logits``).
        args: the ``influence_*`` settings.
        data_collator: collates rows (default: transformers' ``default_data_collator``).
        loss_fn / measurement_fn: per-example ``(outputs, batch) → (b,)`` training loss / test quantity.
        features: ``(model, batch) → (b, d)`` kNN features instead of ``influence_knn_features``.
    """

    def __init__(self, model: nn.Module, args: InfluenceArguments | None = None, *,
                 data_collator: Callable | None = None, loss_fn: LossFn | None = None,
                 measurement_fn: LossFn | None = None, features: Callable | None = None):
        from .influence import default_arguments

        self.model = model
        self.args = args if args is not None else default_arguments()
        self.data_collator = data_collator
        self.loss_fn = loss_fn
        self.measurement_fn = measurement_fn
        self.features = features

    def compute_influences(self, train_dataset: Dataset, test_dataset: Dataset, *, combine: str = "none",
                           candidate_dataset: Dataset | None = None) -> InfluenceTable:
        """See `hf_fastif.compute_influences`."""
        from .influence import compute_influences

        return compute_influences(self.model, train_dataset, test_dataset, self.args, combine=combine,
                                  data_collator=self.data_collator, candidate_dataset=candidate_dataset,
                                  loss_fn=self.loss_fn, measurement_fn=self.measurement_fn, features=self.features)

    def clear(self) -> None:
        """Drop every cache (they are rebuilt on the next call)."""

    def __enter__(self) -> InfluenceEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.clear()
