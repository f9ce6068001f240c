"""Influence of candidates: ``-∇L(z) · s_test`` for every candidate z and every s_test, in batches.

Negative is helpful (upweighting z lowers the test loss), positive harmful: the paper's sign.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .batches import Batcher
from .hvp import batch_gradient, directional_derivatives
from .loss import FunctionalModel, forward_ad_unsupported
from .params import flatten

logger = logging.get_logger(__name__)

TANGENT_CHUNK = 16
GRAD_CHUNK = 16


def score_batch(fm: FunctionalModel, params: Mapping[str, torch.Tensor], batch, s_test: torch.Tensor,
                method: str = "jvp", row_batch: Callable[[int], dict] | None = None) -> torch.Tensor:
    """Influence ``(b, m)`` of the batch's rows on each of the m rows of ``s_test`` ``(m, p)``.

    ``jvp``: forward-mode directional derivatives (about the cost of a few forward passes per batch).
    ``grad``: per-example gradients ``(b, p)`` times ``s_testᵀ``. A model that cannot run under forward-mode AD (a
    custom ``autograd.Function`` such as Bloom's GeLU; a half-precision model whose tangents come out float32, as a
    bfloat16 BERT's on a GPU: `hf_fastif.loss.forward_ad_unsupported`) is scored by ``grad`` instead, with a
    warning, from the first batch that shows it on (the same numbers; memory ``b × p`` per batch). ``row_batch``: ``i ↦`` row i collated
    alone, for per-example gradients of a batch with a non-finite row (`hf_fastif.hvp.batch_gradient`).
    """
    if method == "jvp" and fm.no_forward_ad is None:
        try:
            parts = [directional_derivatives(fm, params, batch, s_test[i : i + TANGENT_CHUNK])
                     for i in range(0, s_test.shape[0], TANGENT_CHUNK)]
            return -torch.cat(parts, 1)
        except (RuntimeError, NotImplementedError) as err:
            if not forward_ad_unsupported(err, under_jvp=True):
                raise
            fm.no_forward_ad = f"{type(err).__name__}: {str(err)[:160]}"
            logger.warning(f"{type(fm.model).__name__} cannot run under forward-mode AD ({fm.no_forward_ad}); "
                           "candidates are scored by per-example gradients instead (the same values, more memory).")
    if method == "grad" or (method == "jvp" and fm.no_forward_ad is not None):
        grads = batch_gradient(fm, params, batch, reduction="none", row_batch=row_batch)
        return -(grads @ s_test.to(grads.dtype).T)
    raise ValueError(f"Unknown scoring method {method!r}; use 'jvp' or 'grad'.")


def score_pairs(fm: FunctionalModel, params: Mapping[str, torch.Tensor], batcher: Batcher,
                test_ids: np.ndarray, candidate_ids: np.ndarray, s_test: torch.Tensor, *, batch_size: int = 64,
                method: str = "jvp", progress: bool = True) -> np.ndarray:
    """Influence of candidate ``candidate_ids[i]`` on test vector ``s_test[test_ids[i]]`` for every pair i.

    Each candidate row is run once, against only the test vectors that asked for it: candidates are
    ordered by the first test that picked them and, within it, by the whole set of tests that did, so
    candidates of one set are batched together and a batch needs the vectors of that set only (batches at a
    boundary, two): disjoint kNN sets cost one tangent per candidate, candidates shared by some tests are scored
    for those tests together, and a full scan runs every candidate for all tests in one pass. Within a set,
    candidates go by length (`Batcher.length_order`'s lengths), so a batch pads little.
    Returns ``(len(test_ids),)`` float64, aligned with the pairs.
    """
    if method == "grad":
        batch_size = min(batch_size, GRAD_CHUNK)
    test_ids, candidate_ids = np.asarray(test_ids, dtype=np.int64), np.asarray(candidate_ids, dtype=np.int64)
    by_candidate = np.lexsort((test_ids, candidate_ids))  # pairs grouped by candidate, tests ascending
    rows, starts = np.unique(candidate_ids[by_candidate], return_index=True)
    stops = np.r_[starts[1:], len(by_candidate)]
    first_test = test_ids[by_candidate[starts]]
    # the set of tests of each candidate, as a sum of random 64-bit keys (wrapping): equal sets, equal keys; a
    # collision only puts two sets in one batch, which then runs the vectors of both
    keys = np.random.default_rng(0).integers(0, 2**63, size=int(test_ids.max(initial=0)) + 1, dtype=np.uint64)
    test_set = np.add.reduceat(keys[test_ids[by_candidate]], starts) if len(starts) else np.zeros(0, np.uint64)
    # candidates of the same tests land in the same batches, and among them rows alike in length (less padding)
    lengths = batcher.padded_lengths()
    by = (rows, test_set, first_test) if lengths is None else (rows, lengths[rows], test_set, first_test)
    order = np.lexsort(by)
    out = np.empty(len(test_ids), dtype=np.float64)
    total = -(-len(rows) // batch_size)
    for start in tqdm(range(0, len(rows), batch_size), total=total, desc="scoring", disable=not progress,
                      leave=False):
        chunk = order[start : start + batch_size]
        pairs = np.concatenate([by_candidate[starts[c] : stops[c]] for c in chunk])
        needed, column = np.unique(test_ids[pairs], return_inverse=True)
        scores = score_batch(fm, params, batcher.batch(rows[chunk]), s_test[torch.as_tensor(needed)], method,
                             row_batch=lambda i, chunk=chunk: batcher.batch([rows[chunk][i]]))
        row_of = np.repeat(np.arange(len(chunk)), stops[chunk] - starts[chunk])
        out[pairs] = scores.double().cpu().numpy()[row_of, column]
    return out


def score_candidates(fm: FunctionalModel, params: Mapping[str, torch.Tensor], batcher: Batcher,
                     candidates: Sequence[int], s_test: torch.Tensor, *, batch_size: int = 64,
                     method: str = "jvp", progress: bool = True) -> np.ndarray:
    """Influence of every candidate row on every s_test: ``(len(candidates), m)`` float64, one pass."""
    candidates = np.asarray(list(candidates), dtype=np.int64)
    m = s_test.shape[0]
    tests = np.tile(np.arange(m), len(candidates))
    values = score_pairs(fm, params, batcher, tests, np.repeat(candidates, m), s_test, batch_size=batch_size,
                         method=method, progress=progress)
    return values.reshape(len(candidates), m)


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
