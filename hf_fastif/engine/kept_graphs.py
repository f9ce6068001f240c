"""First-backward graphs and collated batches kept between Hessian-vector products, within a budget of bytes.

A product ``H v`` with a batch's Hessian is a forward, a first backward that keeps its graph, and a second backward
through it (`hf_fastif.hvp.BatchHessian`). Where the same batch is multiplied again (CG's iterations and the
Lanczos steps over the mean Hessian's chunks, LiSSA's rows drawn again, and a held engine's later call on the same
weights and rows) the graph is kept, and only the second backward is paid. `KeptHessians` keeps graphs by key up to a
budget, measured on the first graph it keeps; `KeptBatches` keeps the collated batches of those it does not. The
budgets themselves belong to their users (`hf_fastif.engine.s_test`'s ``*_BYTES``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from transformers.utils import logging

from ..grouped_products import GroupedHessian, PartlyAdded
from ..hvp import BatchHessian
from ..solvers import Carry
from .call import Call

logger = logging.get_logger(__name__)

TENSOR_OVERHEAD_BYTES = 1024
"""What a kept tensor costs beside its data (the tensor object, its storage, the allocator's rounding), as counted
against the budgets of kept batches: single-row batches of short rows cost ~6x their data."""


def batch_bytes(batch: Mapping) -> int:
    """The memory a kept collated batch holds, as counted against a `KeptBatches` budget (s_test's
    `FULL_HVP_KEPT_BYTES` / `LISSA_BATCH_MEMO_BYTES`), and what `KeptHessians` scales a graph's measured size by."""
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

    def __init__(self, call: Call, budget: int, batches: KeptBatches, reduction: str, *, retain: bool = False):
        self.call, self.room, self.batches, self.reduction = call, budget, batches, reduction
        self.budget = budget
        self.retain = retain  # keep every graph that fits, for later calls too (the owner keys this object)
        self.kept: dict = {}  # key -> (graph, bytes counted)
        self._units: dict[str, tuple[int, int]] = {}  # kind -> (graph bytes, batch bytes) of the graph measured

    def for_call(self, call: Call, batches: KeptBatches) -> KeptHessians:
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
