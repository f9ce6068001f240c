"""Gradients and Hessian-vector products of a `FunctionalModel` on one batch.

Vectors are flat: ``(p,)`` or a stack ``(m, p)`` in the order of ``FunctionalModel.names``. Hessian-vector
products use double backward (reverse-over-reverse): measured faster than forward-over-reverse on CPU.
Several vectors share one forward and one first backward (``is_grads_batched``), and a `BatchHessian` keeps the first
backward's graph for the products that follow on the same batch; `BatchHessian.accumulate` adds a product into a
vector parameter by parameter, never flattening it (LiSSA's update). A `BatchHessian` assembles the weight blocks of
``torch.nn.Linear`` layers from activations where it can (`hf_fastif.linear_products`: exact, checked against
autograd's product once per `FunctionalModel`); a stack of vectors takes one batched second backward there too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping

import torch
from torch.autograd.graph import get_gradient_edge
from transformers.utils import logging

from .linear_products import LINEAR_PRODUCTS_TOLERANCE, LinearProducts
from .loss import FunctionalModel, forward_mode
from .params import flatten, flatten_batched, unflatten, unflatten_cast
from .utils import HALF_DTYPES, batched_grad, relative_difference

logger = logging.get_logger(__name__)


def fresh_leaves(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies of ``params`` that require grad: the leaves a graph is built from (the model's own
    parameters stay out of it)."""
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}


