"""The model state influence needs, set for the computation and restored afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


@contextlib.contextmanager
def influence_mode(model: nn.Module, names: Sequence[str]):
    """Eval mode, eager attention (double backward / forward-mode AD need it), and only the selected
    parameters requiring grad, so autograd does not walk frozen layers. Everything is restored after."""
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    selected = set(names)
    attn = _attention_implementation(model)
    switched = attn not in (None, "eager")
    if switched:
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(
                f"The model uses attn_implementation={attn!r}, which supports neither double backward nor "
                "forward-mode AD; load it with attn_implementation='eager' for influence."
            )
        logger.info(f"Switching attention from {attn!r} to 'eager' for influence (SDPA/flash kernels support "
                    "neither double backward nor forward-mode AD); it is switched back afterwards.")
        model.set_attn_implementation("eager")
    try:
        model.eval()
        for n, p in model.named_parameters():
            p.requires_grad_(n in selected)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
        if switched:
            model.set_attn_implementation(attn)


def _attention_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None
