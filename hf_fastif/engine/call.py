"""`Call`: the state of one `InfluenceEngine` call, which every stage module reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..batches import Batcher
from ..loss import FunctionalModel
from ..utils import Timer


@dataclass
class Call:
    """The state of one `InfluenceEngine.compute_influences` call."""

    names: list[str]
    params: dict[str, torch.Tensor]
    fm: FunctionalModel
    train: Batcher
    test: Batcher
    cand: Batcher
    k: int | None
    combine: str
    digests: dict[str, str]
    feature_methods: tuple  # the named kNN feature methods this call extracts through the trunk (none: k is None,
    # the candidates come from the gradient index or at random, or from a features= callable, which runs whole)
    model_fingerprint: str  # the weights, config and adapters (what a table records)
    module_state: str  # the modules' plain attributes and hooks (`module_state_description`: a hook, an eps)
    work_dtype: torch.dtype
    progress: bool
    timer: Timer = field(default_factory=Timer)
    info: dict = field(default_factory=dict)

    @property
    def model_key(self) -> str:
        """What the caches are keyed on: the model's fingerprint and its modules' state."""
        return f"{self.model_fingerprint}|modules:{self.module_state}"
