"""`InfluenceEngine`: the influence pipeline, and the owner of what it reuses across calls.

One call reads as its stages::

    parameters → trunk states → test gradients → s_test → candidates → scores → InfluenceTable

An engine is bound to one model, one set of ``influence_*`` settings, a data collator, and the loss / measurement /
feature functions. Its caches live exactly as long as the engine and are keyed on content, never on ``id()``; data
by the hash of the values of the columns read (`Batcher.fingerprint`, once per dataset and call), never by datasets'
``_fingerprint``, which datasets with other rows can share (a ``map`` that draws at random, run twice):

| cache | keyed on |
|---|---|
| trunk states (per dataset) | fingerprint of the weights below the split, the dataset, the collator |
| kNN feature index | fingerprint of all weights, the candidate data, the collator, the feature method, the index type |
| gradient index | all weights, the candidate data, the collator, the loss, the projection, the parameters |
| curvature estimates (LiSSA check, low-rank Hessian) | all weights, the training data, the collator, the loss, B, seed |
| the read-position cut (where the last layer is cut, or why not) | all weights, the parameters, the split, the training and test data, the setting |

`InfluenceTrainer` holds one engine across calls (training changes the weights, so the caches rebuild themselves);
`compute_influences` makes a short-lived one.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import shutil
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from datasets import Dataset
from filelock import FileLock
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from . import distributed as D
from . import trunk as trunk_module
from .arguments import InfluenceArguments, validate_influence_settings
from .batches import (
    Batcher,
    check_values,
    column_rule,
    decoder_inputs_from_labels,
    in_row_order,
    padding_collator_for,
    validate_dataset,
    without_trailing_padding,
)
from .fingerprint import (
    callable_fingerprint,
    collator_key,
    collator_settings,
    description_key,
    in_place_version,
    model_code_fingerprint,
    model_fingerprint,
    module_state_description,
    portable_fingerprint,
    settings_differences,
    tensor_digests,
)
from .gradient_index import (
    cache_file_digest,
    check_index_factory,
    check_projection_dim,
    gradient_candidates,
    saved_index_intact,
)
from .grouped_products import AmbiguousBatch, GroupedHessian, PartlyAdded, grouped_modules
from .hvp import BatchHessian, batch_gradient
from .knn import build_index, extract_features, model_features, search, warn_short
from .loss import (
    FunctionalModel,
    LossFn,
    default_loss_smoothing,
    find_logits,
    influence_model,
    logits_of,
    rows_without_targets,
    shifts_labels,
)
from .mode import influence_mode, uncompiled
from .params import num_parameters, select_parameters
from .quality import recall_ns
from .readout import READOUT_TOLERANCE, Readout, cut_in_words, find_readout
from .scoring import score_pairs
from .solvers import (
    SPREAD_WARNING,
    TRUNCATION_WARNING,
    Carry,
    LissaDivergenceError,
    LowRankSolve,
    build_hessian,
    converging_depth,
    extreme_eigenvalues,
    lanczos_steps,
    low_rank_hessian,
    repetition_spread,
    solve_cg,
    solve_decomposed,
    solve_lissa,
    suggest_scale,
    truncation_share,
)
from .solvers.arnoldi import TRUNCATION_WARNING as ARNOLDI_TRUNCATION_WARNING
from .solvers.exact import check_exact_size
from .stacked import StackedHessian, stack_tolerance, stacks, unstackable_attention
from .table import InfluenceTable
from .trunk import (
    FirstPositionError,
    TrunkCache,
    TrunkLayoutError,
    TrunkSplit,
    find_split,
    forward_context,
    model_inputs,
    split_tolerance,
    verify_split,
)
from .utils import HALF_DTYPES, Timer, library_version, relative_difference, to_json, write_atomic

logger = logging.get_logger(__name__)

COMBINE = ("none", "mean")
PADDING_PROBE_ROWS = 64
"""Rows among which `InfluenceEngine` picks the shortest and the longest for its padding probe when the data stores
no token ids (a collator that tokenises text); otherwise every row's stored lengths decide (`Batcher.padding_probes`)."""
PADDING_TOLERANCE = 1e-3
"""Largest relative change of a row's loss under padding that counts as float rounding (20 machine epsilons of
the model's dtype where that is more: float16 0.02, bfloat16 0.16)."""
TRAILING_PROBE_ROWS = 8
"""Rows of different real lengths (the shortest, the longest and spread between, both parities where there are)
on which `InfluenceEngine` compares a batch with and without its trailing padding before it drops it."""
TRAILING_TOLERANCE = 100
"""Largest difference, in machine epsilons of the model's dtype and relative to the largest value compared, between
a probe's values and outputs with and without its trailing padding (float32: 1.2e-5; float64: 2.2e-14): other widths
only reorder sums there. Looser, a fitted question-answering loss of 3.5e-4 passed the padding check's 1e-3 while
influence moved by 35% (a softmax over every position, padding included), and a ConvBERT's 6e-5."""
CHECK_BATCHES = 4
"""LiSSA's convergence check: B-row batches whose Hessians' top eigenvalues are estimated (Lanczos)."""
CHECK_ITERATIONS = 5
"""Lanczos steps per estimate of the convergence check."""
CHECK_ROWS = 32
"""Rows of the mean Hessian whose smallest eigenvalue the convergence check estimates first."""
CONFIRM_ROWS = (256, 1024)
"""Rows (at most, in turn) of the mean Hessian that confirm a negative estimate before LiSSA is refused: a small
sample's smallest eigenvalue is mostly far more negative than the whole set's (the paper table's trained tiny BERT:
-0.049 over all 3,000 rows, -0.16 to -0.33 on 64-row samples, -0.30 to -0.67 in refused checks), but can be less (a
32-row sample's -0.055 against the set's -0.084). The first size whose estimate clears -λ by `CONFIRM_MARGIN` ends
the confirmation; a refusal needs the last."""
CONFIRM_MARGIN = 0.5
"""An estimate that does not clear -λ by this share of λ (smallest eigenvalue above -λ/2) is confirmed on more rows
too, not only one below -λ."""
MAX_TRUNK_CACHES = 4
MAX_STORED_LENGTHS = 8
"""Datasets (by the content of the columns read) whose stored row lengths the engine keeps between calls
(`Batcher.share_lengths`: what the padding probes and the trunk states' layout read); a few KB to a few MB each."""
READOUT_PROBE_ROWS = 4
"""The first training rows and the first test rows (each collated together) on which
`hf_fastif.readout.find_readout` checks a cut, besides the shortest training row alone and next to the longest."""
FULL_HVP_KEPT_BYTES = 256 * 2**20
"""Collated batches (with their trunk states, padded) that a product with the mean Hessian over every row keeps for
the next product (CG's iterations, arnoldi's Lanczos steps, the exact solver's columns); the rest are collated again
each time, so memory stays bounded at any N (they were all kept: 3.9 GB beside 2.1 GB of memory-mapped trunk states
on 22,000 rows)."""
TENSOR_OVERHEAD_BYTES = 1024
"""What a kept tensor costs beside its data (the tensor object, its storage, the allocator's rounding), as counted
against the budgets of kept batches: single-row batches of short rows cost ~6x their data."""


def batch_bytes(batch: Mapping) -> int:
    """The memory a kept collated batch holds, as counted against `FULL_HVP_KEPT_BYTES` / `LISSA_BATCH_MEMO_BYTES`
    (and what `KeptHessians` scales a graph's measured size by)."""
    return sum(v.nbytes + TENSOR_OVERHEAD_BYTES for v in batch.values() if isinstance(v, torch.Tensor))


class KeptBatches:
    """Collated batches kept by key up to ``budget`` bytes (`batch_bytes`); past it, a batch is collated each time
    it is asked for."""

    def __init__(self, budget: int):
        self.room, self.kept = budget, {}

    def get(self, key, collate: Callable[[], dict]) -> dict:
        if key not in self.kept:
            batch = collate()
            size = batch_bytes(batch)
            if size > self.room:
                return batch
            self.kept[key], self.room = batch, self.room - size
        return self.kept[key]

    def pop(self, key, collate: Callable[[], dict]) -> dict:
        """The batch, no longer kept (collated if it was not)."""
        if key not in self.kept:
            return collate()
        batch = self.kept.pop(key)
        self.room += batch_bytes(batch)
        return batch


LISSA_BATCH_MEMO_BYTES = 256 * 2**20
"""Collated LiSSA batches (with their trunk states) kept until they are drawn again, for rows whose graph
(`LISSA_GRAPH_BYTES`) is not kept: a row is read, collated and gathered once. Rows recur where B = 1 and J·T > N/2
(the repetitions draw independently: FastIF's J 1000, T 4 over the MiniLM default's 2,000 rows draws each row
twice); not at the paper's scale (4,000 draws over 392,702 rows), where few recur and little is kept. The collator is
taken to be deterministic, as the trunk cache takes it."""
LISSA_GRAPH_BYTES = 256 * 2**20
"""First-backward graphs (`hf_fastif.hvp.BatchHessian`) of LiSSA batches, kept while they fit, so that a batch drawn
again pays only the second backward: ~0.3 MB a 32-token row of MiniLM's last layer from its trunk states, ~0.8 MB of
the tiny BERT with every parameter. The engine holds them between calls while the weights, the training rows and
what else keys its curvature estimates stay the same (later calls draw the same batches); `InfluenceEngine.clear`
frees them."""
FULL_HVP_GRAPH_BYTES = 256 * 2**20
"""First-backward graphs of the chunks of a product with the mean Hessian over a batcher's rows, kept for the next
product (CG's iterations, arnoldi's and the convergence check's Lanczos steps, the exact solver's columns); the
chunks beyond it are built again for each product (their collated batches kept up to `FULL_HVP_KEPT_BYTES`)."""


class _StackedSteps:
    """One LiSSA call's stacked steps: grouped (`hf_fastif.grouped_products`, their graphs kept in ``kept``, so a
    later call on the same weights and rows, which draws the same groups, multiplies from them) or vmapped
    (`hf_fastif.stacked`). The first step, and any step whose rows are longer than every row checked before (a mask
    built unlike the model's may show only on longer rows), is checked against the products one batch at a time,
    which that step then uses; a check that fails or raises turns stacking off for the rest of the call and, through
    ``refused`` (which logs why), for later calls on the same weights, rows and loss. A kept grouped graph passed that
    check in the call that built it. A step that raises after the checks passed (out of memory with R batches at
    once, say) adds nothing, returns False and turns stacking off for the rest of the call only: from that step on,
    one product at a time; a grouped assembly that fails after adding part of the products raises `PartlyAdded`. A
    batch whose shapes cannot say which dimension holds the rows (`AmbiguousBatch`: a padded length equal to the
    row count) runs that step, and every later one of that length, one product at a time; other lengths group on."""

    def __init__(self, hessian: StackedHessian | GroupedHessian, train: Batcher, tolerance: float,
                 refused: Callable[[str], None], kept: KeptHessians | None = None):
        self.hessian, self.train, self.tolerance, self.refused = hessian, train, tolerance, refused
        self.kept = kept  # (grouped graphs are kept there, for later calls)
        self.usable, self.checked_length = True, -1
        self.ambiguous: set[int] = set()  # padded lengths whose batches' shapes cannot say where the rows are

    def step(self, groups: Sequence[np.ndarray], vectors: torch.Tensor, into: torch.Tensor, alpha: float,
             carry: Carry) -> bool:
        """``into[r] = carried + alpha · H_r @ vectors[r]`` (``(R, m, p)`` each), H_r the Hessian of the batch of rows
        ``groups[r]`` without the L2 term, the carried part written through ``carry`` (`hf_fastif.solvers.lissa.Carry`:
        block by block on the grouped route, whole before other products); False where no product was added (the
        step then runs one product at a time)."""
        rows = np.concatenate(groups)
        grouped = isinstance(self.hessian, GroupedHessian)
        key = ("grouped", len(groups), rows.tobytes())
        kept = grouped and self.kept is not None and key in self.kept.kept
        batch = None if kept else self.train.batch(rows)
        mask = None if kept else batch.get("attention_mask")
        length = mask.shape[-1] if isinstance(mask, torch.Tensor) and mask.dim() >= 2 else 0
        if not kept and length in self.ambiguous:
            return False
        if kept or length <= self.checked_length:
            try:
                if grouped:  # (into the next iterate: no products stored apart)
                    self.kept.accumulate_grouped(key, lambda: batch if batch is not None else self.train.batch(rows),
                                                 self.hessian, vectors, into, alpha, carry)
                else:
                    products = self.hessian.products(batch, vectors)
                    carry.finish()
                    into.add_(products, alpha=alpha)
            except PartlyAdded:
                raise
            except AmbiguousBatch:  # (this length's shapes only: it runs one product at a time, others may group)
                self.ambiguous.add(length)
                return False
            except Exception as err:  # noqa: BLE001 (vmap's and the model's errors under it: the default path decides)
                self.usable = False
                logger.info(f"A stacked LiSSA step raised {type(err).__name__} ({_first_line(err)}); this call's "
                            "steps run one product at a time from here.")
                return False
            return True
        # (what the default path raises, it raises here too)
        alone = self.hessian.alone([self.train.batch(g) for g in groups], vectors)
        try:  # (both read ``vectors`` before the carried part is written: it may be written over them)
            stacked = self.hessian.products(batch, vectors)
        except AmbiguousBatch:  # (not checked: later steps with rows this long run one product at a time)
            self.ambiguous.add(length)
            stacked = None
        except Exception as err:  # noqa: BLE001
            self.usable = False
            self.refused(f"the stacked products raised {type(err).__name__} ({_first_line(err)})")
            stacked = None
        carry.finish()
        into.add_(alone, alpha=alpha)
        if stacked is None:
            return True
        gap = relative_difference(stacked, alone)
        if gap > self.tolerance:
            self.usable = False
            self.refused(f"the stacked products differ from the products one at a time by {gap:.3g} of their "
                         f"largest entry (more than {self.tolerance:g}) on rows of {length} positions")
        else:
            self.checked_length = length
        return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines() or [""])[0][:200]


