"""Influence of candidates: ``-∇L(z) · s_test`` for every candidate z and every s_test, in batches.

Negative is helpful (upweighting z lowers the test loss), positive harmful: the paper's sign.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .batches import Batcher
from .hvp import batch_gradient, directional_derivatives
from .loss import FunctionalModel
from .params import flatten

TANGENT_CHUNK = 16
GRAD_CHUNK = 16


def score_batch(fm: FunctionalModel, params: Mapping[str, torch.Tensor], batch, s_test: torch.Tensor,
                method: str = "jvp") -> torch.Tensor:
    """Influence ``(b, m)`` of the batch's rows on each of the m rows of ``s_test`` ``(m, p)``.

    ``jvp``: forward-mode directional derivatives (about the cost of a few forward passes per batch).
    ``grad``: per-example gradients ``(b, p)`` times ``s_testᵀ``.
    """
    if method == "jvp":
        parts = [directional_derivatives(fm, params, batch, s_test[i : i + TANGENT_CHUNK])
                 for i in range(0, s_test.shape[0], TANGENT_CHUNK)]
        return -torch.cat(parts, 1)
    if method == "grad":
        grads = batch_gradient(fm, params, batch, reduction="none")
        return -(grads @ s_test.to(grads.dtype).T)
    raise ValueError(f"Unknown scoring method {method!r}; use 'jvp' or 'grad'.")


def score_candidates(fm: FunctionalModel, params: Mapping[str, torch.Tensor], batcher: Batcher,
                     candidates: Sequence[int], s_test: torch.Tensor, *, batch_size: int = 64,
                     method: str = "jvp", progress: bool = True) -> np.ndarray:
    """Influence of every candidate row on every s_test: ``(len(candidates), m)`` float64.

    One pass over the candidates serves all m test vectors.
    """
    if method == "grad":
        batch_size = min(batch_size, GRAD_CHUNK)
    out = np.empty((len(candidates), s_test.shape[0]), dtype=np.float64)
    total = -(-len(candidates) // batch_size)
    offset = 0
    for chunk, batch in tqdm(batcher.batches(candidates, batch_size), total=total, desc="scoring",
                             disable=not progress, leave=False):
        scores = score_batch(fm, params, batch, s_test, method)
        out[offset : offset + len(chunk)] = scores.double().cpu().numpy()
        offset += len(chunk)
    return out


def score_per_example_loop(fm: FunctionalModel, params: Mapping[str, torch.Tensor], batcher: Batcher,
                           candidates: Sequence[int], s_test: torch.Tensor) -> np.ndarray:
    """The 2021 reference code's way, kept as a baseline: one forward and one backward (with
    ``create_graph=True``, as there) per candidate, then a dot product. ``(len(candidates), m)``."""
    s_test = s_test if s_test.dim() == 2 else s_test.unsqueeze(0)
    out = np.empty((len(candidates), s_test.shape[0]))
    for row, idx in enumerate(candidates):
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        loss = fm.losses(leaves, batcher.batch([idx])).sum()
        grad = flatten(torch.autograd.grad(loss, list(leaves.values()), create_graph=True))
        out[row] = (-(s_test.to(grad.dtype) @ grad)).detach().double().cpu().numpy()
    return out
