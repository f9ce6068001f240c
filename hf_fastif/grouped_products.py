"""LiSSA's repetitions of one step as one batch, without vmap: ``H_r @ v_r`` for R groups of rows at once.

At a step, repetition r multiplies its iterate by the Hessian of its own sampled rows. Collated as one batch of R
groups, one forward and one first backward serve all R, but autograd's parameter gradient is the sum over the
groups, so a second backward through it gives ``Σ_r H_r v_r``, not each. Where every influence parameter sits in a
module whose gradient is a sum of per-row terms of the module's input ``x`` and output gradient ``g = ∂L/∂y``, the
products can be taken per group from activations instead (as `hf_fastif.linear_products` does for one vector):

* ``nn.Linear``, ``y = x Wᵀ + b``: ``∇W = gᵀx``; ``(H v)_W = ȳᵀx + gᵀx̄``, ``(H v)_b = Σ ȳ``;
* ``nn.LayerNorm``, ``y = x̂ ⊙ γ + β`` with ``x̂ = (x - μ)/σ`` per position: ``∇γ = Σ g ⊙ x̂``;
  ``(H v)_γ = Σ ȳ ⊙ x̂ + g ⊙ A x̄``, ``(H v)_β = Σ ȳ``, with ``A d = (d - mean(d) - x̂·mean(x̂ ⊙ d)) / σ`` the
  normalisation's (symmetric) Jacobian;
* ``nn.Embedding``, ``y = E[ids]``: ``∇E = Σ_t e_{ids_t} g_tᵀ`` (not at ``padding_idx``); ``(H v)_E`` adds ``ȳ_t``
  into row ``ids_t``.

``ȳ`` and ``x̄`` are what the second backward of ``s = Σ_r ∇L_r · v_r`` brings to the module's output and to the
first backward's gradient at its input (where the parameter enters the first backward once more: ``g W`` for a
linear layer, ``A (g ⊙ γ)`` for a LayerNorm). Written through the activations, ``s`` is a sum over rows, each row
dotted with its own group's vector, so one second backward of the R-group batch gives every group's ``ȳ`` and ``x̄``,
and each group's blocks are assembled from its own rows (one ``baddbmm_`` per linear layer for all groups).

Used only where this is exact: every influence parameter belongs to a module that is exactly one of the three
classes, with the class's ``forward`` (not replaced on the class since import, nor on the instance), no hooks (its
own or global), the module called once on the batch with its input and output laid out by rows and not written in
place afterwards, no tied parameter, a LayerNorm over the last dimension with an affine weight, an embedding without
``max_norm`` / ``scale_grad_by_freq`` / ``sparse``, and the batch's autograd graph reading each parameter through
exactly one edge. Otherwise `GroupedProducts.build` raises `hf_fastif.stacked.NotStackable`, and the engine runs the
repetitions one product at a time. "Laid out by rows" is read from shapes: a tensor whose first dimension is not the
row count is refused, and one where another dimension (a float tensor's features aside) has as many entries too is
ambiguous (`AmbiguousBatch`: MPNet's relative position buckets are ``(s, s)`` and XLNet's states sequence-first, so
with a padded length equal to the row count they passed, 0.3-100% off, in a review's repros), and that batch runs
one product at a time. An embedding read with one row of ids for all rows (BERT's absolute positions) is given
them for each row only where its output is added to other tensors (else refused: a model that reads ``emb(ids)[0]``
would put every group's gradient on the first). Rows must not interact in the forward (no batch norm; an attention
mask keeps padded positions out), which the engine's check against the products taken one group at a time sees on
the first step (`hf_fastif.engine.s_test`'s stacked steps). A stack of m vectors a group takes one second backward per
vector (one batched backward for all m where the parameters sit next to the loss, `NEAR_LOSS_NODES`), each added
into the caller's vectors as it comes; a failure after the first raises `PartlyAdded`. Given
LiSSA's `hf_fastif.solvers.lissa.Carry`, each parameter's range of the next iterate is carried (``v + (1 - damp)·h``)
just before its block is first added, while it is in cache, instead of in a pass over the whole iterate ahead. With
half-precision LayerNorms the normalised inputs are recomputed in float32 (autograd saves float32 statistics); the
products still round apart from autograd's by ~1-2% there (each as far from float64's), so the engine's 1e-2 check
may refuse grouping for such a model, which then runs one product at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from .hvp import count_saved_bytes, fresh_leaves
from .linear_products import (
    add_weight_block,
    any_global_hooks,
    cast_like,
    graph_edges,
    graph_reads,
    is_plain_layer,
)
from .loss import FunctionalModel
from .params import flat_ranges, unflatten, unflatten_cast
from .solvers.lissa import Carry
from .stacked import GroupsHessian, NotStackable
from .utils import HALF_DTYPES, batched_grad

ROUTED_MODULES = (nn.Linear, nn.LayerNorm, nn.Embedding)
NEAR_LOSS_NODES = 8
"""A graph whose influence parameters sit in modules with at most this many autograd nodes between each one's output
and the loss (a classification head: 2-4; BERT's pooler with its classifier: 7) takes its m vectors a group in one
batched second backward (`GroupedProducts.accumulate_many`); where a module sits deeper (the last layer's output
projection: 11, the embeddings: ~100), one per vector."""
_FORWARDS = {kind: kind.forward for kind in ROUTED_MODULES}  # (a class-level patch after import is refused)


class PartlyAdded(RuntimeError):
    """The products' assembly failed after adding some of them into the caller's vectors (which are then unusable)."""


class AmbiguousBatch(NotStackable):
    """This batch's shapes cannot say which dimension holds the rows (a routed tensor's other dimension has as many
    entries as there are rows: a padded length equal to the row count); another batch may. The engine runs this step
    one product at a time and goes on grouping."""


def grouped_modules(fm: FunctionalModel, names: Sequence[str]) -> dict[nn.Module, dict[str, str]] | str:
    """``{module: {"weight": name, "bias": name}}`` (the influence parameters each module holds) where every
    influence parameter in ``names`` sits in a module this route takes; else why not (a string)."""
    selected, owned, table = set(names), set(), {}
    tied = set(fm.aliases) | {a for group in fm.aliases.values() for a in group}
    for path, module in fm.model.named_modules():
        if type(module) not in ROUTED_MODULES:
            continue
        mine = {}
        for kind in ("weight", "bias"):
            name = f"{path}.{kind}" if path else kind
            if getattr(module, kind, None) is not None and name in selected:
                mine[kind] = name
        if not mine:
            continue
        why = _unfit(module)
        if why is not None:
            return f"{path}: {why}"
        if any(n in tied for n in mine.values()):
            return f"{path}: its parameters are tied to others"
        table[module] = mine
        owned |= set(mine.values())
    missing = [n for n in names if n not in owned]
    if missing:
        return f"{missing[0]} is not held by an nn.Linear, nn.LayerNorm or nn.Embedding"
    return table


def _layout(t: torch.Tensor, rows: int) -> str:
    """``"rows"`` where ``t``'s first dimension is the batch's rows, ``"other"`` where it cannot be, ``"ambiguous"``
    where another dimension but a float tensor's last (its features) has as many entries too."""
    if t.dim() == 0 or t.shape[0] != rows:
        return "other"
    inner = t.shape[1:-1] if t.is_floating_point() else t.shape[1:]
    return "ambiguous" if rows in inner else "rows"