class KeptHessians:
    """`BatchHessian`s of batches multiplied again, kept by key up to ``budget`` bytes; the others are built for each
    product from collated batches that ``batches`` keeps while it has room. With ``retain``, every graph that fits is
    kept, also past its batch's last product in a call: its owner holds this object for later calls on the same
    weights and rows (`for_call`), keyed on them.

    What a graph holds is measured on the first graph a key would keep (the tensors autograd saved for the second
    backward, beside the parameters), and estimated for the next ones from their collated batches: ``first ·
    max(r, r²)`` with r the ratio of the batches' sizes (attention's saved probabilities grow with the square of a
    row's length), so that no budget is overrun by longer rows.

    A kept graph that autograd refuses because a tensor it saved was written in place since it was built (one the
    keys see by its values only: a module's tensor attribute or a hook's, zeroed for an ablation and restored) is
    dropped with every other kept graph, and the product is taken from a graph built now.
    """

    def __init__(self, call: _Call, budget: int, batches: KeptBatches, reduction: str, *, retain: bool = False):
        self.call, self.room, self.batches, self.reduction = call, budget, batches, reduction
        self.budget = budget
        self.retain = retain  # keep every graph that fits, for later calls too (the owner keys this object)
        self.kept: dict = {}  # key -> (graph, bytes counted)
        self._units: dict[str, tuple[int, int]] = {}  # kind -> (graph bytes, batch bytes) of the graph measured

    def for_call(self, call: _Call, batches: KeptBatches) -> KeptHessians:
        """This object for another call on the same weights and rows: its graphs stay, new ones are built with
        ``call``'s model function and parameters, and ``batches`` (the call's own) keeps collated batches."""
        self.call, self.batches = call, batches
        return self

    def end_call(self) -> None:
        """Let go of the call and its collated batches (the graphs stay for the next call)."""
        self.call, self.batches = None, KeptBatches(0)

    def product(self, key, collate: Callable[[], dict], vectors: torch.Tensor, *, again: bool = True,
                **kwargs) -> torch.Tensor:
        """``BatchHessian.product`` for the batch ``collate()`` (named ``key``); ``again``: it will be asked for
        again in this call (False frees what was kept for it, unless this object retains its graphs)."""
        return self._multiply(key, collate, again, lambda graph, last: graph.product(vectors, last=last, **kwargs))

    def accumulate(self, key, collate: Callable[[], dict], vector: torch.Tensor, into: torch.Tensor, alpha: float, *,
                   again: bool = True, **kwargs) -> None:
        """``BatchHessian.accumulate`` (``into += alpha · H @ vector``) for the batch ``collate()``, kept as in
        `product`."""
        self._multiply(key, collate, again,
                       lambda graph, last: graph.accumulate(vector, into, alpha, last=last, **kwargs))

    def accumulate_grouped(self, key, collate: Callable[[], dict], hessian: GroupedHessian, vectors: torch.Tensor,
                           into: torch.Tensor, alpha: float, carry: Carry | None = None) -> None:
        """`GroupedGraph.accumulate` (``into[r] += alpha · H_r @ vectors[r]``, with ``carry`` written block by block
        first) for the R groups of rows ``collate()`` (named ``key``), its graph kept (for later calls, with
        ``retain``) while it fits."""
        groups = vectors.shape[0]
        self._multiply(key, collate, False,
                       lambda graph, last: graph.accumulate(vectors, into, alpha, last=last, carry=carry),
                       lambda batch, measure: hessian.build(batch, groups, measure=measure))

    def _multiply(self, key, collate: Callable[[], dict], again: bool, multiply: Callable, build=None):
        graph, last, found = self._graph(key, collate, again, build)
        try:
            return multiply(graph, last)  # (autograd refuses a graph before any product is written)
        except RuntimeError as err:  # (not after part was added: a retry would add that part twice)
            if isinstance(err, PartlyAdded) or not found or "modified by an inplace operation" not in str(err):
                raise
        logger.info("A tensor the kept first-backward graphs read was written in place since they were built: they "
                    "are built again.")
        self.drop()
        graph, last, _ = self._graph(key, collate, again, build)
        return multiply(graph, last)

    def drop(self) -> None:
        """Free every kept graph."""
        self.kept.clear()
        self.room = self.budget

    def _graph(self, key, collate: Callable[[], dict], again: bool, build=None) -> tuple[BatchHessian, bool, bool]:
        """The graph of the batch named ``key`` (kept, or built now by ``build(batch, measure)``, a `BatchHessian`
        by default, and kept while it fits), whether its next product is its last (the graph is not kept), and
        whether it was kept from before."""
        keep = again or self.retain
        found = self.kept.get(key) if keep else self.kept.pop(key, None)
        if found is not None:
            if not keep:
                self.room += found[1]
            return found[0], not keep, True
        kind = "batch" if build is None else "grouped"  # (what a graph holds per byte of its batch differs)
        batch = self.batches.get(key, collate) if again else self.batches.pop(key, collate)
        size = self._estimate(batch, kind) if keep and kind in self._units else None
        measure = keep and kind not in self._units and self.room > 0
        if build is None:
            graph = BatchHessian(self.call.fm, self.call.params, batch, reduction=self.reduction, measure=measure)
        else:
            graph = build(batch, measure)
        if measure:
            self._units[kind] = (max(graph.saved_bytes, 1), max(batch_bytes(batch), 1))
            size = self._estimate(batch, kind)
        kept = size is not None and size <= self.room
        if kept:
            self.kept[key] = (graph, size)
            self.room -= size
            self.batches.pop(key, lambda: batch)  # the graph holds what its products need
        return graph, not kept, False

    def _estimate(self, batch: dict, kind: str) -> int:
        saved, measured = self._units[kind]
        ratio = batch_bytes(batch) / measured
        return int(saved * max(ratio, ratio * ratio)) + TENSOR_OVERHEAD_BYTES


def non_finite_scores(rows: np.ndarray, values: np.ndarray) -> dict | None:
    """``diagnostics.non_finite_scores`` of a table's ``train_id`` / ``influence`` columns: how many values are not
    finite, and of which rows (the first 100 of them, and their number); None when every value is finite."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    named = np.unique(rows[bad])
    return {"count": int(bad.sum()), "train_ids": named[:100].tolist(), "num_train_ids": len(named)}


@dataclass
class _Call:
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


def loss_key(loss_fn: LossFn | None, args, fingerprint: Callable = callable_fingerprint) -> str:
    """What keys an engine's loss: the function's fingerprint and the default loss's label smoothing (``args``')."""
    smoothing = default_loss_smoothing(args, loss_fn)
    return fingerprint(loss_fn) + (f"|label_smoothing={smoothing!r}" if smoothing else "")


@dataclass
class _Watch:
    """What a held engine knows of a described state (the modules', `module_state_description`; the collator's,
    `collator_settings`) between its calls, to tell records from changes (`settings_differences`). A list that grew
    during one of its calls is a record (a hook appending gradient norms or activations, in the engine's forwards or
    an SGD step's between calls); what else changed during a call (activations by layer a hook writes, a collator's
    last batch or call count) is a record once it changed during two calls in a row: the first time it may be a
    setting moved while the call ran (another thread, a loss function, a curriculum collator), and the next call is
    keyed anew. Between calls, only records that grew are no change: a setting list extended by the user is one."""

    last: object = None  # the description the last call left (None: key anew)
    start: object = None  # the description this call started with
    grows: set = field(default_factory=set)  # paths of lists seen growing during a call
    changing: set = field(default_factory=set)  # paths that changed otherwise during the last call

    def unchanged(self, now) -> bool:
        """At a call's start: ``now`` is what the last call left, but for records that grew."""
        if self.last is None:
            return False
        return all(kind == "grew" and path in self.grows for path, kind in settings_differences(self.last, now).items())

    def ended(self, now) -> None:
        """At a call's end: ``now`` carries the call's key on if what changed since its start are records."""
        if self.start is None:
            return
        differences = settings_differences(self.start, now)
        grew = {path for path, kind in differences.items() if kind == "grew"}
        others = set(differences) - grew
        self.grows |= grew
        self.last = now if others <= self.changing else None
        self.changing = others