def _gradient(outputs: torch.Tensor, leaves: Mapping[str, torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """``autograd.grad`` of ``outputs`` w.r.t. the parameters, with a clear error naming any parameter the loss does
    not use (autograd's own names an index only)."""
    # (a loss that reads none of them: autograd's own "element 0 of tensors does not require grad")
    grads = (torch.autograd.grad(outputs, list(leaves.values()), allow_unused=True, **kwargs)
             if outputs.requires_grad else [None] * len(leaves))
    unused = [name for name, g in zip(leaves, grads) if g is None]
    if unused:
        raise ValueError(
            f"{len(unused)} influence parameter(s) take no part in the loss's autograd graph: {', '.join(unused[:4])}"
            f"{', ...' if len(unused) > 4 else ''} ({_peft_hint(unused)}a pooler the classification head does not "
            "read, for instance; PEFT adapters that are merged into the base weights or disabled, or not active "
            "(model.active_adapters), which the forward then skips: unmerge, enable or activate them; or layers "
            "whose gradients the model computes by hand inside a custom autograd.Function, as Reformer's reversible "
            "layers do). Leave them out of influence_params: autograd gives them no derivatives."
        )
    return list(grads)


def _peft_hint(unused: list[str]) -> str:
    """What PEFT's copies among ``unused`` are (a pattern such as the paper's ``classifier\\.`` selects them)."""
    if any(".original_module." in name for name in unused):
        return ("PEFT's `original_module` is the frozen copy that `modules_to_save` replaces: select the "
                r"`modules_to_save` copy instead, e.g. 'classifier\.modules_to_save'; ")
    return ""


def batch_gradient(fm: FunctionalModel, params: Mapping[str, torch.Tensor], batch, *,
                   measurement: bool = False, reduction: str = "sum",
                   row_batch: Callable[[int], dict] | None = None) -> torch.Tensor:
    """Gradient of the batch's per-example values w.r.t. the parameters.

    Args:
        reduction: ``"sum"`` → ``(p,)`` gradient of the sum; ``"none"`` → ``(b, p)`` per-example gradients.
        measurement: use the test measurement instead of the training loss.
        row_batch: ``i ↦`` row i of the batch collated alone (``"none"``). Per-example gradients come from one
            backward with a one-hot stack, so one row whose derivative is NaN / inf puts ``0 · NaN`` into every
            row's gradient; with ``row_batch``, such a batch is run again a row at a time, and only the rows whose own
            gradient is not finite stay so.
    """
    leaves = fresh_leaves(params)
    values, l2 = fm.values_without_l2(leaves, batch, measurement)
    if not values.requires_grad:  # a loss that reads none of them: raises, naming them
        _gradient(values.sum(), leaves)
    inputs = list(leaves.values())
    if reduction == "sum":
        gradient = flatten(_gradient(values.sum(), leaves))
        return gradient + values.shape[0] * fm.l2_gradient(params).to(gradient.dtype) if l2 else gradient
    rows = values.shape[0]
    eye = torch.eye(rows, dtype=values.dtype, device=values.device)
    try:
        gradients = flatten_batched(batched_grad(values, inputs, eye), rows).detach()
    except RuntimeError as err:
        if "not have been used in the graph" in str(err):
            _gradient(values.sum(), leaves, retain_graph=True)  # raises, naming the unused parameters
        raise
    if row_batch is not None and rows > 1 and not bool(torch.isfinite(gradients).all()):
        return torch.cat([batch_gradient(fm, params, row_batch(i), measurement=measurement, reduction="none")
                          for i in range(rows)])
    return gradients + fm.l2_gradient(params).to(gradients.dtype) if l2 else gradients


class BatchHessian:
    """The Hessian of one batch's training loss, kept as the graph of its first backward.

    Building it runs the forward and the first backward (``create_graph``; taken at ``nn.Linear`` layers' outputs and
    inputs where `hf_fastif.linear_products` applies); each `product` then runs only the second backward, so a batch
    multiplied again (a Lanczos run's steps, LiSSA rows drawn again, CG's passes over the data) pays its forward and
    first backward once: a single-row product from a kept graph cost 45-52% of a fresh one on the tiny BERT and
    MiniLM's last layer (docs/benchmarks.md), with the same result to the bit. The graph holds what the
    second backward reads (the batch's activations, ~0.3-0.8 MB a 32-token row on those models; see `saved_bytes`),
    not the parameter-sized gradient, which autograd reaches through its gradient edge. It reads the parameters as
    they were when it was built: use it only while they are unchanged, and not written in place (autograd refuses a
    graph whose saved tensors were; the engine keys the LiSSA graphs it keeps between calls on the weights' content
    and in-place versions, and drops them when either changes).

    Args:
        reduction: ``"mean"`` (the batch's mean loss, LiSSA's) or ``"sum"`` (to accumulate a mean over a whole
            dataset exactly, whatever the batch size).
        measure: count `saved_bytes` (hooks on the tensors autograd saves, while building only).
    """

    def __init__(self, fm: FunctionalModel, params: Mapping[str, torch.Tensor], batch, *, reduction: str = "mean",
                 measure: bool = False):
        self._fm, self._params = fm, params
        leaves = fresh_leaves(params)
        self._leaves, self._inputs = leaves, list(leaves.values())
        self._dtypes = [p.dtype for p in self._inputs]
        self._edges = self._linear = self._varying = None
        self._reduction = reduction
        saved: dict[int, int] = {}  # storage -> bytes, filled only when measured
        rng = _rng_states(self._inputs[0].device) if fm.linear_products is None else None  # the check's forward
        with count_saved_bytes(leaves, saved) if measure else contextlib.nullcontext():
            losses = None
            if fm.linear_products in (None, True):  # (a reason why not: off for this model)
                self._linear, losses = LinearProducts.build(fm, leaves, batch, reduction)
            if self._linear is None:
                losses = self._plain(batch, losses)
        self.saved_bytes = sum(saved.values()) if measure else None
        # the L2 term's Hessian: weight · 2wd · I (the mean loss's weight is 1, the summed loss's the row count)
        self._l2_weight = 1.0 if reduction == "mean" else float(losses.shape[0])
        if self._linear is not None and fm.linear_products is None:
            self._check_linear(batch, rng)

    def _plain(self, batch, losses: torch.Tensor | None) -> torch.Tensor:
        """Autograd's route: the first backward w.r.t. every parameter (from ``losses`` if the forward ran)."""
        if losses is None:
            losses, _ = self._fm.values_without_l2(self._leaves, batch)
        loss = losses.mean() if self._reduction == "mean" else losses.sum()
        grads = _gradient(loss, self._leaves, create_graph=True)
        # the gradients themselves are freed here; one that is a constant (a loss linear in a bias) has no edge, and
        # its parameter no product with any vector
        self._edges = [get_gradient_edge(g) for g in grads if g.requires_grad]
        self._varying = None if all(g.requires_grad for g in grads) else [g.requires_grad for g in grads]
        return losses

    def _check_linear(self, batch, rng: tuple) -> None:
        """Compare the weight blocks assembled from activations with autograd's product on a random vector, once per
        `FunctionalModel` (`hf_fastif.linear_products`): every parameter's block within `LINEAR_PRODUCTS_TOLERANCE`
        of the product's largest entry (20 machine epsilons of that parameter's dtype where that is more). A
        difference turns the route off for the model, and this graph takes autograd's route. Autograd's forward draws
        the random numbers the route's did (``rng``: dropout in training mode), and leaves the generator as it was.
        Products that are not finite (a float16 model's overflow) decide nothing: the next graph checks again."""
        fm = self._fm
        dtype = torch.float64 if torch.float64 in self._dtypes else torch.float32
        vector = torch.randn(sum(p.numel() for p in self._inputs), generator=torch.Generator().manual_seed(0),
                             dtype=dtype).to(self._inputs[0].device)
        assembled = torch.zeros_like(vector)
        self._linear.accumulate(self._parts(vector), unflatten(assembled, self._leaves), 1.0, last=False)
        with _replayed(rng):
            self._plain(batch, None)
        plain = flatten(self._second_backward(vector, last=False)).to(dtype)
        if not (bool(torch.isfinite(plain).all()) and bool(torch.isfinite(assembled).all())):
            # overflow (a float16 model's products), not the route: undecided, checked again on the next graph;
            # this graph takes autograd's route, whose product is not finite either, and what multiplies with it
            # refuses that, naming the cause (blaming the route here had sent a float16 model's user after a weight
            # read outside its forward)
            self._linear = None
            return
        largest = float(plain.abs().max())
        worst, where = 0.0, None
        for (name, found), expected, d in zip(unflatten(assembled, self._leaves).items(),
                                              unflatten(plain, self._leaves).values(), self._dtypes):
            ratio = relative_difference(found, expected, floor=largest) / max(LINEAR_PRODUCTS_TOLERANCE,
                                                                               20 * torch.finfo(d).eps)
            if not ratio <= worst:
                worst, where = ratio, name
        if worst <= 1.0:
            fm.linear_products = True
            self._edges = None
            return
        fm.linear_products = (f"the weight blocks assembled from activations differ from autograd's product at "
                              f"{where} by {worst:.3g} times the tolerance, on a random vector")
        half = any(d in HALF_DTYPES for d in self._dtypes)
        cause = ("float16 / bfloat16 rounding, or a layer's weight read outside its forward; only speed is lost"
                 if half else "a layer's weight read outside its forward, perhaps")
        logger.warning(f"Hessian-vector products take autograd's route for this model: {fm.linear_products} "
                       f"({cause}).")
        self._linear = None

    def _parts(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """``vector`` ``(p,)`` (or a stack ``(m, p)``) split per parameter, each in its parameter's dtype."""
        return unflatten_cast(vector, self._leaves)

    def accumulate(self, vector: torch.Tensor, into: torch.Tensor, alpha: float, *, l2_term: bool = True,
                   last: bool = False) -> None:
        """``into += alpha · (H @ vector)`` for one vector ``(p,)`` into a ``(p,)`` tensor (a contiguous one, such as
        a row of a stack), parameter by parameter from autograd's products: the product is never flattened, so a
        LiSSA step reads and writes the parameter-sized vectors two times fewer than `product` followed by an add.
        ``l2_term`` and ``last`` as in `product`."""
        if vector.dim() != 1 or into.shape != vector.shape or not into.is_contiguous():
            raise ValueError("accumulate takes one vector (p,) and a contiguous (p,) tensor to add into (its "
                             "parameter slices must be views).")
        if self._linear is not None:
            self._linear.accumulate(self._parts(vector), unflatten(into, self._leaves), alpha, last)
        else:
            for target, product in zip(unflatten(into, self._leaves).values(), self._second_backward(vector, last)):
                target.add_(product, alpha=alpha)
        if l2_term:
            self._add_l2_term(into, vector, alpha)

    def product(self, vectors: torch.Tensor, *, out: torch.Tensor | None = None, l2_term: bool = True,
                last: bool = False) -> torch.Tensor:
        """The Hessian times ``vectors`` (``(p,)`` or ``(m, p)``), same shape out.

        One vector (``(p,)``, or a ``(1, p)`` stack) takes the plain second backward (no batched-gradient machinery),
        with the vector handed to autograd per parameter; ``out`` (``(p,)``, for a ``(p,)`` vector) receives the result
        without an extra copy. ``l2_term=False`` leaves out the L2 term's Hessian (the data term alone, e.g. for the
        low-rank solver, which keeps the L2 term exactly). ``last=True`` frees the graph with this product.
        """
        if vectors.dim() == 2 and vectors.shape[0] == 1:  # a stack of one: the single-vector path
            return self.product(vectors[0], l2_term=l2_term, last=last).unsqueeze(0)
        if self._linear is not None:  # assembled into zeros
            dtype = functools.reduce(torch.promote_types, self._dtypes)
            if out is None:
                out = torch.zeros(vectors.shape, dtype=dtype, device=vectors.device)
            else:
                out.zero_()
            self._linear.accumulate(self._parts(vectors), unflatten(out, self._leaves), 1.0, last,
                                    stacked=vectors.dim() == 2)
            if l2_term:
                self._add_l2_term(out, vectors)
            return out
        products = self._second_backward(vectors, last)
        if vectors.dim() == 1:
            if out is None:
                out = flatten(products)
            else:
                torch.cat([t.reshape(-1).to(out.dtype) for t in products], out=out)
            if l2_term:
                self._add_l2_term(out, vectors)
            return out
        products = flatten_batched(products, vectors.shape[0]).detach()  # (a new tensor: added into in place)
        if l2_term:
            self._add_l2_term(products, vectors)
        return products

    def _second_backward(self, vectors: torch.Tensor, last: bool) -> list[torch.Tensor]:
        """The second backward with ``vectors`` (``(p,)``: the plain one; ``(m, p)``: batched), per parameter;
        ``last=True`` frees the graph."""
        if self._edges is None:
            raise RuntimeError("This BatchHessian's graph was freed by a product with last=True; build another.")
        parts = list(self._parts(vectors).values())
        unused = self._varying is not None
        if unused:
            parts = [t for t, varying in zip(parts, self._varying) if varying]
        try:
            if not self._edges:
                products = [None] * len(self._inputs)
            elif vectors.dim() == 1:
                products = list(torch.autograd.grad(self._edges, self._inputs, grad_outputs=parts,
                                                    retain_graph=not last, allow_unused=unused))
            else:
                products = batched_grad(self._edges, self._inputs, parts, allow_unused=unused)
        finally:
            if last:
                self._edges = None
        lead = tuple(vectors.shape[:-1])
        return [p.new_zeros(lead + p.shape) if product is None else product
                for p, product in zip(self._inputs, products)]

    def _add_l2_term(self, out: torch.Tensor, vector: torch.Tensor, alpha: float = 1.0) -> None:
        """``out += alpha ·`` the L2 term's Hessian (``weight · 2wd`` on the decayed entries) times ``vector``
        (``(p,)``, or a stack ``(m, p)`` row by row)."""
        if self._fm.l2_in_hessian:
            out.addcmul_(self._fm.l2_mask(self._params).to(out.dtype), vector.to(out.dtype),
                         value=alpha * self._l2_weight)


def _rng_states(device: torch.device) -> tuple:
    """The CPU generator's state, and the device's where it is a CUDA device."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None), device


@contextlib.contextmanager
def _replayed(rng: tuple):
    """Within the block, the generators start from the states ``rng`` (`_rng_states`); afterwards they are as
    before it."""
    cpu, cuda, device = rng
    with torch.random.fork_rng(devices=[device] if cuda is not None else [],
                               device_type="cuda" if cuda is not None else "cpu"):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def count_saved_bytes(leaves: Mapping[str, torch.Tensor], saved: dict[int, int]):
    """Saved-tensor hooks that record in ``saved`` the bytes of each storage autograd saves for the backward, beside
    the parameters' own (the graph does not hold those)."""
    owned = {p.untyped_storage().data_ptr() for p in leaves.values()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, _unpacked)


def _unpacked(t: torch.Tensor) -> torch.Tensor:
    return t


def batch_hvp(fm: FunctionalModel, params: Mapping[str, torch.Tensor], batch, vectors: torch.Tensor,
              *, reduction: str = "mean", out: torch.Tensor | None = None, l2_term: bool = True) -> torch.Tensor:
    """Hessian of the batch's training loss times ``vectors`` (``(p,)`` or ``(m, p)``), same shape out: one product
    of a `BatchHessian` built for it (see there for ``reduction``, ``out`` and ``l2_term``)."""
    return BatchHessian(fm, params, batch, reduction=reduction).product(vectors, out=out, l2_term=l2_term, last=True)


def directional_derivatives(fm: FunctionalModel, params: Mapping[str, torch.Tensor], batch,
                            vectors: torch.Tensor) -> torch.Tensor:
    """``∇ℓ_i · s_k`` for every row i of the batch and every vector s_k, by forward-mode AD: ``(b, m)``.

    One ``torch.func.jvp`` over ``functional_call`` per batch; several vectors are vmapped over the
    tangents only, so the model's input handling (attention masks) is never batched.
    """
    primals = {n: p.detach() for n, p in params.items()}

    def losses(p):
        return fm.values_without_l2(p, batch)[0]

    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    # each tangent in its own parameter's dtype (a bf16 pooler next to an fp32 classifier keeps fp32 there)
    tangents = {n: t.to(primals[n].dtype) for n, t in unflatten(vectors, primals).items()}

    def one(t):
        return torch.func.jvp(losses, (primals,), (t,))[1]

    with torch.no_grad(), forward_mode():
        if vectors.shape[0] == 1:
            out = one({n: t[0] for n, t in tangents.items()}).unsqueeze(0)
        else:
            out = torch.func.vmap(one)(tangents)
        if fm.decayed and fm.l2_in_gradients:  # the L2 term's directional derivative, the same for every row
            out = out + (vectors.to(out.dtype) @ fm.l2_gradient(params).to(out.dtype))[:, None]
    return out.T.detach()