def _unfit(module: nn.Module) -> str | None:
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1 or module.weight is None:
            return "a LayerNorm over more than the last dimension, or without an affine weight"
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return "an embedding with max_norm, scale_grad_by_freq or sparse gradients"
    return None


@dataclass
class _Use:
    """One module's call on the batch, grouped: ``x`` and ``y`` as recorded, their values as ``(R, n, features)``
    (``ids`` ``(R, n)`` for an embedding), the first backward's ``g`` at y and the index of its gradient at x."""

    module: nn.Module
    names: dict[str, str]
    x: torch.Tensor
    y: torch.Tensor
    versions: tuple[int, int]
    g: torch.Tensor | None = None
    input_gradient: int | None = None
    xs: torch.Tensor | None = None  # (R, n, in): x by group (x̂ for a LayerNorm; ids (R, n) for an embedding)
    gs: torch.Tensor | None = None  # (R, n, out)
    scale: torch.Tensor | None = None  # a LayerNorm's 1/σ, (R, n, 1)
    kept: torch.Tensor | None = None  # an embedding's positions not at padding_idx, (R, n, 1)


class GroupedProducts:
    """One batch of R groups of rows (group r's rows together), its forward and first backward, for the products
    ``H_r v_r`` of each group's mean loss (without the L2 term) with its own vector, as the module docstring says.
    `build` raises `hf_fastif.stacked.NotStackable` where the route does not apply."""

    def __init__(self, uses: list[_Use], input_gradients: list[torch.Tensor], groups: int):
        self._uses, self._input_gradients, self._groups = uses, input_gradients, groups
        self.batches_vectors = False  # (m vectors in one batched second backward: set by `_build`, `NEAR_LOSS_NODES`)
        self.saved_bytes: int | None = None  # (measured where built with measure=True)

    @classmethod
    def build(cls, fm: FunctionalModel, leaves: Mapping[str, torch.Tensor], batch, groups: int, rows: int, *,
              measure: bool = False, table: dict | str | None = None) -> GroupedProducts:
        """The batch's forward and first backward (``rows`` rows in ``groups`` groups). An embedding read with one row
        of indices for every row (BERT's position ids, ``(1, s)``) is given them repeated for each row: the same
        values, and a gradient per row. ``measure``: count `saved_bytes` (what autograd saved beside the parameters,
        and the normalised inputs held here), as `hf_fastif.hvp.BatchHessian` does. ``table``: `grouped_modules`'
        answer for these parameters, where the caller found it already."""
        saved: dict[int, int] = {}
        with count_saved_bytes(leaves, saved) if measure else contextlib.nullcontext():
            graph = cls._build(fm, leaves, batch, groups, rows,
                               grouped_modules(fm, list(leaves)) if table is None else table)
        if measure:
            graph.saved_bytes = sum(saved.values()) + sum(
                t.untyped_storage().nbytes() for u in graph._uses for t in (u.xs, u.scale)
                if isinstance(u.module, nn.LayerNorm))
        return graph

    @classmethod
    def _build(cls, fm: FunctionalModel, leaves: Mapping[str, torch.Tensor], batch, groups: int, rows: int,
               table: dict | str) -> GroupedProducts:
        if isinstance(table, str):
            raise NotStackable(table)
        if any_global_hooks() or not all(is_plain_layer(m) for m in table) or any(
                kind.forward is not forward for kind, forward in _FORWARDS.items()):
            raise NotStackable("a module hook or a replaced forward is in place")
        uses: list[_Use] = []
        expanded: list[nn.Module] = []

        def record(module, args, output):
            x = args[0] if args else None
            if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor)):
                raise NotStackable(f"a {type(module).__name__} called with keywords or returning a structure")
            uses.append(_Use(module, table[module], x, output, (x._version, output._version)))

        def by_rows(module, args):
            ids = args[0] if args else None
            if isinstance(ids, torch.Tensor) and ids.dim() >= 1 and ids.shape[0] == 1 and rows > 1:
                expanded.append(module)
                return (ids.expand(rows, *ids.shape[1:]), *args[1:])
            return None

        handles = [module.register_forward_hook(record) for module in table]
        handles += [module.register_forward_pre_hook(by_rows) for module in table if isinstance(module, nn.Embedding)]
        try:
            losses, _ = fm.values_without_l2(leaves, batch)
        except Exception as err:
            if not expanded:
                raise
            raise NotStackable(f"an embedding read with one row of ids for all rows, given them for each row, broke "
                               f"the forward ({type(err).__name__}: {str(err)[:200]})") from err
        finally:
            for handle in handles:
                handle.remove()
        if losses.shape[0] != rows or rows % groups:
            raise NotStackable(f"{rows} rows are not {groups} groups")
        seen = [u.module for u in uses]
        if len(uses) != len(table) or len(set(map(id, seen))) != len(seen):
            raise NotStackable("a module was called twice on the batch, or not at all")
        for u in uses:
            if (u.x._version, u.y._version) != u.versions or not u.y.requires_grad:
                raise NotStackable("a module's output does not reach the loss, or its input or output was written in place "
                                  "after its call")
            layouts = {_layout(u.x, rows), _layout(u.y, rows)}
            if "other" in layouts:
                raise NotStackable("a module's input or output is not laid out by rows")
            if "ambiguous" in layouts:
                raise AmbiguousBatch(f"a module's input or output has {rows} entries in a dimension beside the rows'")
            if isinstance(u.module, nn.Embedding):
                if u.x.is_floating_point():
                    raise NotStackable("an embedding read with float indices")
            elif not u.x.dtype == u.y.dtype == u.module.weight.dtype:
                raise NotStackable("a module's input, output and weight differ in dtype")
        read_once, only_added = graph_reads(losses, [leaves[n] for u in uses for n in u.names.values()],
                                            [u.y.grad_fn for u in uses if u.module in expanded])  # (one walk for both)
        if not read_once:
            raise NotStackable("a parameter is read outside its module")
        if not only_added:
            raise NotStackable("an embedding read with one row of ids for all rows is used otherwise than added to "
                               "rows (its gradient per row would not be its own)")
        loss = losses.view(groups, rows // groups).mean(1).sum()
        inputs: list[torch.Tensor] = []
        for u in uses:
            if u.x.is_floating_point() and u.x.requires_grad and "weight" in u.names:
                found = next((i for i, x in enumerate(inputs) if x is u.x), None)
                if found is None:
                    inputs.append(u.x)
                    found = len(inputs) - 1
                u.input_gradient = found
        grads = torch.autograd.grad(loss, [u.y for u in uses] + inputs, create_graph=True, allow_unused=True)
        gs, input_gradients = grads[:len(uses)], list(grads[len(uses):])
        if any(g is None for g in gs) or any(g is None for g in input_gradients):
            raise NotStackable("the loss does not reach a module's output")
        for u, g in zip(uses, gs):
            u.g = g
            u.gs = g.detach().reshape(groups, -1, g.shape[-1])
            x = u.x.detach()
            if isinstance(u.module, nn.Embedding):
                u.xs = x.reshape(groups, -1)
                if u.module.padding_idx is not None:
                    u.kept = (u.xs != u.module.padding_idx).unsqueeze(-1)
            elif isinstance(u.module, nn.LayerNorm):
                x = x.float() if x.dtype in HALF_DTYPES else x  # (autograd's statistics: float32)
                centred = x - x.mean(-1, keepdim=True)  # (two passes: `Tensor.var` over the last dimension ran ~7x
                scale = torch.rsqrt(centred.square().mean(-1, keepdim=True) + u.module.eps)  # slower on the CPU)
                u.xs = (centred * scale).reshape(groups, -1, x.shape[-1])
                u.scale = scale.reshape(groups, -1, 1)
            else:
                u.xs = x.reshape(groups, -1, x.shape[-1])
        graph = cls(uses, input_gradients, groups)
        graph.batches_vectors = all(_near_loss(losses, u.y, NEAR_LOSS_NODES) for u in uses)
        return graph

    def accumulate(self, vectors: Mapping[str, torch.Tensor], into: Mapping[str, torch.Tensor], alpha: float,
                   last: bool = True) -> None:
        """``into[n][r] += alpha · (H_r v_r)_n`` for every parameter n and group r, ``vectors`` and ``into``
        parameter-shaped with a leading dimension of R (``vectors`` in each parameter's dtype); ``last=True`` frees
        the graph (else it is kept for more products)."""
        self._add(vectors, [into], alpha, last)

    def accumulate_many(self, vectors: Mapping[str, torch.Tensor], intos: Sequence[Mapping[str, torch.Tensor]],
                        alpha: float, last: bool = True) -> None:
        """`accumulate` for m vectors a group in one batched second backward (``is_grads_batched``): ``vectors``
        parameter-shaped with a leading dimension of R·m (group r's m vectors together), ``intos`` m mappings like
        `accumulate`'s ``into``, vector i's products added into ``intos[i]`` in turn (a failure while adding raises
        `PartlyAdded`). Faster than m `accumulate` calls only where the second backward is little more than its
        fixed cost (`batches_vectors`, see `GroupedGraph.accumulate`)."""
        self._add(vectors, intos, alpha, last)

    def _add(self, vectors: Mapping[str, torch.Tensor], intos: Sequence[Mapping[str, torch.Tensor]], alpha: float,
             last: bool) -> None:
        if self._uses is None:
            raise RuntimeError("This graph was freed by a product with last=True; build another.")
        m = len(intos)
        outputs, grad_outputs = [], []
        for u in self._uses:
            # m vectors: group r's activations repeated for each of its vectors, the R·m groups' seeds taken as R's
            at_g, at_x = _seeds(u if m == 1 else _repeated(u, m), vectors)
            if at_g is not None and u.g.requires_grad:
                outputs.append(u.g)
                grad_outputs.append(_by_vector(at_g, m, u.g.shape).to(u.g.dtype))
            if at_x is not None:
                outputs.append(u.x)
                grad_outputs.append(_by_vector(at_x, m, u.x.shape).to(u.x.dtype))
        varying = [t for t in self._input_gradients if t.requires_grad]
        wanted = [u.y for u in self._uses] + varying
        uses, input_gradients = self._uses, self._input_gradients
        if last:  # (the batched backward retains the graph: nothing here may hold it after)
            self._uses, self._input_gradients = None, []
        if not outputs:
            adjoints = [None] * len(wanted)
        elif m > 1:
            adjoints = batched_grad(outputs, wanted, grad_outputs, allow_unused=True)
        else:
            adjoints = torch.autograd.grad(outputs, wanted, grad_outputs=grad_outputs, allow_unused=True,
                                           retain_graph=not last)
        found = iter(adjoints[len(uses):])
        at_inputs = [next(found) if t.requires_grad else None for t in input_gradients]
        try:
            for i, into in enumerate(intos):
                for u, y_bar in zip(uses, adjoints[:len(uses)]):
                    y_bar = u.gs.new_zeros(u.gs.shape) if y_bar is None else _vector(y_bar, i, m).reshape(u.gs.shape)
                    x_bar = None if u.input_gradient is None else at_inputs[u.input_gradient]
                    x_bar = None if x_bar is None else _vector(x_bar, i, m).reshape(self._groups, -1, x_bar.shape[-1])
                    _assemble(u, y_bar, x_bar, into, alpha)
        except Exception as err:
            raise PartlyAdded(f"assembling the grouped products failed part way ({type(err).__name__}: {err})") from err


def _near_loss(losses: torch.Tensor, y: torch.Tensor, limit: int) -> bool:
    """Whether at most ``limit`` autograd nodes lie between ``y`` and ``losses`` (walked from the losses, not past
    ``y``'s own node)."""
    seen = set() if losses.grad_fn is None else {losses.grad_fn}
    for _, child in graph_edges(losses, stop=y.grad_fn):
        if child is not y.grad_fn:
            seen.add(child)
            if len(seen) > limit:
                return False
    return True


def _repeated(u: _Use, m: int) -> _Use:
    """``u`` with each group's activations repeated m times (R·m groups: group r's copies together)."""
    def each(t):
        return None if t is None else t.repeat_interleave(m, dim=0)
    return replace(u, xs=each(u.xs), gs=each(u.gs), scale=each(u.scale), kept=each(u.kept))


def _by_vector(seed: torch.Tensor, m: int, shape: torch.Size) -> torch.Tensor:
    """A seed as the second backward takes it: ``(m, *shape)``; with m vectors, from ``(R·m, ...)`` (group-major)."""
    if m == 1:
        return seed.reshape(shape)
    return seed.reshape(-1, m, *seed.shape[1:]).transpose(0, 1).reshape(m, *shape)


def _vector(adjoint: torch.Tensor, i: int, m: int) -> torch.Tensor:
    """Vector i's part of the second backward's adjoint (the adjoint itself for one vector)."""
    return adjoint if m == 1 else adjoint[i]


def _seeds(u: _Use, vectors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The derivatives of ``s = Σ_r ∇L_r · v_r`` (this module's share) at ``g`` and at ``x``, grouped; the one at
    ``x`` only where the first backward took a gradient at x (else None: a module fed by the cached trunk, MiniLM's
    query, key and value, whose ``g W`` was formed and dropped, ~0.8 ms of a ~27 ms step). Each in memory of its own,
    never a view of ``vectors``: autograd may hand a seed back as another module's adjoint (a bias-only LayerNorm
    feeding a selected query weight: its seed is that weight's ``x̄``), which `GroupedProducts.accumulate` reads after
    it wrote into ``into``, and LiSSA's in-place step writes ``into`` over ``vectors``."""
    weight, bias = (vectors.get(u.names.get(k)) for k in ("weight", "bias"))
    at_input = weight is not None and u.input_gradient is not None
    if isinstance(u.module, nn.Embedding):
        at_g = weight[torch.arange(weight.shape[0], device=weight.device)[:, None], u.xs]  # (R, n, d): v_r[ids]
        return (at_g if u.kept is None else at_g * u.kept), None
    if isinstance(u.module, nn.LayerNorm):
        at_g = _plus_bias(None if weight is None else u.xs * weight[:, None], bias, u.gs.shape)
        return at_g, _normalisation_jacobian(u, u.gs * weight[:, None]) if at_input else None
    at_g = _plus_bias(None if weight is None else torch.bmm(u.xs, weight.transpose(1, 2)), bias, u.gs.shape)
    return at_g, torch.bmm(u.gs, weight) if at_input else None


def _plus_bias(at_g: torch.Tensor | None, bias: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """The weight's seed at ``g`` plus the bias's, ``bias[r]`` at every row of group r; a bias alone is copied out
    of ``vectors`` (its broadcast view must not be a seed, as `_seeds` says)."""
    if bias is None:
        return at_g
    return bias[:, None].expand(shape).clone() if at_g is None else at_g + bias[:, None]


def _normalisation_jacobian(u: _Use, d: torch.Tensor) -> torch.Tensor:
    """``A d`` for a LayerNorm's normalisation ``x ↦ x̂`` at the recorded input (A is symmetric)."""
    x_hat = u.xs
    return (d - d.mean(-1, keepdim=True) - x_hat * (x_hat * d).mean(-1, keepdim=True)) * u.scale


def _assemble(u: _Use, y_bar: torch.Tensor, x_bar: torch.Tensor | None, into: Mapping[str, torch.Tensor],
              alpha: float) -> None:
    weight, bias = (into.get(u.names.get(k)) for k in ("weight", "bias"))
    if bias is not None:
        bias.add_(cast_like(y_bar.sum(1), bias), alpha=alpha)
    if weight is None:
        return
    if isinstance(u.module, nn.Embedding):
        y_bar = y_bar if u.kept is None else y_bar * u.kept
        group = torch.arange(weight.shape[0], device=u.xs.device)[:, None].expand(u.xs.shape)
        weight.index_put_((group, u.xs), cast_like(y_bar * alpha, weight),
                          accumulate=True)
    elif isinstance(u.module, nn.LayerNorm):
        block = (y_bar * u.xs).sum(1)
        if x_bar is not None:
            block = block + (u.gs * _normalisation_jacobian(u, x_bar)).sum(1)
        weight.add_(cast_like(block, weight), alpha=alpha)
    else:
        add_weight_block(weight, y_bar, u.gs, u.xs, x_bar, alpha)


class GroupedHessian(GroupsHessian):
    """`hf_fastif.stacked.StackedHessian`'s interface over `GroupedProducts` (R groups' products from one batch, m
    vectors a group), and the graphs themselves (`build`) for the engine to keep. Which modules hold the parameters
    is found once (`grouped_modules`, or ``table``, its answer where the caller found it already), as are the
    parameters' ranges in a flat vector; what can change between batches (hooks, patched forwards) is looked at on
    each."""

    def __init__(self, fm: FunctionalModel, params: Mapping[str, torch.Tensor], *, table: dict | str | None = None):
        super().__init__(fm, params)
        self._table = grouped_modules(fm, list(self._primals)) if table is None else table
        self._ranges = flat_ranges(self._primals)

    def build(self, batch: Mapping[str, torch.Tensor], groups: int, *, measure: bool = False) -> GroupedGraph:
        """The graph of ``batch`` (``groups`` groups of rows, group r's rows together), for `GroupedGraph.accumulate`."""
        rows = next((t.shape[0] for t in batch.values() if isinstance(t, torch.Tensor) and t.dim() > 0), 0)
        products = GroupedProducts.build(self._fm, fresh_leaves(self._primals), batch, groups, rows, measure=measure,
                                         table=self._table)
        return GroupedGraph(self._primals, products, self._ranges)

    def products(self, batch: Mapping[str, torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
        """``(R, m, p)``: group r's Hessian (its mean loss, without the L2 term) times each of ``vectors[r]``
        (``(R, m, p)``), in ``vectors``' dtype."""
        out = torch.zeros_like(vectors)
        self.build(batch, vectors.shape[0]).accumulate(vectors, out, 1.0, last=True)
        return out


class GroupedGraph:
    """One batch's `GroupedProducts`, taking and giving flat vectors: ``(R, m, p)`` over the parameters ``like``,
    parameter n at ``ranges[n]`` (start, end) of a vector."""

    def __init__(self, like: Mapping[str, torch.Tensor], products: GroupedProducts,
                 ranges: Mapping[str, tuple[int, int]]):
        self._like, self._products, self._ranges = like, products, ranges
        self.saved_bytes = products.saved_bytes

    def accumulate(self, vectors: torch.Tensor, into: torch.Tensor, alpha: float, last: bool = True,
                   carry: Carry | None = None) -> None:
        """``into[r, i] += alpha · H_r @ vectors[r, i]`` (``(R, m, p)`` each, ``into`` contiguous), without the L2
        term, ``last=True`` freeing the graph. One second backward per vector i; but where the influence parameters
        sit next to the loss (`NEAR_LOSS_NODES`: a classification head, a convex model), whose second backward is
        little more than its fixed cost, one batched second backward for all m (`GroupedProducts.accumulate_many`).
        Measured: the digits logistic regression's 50 test points (J 1000, B 1, T 4, 2 torch threads) 2.9 against
        5.5 s a call; MiniLM's pooler + classifier, 16 test points (J 200, 1 thread), 3.8 against 5.5 s; over a
        module deep in the model the batched backward was slower (a 4-layer BERT's word embeddings alone, 8 vectors:
        0.48 against 0.40 s).
        ``carry`` (`hf_fastif.solvers.lissa.Carry` over ``into``): each parameter's range is carried just before its
        block is first added, the rest after the last vector."""
        if into.shape != vectors.shape or vectors.dim() != 3 or not into.is_contiguous():
            raise ValueError("a grouped graph takes (R, m, p) vectors and a contiguous (R, m, p) tensor to add into.")
        m = vectors.shape[1]
        targets = [unflatten(into[:, i], self._like) for i in range(m)]
        if carry is not None:
            targets = [_Carried(t, carry, self._ranges) for t in targets]
        if m > 1 and self._products.batches_vectors:
            self._products.accumulate_many(unflatten_cast(vectors.reshape(-1, vectors.shape[-1]), self._like), targets,
                                           alpha, last)
            return
        for i in range(m):
            try:
                self._products.accumulate(unflatten_cast(vectors[:, i], self._like), targets[i], alpha,
                                          last and i == m - 1)
            except PartlyAdded:
                raise
            except Exception as err:
                if i == 0:
                    raise
                raise PartlyAdded(f"the grouped products of vector {i} of {m} failed after those before it were "
                                  f"added ({type(err).__name__}: {err})") from err


class _Carried(dict):
    """A step's targets (parameter name → view of the next iterate), each read (``[]`` or `get`) first carrying that
    parameter's range (`hf_fastif.solvers.lissa.Carry.part`)."""

    def __init__(self, targets: dict[str, torch.Tensor], carry: Carry, ranges: dict[str, tuple[int, int]]):
        super().__init__(targets)
        self._carry, self._ranges = carry, ranges

    def __getitem__(self, name: str) -> torch.Tensor:
        target = super().__getitem__(name)
        self._carry.part(*self._ranges[name])
        return target

    def get(self, name, default=None):
        return self[name] if name in self else default