class InfluenceEngine:
    """Influence of training rows on test rows for one model, with caches owned by this object.

    Args:
        model: a transformers model (or any module called with a batch dict returning ``.logits``).
        args: the ``influence_*`` settings (default: `hf_fastif.influence.default_arguments`).
        data_collator: collates rows (default: transformers' ``default_data_collator``).
        loss_fn / measurement_fn: per-example ``(outputs, batch) → (b,)`` training loss / test quantity.
        features: ``(model, batch) → (b, d)`` kNN features instead of ``influence_knn_features``.
    """

    def __init__(self, model: nn.Module, args: InfluenceArguments | None = None, *,
                 data_collator: Callable | None = None, loss_fn: LossFn | None = None,
                 measurement_fn: LossFn | None = None, features: Callable | None = None):
        from .influence import default_arguments  # influence.py builds on this module

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a transformers model, e.g. from "
                            f"AutoModelForSequenceClassification.from_pretrained), got {type(model).__name__}.")
        self.model = uncompiled(model)
        self.args = args if args is not None else default_arguments()
        if not hasattr(self.args, "influence_solver"):
            raise TypeError(f"args must be an InfluenceArguments (the influence_* settings), got "
                            f"{type(self.args).__name__}; use hf_fastif.InfluenceArguments(output_dir=..., ...), "
                            "which takes every TrainingArguments field too.")
        validate_influence_settings(self.args)
        self.data_collator = data_collator
        self.loss_fn = loss_fn
        self.measurement_fn = measurement_fn
        self.features = features
        self.trained_loss: str | None = None
        """What the model was trained on instead of its own loss, where the caller knows and influence uses the
        default loss all the same (`InfluenceTrainer`: "a compute_loss_func"): recorded in each table's diagnostics
        as ``trained_with``, so a table keeps what its trainer's warning said."""
        settings = collator_settings(data_collator)
        self._collator_watch = _Watch(last=settings)  # (what a call changes in the collator's settings: `_Watch`)
        self._functions = {"collator": collator_key(data_collator, settings), "loss": self._loss_key(),
                           "measurement": callable_fingerprint(measurement_fn),
                           "features": callable_fingerprint(features)}
        self._split: tuple[str, TrunkSplit | None, str] | None = None
        self._warned_backward: list | None = None  # (the backward hooks warned about: modules, registrations)
        self._module_key: str | None = None  # (the modules' state the caches are keyed on: `_module_state`)
        self._module_watch = _Watch()
        self._split_error: float | None = None
        self._readout: tuple[tuple, Readout | None, str] | None = None  # (key, the cut or None, why not)
        # the trunk's own cut for a split after the whole stack (`_first_position_cut`): (key, the cut or None, why not)
        self._trunk_cut: tuple[tuple, Readout | None, str] | None = None
        self._stack_refused: tuple[tuple, str] | None = None  # (key, why) where stacked LiSSA steps failed their check
        self._trunks: OrderedDict[str, TrunkCache] = OrderedDict()
        self._lissa_graphs: tuple[tuple, KeptHessians] | None = None  # (key, LiSSA's kept graphs) between calls
        self._stored_lengths: OrderedDict[tuple, dict] = OrderedDict()  # (content, columns) -> `Batcher.share_lengths`
        self._feature_index: tuple[tuple, Dataset] | None = None
        self._gradient_index: tuple[tuple, object] | None = None
        self._curvature: dict[tuple, dict] = {}
        self._spread_warned: set[tuple] = set()  # (LiSSA's repetitions' spread, warned once per key: `_lissa`)
        self._padding_checked: set[tuple] = set()
        # (weights, dataset, collator, loss, ...) → None where its batches drop their trailing padding, else why not
        self._trailing_padding: dict[tuple, str | None] = {}
        # (weights, collator, loss, measurement) → what showed the model reads its padding (every dataset keeps it)
        self._reads_padding: dict[tuple, str] = {}
        # (weights, dataset, ...) whose stored values passed `check_values` → the row of its longest sequence
        self._values_checked: dict[tuple, int | None] = {}
        # (weights, training data) → the model's own loss and the default one, where they differ
        self._own_loss: dict[tuple, dict | None] = {}
        self._low_rank: tuple[tuple, tuple] | None = None
        self._exact: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, eigenvalues, eigenvectors) of H
        self._prepared_solve: tuple[tuple, LowRankSolve] | None = None  # (low-rank key, λ) -> its solve
        self._saved_gradient_index: tuple | None = None  # (key, path, dtype, digest) from load_caches, read on first use
        self._from_disk: dict[tuple[str, object], bool] = {}  # (kind, key) read by load_caches -> served a call since

    # ---- the pipeline ------------------------------------------------------------------------------------------
    def compute_influences(self, train_dataset: Dataset, test_dataset: Dataset, *, combine: str = "none",
                           candidate_dataset: Dataset | None = None) -> InfluenceTable:
        """Influence of training rows on test rows: ``-∇L(z_train) · (H + λI)⁻¹ ∇L(z_test)``.

        Args:
            train_dataset: tokenized training rows with labels; H is the Hessian of their mean loss.
            test_dataset: tokenized test rows with labels.
            combine: ``"none"``: one s_test per test row; ``"mean"``: one s_test for the mean test loss
                (``test_id`` 0 in the table), the kNN query being the mean test feature.
            candidate_dataset: rows to score (default ``train_dataset``), e.g. an unseen pool for augmentation;
                ``train_id`` then indexes this dataset.
        Returns:
            An `InfluenceTable` (negative influence = helpful), identical on every process.
        """
        call = self._start(train_dataset, test_dataset, candidate_dataset, combine)
        with influence_mode(self.model, call.names):
            self._prepare(call)
            queries = None
            if not self._candidates_read_s_test(call):  # first: a bad feature or index setting fails before s_test
                with call.timer("candidates"):
                    queries = self._candidates(call, None)
            s_test = self._s_test_of(call)
            if queries is None:
                with call.timer("candidates"):
                    queries = self._candidates(call, s_test)
            with call.timer("scoring"):
                pair_tests, pair_rows, values = self._scores(call, queries, s_test)
            self._flag_non_finite(call, pair_rows, values)
            if self.args.influence_measure_recall and call.k is not None:
                with call.timer("recall"):
                    call.info["candidate_recall"] = self._recall_of(call, s_test, queries)
        readout, split = call.fm.readout, call.fm.split
        if readout is not None and readout.failed is not None:  # dropped during this call: say so in the table
            call.info["readout"] = {"cut_after": readout.name, "failed_on_a_batch": readout.failed,
                                    "note": "the whole layer ran from that batch on"}
        if split is not None and split.failed is not None:
            call.info["trunk"] |= {"failed_on_a_batch": split.failed,
                                   "note": "the batches that did not line up ran the whole model"}
        if call.fm.no_forward_ad is not None:
            call.info["scored_by"] = {"method": "per-example gradients", "why": call.fm.no_forward_ad}
        metadata = self._metadata(call, train_dataset, test_dataset, candidate_dataset or train_dataset)
        self._ended()
        return InfluenceTable.from_arrays(pair_tests, pair_rows, values, metadata, pairs_unique=True)  # (per query:
        # distinct candidate rows)

    @staticmethod
    def _flag_non_finite(call: _Call, rows: np.ndarray, values: np.ndarray) -> None:
        """Say which scores are not finite (kept as NaN / inf in the table, with what was computed around them): a
        candidate's gradient overflowed, as a float16 causal LM's do on longer rows, or its loss is inf / NaN."""
        summary = non_finite_scores(rows, values)
        if summary is None:
            return
        call.info["non_finite_scores"] = summary
        named = summary["train_ids"]
        logger.warning(f"{summary['count']} of {len(values)} influence values are not finite, of candidate rows "
                       f"{named[:10]}{' ...' if summary['num_train_ids'] > 10 else ''} (the table keeps them, and "
                       "names them under diagnostics.non_finite_scores): those rows' gradients overflowed (a "
                       "float16 / bfloat16 model: compute influence on a float32 copy, model.float()) or their loss "
                       "is inf / NaN.")

    def candidate_recall(self, train_dataset: Dataset, test_dataset: Dataset, ks: Sequence[int], *,
                         methods: Sequence[str] = ("auto", "gradient", "random"), ns: Sequence[int] | None = None,
                         candidate_dataset: Dataset | None = None) -> list[dict]:
        """How many of the truly most influential rows each candidate method finds, with one s_test.

        For every test row: s_test once, then the full scan (every candidate row scored exactly); then for each
        ``method`` (``influence_knn_features`` values, ``"gradient"``, ``"random"``) and each ``k``: recall@n of the
        full scan's ``n`` most helpful and most harmful rows among the k candidates (candidates are scored exactly,
        so that is also the recall of the candidate method's own top n). Random candidates are expected at k/N.
        ``ns`` defaults to 10 and 100, each capped at the candidate rows.

        Returns:
            One dict per (method, k): ``method``, ``k``, ``k_fraction``, ``recall@{n} helpful/harmful`` (mean over
            test rows), ``random_expectation`` (k/N), ``build_s`` (the method's index, once), ``query_s`` (per query).
        """
        call = self._start(train_dataset, test_dataset, candidate_dataset, "none", methods=list(methods))
        n_rows = len(call.cand)
        ns = recall_ns(n_rows) if ns is None else ns  # (10, 100) capped at the rows: 100 was refused under 100 rows
        for k in ks:
            if not 1 <= int(k) <= n_rows:
                raise ValueError(f"Every k must be between 1 and the {n_rows} candidate rows, got {k}.")
        for n in ns:
            if not 1 <= int(n) <= n_rows:
                raise ValueError(f"Every n must be between 1 and the {n_rows} candidate rows, got {n}.")
        out = []
        with influence_mode(self.model, call.names):
            self._prepare(call)
            for method in methods:  # an index setting that cannot work fails before s_test and the full scan (it
                if method not in ("gradient", "random"):  # failed after them, and after the CLI's fine-tuning)
                    self._check_feature_index(call, method)
            s_test = self._s_test_of(call)
            reference = self._full_scan(call, s_test)
            for method in methods:
                first = True
                for k in ks:
                    start = time.perf_counter()
                    found = self._candidates(call, s_test, method, int(k))
                    seconds = time.perf_counter() - start
                    if first:  # the first call builds the method's index; time a second query alone
                        start = time.perf_counter()
                        self._candidates(call, s_test, method, int(k))
                        query = time.perf_counter() - start
                        build, first = max(seconds - query, 0.0), False
                    else:
                        query = seconds
                    row = {"method": method if isinstance(method, str) else "callable", "k": int(k),
                           "k_fraction": int(k) / n_rows, "random_expectation": int(k) / n_rows,
                           "build_s": build, "query_s": query / len(found)}
                    row |= _recall(reference, found, ns)
                    out.append(row)
        self._ended()
        return out

    def _prepare(self, call: _Call) -> None:
        """The padding probe, the trunk caches, the read position, and the default loss against the model's own:
        what every later stage runs on."""
        self._check_padding(call)
        with call.timer("trunk"):
            # each process computes its own trunk states (its own file, its own disk space): one that fails stops
            # every process, which went on into the next stage's collectives and waited for ever
            D.together(lambda: self._attach_trunks(call), "The trunk states")
            self._attach_readout(call)
        self._check_own_loss(call)

    def _label_smoothing(self) -> float:
        return default_loss_smoothing(self.args, self.loss_fn)

    def _loss_key(self, fingerprint: Callable = callable_fingerprint) -> str:
        return loss_key(self.loss_fn, self.args, fingerprint)

    def _module_state(self) -> str:
        """The key of the modules' state (`module_state_description`) this call's caches are keyed on: the last
        call's when nothing changed since it ended but records it saw grow (`_Watch`), else the state's own."""
        now = module_state_description(self.model)
        if self._module_key is None or not self._module_watch.unchanged(now):
            self._module_key = description_key(now)
        self._module_watch.start = now
        return self._module_key

    def _ended(self) -> None:
        """After a call: what the modules and the collator hold now, against what they held at its start (`_Watch`)."""
        self._module_watch.ended(module_state_description(self.model))
        self._collator_watch.ended(collator_settings(self.data_collator))

    def _refresh_collator_key(self) -> None:
        """Key the collator anew when its settings changed since the last call left them (padding side, pad id, what
        it reads; records seen growing are no change, `_Watch`): every cache is keyed on it. Its settings are read on
        every call; its key reads the tokenizer's vocabulary (34 ms on MiniLM's), so not."""
        settings = collator_settings(self.data_collator)
        if not self._collator_watch.unchanged(settings):
            self._functions["collator"] = collator_key(self.data_collator, settings)
        self._collator_watch.start = settings

    def _warn_backward_hooks(self, model: nn.Module) -> None:
        """Warn (once per set of hooks: their modules and registrations) about backward hooks: the gradients and
        Hessian-vector products run through them and the forward-mode scoring does not, so the values mix the hooked
        and the unhooked model (a hook that doubled the pooler's input gradients moved a table by 5e-4 where the
        hooked model's influence is another)."""
        from torch.nn.modules import module as torch_module

        registered = [(name or type(model).__name__, tuple(m._backward_hooks), tuple(m._backward_pre_hooks))
                      for name, m in model.named_modules() if m._backward_hooks or m._backward_pre_hooks]
        if torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks:
            registered.append(("every module (torch's global backward hooks)",
                               tuple(torch_module._global_backward_hooks),
                               tuple(torch_module._global_backward_pre_hooks)))
        if registered and self._warned_backward != registered:
            self._warned_backward = registered
            hooked = [name for name, *_ in registered]
            logger.warning(f"Backward hooks are registered on {', '.join(hooked[:3])}"
                           f"{f' and {len(hooked) - 3} more' if len(hooked) > 3 else ''}: influence's gradients and "
                           "Hessian-vector products run through them, its forward-mode scoring does not, so the values "
                           "mix the hooked and the unhooked model. Remove them for influence (handle.remove()).")

    def _portable_functions(self) -> dict:
        """The collator, loss, measurement and features as `portable_fingerprint` describes them: what processes of
        a launch compare (`_functions`, the caches' keys, tell two live objects apart by address, which differs
        between processes even when they run the same script)."""
        return {"collator": portable_fingerprint(self.data_collator), "loss": self._loss_key(portable_fingerprint),
                "measurement": portable_fingerprint(self.measurement_fn), "features": portable_fingerprint(self.features)}

    def trained_with(self) -> str | None:
        """The tables' ``trained_with`` note: `trained_loss` where influence uses the default loss, else None."""
        if self.trained_loss is None or self.loss_fn is not None:
            return None
        return f"{self.trained_loss}; influence used the model's default loss"

    def _check_own_loss(self, call: _Call) -> None:
        """With the default loss, compare it with the loss the model itself returns, once per weights and data (a
        loss term can be invisible at some weights: class weights while every row's loss is the same, a penalty
        that is zero at initialisation): for a classifier on the first 8 training rows together (class weights
        cancel on one row), for token losses on the first row alone (the model weights rows by their tokens). A
        model that weights classes, smooths labels or adds a term in its own forward trains on another loss than
        the head's plain one, and influence would silently be of the plain one. Only the top runs, from the cached
        trunk states (1.5 ms on MiniLM). A mixture of experts' router loss is left out (it is not a per-row loss,
        and takes no part in a head's derivatives); the model's config is restored afterwards (transformers sets
        ``problem_type`` on the first forward with labels, which would change the model's fingerprint)."""
        note = self.trained_with()
        if note is not None:
            call.info["trained_with"] = note
        if self.loss_fn is not None or self._label_smoothing():  # (smoothing: the Trainer's loss, not the model's)
            return
        key = (call.model_key, call.train.fingerprint)
        if key not in self._own_loss:
            compared = self._own_and_default_loss(call, list(range(min(8, len(call.train)))))
            if compared is not None and compared[4] is not None and compared[4].dim() != 2:  # token losses
                compared = self._own_and_default_loss(call, [0])
            self._own_loss[key] = None  # (also where there is nothing to compare at these weights)
            if compared is None:
                return
            own, ours, tolerance, floor, _, rows = compared
            if abs(own - ours) > tolerance * max(abs(own), abs(ours)) + floor:
                self._own_loss[key] = {"rows": rows, "model_loss": own, "default_loss": ours}
                what = "row 0" if len(rows) == 1 else f"rows 0-{len(rows) - 1}"
                logger.warning(
                    f"On train_dataset {what} the model's own loss is {own:.6g}, and the mean of the default per-row "
                    f"loss (the head's plain one, hf_fastif.loss) is {ours:.6g}: the model computes its loss "
                    "otherwise (class weights, label smoothing or an extra term in its forward), so the influence "
                    "computed would be of another loss than the one it trains on. Pass loss_fn=(outputs, batch) -> "
                    "per-row loss that matches it (InfluenceTrainer: influence_loss_fn=). A penalty on the "
                    "parameters (AdaLoRA's orthogonal regularisation) cannot go through loss_fn, which runs outside "
                    "the parameters' derivatives: an L2 term is influence_weight_decay, others are left out.")
        if self._own_loss.get(key) is not None:
            call.info["own_loss_differs"] = self._own_loss[key]

    def _own_and_default_loss(self, call: _Call, rows: list[int]):
        """``(the model's own loss, the mean default loss over the rows it counts, the relative and the absolute
        tolerance of the logits' dtype, the logits, rows)`` on these training rows, or None where there is nothing to
        compare."""
        batch = call.train.batch(rows)
        if not isinstance(batch.get("labels"), torch.Tensor):
            return None
        config = getattr(self.model, "config", None)
        saved = dict(vars(config)) if config is not None else None
        try:
            with torch.no_grad(), forward_context(call.fm.split, batch):
                outputs = self.model(**model_inputs(batch, self.model), labels=batch["labels"])
                own = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
                ours = call.fm.loss_fn(outputs, batch) if isinstance(own, torch.Tensor) else None
        except Exception as err:  # a model that cannot take labels this way: nothing to compare
            logger.debug(f"The model's own loss could not be compared with the default one ({err}).")
            return None
        finally:
            if saved is not None:
                vars(config).clear()
                vars(config).update(saved)
        if ours is None or own.numel() != 1 or len(ours) != len(rows):
            return None
        aux, coefficient = getattr(outputs, "aux_loss", None), getattr(config, "router_aux_loss_coef", None)
        if isinstance(aux, torch.Tensor) and coefficient:
            own = own - coefficient * aux.to(own.dtype)
        labels = batch["labels"]
        if labels.dim() == 1 and not labels.is_floating_point():
            ours = ours[labels != -100]  # the model's mean counts the labelled rows only
        logits = find_logits(outputs)
        if not len(ours) or not torch.isfinite(own):
            return None
        floating = isinstance(logits, torch.Tensor) and logits.is_floating_point()
        dtype = logits.dtype if floating else torch.float32
        # the model's own loss is computed in its logits' dtype: log-sum-exp minus the label's logit cancels to the
        # logits' rounding, eps·max|z| (bf16: a confident row's 3e-4 is 0), besides the relative part
        floor = 1e-6
        if floating and logits.numel():
            floor = max(floor, 4 * torch.finfo(dtype).eps * float(logits.detach().abs().max()))
        return float(own), float(ours.mean()), max(1e-4, 8 * torch.finfo(dtype).eps), floor, logits, rows

    def _candidates_read_s_test(self, call: _Call) -> bool:
        """Whether this call's candidates come from s_test (gradient-space candidates); kNN over model features,
        a random sample or every row do not, and are found before s_test."""
        method = self.features or self.args.influence_knn_features
        return call.k is not None and isinstance(method, str) and method == "gradient"

    def _s_test_of(self, call: _Call) -> torch.Tensor:
        with call.timer("test_gradients"):
            v = self._test_gradients(call)
        bad = np.flatnonzero(~torch.isfinite(v).all(1).cpu().numpy())
        if len(bad):
            rows = "the mean of the test rows" if call.combine == "mean" else f"test rows {bad[:10].tolist()}"
            half = _half_dtypes(call.params)
            raise FloatingPointError(
                f"The gradient of {rows} is not finite: their loss is inf / NaN (check those rows' labels and inputs)"
                + (f", or it overflowed in {', '.join(half)} (compute influence on a float32 copy, model.float())"
                   if half else "") + ".")
        with call.timer("s_test"):
            return self._s_test(call, v)

    def _check_padding(self, call: _Call) -> None:
        """Refuse a model whose output for a row changes with the padding around it (left padding without
        position ids, for instance): every stage batches rows of different lengths, so its numbers would depend
        on the batch sizes. Probes per model and dataset (training, test and candidate rows: a test set can be
        padded where fixed-length training blocks are not): the narrowest row alone, and padded next to the
        widest, and the same by real tokens and by stored targets (`Batcher.padding_probes`).

        First, whether each dataset's batches drop their trailing padding (`_skips_padding`); the probes then see
        the batches every stage will see. Where they fail on batches without it (rows at their own width against
        rows at a wider row's: a model whose outputs depend on the batch's width, as Funnel's pooling does), the
        model is taken to read its padding: every dataset keeps it, and the probes run again on those batches."""
        datasets = [(call.train, "train_dataset", False), (call.test, "test_dataset", True)]
        datasets += [] if call.cand is call.train else [(call.cand, "candidate_dataset", False)]
        keys = [(call.model_key, batcher.fingerprint, measurement, self._functions["collator"],
                 self._functions["loss"], self._functions["measurement"]) for batcher, _, measurement in datasets]
        padding_key = self._padding_key(call)
        while True:
            why_not = [self._skips_padding(call, b, m, key) for (b, _, m), key in zip(datasets, keys)]
            if padding_key in self._reads_padding:  # (found on one dataset: every dataset keeps it)
                why_not = [self._skips_padding(call, b, m, key) for (b, _, m), key in zip(datasets, keys)]
            for (batcher, name, _), why in zip(datasets, why_not):
                batcher.skip_padding = why is None
                call.info.setdefault("trailing_padding", {})[name] = "skipped" if why is None else f"kept: {why}"
            try:
                for (batcher, name, measurement), key in zip(datasets, keys):
                    self._probe_dataset_padding(call, batcher, name, measurement, (*key, batcher.skip_padding))
                return
            except ValueError as err:
                if not any(b.skip_padding for b, _, _ in datasets):
                    raise
                reads = f"rows without their trailing padding change next to wider rows ({_first_line(err)})"
                self._reads_padding[padding_key] = reads
                logger.info(f"Batches keep their trailing padding: {reads}.")

    def _probe_dataset_padding(self, call: _Call, batcher: Batcher, name: str, measurement: bool, key: tuple) -> None:
        if key in self._padding_checked:
            return
        pairs = batcher.padding_probes(PADDING_PROBE_ROWS)
        for short, long in pairs:
            self._probe_padding(call, batcher, name, measurement, short, long)
        if pairs and shifts_labels(self.model):  # a causal LM: a row whose first token is a target is hurt by
            # left padding whatever its length (the narrowest row's first target was -100 in an SFT-style mix,
            # and the others' values changed with the batch size, 40% off)
            first, width = batcher.stored_lengths("labels", "first_target"), batcher.stored_lengths()
            if first is not None and width is not None:
                hurt = np.flatnonzero((first > 0) & (width < width.max()))
                if len(hurt):
                    self._probe_padding(call, batcher, name, measurement, int(hurt[0]), int(width.argmax()))
        self._padding_checked.add(key)

    def _padding_key(self, call: _Call) -> tuple:
        """What decides whether a model reads its padding: the weights, the collator and the functions."""
        return (call.model_key, self._functions["collator"], self._functions["loss"], self._functions["measurement"])

    def _skips_padding(self, call: _Call, batcher: Batcher, measurement: bool, key: tuple) -> str | None:
        """None where ``batcher``'s batches may drop their trailing padding (`without_trailing_padding`), else why
        not. Decided once per model, data, collator and functions, on probe rows (`_trailing_probes`: up to
        `TRAILING_PROBE_ROWS` rows of different real lengths, each alone, then the narrowest next to the widest,
        then the first row alone, for a dataset of one row; where the shortest row alone has no trailing padding,
        as rows padded per batch have not, no other is collated): each batch that has trailing padding must give
        the same values and the same floating outputs (logits, start and end logits, hidden states: at the
        positions it keeps) without it as with it, to `TRAILING_TOLERANCE` ulps of the model's dtype. Where one differs or raises
        (a loss or head that reads padded positions, a model that pools by the sequence's length), the model is
        taken to read its padding: this dataset and every other keeps it (`_reads_padding`), as before. Half
        precision keeps it too: its rounding is coarser than what the padding may change."""
        if not getattr(self.args, "influence_skip_trailing_padding", True):  # (read on every call: set in place)
            return "influence_skip_trailing_padding=False"
        padding_key = self._padding_key(call)
        reads = self._reads_padding.get(padding_key)
        if reads is not None:
            return f"the model reads its padding: {reads}"
        if key in self._trailing_padding:
            return self._trailing_padding[key]
        batcher.skip_padding = False
        dtype = next(self.model.parameters()).dtype
        why = "no probe batch has positions after every row's last token"
        if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            why = "an encoder-decoder model (its targets are laid out apart from its inputs)"
        elif dtype in HALF_DTYPES:
            why = f"a {str(dtype).removeprefix('torch.')} model (its rounding hides what the padding may change)"
        else:
            value, tolerance = call.fm.value_fn(measurement), TRAILING_TOLERANCE * torch.finfo(dtype).eps
            for i, rows in enumerate(_trailing_probes(batcher)):
                whole = batcher.batch(rows, trunk=False)
                cut = without_trailing_padding(whole)
                if cut is whole and i == 0:  # (the shortest row alone: rows not stored padded, padded per batch)
                    break
                if cut is whole:
                    continue
                named = [int(r) for r in batcher.base_rows(rows)]
                with torch.no_grad():
                    outputs = call.fm.outputs(call.params, whole)
                    values = value(outputs, whole).double()
                    try:  # (a loss or model that cannot take the narrower batch keeps the padding, as before)
                        cut_outputs = call.fm.outputs(call.params, cut)
                        cut_values = value(cut_outputs, cut).double()
                    except Exception as err:  # noqa: BLE001
                        reads = (f"rows {named} without their trailing padding raise {type(err).__name__} "
                                 f"({_first_line(err)})")
                        break
                error = (max(relative_difference(cut_values, values), _outputs_difference(outputs, cut_outputs, cut))
                         if cut_values.shape == values.shape else float("inf"))
                if not error <= tolerance:
                    reads = (f"the values or outputs of rows {named} change by {error:.2g} without their trailing "
                             "padding")
                    break
                why = None
            if reads is not None:  # (every dataset keeps it: `_check_padding` asks again for those before this one)
                self._reads_padding[padding_key] = reads
                logger.info(f"Batches keep their trailing padding: {reads}.")
                return f"the model reads its padding: {reads}"
        self._trailing_padding[key] = why
        return why

    def _probe_padding(self, call: _Call, batcher: Batcher, name: str, measurement: bool, short: int,
                       long: int) -> None:
        alone_batch, padded_batch = batcher.batch([short], trunk=False), batcher.batch([short, long], trunk=False)
        value = call.fm.value_fn(measurement)
        with torch.no_grad():  # each row's value, as every stage computes it (any head, any loss_fn)
            alone_outputs, padded_outputs = (call.fm.outputs(call.params, b) for b in (alone_batch, padded_batch))
            alone = value(alone_outputs, alone_batch).double()
            padded = value(padded_outputs, padded_batch)[:1]
        error = relative_difference(padded.double(), alone, floor=1.0)
        error = max(error, _per_row_logits_error(alone_outputs, padded_outputs))
        dtype = next(self.model.parameters()).dtype  # half precision rounds other batch shapes coarser
        finite_alone, finite_padded = bool(torch.isfinite(alone).all()), bool(torch.isfinite(padded).all())
        row, other = (int(r) for r in batcher.base_rows([short, long]))  # (dataset rows, as the error names them)
        if measurement and not finite_alone:  # not the padding's doing: the test gradients' check names such rows
            return
        if not (finite_alone and finite_padded):
            where = "alone" if not finite_alone else f"padded next to row {other}"
            raise ValueError(
                f"The loss of {name} row {row} is not finite {where} ({float(alone[0]):.4g} alone, "
                f"{float(padded[0]):.4g} padded): the model's own forward gives NaN/inf there. With padding, "
                "the usual cause is a row whose attention sees no position at all (left padding with a causal "
                "or sliding-window mask in eager attention): pad on the right (tokenizer.padding_side = "
                "'right'); otherwise check the rows' token ids and labels."
            )
        if not error <= max(PADDING_TOLERANCE, 20 * torch.finfo(dtype).eps):
            raise ValueError(
                f"The loss (or per-row logits) of {name} row {row} changes when it is padded next to row {other} "
                f"(relative difference {error:.2g}): every stage of influence batches rows of different lengths, so "
                "its numbers would depend on the batch sizes. "
                + _padding_cause(self.model, padded_batch)
            )

    def _full_scan(self, call: _Call, s_test: torch.Tensor) -> np.ndarray:
        """``(queries, N)``: influence of every candidate row on every query (the recall reference)."""
        queries = 1 if call.combine == "mean" else len(call.test)
        every = [np.arange(len(call.cand))] * queries
        tests, rows, values = self._scores(call, every, s_test)
        reference = np.empty((queries, len(call.cand)))
        reference[tests, rows] = values
        return reference

    def _recall_of(self, call: _Call, s_test: torch.Tensor, queries: list[np.ndarray]) -> dict:
        # recall@10 / @100 capped at the candidate rows, labelled as such (N = 40 was reported as "recall@100")
        return _recall(self._full_scan(call, s_test), queries, recall_ns(len(call.cand))) | {
            "random_expectation": len(queries[0]) / len(call.cand), "method": call.info.get("candidates")}

    def save_caches(self, directory: str | os.PathLike) -> Path:
        """Write the caches this engine holds (trunk states, low-rank Hessian, gradient index, curvature estimates)
        with their content keys, so another engine (a later process: a Space's next start) can `load_caches` them.
        A loaded cache is used only by a call whose own key equals the saved one, so nothing stale is ever used."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        # one save or load of a folder at a time (two Space processes share one): their files were paired with the
        # other engine's keys, and served
        with FileLock(str(folder / CACHE_LOCK)):
            return self._write_caches(folder)

    def _write_caches(self, folder: Path) -> Path:
        # the manifest goes first, and comes back last: a save cut short leaves no manifest pairing old keys with
        # new arrays (the folder then loads nothing, and the caches are rebuilt)
        (folder / CACHE_MANIFEST).unlink(missing_ok=True)
        # the model's code: every key below holds its weights and config, not what its forward does (a
        # trust_remote_code model's modeling file edited between a save and a load was served the old states)
        manifest: dict = {"library_version": library_version(), "model_code": model_code_fingerprint(self.model),
                          "trunks": [], "curvature": []}
        files: list[str] = []  # every file the manifest names, digested below (checked when read back)

        def save_array(name: str, array: np.ndarray) -> None:
            # a new file put in place, not the old one rewritten: an engine that memory-maps the old one keeps it
            write_atomic(folder / name, lambda handle: np.save(handle, array, allow_pickle=False))
            files.append(name)

        for i, (key, cache) in enumerate(self._trunks.items()):
            # bfloat16 (which numpy lacks) as its raw 16-bit patterns: read back, it maps without a conversion
            raw = cache.flat.dtype == torch.bfloat16
            save_array(f"trunk-{i}.npy", cache.flat.detach().cpu().view(torch.int16).numpy() if raw
                       else _numpy(cache.flat))
            save_array(f"trunk-{i}-rows.npy", np.stack([cache.lengths, cache.offsets]))
            manifest["trunks"].append({"key": key, "file": f"trunk-{i}", "dtype": str(cache.flat.dtype), "raw": raw,
                                       "per_row": cache.per_row})
        if self._low_rank is not None:
            key, (values, vectors) = self._low_rank
            save_array("low_rank_values.npy", _numpy(values))
            save_array("low_rank_vectors.npy", _numpy(vectors))
            manifest["low_rank"] = {"key": key, "dtype": str(vectors.dtype)}
        if self._gradient_index is not None:
            key, index = self._gradient_index
            index.save(folder / "gradient.faiss")
            manifest["gradient_index"] = {"key": key, "dtype": str(index.sketch.dtype)}
        elif self._saved_gradient_index is not None and saved_index_intact(self._saved_gradient_index):
            # loaded but not read yet (it is read on first use): kept, not dropped from the new manifest
            key, path, dtype, digest = self._saved_gradient_index
            target = folder / "gradient.faiss"
            if path.resolve() != target.resolve():
                shutil.copyfile(path, target)
                self._saved_gradient_index = (key, target, dtype, digest)
            manifest["gradient_index"] = {"key": key, "dtype": str(dtype)}
        files += ["gradient.faiss"] if "gradient_index" in manifest else []
        manifest["curvature"] = [[key, value] for key, value in self._curvature.items()]
        manifest["files"] = {name: cache_file_digest(folder / name) for name in files}
        write_atomic(folder / CACHE_MANIFEST, to_json(manifest, indent=1))
        return folder

    def load_caches(self, directory: str | os.PathLike) -> list[str]:
        """Read caches written by `save_caches`; returns what was loaded. A folder with nothing saved in it (missing,
        or without the manifest `save_caches` writes: a typo, or the folder above) loads nothing, with a warning;
        one that cannot be read (damaged, truncated) is skipped with a warning: the caches only save time, and this
        engine's own are left as they were."""
        folder = Path(directory)
        if not (folder / CACHE_MANIFEST).is_file():
            found = "does not exist" if not folder.exists() else f"holds no {CACHE_MANIFEST} (not a save_caches folder)"
            logger.warning(f"No engine caches loaded: {folder} {found}; they are computed when needed, and "
                           "engine.save_caches(folder) writes them for a later process.")
            return []
        state = (OrderedDict(self._trunks), self._low_rank, self._saved_gradient_index, dict(self._curvature),
                 dict(self._from_disk))
        try:
            with _reading_lock(folder):
                return self._read_caches(folder)
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError) as err:
            (self._trunks, self._low_rank, self._saved_gradient_index, self._curvature, self._from_disk) = state
            logger.warning(f"Could not read the engine caches in {folder} ({type(err).__name__}: {err}); they are "
                           "computed again when needed. Delete the folder (or save_caches over it) to replace them.")
            return []

    def _read_caches(self, folder: Path) -> list[str]:
        manifest = json.loads((folder / CACHE_MANIFEST).read_text())
        if manifest.get("model_code") != model_code_fingerprint(self.model):
            logger.info(f"The engine caches in {folder} were saved for other model code (another transformers "
                        "version, or a model class of one's own that changed; or saved before the code was recorded): "
                        "not loaded, they are computed again when needed.")
            return []
        for name, digest in manifest.get("files", {}).items():  # (folders saved before digests: not checked)
            if cache_file_digest(folder / name) != digest:
                raise ValueError(f"{name} changed since it was saved (its xxh3 digest differs from the manifest's)")
        loaded = []
        device = next(self.model.parameters()).device
        retired = []  # caches replaced or dropped by this load: closed only once all of it was read (a failure
        # puts the engine's own caches back, and they must still hold their states)
        for entry in manifest.get("trunks", []):
            stored = np.load(folder / f"{entry['file']}.npy", mmap_mode="c")
            dtype = _dtype(entry["dtype"])
            # states beyond the memory limit stay memory-mapped, as built ones do (a copy-on-write map: pages are
            # read from the file when used; `save_caches` puts new files in place, never rewrites this one)
            raw = bool(entry.get("raw"))
            mapped = stored.nbytes > trunk_module.MEMORY_LIMIT_BYTES and (raw or torch.from_numpy(stored[:0]).dtype == dtype)
            flat = torch.from_numpy(stored if mapped else np.array(stored))
            flat = flat.view(dtype) if raw else flat.to(dtype)
            rows = np.load(folder / f"{entry['file']}-rows.npy")
            if entry["key"] in self._trunks:
                retired.append(self._trunks.pop(entry["key"]))
            self._trunks[entry["key"]] = TrunkCache.from_arrays(entry["key"], rows[0], rows[1], flat, device,
                                                                per_row=int(entry.get("per_row", 0)))
            self._from_disk["trunk", entry["key"]] = False
            loaded.append("trunk")
        if "low_rank" in manifest:
            dtype = _dtype(manifest["low_rank"]["dtype"])
            values = torch.from_numpy(np.load(folder / "low_rank_values.npy"))
            vectors = torch.from_numpy(np.load(folder / "low_rank_vectors.npy")).to(device=device, dtype=dtype)
            self._low_rank = (_freeze(manifest["low_rank"]["key"]), (values, vectors))
            self._from_disk["low_rank", self._low_rank[0]] = False
            loaded.append("low_rank")
        if "gradient_index" in manifest:
            key = _freeze(manifest["gradient_index"]["key"])
            self._saved_gradient_index = (key, folder / "gradient.faiss", _dtype(manifest["gradient_index"]["dtype"]),
                                          manifest.get("files", {}).get("gradient.faiss"))
            self._from_disk["gradient_index", key] = False
            loaded.append("gradient_index")
        for key, value in manifest.get("curvature", []):
            self._curvature[_freeze(key)] = value
            self._from_disk["curvature", _freeze(key)] = False
            loaded.append("curvature")
        for old in retired + self._evict_trunks():  # the cap holds for loaded caches too
            old.close()
        return loaded

    def _align_caches(self, portable: dict[str, str]) -> None:
        """Under a launch, keep only the caches built by collectives (curvature estimates, the exact and low-rank
        Hessians, the gradient and kNN indexes) that every process holds: a process using its own while another
        rebuilds it waited in the other's collectives for ever (caches loaded by one process only, or saved under
        another rank). Trunk states are each process's own work, and stay."""
        device = repr(str(next(self.model.parameters()).device))  # each process's own GPU is the same place
        # the keys hold `_functions`, which tell live objects apart by address: compared as their ``portable``
        # fingerprints (`_portable_functions`), else every cache counted as held by one process only
        to_portable = {self._functions[k]: portable[k] for k in portable if self._functions[k] != portable[k]}

        def name(key) -> str:
            text = repr(key).replace(device, "'<device>'")
            for local, shared in to_portable.items():
                text = text.replace(local, shared)
            return text

        held = {("curvature", name(key)) for key in self._curvature}
        for kind, entry in (("exact", self._exact), ("low_rank", self._low_rank), ("feature_index", self._feature_index),
                            ("gradient_index", self._gradient_index),
                            ("saved_gradient_index", self._saved_gradient_index)):
            if entry is not None:
                held.add((kind, name(entry[0])))
        common = set.intersection(*map(set, D.in_step("the caches every process holds", held)))
        for kind, key in held - common:
            logger.warning(f"Another process does not hold this process's {kind.replace('_', ' ')} cache: every "
                           "process builds it again (load the same caches in every process to reuse them; caches "
                           "saved on a GPU are keyed on its device, cuda:<rank>, so on GPUs they are rebuilt).")
            if kind == "curvature":
                self._curvature = {k: v for k, v in self._curvature.items() if name(k) != key}
            else:
                setattr(self, f"_{kind}", None)
                if kind == "low_rank":
                    self._prepared_solve = None

    def _served(self, kind: str, key) -> None:
        """Note that a cache read by `load_caches` served a call (so it was not stale)."""
        if (kind, key) in self._from_disk:
            self._from_disk[kind, key] = True

    def _replaced(self, kind: str, key) -> None:
        """Note that the cache of this kind and key is no longer the one `load_caches` read (built now, or pushed
        out), so `forget_unused_loaded` never drops a fresh one."""
        self._from_disk.pop((kind, key), None)

    def unused_loaded_caches(self) -> list[str]:
        """Kinds of cache read by `load_caches` of which no entry has served a call since: stale (saved for other
        weights, data, settings or code, e.g. by another hf_fastif version), rebuilt by the calls that needed them."""
        served = {kind for (kind, _), used in self._from_disk.items() if used}
        return sorted({kind for kind, _ in self._from_disk} - served)

    def forget_unused_loaded(self, kinds: Sequence[str]) -> None:
        """Drop the entries of ``kinds`` read by `load_caches` that have served no call (so `save_caches` does not
        write them again)."""
        for (kind, key), used in list(self._from_disk.items()):
            if used or kind not in kinds:
                continue
            if kind == "trunk" and key in self._trunks:
                self._trunks.pop(key).close()
            elif kind == "low_rank" and self._low_rank is not None and self._low_rank[0] == key:
                self._low_rank = None
            elif kind == "gradient_index" and self._saved_gradient_index is not None \
                    and self._saved_gradient_index[0] == key:
                self._saved_gradient_index = None
            elif kind == "curvature":
                self._curvature.pop(key, None)
            del self._from_disk[kind, key]

    def clear(self) -> None:
        """Drop every cache (they are rebuilt on the next call)."""
        for cache in self._trunks.values():
            cache.close()
        self._trunks.clear()
        self._stored_lengths.clear()
        self._lissa_graphs = None
        self._split = self._readout = self._trunk_cut = self._stack_refused = None
        self._feature_index = self._gradient_index = self._low_rank = self._prepared_solve = self._exact = None
        self._saved_gradient_index = None
        self._curvature.clear()
        self._from_disk.clear()

    def __enter__(self) -> InfluenceEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.clear()

    # ---- stage 0: checks, parameters, batchers -------------------------------------------------------------
    def _start(self, train_dataset, test_dataset, candidate_dataset, combine, methods=None) -> _Call:
        """Checks before any work, then the call's parameters, fingerprints and batchers. ``methods``: the candidate
        methods a recall measurement will use (instead of the settings' own k and method)."""
        args, model = self.args, self.model
        validate_influence_settings(args)
        meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
        if meta is not None:
            raise ValueError(f"The model's parameter {meta!r} is on the 'meta' device: its weights were never loaded "
                             "(a model built under init_empty_weights / device_map='meta'). Load the weights "
                             "(from_pretrained without it, or model.to_empty(device=...) and load_state_dict) first.")
        self._refresh_collator_key()
        # a loss changed in place (a temperature, a closure's value) keys the curvature caches anew (µs each)
        self._functions |= {"loss": self._loss_key(),
                            "measurement": callable_fingerprint(self.measurement_fn),
                            "features": callable_fingerprint(self.features)}
        if combine not in COMBINE:
            raise ValueError(f"combine={combine!r} is unknown; use 'none' (one s_test per test row) or 'mean'.")
        candidate_dataset = train_dataset if candidate_dataset is None else candidate_dataset
        rule = column_rule(args)
        train_cols = validate_dataset(train_dataset, "train_dataset", model, **rule)
        test_cols = validate_dataset(test_dataset, "test_dataset", model, **rule)
        # the training rows as candidates: their columns were read above (said once, not again as candidate_dataset)
        cand_cols = (train_cols if candidate_dataset is train_dataset
                     else validate_dataset(candidate_dataset, "candidate_dataset", model, **rule))
        k = args.influence_knn_k
        if k is not None and k >= len(candidate_dataset) and methods is None:
            if k > len(candidate_dataset):
                logger.warning(f"influence_knn_k={k} exceeds the {len(candidate_dataset)} candidate rows; scoring all "
                               "of them.")
            k = None  # (k = N is every row too: an approximate index searched at k = N returned fewer)
        params = select_parameters(model, args.influence_params)
        names = list(params)
        weights = dict(model.named_parameters())
        half = _half_dtypes(weights)  # (any of them: a bf16 trunk under float32 influence parameters moved rankings too)
        if half:  # (documented as 0.2% off, but rankings moved: Spearman 0.84 in a review's check, unwarned)
            count = sum(p.numel() for p in weights.values() if str(p.dtype).removeprefix("torch.") in half)
            logger.warning_once(
                f"{count:,} of the model's parameters are {' / '.join(half)}: its forwards and Hessian-vector "
                "products run in that precision (solvers and scores in float32), so influence values come out ~0.1-2% "
                "off and close ones swap places (a bfloat16 tiny BERT: Spearman 0.84 with float64, 1.000 for its "
                "float32 copy; 0.83 with only its influence parameters in float32). For rankings to act on, compute "
                "influence on a float32 copy of the model: copy.deepcopy(model).float().")
        if args.influence_solver == "exact":
            check_exact_size(num_parameters(params))
        gradient = (k is not None and self.features is None and args.influence_knn_features == "gradient"
                    if methods is None else "gradient" in methods)
        if gradient:
            check_projection_dim(args.influence_projection_dim, num_parameters(params))
            check_index_factory(args.influence_knn_index, len(candidate_dataset), args.influence_projection_dim)
        digests = tensor_digests(model)
        fingerprint = model_fingerprint(model, digests)
        module_state = self._module_state()  # before anything is installed for the call (1.4 ms on MiniLM)
        self._warn_backward_hooks(model)
        device = next(model.parameters()).device
        rows = dict(decoder_inputs=decoder_inputs_from_labels(model), padding_collator=padding_collator_for(model))
        train = Batcher(train_dataset, train_cols, self.data_collator, device, **rows)
        test = Batcher(test_dataset, test_cols, self.data_collator, device, **rows)
        cand = train if candidate_dataset is train_dataset else Batcher(candidate_dataset, cand_cols,
                                                                         self.data_collator, device, **rows)
        for batcher in dict.fromkeys((train, test, cand)):
            self._share_lengths(batcher)
        # every cache of a dataset is keyed on the hash of its rows (`Batcher.fingerprint`, computed here once per
        # call), never on datasets' _fingerprint, which datasets with other rows can share
        rank, world_size = D.world()
        if world_size > 1:  # processes that differ in anything that decides the numbers would mix results
            portable = self._portable_functions()
            D.check_same_everywhere({
                "settings": args.influence_settings(), "combine": combine, "parameters": names,
                "model": fingerprint, "functions": portable, **_data_description("train", train),
                **_data_description("test", test),
                **({"candidates": "the training rows"} if cand is train else _data_description("candidates", cand)),
            })
            self._align_caches(portable)
        default_loss = self.loss_fn is None
        own = default_loss and self.measurement_fn is None  # the test rows' default loss is what is measured
        checks = [(train, train_dataset, train_cols, "train_dataset", default_loss, False),
                  (test, test_dataset, test_cols, "test_dataset", own, own and combine == "none")]
        if candidate_dataset is not train_dataset:
            checks.append((cand, candidate_dataset, cand_cols, "candidate_dataset", default_loss, False))
        longest = {}
        for batcher, dataset, columns, name, loss, target in checks:
            key = (fingerprint, batcher.fingerprint, tuple(columns), name, loss, target)
            if key not in self._values_checked:  # a scan of the stored columns, once per dataset and model
                self._values_checked[key] = check_values(dataset, columns, name, model, default_loss=loss,
                                                         needs_target=target)
            longest[name] = self._values_checked[key]
        batchers = [(train, "train_dataset"), (test, "test_dataset")]
        batchers += [] if cand is train else [(cand, "candidate_dataset")]
        for batcher, name in batchers:  # (after the stored rows' checks)
            # every call (~1 ms): a collator can change in ways no key sees
            batcher.check_collator(name, model, longest=longest[name])
        if self.loss_fn is None:  # the default loss reads `labels`; a loss_fn reads what it reads (QA: positions)
            for batcher, name in ((train, "train_dataset"), (cand, "candidate_dataset")):
                batcher.check_labels(name)
        if self.measurement_fn is None and self.loss_fn is None:
            test.check_labels("test_dataset")
        dtypes = {p.dtype for p in params.values()}
        work = torch.float64 if torch.float64 in dtypes else torch.float32
        fm = influence_model(model, names, args, self.loss_fn, self.measurement_fn)
        named = [self.features or args.influence_knn_features] if methods is None and k is not None else methods or []
        return _Call(names=names, params=params, fm=fm, train=train, test=test, cand=cand, k=k, combine=combine,
                     feature_methods=tuple(m for m in named if isinstance(m, str) and m not in ("gradient", "random")),
                     digests=digests, model_fingerprint=fingerprint, work_dtype=work,
                     module_state=module_state,
                     progress=not getattr(args, "disable_tqdm", False) and rank == 0)

    def _share_lengths(self, batcher: Batcher) -> None:
        """Give ``batcher`` the stored row lengths this engine keeps for its dataset's content (filled as read),
        keeping the `MAX_STORED_LENGTHS` datasets used last."""
        key = (batcher.fingerprint, tuple(batcher.dataset.column_names))
        lengths = self._stored_lengths.pop(key, {})
        self._stored_lengths[key] = lengths
        while len(self._stored_lengths) > MAX_STORED_LENGTHS:
            self._stored_lengths.popitem(last=False)
        batcher.share_lengths(lengths)

    # ---- stage 1: the frozen trunk ---------------------------------------------------------------------------
    def _attach_trunks(self, call: _Call) -> None:
        """Give every batcher its dataset's cached trunk states when the model splits cleanly."""
        split = self._find_split(call.names, call.train)
        below = None if split is None else split.fingerprint(call.digests)  # (once: 5 ms each on MiniLM)
        cut = None if split is None else self._first_position_cut(call, split)
        for name in ("train", "test", "cand"):
            if split is not None:
                setattr(call, name, self._with_trunk(split, getattr(call, name), below, call.module_state,
                                                     call.progress and name != "test", cut))
                split = self._split[1]  # None if a new cache failed its check
                cut = cut and self._trunk_cut[1]  # None if a cut cache failed it (the next ones keep every position)
        if split is None:
            for name in ("train", "test", "cand"):
                setattr(call, name, getattr(call, name).with_trunk(None))
            call.info["trunk"] = {"split": None, "reason": self._split[2]}
            return
        call.fm.split = split
        call.info["trunk"] = {"split": f"{split.path}.{split.first}", "verified_relative_error": self._split_error}
        if split.first == len(split.layers):
            call.info["trunk"]["first_position_cut"] = (cut_in_words(cut.name) if cut is not None
                                                        else f"none ({self._trunk_cut[2]})")

    def _readout_probes(self, call: _Call) -> tuple[list[dict], list[dict]]:
        """The batches a cut of the last layer is checked on (`hf_fastif.readout.find_readout`): the first training
        rows together, the shortest alone and next to the longest, and the first test rows together."""
        first = range(min(READOUT_PROBE_ROWS, len(call.train)))
        probes = [call.train.batch(first)]
        for pair in call.train.padding_probes(PADDING_PROBE_ROWS):  # alone and padded together (internal
            probes += [call.train.batch([pair[0]]), call.train.batch(list(pair))]  # padding shows up there)
        return probes, [call.test.batch(range(min(READOUT_PROBE_ROWS, len(call.test))))]

    def _first_position_cut(self, call: _Call, split: TrunkSplit) -> Readout | None:
        """For a split after the whole stack (only a pooler and a head hold influence parameters), the cut that
        computes and keeps the stack's last layer at its first position only (`TrunkCache`'s ``first_position``),
        where nothing this call reads from the trunk changes: the loss and the measurement
        (`hf_fastif.readout.find_readout`, on the whole model) and the kNN features of every method the call extracts
        through the trunk (equal with and without the cut on the same probe rows). Decided again when the weights,
        the parameters, the training data or the feature methods change. Only under the default loss and
        measurement, which read the head's logits: a ``loss_fn`` or ``measurement_fn`` of one's own may read the
        states at a position that depends on the row (a review's loss reading a marker token's state: 0.44 off on
        rows the probes did not include, without a word), and the trunk then keeps every position. New test rows
        are not probed again: every new cache is checked against the full model's logits, as every trunk cache is,
        and one that fails keeps every position instead (probing each new test point had made the Space's
        settings' later calls 0.06 -> 0.26 s)."""
        on = getattr(self.args, "influence_skip_unread_positions", True)
        key = (on, tuple(call.names), call.model_key, f"{split.path}.{split.first}", call.train.fingerprint,
               self._functions["loss"], self._functions["measurement"], call.feature_methods)
        if split.first != len(split.layers):
            return None
        if not on:
            self._trunk_cut = (key, None, "influence_skip_unread_positions=False")
        elif self.loss_fn is not None or self.measurement_fn is not None:
            # (a function of one's own may read the last layer's states at a position that depends on the row: the
            # probes cannot show it for every row, and a cut trunk would answer with the first position's state)
            self._trunk_cut = (key, None, "a loss_fn or measurement_fn of one's own may read other positions")
        elif self._trunk_cut is None or self._trunk_cut[0] != key:
            probes, tests = self._readout_probes(call)
            cut, reason = find_readout(call.fm, call.params, probes, tests)
            if cut is not None:
                reason = next((f"influence_knn_features={m!r} reads other positions" for m in call.feature_methods
                               if not _same_features(self.model, m, cut, [*probes, *tests])), "")
                cut = None if reason else cut
            if cut is None:
                logger.info(f"The trunk keeps every position of {split.path}.{split.first - 1}: {reason}.")
            self._trunk_cut = (key, cut, reason)
        return self._trunk_cut[1]

    def _attach_readout(self, call: _Call) -> None:
        """Cut the last layer to the position the loss reads, where `hf_fastif.readout.find_readout` shows that
        nothing changes (probe rows of the training and test data; decided again when the weights, the parameters,
        the split or the data change)."""
        split, on = call.fm.split, getattr(self.args, "influence_skip_unread_positions", True)
        key = (on, tuple(call.names), call.model_key, None if split is None else f"{split.path}.{split.first}",
               call.train.fingerprint, call.test.fingerprint,
               self._functions["loss"], self._functions["measurement"])  # (what the cut was checked on)
        if not on:
            self._readout = (key, None, "influence_skip_unread_positions=False")
        elif self._readout is None or self._readout[0] != key:
            probes, tests = self._readout_probes(call)
            readout, reason = find_readout(call.fm, call.params, probes, tests)
            if readout is None:
                logger.info(f"The last layer runs at every position: {reason}.")
            self._readout = (key, readout, reason)
        readout, reason = self._readout[1:]
        if readout is not None and readout.failed is not None:
            readout, reason = None, f"the cut {readout.where} failed on a batch ({readout.failed})"
        call.fm.readout = readout
        call.info["readout"] = {"cut_after": readout.name} if readout is not None else {"cut_after": None,
                                                                                          "reason": reason}

    def _find_split(self, names: list[str], batcher: Batcher) -> TrunkSplit | None:
        if not getattr(self.args, "influence_trunk_cache", True):
            self._split = ("off", None, "influence_trunk_cache=False")
            return None
        key = ",".join(names)
        if self._split is not None and self._split[1] is not None and self._split[1].failed is not None:
            self._drop_split(f"the cached states did not line up with a batch ({self._split[1].failed})")
        if self._split is None or self._split[0] != key:
            probe = model_inputs(batcher.batch(range(min(2, len(batcher))), trunk=False), self.model)
            split, reason = find_split(self.model, names, probe)
            if split is None:
                logger.info(f"No frozen-trunk cache: {reason}; every forward runs the whole model.")
            self._split, self._split_error = (key, split, reason), None
        return self._split[1]

    def _with_trunk(self, split: TrunkSplit, batcher: Batcher, below: str, module_state: str,
                    progress: bool, cut: Readout | None = None, any_layout: bool = False) -> Batcher:
        """``batcher`` with its dataset's trunk states (cached by content; ``below``: the trunk's
        `TrunkSplit.fingerprint`; ``cut``: states of the first position only, `TrunkCache`'s ``first_position``). The
        first cache of a split is checked against the full model on its first rows; a split that changes the logits
        is dropped for this engine. ``any_layout``: without a cache of every position, one of the first position is
        served too (predictions: a cut cache passed the same check of the logits)."""
        prefix = "|".join([below, module_state, batcher.fingerprint, str(len(batcher)), self._functions["collator"],
                           ",".join(batcher.dataset.column_names), str(batcher.device),
                           *batcher.layout_key])
        key = f"{prefix}|" + ("every position" if cut is None else f"first position, {cut.name}")
        if any_layout and key not in self._trunks:
            key = next((k for k in reversed(self._trunks) if k.startswith(f"{prefix}|first position, ")), key)
        new, state = key not in self._trunks, (below, module_state)
        try:  # (a new one-row cache of a split checked before, in this state of the model, keeps the whole model's
            # outputs for its check: one forward fewer; a cut one then keeps the first position of that forward)
            cache = self._trunk_cache(split, batcher, key, progress, cut=cut,
                                      full_forward=new and len(batcher) == 1 and state in split.verified)
        except FirstPositionError as err:  # (the cut's own doing: the trunk keeps every position instead)
            return self._keep_every_position(str(err), split, batcher, below, module_state, progress)
        except TrunkLayoutError as err:
            logger.warning(f"No frozen-trunk cache: {err}; every forward runs the whole model.")
            self._drop_split(str(err))
            return batcher.with_trunk(None)
        if new:  # every new cache is checked against the full model, on its first rows and padded ones
            error = verify_split(split, cache, batcher, verification_rows(batcher))
            if error > split_tolerance(self.model) and cut is not None:  # the cut's doing: keep every position
                self._trunks.pop(key).close()
                self._replaced("trunk", key)
                return self._keep_every_position(f"the first position alone changed the logits by {error:.2g}", split,
                                                 batcher, below, module_state, progress)
            self._split_error = max(error, self._split_error or 0.0)
            if error > split_tolerance(self.model):
                logger.warning(f"The top-only forward from {split.path}.{split.first} changes the logits by {error:.2g} "
                               "(relative): not using the trunk cache for this model; the full forward runs instead.")
                self._drop_split(f"the top-only logits differ by {error:.2g} (relative)")
                return batcher.with_trunk(None)
        split.verified.add(state)  # (the cache passed its check, here or when it was built: an engine keeps, saves
        # and loads no other)
        return batcher.with_trunk(cache)

    def _keep_every_position(self, reason: str, split: TrunkSplit, batcher: Batcher, below: str, module_state: str,
                             progress: bool) -> Batcher:
        """A cut cache failed (``reason``): no cut for the rest of this decision's key, and ``batcher`` with a cache
        of every position."""
        half = _half_dtypes(dict(self.model.named_parameters()))
        logger.warning(f"The trunk keeps every position (only speed is lost): {reason}"
                       + (f" ({' / '.join(half)} rounding, most likely: the cut changes the shapes of the last layer's "
                          "products; a float32 copy of the model keeps the cut)." if half else "."))
        self._trunk_cut = (self._trunk_cut[0], None, reason)
        return self._with_trunk(split, batcher, below, module_state, progress)

    def _drop_split(self, reason: str) -> None:
        """Stop using the current split for this engine (the full forward runs), and free the states cached for it."""
        split = self._split[1]
        for key in [k for k, cache in self._trunks.items() if split is not None and cache.split is split]:
            self._trunks.pop(key).close()
            self._replaced("trunk", key)
        self._split = (self._split[0], None, reason)

    # ---- predictions through the same trunk -------------------------------------------------------------------
    def logits(self, dataset: Dataset, batch_size: int = 128) -> np.ndarray:
        """Logits of every row of ``dataset`` (``(N, ...)`` float32; token logits padded with NaN to the longest
        batch's length), in eval mode, the rows run in batches of like length (`Batcher.length_order`). Where the
        model splits, only the top runs from the cached trunk states (which stay valid while only the top changes,
        e.g. over the SGD steps of HANS correction); otherwise the full model."""
        model = self.model
        self._refresh_collator_key()  # (the trunk states are keyed on it: a collator changed in place was not seen)
        names = list(select_parameters(model, self.args.influence_params))
        device = next(model.parameters()).device
        batcher = Batcher(dataset, validate_dataset(dataset, "dataset", model, **column_rule(self.args)),
                          self.data_collator, device, decoder_inputs=decoder_inputs_from_labels(model),
                          padding_collator=padding_collator_for(model))
        out = []
        # the modules' state as `_start` reads it, before influence_mode turns gradient checkpointing and its
        # input-gradient hook off: read inside, it keyed the same rows' trunk states anew (computed and held twice)
        module_state = self._module_state()
        with influence_mode(model, names), torch.no_grad():
            split = self._find_split(names, batcher)
            if split is not None:
                self._share_lengths(batcher)
                batcher = self._with_trunk(split, batcher, split.fingerprint(tensor_digests(model)), module_state,
                                           progress=False, any_layout=True)
                split = self._split[1]
            order = batcher.length_order()  # (batches of like length; each row's logits put back at its place)
            for _, batch in batcher.batches(order, batch_size):
                with forward_context(split, batch):
                    out.append(logits_of(model(**model_inputs(batch, model))).float().cpu().numpy())
        widest = np.max([o.shape[1:] for o in out], 0) if out and out[0].ndim > 1 else None
        if widest is not None:  # token logits of batches padded to different lengths: NaN beyond a batch's own
            out = [np.pad(o, [(0, 0)] + [(0, int(w) - d) for w, d in zip(widest, o.shape[1:])],
                          constant_values=np.nan) for o in out]
        self._ended()
        return in_row_order(out, order)

    def _trunk_cache(self, split: TrunkSplit, batcher: Batcher, key: str, progress: bool,
                     full_forward: bool = False, cut: Readout | None = None) -> TrunkCache:
        if key in self._trunks:
            self._trunks.move_to_end(key)
            self._served("trunk", key)
            return self._trunks[key]
        cache = TrunkCache(split, batcher, key, directory=getattr(self.args, "influence_cache_dir", None),
                           batch_size=self.args.influence_hvp_batch_size, progress=progress,
                           full_forward=full_forward, first_position=cut)
        self._trunks[key] = cache
        self._replaced("trunk", key)
        for old in self._evict_trunks():
            old.close()
        return cache

    def _evict_trunks(self) -> list[TrunkCache]:
        """Drop the least recently used trunk caches beyond `MAX_TRUNK_CACHES`; returns them, for the caller to close
        (a load closes them only once the whole folder was read)."""
        evicted = []
        while len(self._trunks) > MAX_TRUNK_CACHES:
            key, old = self._trunks.popitem(last=False)
            self._replaced("trunk", key)
            evicted.append(old)
        return evicted

    # ---- stage 2: test gradients ---------------------------------------------------------------------------
    def _test_gradients(self, call: _Call) -> torch.Tensor:
        """``(m, p)`` in the working dtype: one measurement gradient per test row, or one row with the gradient
        of their mean (``combine="mean"``, rows split over processes)."""
        bsz = self.args.influence_hvp_batch_size
        default = self.loss_fn is None and self.measurement_fn is None  # the default loss: it reads the rows' targets
        if call.combine == "mean":
            device = next(iter(call.params.values())).device
            total = torch.zeros(num_parameters(call.params), dtype=call.work_dtype, device=device)
            # the rows the mean is over: with the default loss, those with a target (an unlabelled row's loss is 0,
            # and the model's own loss leaves it out; counted, it scaled every value by the labelled share, 0.75)
            counted = torch.zeros((), dtype=torch.float64, device=device)

            def mine():
                for rows, batch in call.test.batches(call.test.length_order(D.shard(range(len(call.test)))), bsz):
                    total.add_(batch_gradient(call.fm, call.params, batch, measurement=True,
                                              reduction="sum").to(total.dtype))
                    counted.add_(len(rows) - (len(rows_without_targets(self.model, batch)) if default else 0))

            D.together(mine, "The test rows' mean gradient")
            count = float(D.all_reduce_sum(counted))
            if not count:
                raise ValueError("No test_dataset row has a target for the loss to read (every label -100), so the "
                                 "mean test loss is 0 and so would every influence be. Label the test rows.")
            call.info["mean_over_rows"] = int(count)  # (the card's count: the rows with a target, not every row)
            return (D.all_reduce_sum(total) / count).unsqueeze(0)
        gradients = []
        for rows, batch in call.test.batches(range(len(call.test)), bsz):
            if default:  # a row must have targets
                empty = rows_without_targets(self.model, batch)
                if empty:
                    raise ValueError(
                        f"test_dataset row {int(call.test.base_rows([rows[empty[0]]])[0])} leaves the loss no target "
                        "to read: every label -100 as collated (a causal LM's loss also skips the first position, as "
                        "each position predicts the next token: a one-token row, or one labelled at its first token "
                        "only), so every influence on it would be 0. Drop such rows, or label at least one token "
                        "(after the first, for a causal LM).")
            gradients.append(batch_gradient(call.fm, call.params, batch, measurement=True, reduction="none",
                                            row_batch=lambda i, rows=rows: call.test.batch([rows[i]])))
        return torch.cat(gradients).to(call.work_dtype)

    # ---- stage 3: s_test --------------------------------------------------------------------------------------
    def _full_hvp(self, call: _Call, batcher: Batcher, *, l2_term: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """``V ↦ H V`` with H the Hessian of the mean loss over every row of ``batcher`` (batches split over
        processes, summed with one all-reduce), in the working dtype; ``l2_term=False``: its data term alone."""
        bsz = self.args.influence_hvp_batch_size
        # chunks of rows alike in length (less padding), the longest first: the first chunk's graph is the one measured
        # for the budget (`KeptHessians`), and the budget keeps the graphs that cost the most to build again
        share = batcher.length_order(D.shard(range(len(batcher))))[::-1]
        chunks = [share[start : start + bsz] for start in range(0, len(share), bsz)]
        # beyond the budgets, built / collated again each product: bounded at any N
        kept = KeptHessians(call, FULL_HVP_GRAPH_BYTES, KeptBatches(FULL_HVP_KEPT_BYTES), "sum")
        n = len(batcher)

        def hvp(vectors: torch.Tensor) -> torch.Tensor:
            total = torch.zeros_like(vectors, dtype=call.work_dtype)

            def mine():
                for i in range(len(chunks)):
                    total.add_(kept.product(i, lambda i=i: batcher.batch(chunks[i]), vectors,
                                            l2_term=l2_term).to(call.work_dtype))

            D.together(mine, "A product with the mean Hessian")
            return D.all_reduce_sum(total).div_(n)  # (total, or the reduction's own copy: no fresh vector)

        return hvp

    def _s_test(self, call: _Call, v: torch.Tensor) -> torch.Tensor:
        args, lam = self.args, self.args.influence_lambda
        solver = args.influence_solver
        if solver == "exact":
            key = self._curvature_key(call, "exact")
            if self._exact is None or self._exact[0] != key:  # the Hessian, once per weights / data / loss
                self._exact = None  # the old one freed first: p² floats
                hessian = build_hessian(self._full_hvp(call, call.train), v.shape[1], dtype=call.work_dtype,
                                        device=v.device, progress=call.progress)
                if not torch.isfinite(hessian).all():  # (eigh: a bare "ill-conditioned" LinAlgError)
                    raise ValueError("The training Hessian holds inf/NaN: a training row's loss or its derivatives "
                                     "overflow (a float16 model: compute influence on model.float()) or the row holds "
                                     "inf/NaN. Check the training rows' losses.")
                self._exact = (key, *torch.linalg.eigh(hessian.double()))
                del hessian
            s_test, info = solve_decomposed(self._exact[1], self._exact[2], v, lam, built_in=call.work_dtype)
        elif solver == "cg":
            s_test, info = solve_cg(self._full_hvp(call, call.train), v, lam,
                                    max_iterations=args.influence_cg_max_iterations, tol=args.influence_cg_tol,
                                    progress=call.progress)
        elif solver == "arnoldi":
            solve = self._low_rank_solve(call, v)
            s_test, info = solve(v), dict(solve.info)
        else:
            s_test, info = self._lissa(call, v)
        call.info.update(info)
        if not bool(torch.isfinite(s_test).all()):
            half = _half_dtypes(call.params)
            raise FloatingPointError(
                f"s_test ({solver}) is not finite: the Hessian-vector products overflowed"
                + (f" in {', '.join(half)}" if half else "")
                + ". Compute influence on a float32 copy of the model (model.float()), or check the loss of the "
                "rows for inf/NaN."
            )
        return s_test

    def _curvature_key(self, call: _Call, *extra) -> tuple:
        return (call.model_key, call.train.fingerprint, len(call.train), tuple(call.names),
                self._functions["loss"], self._functions["collator"], self.args.influence_weight_decay,
                self.args.influence_seed, D.world()[1], str(call.train.device), *call.train.layout_key,
                *extra)  # (a model moved: rebuilt there)

    def _low_rank_solve(self, call: _Call, v: torch.Tensor) -> LowRankSolve:
        """The low-rank solve for this call's λ and L2 term, prepared once per low-rank Hessian and λ (with an L2
        term on some parameters only, its preparation reads the eigenvectors once more)."""
        values, vectors = self._low_rank_hessian(call, v)
        key = (self._low_rank[0], self.args.influence_lambda)
        if self._prepared_solve is None or self._prepared_solve[0] != key:
            l2 = call.fm.l2_mask(call.params).to(call.work_dtype) if call.fm.decayed else None  # 2·wd on the decayed
            solve = LowRankSolve(values, vectors, self.args.influence_lambda, l2)
            self._prepared_solve = (key, solve)
            factor = solve.info["arnoldi_truncation_factor"]
            if factor > ARNOLDI_TRUNCATION_WARNING:
                logger.warning(
                    f"influence_solver='arnoldi' at rank {self.args.influence_arnoldi_rank}: the smallest kept "
                    f"eigenvalue of the Hessian is {factor - 1:.3g}x the damping (λ = {self.args.influence_lambda:.4g}, "
                    "plus the L2 term's curvature) that every direction beyond the rank is solved with, as if flat; "
                    f"where those directions curve about as much, their share of s_test comes out up to {factor:.3g}x "
                    "too large. Raise influence_arnoldi_rank (until the smallest kept eigenvalue falls below λ) or "
                    "influence_damping, or compare with influence_solver='cg'.")
        return self._prepared_solve[1]

    def _low_rank_hessian(self, call: _Call, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-``influence_arnoldi_rank`` eigenpairs of the data term of H (the L2 term, known exactly, is
        left to the solve) over ``influence_arnoldi_rows`` seeded training rows (all by default), computed once
        per weights / data / loss and kept by the engine."""
        args = self.args
        # (v2: Lanczos restarts in a closed Krylov space, and the most negative Ritz pair is kept; v3: its start vector
        # the same whatever the dtype; v4: that start drawn in float32, so a Hessian saved from another start is not
        # served)
        key = self._curvature_key(call, "arnoldi (data term) v4", args.influence_arnoldi_rank,
                                  args.influence_arnoldi_rows)
        if self._low_rank is not None and self._low_rank[0] == key:
            self._served("low_rank", key)  # (a no-op unless it was read from disk)
        else:
            self._replaced("low_rank", key)
            rows = args.influence_arnoldi_rows
            batcher = call.train
            if rows is not None and rows < len(batcher):
                batcher = batcher.subset(np.sort(np.random.default_rng([args.influence_seed, 11]).permutation(
                    len(batcher))[:rows]))
            hvp = self._full_hvp(call, batcher, l2_term=False)
            steps = lanczos_steps(v.shape[1], args.influence_arnoldi_rank)
            with tqdm(total=steps, desc=f"Hessian eigenpairs (arnoldi, {len(batcher)} rows)", leave=False,
                      disable=not call.progress) as bar:
                def counted(x: torch.Tensor) -> torch.Tensor:
                    out = hvp(x.unsqueeze(0))[0]
                    bar.update()
                    return out

                self._low_rank = (key, low_rank_hessian(counted, v.shape[1], args.influence_arnoldi_rank,
                                                        dtype=call.work_dtype, device=v.device,
                                                        seed=args.influence_seed))
        return self._low_rank[1]

    def _lissa(self, call: _Call, v: torch.Tensor) -> tuple[torch.Tensor, dict]:
        args = self.args
        rank, world_size = D.world()
        repetitions = args.influence_repetitions or world_size
        depth, bsz, n = args.influence_recursion_depth, args.influence_batch_size, len(call.train)
        info: dict = {"lissa_total_repetitions": repetitions}
        if bsz > n:  # (B 100 over 40 rows ran unremarked)
            logger.warning_once(
                f"influence_batch_size={bsz} is more than the {n} training rows: each LiSSA step's batch holds rows "
                "twice or more (every row as often as the others over the steps) and costs more than a product with "
                f"the whole training set's Hessian. Use influence_batch_size={n} or less, or influence_solver='cg' "
                "(the mean Hessian itself).")
        top = None
        smallest = None
        if args.influence_check_convergence:
            check = self._check_lissa(call, v)
            info |= check
            top = check["lissa_batch_top_eigenvalue"]
            smallest = check.get("hessian_min_eigenvalue_confirmed", check["hessian_min_eigenvalue_estimate"])
        left_out = truncation_share(args.influence_damping, args.influence_scale, depth, smallest)
        info["lissa_truncation_share"] = left_out  # (below the warning's half, a table still says how far J went)
        if left_out > TRUNCATION_WARNING:  # (J 5 at damp 0.01 returned s_test 44% off the exact solve, unwarned)
            negative = smallest is not None and smallest < 0
            logger.warning_once(
                f"influence_recursion_depth={depth} with influence_damping={args.influence_damping:g}: LiSSA stops "
                f"after J steps, where along directions of little{' or negative' if negative else ''} curvature it "
                f"has summed only {1 - left_out:.0%} of its series (up to {left_out:.0%} of s_test missing there). "
                "The paper keeps J·damping at 5 (1000 × 5e-3): raise influence_recursion_depth to "
                f"{converging_depth(args.influence_damping, args.influence_scale, smallest)}"
                + (f" (the Hessian's smallest eigenvalue, ~{smallest:.3g}, slows it)" if negative else "")
                + ", or raise influence_damping (λ = damping × scale rises with it; lower influence_scale to keep λ).")
        mine = D.shard(range(repetitions))
        draws = {t: lissa_batches(n, bsz, depth, args.influence_seed, t) for t in mine}

        # batches drawn again (rows recur where B = 1 and J·T > N/2, and a later call with these weights and rows
        # draws the same ones) keep their graph while it fits, or else, within this call, their collated rows
        uses = Counter(rows.tobytes() for t in mine for rows in draws[t])
        kept = self._kept_lissa_graphs(call).for_call(call, KeptBatches(LISSA_BATCH_MEMO_BYTES))

        stacked = self._stacked_steps(call, len(mine), v, kept)

        def hvp_step(j: int, reps: Sequence[int], h: torch.Tensor, *, into: torch.Tensor, alpha: float,
                     carry: Carry) -> None:
            if stacked is not None and stacked.usable:
                groups = [draws[t][j - 1] for t in reps]
                if stacked.step(groups, h, into, alpha, carry):
                    for rows in groups:  # (drawn: a kept graph is kept for the draws still to come)
                        uses[rows.tobytes()] -= 1
                    return
                # it raised after its checks: this step and the rest of the call run one product at a time
            if into.data_ptr() == h.data_ptr():  # (in place, only where the steps stack: the products below read
                h = h.clone()  # h after the carry wrote it; from a step that stopped stacking on, a copy a step)
            carry.finish()  # (what a grouped step carried before it raised stays: carried once)
            for r, t in enumerate(reps):
                rows = draws[t][j - 1]
                key = rows.tobytes()
                uses[key] -= 1
                step = dict(again=uses[key] > 0, l2_term=False)  # the L2 term's diagonal: left to solve_lissa
                collate = functools.partial(call.train.batch, rows)
                if h.shape[1] == 1:  # one vector: the plain double backward, added into the next iterate
                    kept.accumulate(key, collate, h[r, 0], into[r, 0], alpha, **step)
                else:
                    into[r].add_(kept.product(key, collate, h[r], **step), alpha=alpha)

        diagonal = call.fm.l2_mask(call.params) if call.fm.decayed else None
        # an error in one process's repetitions (a divergence) stops every process; they waited for its sum
        try:
            estimate, lissa_info = D.together(
                lambda: solve_lissa(hvp_step, v, damping=args.influence_damping, scale=args.influence_scale,
                                    depth=depth, repetitions=mine, top_eigenvalue=top, progress=call.progress,
                                    diagonal=diagonal, accumulates=True, carries=True,
                                    in_place=v.shape[0] == 1 and stacked is not None),
                "LiSSA's repetitions")
        finally:
            kept.end_call()
        total = D.all_reduce_sum(estimate * len(mine)) / repetitions
        # stacked to the end in every process (a process holding one repetition has nothing to stack)
        info["lissa_stacked"] = bool(D.gather_rows(np.array([stacked is not None and stacked.usable])).all())
        # the table's diagnostics describe every repetition, not only this process's share
        ends = D.gather_rows(np.array([[lissa_info.get("lissa_final_norm", np.nan),
                                        lissa_info.get("lissa_min_alignment", np.nan)]]))
        # the repetitions' squared deviations from the mean of all: each process's about its own mean, and its own
        # mean's from the whole (none in a process without a repetition)
        # (on the device: NCCL reduces no CPU tensor; every process knows T, so all or none take part)
        spread = None
        if repetitions > 1:
            deviations = torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
            if mine:
                own = torch.linalg.vector_norm(estimate - total, dim=-1).double() ** 2
                deviations = lissa_info["lissa_deviations"] + len(mine) * own
            spread = repetition_spread(D.all_reduce_sum(deviations), total, repetitions)
        lissa_info = {"lissa_repetitions": repetitions, "lissa_steps": depth,
                      "lissa_final_norm": float(np.nanmax(ends[:, 0])),
                      "lissa_min_alignment": float(np.nanmin(ends[:, 1]))}
        if spread is not None:
            lissa_info["lissa_repetition_spread"] = spread
        # once per weights, data and settings (a loop over test points said it for each), by the main process
        if spread is not None and spread > SPREAD_WARNING:
            key = self._curvature_key(call, "spread warned", bsz, repetitions, depth, args.influence_damping,
                                      args.influence_scale)
            if key not in self._spread_warned and D.is_main_process():
                logger.warning(
                    f"LiSSA's {repetitions} repetitions disagree: their mean's standard error is {spread:.2g} of "
                    "s_test's norm, so s_test is that uncertain from sampling alone (each repetition rests on its last "
                    f"~1/damping = {1 / max(args.influence_damping, 1e-12):.3g} batches of {bsz} rows). Raise "
                    "influence_repetitions or influence_batch_size, lower influence_damping (raising "
                    "influence_recursion_depth to match), or use influence_solver='cg' (no sampling).")
            self._spread_warned.add(key)
        return total, info | lissa_info

    def _stacked_steps(self, call: _Call, repetitions: int, v: torch.Tensor,
                       kept: KeptHessians) -> _StackedSteps | None:
        """The stacked LiSSA steps of this call (`hf_fastif.stacked`), or None where ``influence_stack_repetitions``
        does not stack here or the stacked products failed their check before on these weights, rows and loss."""
        mode = getattr(self.args, "influence_stack_repetitions", "auto")
        table = grouped_modules(call.fm, call.names)
        grouped = not isinstance(table, str)
        if not stacks(mode, v.device, repetitions, grouped):
            return None
        key = self._curvature_key(call, "stacked lissa", str(call.work_dtype),
                                  None if call.fm.split is None else f"{call.fm.split.path}.{call.fm.split.first}",
                                  None if call.fm.readout is None else call.fm.readout.name)
        if self._stack_refused is not None and self._stack_refused[0] == key:
            return None

        def refused(why: str) -> None:
            self._stack_refused = (key, why)
            logger.info(f"LiSSA's repetitions run one product at a time: {why}.")

        if grouped:
            return _StackedSteps(GroupedHessian(call.fm, call.params, table=table), call.train,
                                 stack_tolerance(call.fm.model), refused, kept)
        why = unstackable_attention(call.fm.model)
        if why is not None:
            refused(f"the model cannot be stacked: {why}")
            return None
        return _StackedSteps(StackedHessian(call.fm, call.params), call.train, stack_tolerance(call.fm.model), refused)

    def _kept_lissa_graphs(self, call: _Call) -> KeptHessians:
        """LiSSA's kept first-backward graphs, held between calls on the same weights, rows, parameters, loss and
        collator (what keys the curvature estimates); built anew (the old ones freed) when any of them changed.

        Also keyed on the in-place version of every parameter and buffer of the model: a graph holds the tensors it
        read, and autograd refuses a graph whose saved tensor was written in place since, even with the same values
        (weights restored by ``load_state_dict``, as HANS correction restores them between its runs, made every later
        call raise "modified by an inplace operation" until `clear`)."""
        versions = tuple(in_place_version(t) for t in (*self.model.parameters(), *self.model.buffers()))
        key = self._curvature_key(call, "lissa graphs", str(call.work_dtype), versions)
        if self._lissa_graphs is None or self._lissa_graphs[0] != key:  # (the old graphs freed with their holder)
            self._lissa_graphs = (key, KeptHessians(call, LISSA_GRAPH_BYTES, KeptBatches(0), "mean", retain=True))
        return self._lissa_graphs[1]

    def _check_lissa(self, call: _Call, v: torch.Tensor) -> dict:
        """Estimate what LiSSA's convergence depends on, before the recursion: the top eigenvalue of B-row batch
        Hessians (the largest over `CHECK_BATCHES` seeded batches) and the smallest eigenvalue of the mean
        Hessian over `CHECK_ROWS` rows (Lanczos), confirmed on `CONFIRM_ROWS` rows in turn when it says H + λI is
        indefinite. Refuse what cannot converge; kept per weights / data / B."""
        args = self.args
        bsz, n = args.influence_batch_size, len(call.train)
        key = self._curvature_key(call, "lissa v4", bsz)  # (v4: batch runs without full reorthogonalisation)
        p, dtype, device = v.shape[1], call.work_dtype, v.device

        @functools.cache
        def workspace() -> torch.Tensor:  # the Lanczos runs' bases one after another in the same rows, made at first
            # need (fresh memory's first touch cost ~3 ms a 1.9M-entry row, each run)
            return torch.empty(CHECK_ITERATIONS + 2, p, dtype=dtype, device=device)

        def smallest(rows: np.ndarray) -> tuple[float, float]:
            mean_hvp = self._full_hvp(call, call.train.subset(np.sort(rows)))
            return extreme_eigenvalues(lambda x: mean_hvp(x.unsqueeze(0))[0], p, iterations=CHECK_ITERATIONS + 2,
                                       dtype=dtype, device=device, seed=args.influence_seed, workspace=workspace())

        self._served("curvature", key)
        if key not in self._curvature:
            rng = np.random.default_rng([args.influence_seed, 2**31 - 1])
            tops = []
            # each batch run's products written into one vector, Lanczos taking it in before asking for the next
            # (where a parameter's dtype differs, products as they come)
            reused = torch.empty(p, dtype=dtype, device=device) if all(
                t.dtype == dtype for t in call.params.values()) else None
            for b in range(CHECK_BATCHES):
                rows = rng.choice(n, size=min(bsz, n), replace=False)
                hessian = BatchHessian(call.fm, call.params, call.train.batch(rows))  # one graph for the run

                def hvp(x, hessian=hessian):
                    return hessian.product(x, out=reused).to(dtype)

                tops.append(extreme_eigenvalues(hvp, p, iterations=CHECK_ITERATIONS, dtype=dtype, device=device,
                                                seed=args.influence_seed + b, reorthogonalise=False,
                                                workspace=workspace())[1])
            reused = None  # (freed before the mean Hessian's run)
            sample = rng.permutation(n)[:CHECK_ROWS]
            low, high = smallest(sample)
            self._curvature[key] = {"lissa_batch_top_eigenvalue": max(tops), "hessian_min_eigenvalue_estimate": low,
                                    "hessian_max_eigenvalue_estimate": high, "lissa_check_batches": CHECK_BATCHES,
                                    "lissa_check_rows": len(sample)}
        found = self._curvature[key]
        scale, damp, lam = args.influence_scale, args.influence_damping, args.influence_lambda
        top, low = found["lissa_batch_top_eigenvalue"], found["hessian_min_eigenvalue_estimate"]
        limit = (2.0 - damp) * scale
        if top >= limit:
            raise LissaDivergenceError(
                f"influence_scale={scale:g} is too small for LiSSA to converge: each step needs the Hessian of its "
                f"{bsz}-row batch to have eigenvalues below (2 - damp)·scale = {limit:.4g}, and the largest seen on "
                f"{CHECK_BATCHES} sampled batches is about {top:.4g}. Use influence_scale >= {suggest_scale(top):.3g} "
                "(lower influence_damping to keep λ = damping × scale if needed), a larger influence_batch_size, or "
                "influence_solver='cg'.")
        rows = found["lissa_check_rows"]
        confirmed = found.setdefault("hessian_min_eigenvalue_confirmed_by_rows", {})
        for size in sorted({min(c, n) for c in CONFIRM_ROWS}):
            # cleared by a margin, or no more rows than the estimate already had; else confirmed on more rows both
            # ways: a small sample's Hessian is mostly more indefinite than the set's, but not always (a 32-row
            # sample's -0.055 against the set's -0.084 let λ = 0.069 through, and LiSSA came back 2x off)
            if low + lam > CONFIRM_MARGIN * lam or size <= rows:
                continue
            if str(size) not in confirmed:
                logger.info(f"LiSSA check: the {rows}-row Hessian's smallest eigenvalue ~{low:.4g} is "
                            f"{'below' if low + lam <= 0 else 'near'} -λ = {-lam:.4g}; confirming on {size} rows.")
                order = np.random.default_rng([args.influence_seed, 2**31 - 2]).permutation(n)  # nested sizes
                confirmed[str(size)] = smallest(order[:size])[0]  # str keys: the same after a JSON round trip
            low, rows = confirmed[str(size)], size
            found["hessian_min_eigenvalue_confirmed"], found["lissa_confirm_rows"] = low, rows
        if low + lam <= 0:
            raise LissaDivergenceError(
                f"H + λI is not positive definite: the smallest eigenvalue of the training Hessian is about {low:.4g} "
                f"(Lanczos on {rows} rows) and λ = {lam:.4g} (influence_damping × influence_scale), so LiSSA has no "
                "fixed point to converge to. The Hessian is indefinite (the model is not at a minimum); raise "
                f"influence_damping so that λ > {-low:.4g} (e.g. {suggest_scale(-low):.3g}).")
        if top > limit / 2:
            logger.warning(f"influence_scale={scale:g} is within 2x of LiSSA's convergence limit: batch Hessians reach "
                           f"~{top:.4g} vs (2 - damp)·scale = {limit:.4g}; a larger scale is safer.")
        return dict(found)

    # ---- stage 4: candidates ------------------------------------------------------------------------------
    def _candidates(self, call: _Call, s_test: torch.Tensor, method=None, k: int | None = None) -> list[np.ndarray]:
        """Candidate rows of each query (one query per test row, or one for the mean), by ``method`` (default: the
        engine's ``features`` or ``influence_knn_features``; ``"random"`` for a seeded uniform sample)."""
        queries = 1 if call.combine == "mean" else len(call.test)
        for_scores = method is None  # (candidate_recall names a method: it measures an index as it is, unwarned)
        k = call.k if method is None else k
        if k is None:
            call.info["candidates"] = "all"
            return [np.arange(len(call.cand))] * queries
        method = method or self.features or self.args.influence_knn_features
        if method == "random":
            rng = np.random.default_rng([self.args.influence_seed, 17])
            return [np.sort(rng.choice(len(call.cand), size=k, replace=False)) for _ in range(queries)]
        if method == "gradient":
            call.info["candidates"] = "gradient"
            found = gradient_candidates(self, call, s_test, k)
        else:
            call.info["candidates"] = "knn" if isinstance(method, str) else "knn (callable features)"
            found = self._knn_candidates(call, method, k)
        if for_scores:
            warn_short(found, k, len(call.cand), "The gradient index" if method == "gradient" else "The kNN index",
                       self.args.influence_knn_index)
        return found

    def _check_feature_index(self, call: _Call, method) -> None:
        """Refuse an ``influence_knn_index`` faiss cannot build over ``method``'s features of the candidate rows,
        from one row's features (their width) and random rows, without building the index."""
        split, (cand,) = _feature_path(call, method, call.cand)
        with torch.no_grad():
            width = extract_features(self.model, cand.subset([0]), method, batch_size=1, split=split,
                                     progress=False).shape[1]
        check_index_factory(self.args.influence_knn_index, len(call.cand), width, metric=faiss.METRIC_L2)

    def _check_feature_padding(self, call: _Call, method: Callable, batchers: list[tuple[Batcher, str]]) -> None:
        """Refuse a ``features=`` callable whose vector for a row changes with the padding around it (a mean over
        every position, padding included): rows are batched with others, by process shares, so its candidates
        depended on the batch size and the number of processes, without a word. Probed as the loss is (the
        narrowest row alone and padded next to the widest), once per model, data and function."""
        for batcher, name in batchers:
            batcher = _plain(batcher, padded=True)  # (as `_feature_path` hands the callable its batches)
            key = ("features", call.model_key, batcher.fingerprint, self._functions["collator"],
                   self._functions["features"])
            if key in self._padding_checked:
                continue
            for short, long in batcher.padding_probes(PADDING_PROBE_ROWS):
                with torch.no_grad():
                    alone = method(self.model, batcher.batch([short], trunk=False)).detach().double().cpu()
                    padded = method(self.model, batcher.batch([short, long], trunk=False)).detach().double().cpu()
                if alone.ndim != 2 or padded.ndim != 2 or alone.shape[1] != padded.shape[1]:
                    continue  # (a width that grows with the padding: extract_features names it)
                if not bool(torch.isfinite(alone).all()):
                    continue  # not the padding's doing: extract_features names the rows that are not finite
                error = relative_difference(padded[0], alone[0], floor=1e-12)
                if not error <= PADDING_TOLERANCE:
                    row, other = (int(r) for r in batcher.base_rows([short, long]))
                    raise ValueError(
                        f"The features= callable gives {name} row {row} another vector when it is padded next to "
                        f"row {other} (relative difference {error:.2g}): it reads the padding, so the kNN candidates "
                        "would depend on the batch size and the number of processes. Leave the padding out (e.g. a "
                        "mean weighted by batch['attention_mask']).")
            self._padding_checked.add(key)

    def _knn_candidates(self, call: _Call, method, k: int) -> list[np.ndarray]:
        if k >= len(call.cand):  # every row, as the gradient index gives them (an IVF / HNSW search can return fewer)
            return [np.arange(len(call.cand), dtype=np.int64)] * (1 if call.combine == "mean" else len(call.test))
        args = self.args
        bsz = args.influence_scoring_batch_size
        key = (call.model_key, call.cand.fingerprint, len(call.cand), self._functions["collator"],
               method if isinstance(method, str) else self._functions["features"], args.influence_knn_index,
               D.world()[1], *call.cand.layout_key)
        split, (cand, test) = _feature_path(call, method, call.cand, call.test)
        if callable(method):
            self._check_feature_padding(call, method, [(call.cand, "candidate"), (call.test, "test")])
        with torch.no_grad():
            if self._feature_index is None or self._feature_index[0] != key:
                self._feature_index = None  # one index at a time: features of a large training set are big
                mine = cand.subset(D.shard(range(len(cand)))) if D.world()[1] > 1 else cand
                feats = D.gather_rows(D.together(
                    lambda: extract_features(self.model, mine, method, batch_size=bsz, split=split,
                                             progress=call.progress, desc="kNN features"),
                    "The candidates' kNN features"))
                self._feature_index = (key, build_index(feats, args.influence_knn_index), feats.shape[1])
            test_feats = extract_features(self.model, test, method, batch_size=bsz, split=split, progress=False,
                                          desc="test features")
        if test_feats.shape[1] != self._feature_index[2]:  # (faiss: a bare AssertionError)
            raise ValueError(f"The test rows' kNN features have {test_feats.shape[1]} columns, the candidates' "
                             f"{self._feature_index[2]}: a features= callable must give every row a vector of one width "
                             "(not one that grows with the padding).")
        if call.combine == "mean":
            test_feats = test_feats.mean(0, keepdims=True)
        _, ids = search(self._feature_index[1], test_feats, k)
        return [np.sort(row[row >= 0]).astype(np.int64) for row in ids]

    # ---- stage 5: scores --------------------------------------------------------------------------------------
    def _scores(self, call: _Call, queries: list[np.ndarray], s_test: torch.Tensor):
        """Influence of each (query, candidate) pair; each process scores its share of the candidate rows and the
        ``(pair, value)`` rows are gathered."""
        pair_tests = np.concatenate([np.full(len(rows), t, dtype=np.int64) for t, rows in enumerate(queries)])
        pair_rows = np.concatenate(queries)
        mine = np.flatnonzero(np.isin(pair_rows, D.shard(np.unique(pair_rows))))
        local = D.together(lambda: score_pairs(call.fm, call.params, call.cand, pair_tests[mine], pair_rows[mine],
                                               s_test, batch_size=self.args.influence_scoring_batch_size,
                                               method=self.args.influence_scoring, progress=call.progress),
                           "Scoring the candidates")
        gathered = D.gather_rows(np.column_stack([mine.astype(np.float64), local]))
        values = np.empty(len(pair_rows))
        values[gathered[:, 0].astype(np.int64)] = gathered[:, 1]
        return pair_tests, pair_rows, values

    # ---- stage 6: the table's metadata ---------------------------------------------------------------------
    def _metadata(self, call: _Call, train_dataset, test_dataset, candidate_dataset) -> dict:
        model, args = self.model, self.args
        config = getattr(model, "config", None)
        return {
            "library_version": library_version(),
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "name_or_path": getattr(config, "_name_or_path", None) or type(model).__name__,
                "revision": getattr(config, "_commit_hash", None),
                "class": type(model).__name__,
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "num_influence_parameters": num_parameters(call.params),
                "fingerprint": call.model_fingerprint,  # (recorded: the weights, not the cache key)
            },
            "train_data": describe_data(train_dataset, call.train.fingerprint),
            "test_data": describe_data(test_dataset, call.test.fingerprint),
            "candidate_data": describe_data(candidate_dataset, call.cand.fingerprint),
            "combine": call.combine,
            "settings": args.influence_settings() | {"influence_knn_k_used": call.k}
            | ({"label_smoothing_factor": self._label_smoothing()} if self._label_smoothing() else {}),
            "lambda": args.influence_lambda,
            "num_processes": D.world()[1],
            # a table of another loss or test quantity said nothing of it (its values are another quantity)
            "functions": {"loss_fn": _describe_function(self.loss_fn, self._functions["loss"]),
                          "measurement_fn": _describe_function(self.measurement_fn, self._functions["measurement"])},
            "semantics": SEMANTICS if self.measurement_fn is None else SEMANTICS | MEASUREMENT_SEMANTICS,
            "diagnostics": call.info | call.timer.seconds,
        }


def _data_description(name: str, batcher: Batcher) -> dict:
    """What processes compare of a dataset, field by field, so that a refusal names what differs (the number of rows,
    the columns read and their order, the format) before the hash of the values."""
    return {f"{name} rows": len(batcher), f"{name} columns": list(batcher.dataset.column_names),
            f"{name} format": batcher.dataset.format.get("type"), f"{name} values (sha256)": batcher.fingerprint}


def _per_row_logits_error(alone, padded) -> float:
    """How far a per-row head's logits ``(b, classes)`` move when the row is padded (the outputs of the row alone and
    padded first in a batch), relative to their own scale (0 for other outputs). The loss alone hides it where the
    head is fresh: a classifier at initialisation (std 0.02) keeps its loss near log k whatever its inputs, so logits
    that moved by 30-300% with left padding moved the loss by less than the tolerance, while the gradients influence
    uses moved a lot (12% off between batch sizes 1 and 10, pretrained MiniLM with a new head padded on the left)."""
    alone, padded = getattr(alone, "logits", None), getattr(padded, "logits", None)
    if not (isinstance(alone, torch.Tensor) and isinstance(padded, torch.Tensor) and alone.dim() == 2
            and padded.dim() == 2 and alone.shape[1] == padded.shape[1] and alone.is_floating_point()):
        return 0.0
    alone, padded = alone.double(), padded[:1].double()
    return relative_difference(padded, alone, floor=1e-12)


def _trailing_probes(batcher: Batcher) -> list[list[int]]:
    """The probe batches of `InfluenceEngine._skips_padding`: up to `TRAILING_PROBE_ROWS` rows of different real
    lengths (of a stored attention mask, else of the stored ids), each alone: the shortest, the longest, rows between
    them, and a row of each parity; then the padding check's pairs (the narrowest next to the widest); then the first
    row alone (a dataset of one row has no pair)."""
    lengths = None
    if len(batcher) > 1:
        lengths = batcher.stored_lengths("attention_mask", "tokens")
        lengths = batcher.stored_lengths() if lengths is None else lengths
    singles: list[int] = []
    if lengths is not None and len(lengths):
        distinct, first = np.unique(lengths, return_index=True)  # (the shortest first: where it has no trailing
        # padding, `InfluenceEngine._skips_padding` probes no more)
        picks = set(np.linspace(0, len(distinct) - 1, min(TRAILING_PROBE_ROWS, len(distinct))).round().astype(int))
        for parity in (0, 1):  # (a model that pools by pairs of positions changes with the length's parity)
            same = np.flatnonzero(distinct % 2 == parity)
            if len(same) and not any(distinct[i] % 2 == parity for i in picks):
                picks.add(int(same[0]))
        singles = [int(first[i]) for i in sorted(picks)]
    pairs = [list(pair) for pair in batcher.padding_probes(PADDING_PROBE_ROWS)]
    return [[row] for row in singles] + pairs + [[0]] * (len(batcher) > 0)


def _outputs_difference(whole, cut, batch: Mapping) -> float:
    """The largest relative difference between the floating tensors of two forwards' outputs, one of a batch with
    its trailing padding and one of ``batch``, the same without: tensors of the same shape whole, those laid out by
    position (``(sequences, positions, ...)``) at the positions ``batch``'s attention mask marks as tokens; others
    (attention maps) are not compared. 0 where nothing is comparable."""
    mask = batch.get("attention_mask")
    real = mask.reshape(-1, mask.shape[-1]).bool() if isinstance(mask, torch.Tensor) else None

    def tensors(outputs):
        if isinstance(outputs, torch.Tensor):
            return [outputs]
        values = outputs.values() if isinstance(outputs, Mapping) else outputs if isinstance(
            outputs, (tuple, list)) else ()
        return [t for v in values for t in tensors(v)]

    worst = 0.0
    for a, b in zip(tensors(whole), tensors(cut)):
        if not (a.is_floating_point() and b.is_floating_point()):
            continue
        if a.shape == b.shape:
            worst = max(worst, relative_difference(b.double(), a.double()))
        elif (real is not None and a.dim() >= 2 and a.shape[0] == b.shape[0] == real.shape[0]
              and b.shape[1] == real.shape[1] <= a.shape[1] and a.shape[2:] == b.shape[2:]):
            worst = max(worst, relative_difference(b[real].double(), a[:, : b.shape[1]][real].double()))
    return worst


def _feature_path(call: _Call, method, *batchers: Batcher) -> tuple:
    """``(split, batchers)`` that ``method``'s features are extracted through: the call's trunk split for a named
    method, the full model (batchers without their trunk states) for a user's callable, and for a method the trunk's
    first-position cut was not checked on (`InfluenceEngine._first_position_cut`)."""
    split = call.fm.split if isinstance(method, str) else None
    cut = any(b.trunk is not None and b.trunk.per_row for b in batchers)
    if cut and method not in call.feature_methods:
        split = None
    return split, tuple(b if split is not None else _plain(b, padded=not isinstance(method, str)) for b in batchers)


def _plain(batcher: Batcher, padded: bool = False) -> Batcher:
    """``batcher`` without its trunk states, and with ``padded`` its batches collated with their trailing padding
    (a ``features=`` callable, which the trailing-padding probe does not see, gets the batches it got before)."""
    view = batcher.with_trunk(None)
    view.skip_padding = batcher.skip_padding and not padded
    return view


def _same_features(model: nn.Module, method: str, cut: Readout, batches: Sequence[dict]) -> bool:
    """Whether ``method``'s kNN features of each batch are the same with the last layer cut at ``cut`` (the whole
    model either way) as without, within `hf_fastif.readout.READOUT_TOLERANCE`."""
    for batch in batches:
        try:
            with torch.no_grad():
                whole = model_features(model, batch, method)
                with cut.active():
                    part = model_features(model, batch, method)
        except (RuntimeError, IndexError, ValueError, TypeError):
            return False
        if whole.shape != part.shape or not relative_difference(part.double(), whole.double()) <= READOUT_TOLERANCE:
            return False
    return True


def _describe_function(function, fingerprint: str) -> dict | None:
    """A table's record of a ``loss_fn`` / ``measurement_fn`` of one's own (None: the default)."""
    if function is None:
        return None
    return {"name": getattr(function, "__qualname__", type(function).__name__),
            "module": getattr(function, "__module__", None), "fingerprint": fingerprint}


CACHE_MANIFEST = "hf_fastif_caches.json"
CACHE_LOCK = ".hf_fastif_caches.lock"


@contextlib.contextmanager
def _reading_lock(folder: Path):
    """The folder's cache lock while reading it; none where it cannot be made (a read-only folder, which no
    `save_caches` can write meanwhile either)."""
    try:
        lock = FileLock(str(folder / CACHE_LOCK))
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _freeze(value):
    """JSON lists back into the tuples the cache keys are made of."""
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as numpy without loss (bfloat16, which numpy lacks, as float32: exact)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def verification_rows(batcher: Batcher) -> list[int]:
    """Rows a trunk cache is checked on: the first 8, and the shortest and longest rows (`Batcher.padding_probes`:
    in one batch, the shortest is padded to the longest)."""
    return sorted(set(range(min(8, len(batcher)))) | {i for pair in batcher.padding_probes(PADDING_PROBE_ROWS)
                                                       for i in pair})


def _padding_cause(model: nn.Module, batch: dict) -> str:
    """What to do about a row whose loss changes with padding, from what the padded ``batch`` shows."""
    labels, mask = batch.get("labels"), batch.get("attention_mask")
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    # token labels laid out like the inputs (a decoder-only model's), position by position
    aligned = (not encoder_decoder and isinstance(labels, torch.Tensor) and isinstance(mask, torch.Tensor)
               and labels.shape == mask.shape)
    if aligned and bool(((mask == 0) & (labels != -100)).any()):
        return ("Its padding positions carry labels other than -100 (the collator pads the labels with the pad "
                "token id), so the loss reads them: pad labels with -100 (DataCollatorForLanguageModeling(tokenizer, "
                "mlm=False), DataCollatorForSeq2Seq, or DataCollatorForTokenClassification).")
    if (aligned and shifts_labels(model) and labels.dim() == 2
            and bool(((labels[:, 1:] != -100) & (mask[:, :-1] == 0)).any())):
        return ("It is a causal LM padded on the left, and its first token is a target predicted from a padding "
                "position (each position predicts the next token; alone, that token has nothing before it and is "
                "not a target), so its loss changes with its batch even with position ids: pad on the right "
                "(tokenizer.padding_side = 'right').")
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if (encoder_decoder and isinstance(labels, torch.Tensor) and labels.dim() == 2 and pad is not None
            and pad != getattr(config, "eos_token_id", None) and bool((labels[:, [0, -1]] == pad).any())):
        # targets are padded apart from the inputs, so the mask above does not show them
        return ("Its targets are padded with the pad token id (DataCollatorForSeq2Seq(label_pad_token_id=...) "
                "other than -100), so the loss reads the padding as targets: pad labels with -100 "
                "(DataCollatorForSeq2Seq's default).")
    if encoder_decoder and isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] > 1:
        pads = labels == -100
        if bool((pads[:, 0] & ~pads[:, -1]).any()):
            return ("Its targets are padded on the left (DataCollatorForSeq2Seq pads labels on "
                    "tokenizer.padding_side), so the decoder reads padding before them: pad on the right "
                    "(tokenizer.padding_side = 'right').")
    return ("The usual causes: left padding without position ids (GPT-2 and other absolute-position models count "
            "positions from the first pad): pad on the right (tokenizer.padding_side = 'right'), or use a collator "
            "that adds position_ids = attention_mask.cumsum(-1) - 1; or a loss that reads the padded positions (a "
            "softmax over every position, as question answering's start / end logits): pass a loss_fn that masks "
            "them, e.g. logits.masked_fill(batch['attention_mask'] == 0, -1e4).")


def _recall(reference: np.ndarray, found: list[np.ndarray], ns: Sequence[int]) -> dict:
    """Mean over queries of the share of the reference's n most helpful / harmful rows among the candidates."""
    out = {}
    for n in ns:
        top = min(int(n), reference.shape[1])  # n above the number of rows: all of them
        helpful = [np.isin(np.argsort(ref, kind="stable")[:top], rows).mean() for ref, rows in zip(reference, found)]
        harmful = [np.isin(np.argsort(-ref, kind="stable")[:top], rows).mean() for ref, rows in zip(reference, found)]
        out[f"recall@{n} helpful"], out[f"recall@{n} harmful"] = float(np.mean(helpful)), float(np.mean(harmful))
    return out


MEASUREMENT_SEMANTICS = {
    "influence": "-grad L(z_train) . s_test, s_test = (H + lambda I)^-1 grad m(z_test), m the measurement_fn "
                 "(metadata['functions']); negative = upweighting the row lowers m (helpful when lower m is better)",
}
SEMANTICS = {
    "influence": "-grad L(z_train) . s_test, s_test = (H + lambda I)^-1 grad L(z_test); negative = helpful",
    "hessian": "Hessian of the mean training loss over the selected parameters (LiSSA: sampled B-row batches)",
    "lissa_steps": "exactly J steps per repetition (the 2021 reference code runs J + 2)",
    "lissa_batches": "one batch sequence per (seed, repetition), shared by every test row of a call (the "
                     "reference code draws per s_test): errors are correlated across the test rows of one call",
    "causal_lm_loss": "each row's mean token loss (HF's model loss is the mean over all tokens of the batch)",
}
"""What the numbers mean, recorded in every table's metadata (see docs/safety.md)."""


def describe_data(dataset: Dataset, sha256: str | None = None) -> dict:
    """Name, split, datasets fingerprint and size of a dataset, for a table's metadata, and ``sha256``: the hash of
    the values of the columns read (`Batcher.fingerprint`), which tells apart rows that share a datasets
    fingerprint (a ``map`` that draws at random, run twice)."""
    info = getattr(dataset, "info", None)
    return {
        "name": getattr(info, "dataset_name", None) or getattr(info, "builder_name", None),
        "split": str(dataset.split) if getattr(dataset, "split", None) is not None else None,
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "num_rows": len(dataset),
        **({"sha256": sha256} if sha256 is not None else {}),
    }


def lissa_batches(num_rows: int, batch_size: int, depth: int, seed: int, repetition: int) -> np.ndarray:
    """Row indices ``(depth, batch_size)`` drawn by repetition ``repetition``: successive shuffles of the
    training set, seeded by ``(seed, repetition)`` only, so any process can draw any repetition."""
    rng = np.random.default_rng([seed, repetition])
    need = depth * batch_size
    order = np.concatenate([rng.permutation(num_rows) for _ in range(-(-need // num_rows))])
    return order[:need].reshape(depth, batch_size)


def _half_dtypes(params: Mapping[str, torch.Tensor]) -> list[str]:
    """The half-precision dtypes among ``params`` (``["bfloat16"]``): the influence parameters' for overflow
    messages, the model's for the precision warning."""
    return sorted(str(d).removeprefix("torch.") for d in {p.dtype for p in params.values()} & set(HALF_DTYPES))
