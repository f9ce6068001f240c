"""Hessian-vector products whose ``nn.Linear`` weight blocks are assembled from activations, not by autograd.

For a linear layer ``y = x Wᵀ + b`` the loss's gradient is ``∇W = gᵀ x`` with ``g = ∂L/∂y``, and W enters the first
backward once more, in ``∂L/∂x ⊇ g W``. So the W block of a Hessian-vector product ``H v`` is exactly

    ``(H v)_W = ȳᵀ x + gᵀ x̄_g``,

where ``ȳ`` and ``x̄_g`` are what the second backward (of ``s = ∇L · v``) brings to ``y`` and to the first
backward's gradient at ``x``; the bias block is ``Σ ȳ``. Autograd's own double backward forms both weight-shaped
terms apart, adds them, and the caller then adds the sum into its vector: ~10 passes over each weight per product.
Here the first backward is taken with respect to the layers' outputs and inputs only (no weight gradients), the
second backward brings ``ȳ`` and ``x̄_g`` (activation-sized), and one ``baddbmm_`` per layer (a batch of m vectors,
or of one) adds ``[ȳ; g]ᵀ [x; x̄_g]`` into the caller's vector: its weights are read twice by the second backward
and ``v`` twice, the target once. On MiniLM's last layer + pooler + classifier from the cached trunk (one 32-token
row, the read-position cut) a product from a kept graph costs 5.1-5.4 ms against 6.4-6.7 ms, and building the graph
2.4-2.9 ms against 3.2-4.0 ms (docs/benchmarks.md, "Against the 2021 reference code").

Used only where it is exact by construction, and checked. A layer takes this route on a batch when it is exactly
``torch.nn.Linear`` (not a subclass, such as a quantised layer, which computes something else; LoRA's A and B are
plain layers and take it), ``nn.Linear.forward`` and its own are the class's and no hooks are in place (its own or
global ones; looked at on every batch), its weight is an influence parameter not tied to another name, and on the
batch it ran once, neither its input nor its output was written in place afterwards, and the batch's autograd graph
reads its weight (and bias) through exactly one edge: a model that reads the weight elsewhere too (``F.linear(h,
self.dense.weight)`` in a head, perhaps on some batches only) adds an edge. A batch where any layer fails these
takes autograd's route whole; every other influence parameter (LayerNorm, embeddings, GPT-2's ``Conv1D``) takes
autograd's route in the same products. Beyond that, the first graph built for each `hf_fastif.loss.FunctionalModel`
is compared with autograd's product on a random vector (its forward replaying the route's random numbers: dropout in
training mode), every parameter's block within `LINEAR_PRODUCTS_TOLERANCE` of the product's largest entry (or 20
machine epsilons of that parameter's dtype), and a difference turns the route off for that model, with a warning. A
review of the first version found three ways past its once-per-model checks (a weight read outside on later batches
only, a hook added after the first graph, one bfloat16 parameter loosening the tolerance for all) and a loss linear
in a layer's output that crashed it; each is a test in ``tests/test_linear_products.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .loss import FunctionalModel
from .utils import batched_grad

LINEAR_PRODUCTS_TOLERANCE = 1e-5
"""Largest difference between the assembled product and autograd's on the check's random vector, in each parameter's
block, relative to the product's largest entry (`hf_fastif.utils.relative_difference`), that counts as float rounding
(20 machine epsilons of that parameter's dtype where that is more). Measured: 4.7e-8 on MiniLM's last layer + pooler
+ classifier in float32."""


_LINEAR_FORWARD = nn.Linear.forward


def linear_layers(fm: FunctionalModel, names) -> dict[nn.Module, tuple[str, str | None]]:
    """``{layer: (weight name, bias name or None)}`` for the layers that may take the route: exactly
    ``nn.Linear``, the weight an influence parameter in ``names`` tied to no other name (the bias is assembled only
    when it is one too). Found once per model and parameter selection; what can change between batches (hooks, a
    patched ``forward``) is looked at on each (`is_plain_layer`)."""
    key = tuple(names)
    if fm.linear_layers is None or fm.linear_layers[0] != key:
        selected = set(names)
        tied = set(fm.aliases) | {a for group in fm.aliases.values() for a in group}
        table = {}
        for path, module in fm.model.named_modules():
            weight, bias = f"{path}.weight" if path else "weight", f"{path}.bias" if path else "bias"
            if type(module) is nn.Linear and weight in selected and weight not in tied:
                table[module] = (weight, bias if module.bias is not None and bias in selected and bias not in tied
                                 else None)
        fm.linear_layers = (key, table)
    return fm.linear_layers[1]


def is_plain_layer(module: nn.Module) -> bool:
    """Whether the layer computes ``x Wᵀ + b`` as it is now: no hooks of its own, no ``forward`` set on it in place
    of the class's (global hooks and a replaced ``nn.Linear.forward``: `any_global_hooks`)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in vars(module))


def any_global_hooks() -> bool:
    """Whether module hooks registered for every module (``nn.modules.module.register_module_forward_hook`` and
    kin) are in place, or ``nn.Linear.forward`` was replaced: then no layer takes the route."""
    from torch.nn.modules import module as base

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    return nn.Linear.forward is not _LINEAR_FORWARD or any(getattr(base, n, None) for n in names)


def graph_edges(losses: torch.Tensor, stop=None):
    """Every edge ``(node, child)`` of the forward's autograd graph from ``losses`` (each node visited once); with
    ``stop`` (a node), not the edges below it (the edges into it are still given)."""
    seen, stack = set(), [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node is stop:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                yield node, child
                stack.append(child)


def _read_once(losses: torch.Tensor, leaves: list[torch.Tensor]) -> bool:
    """Whether the forward's autograd graph (from ``losses``) reads each of ``leaves`` through exactly one edge (its
    layer's product): a read anywhere else (a head's ``F.linear(h, self.dense.weight)``, on some batches only) is a
    second edge. 0.02-0.04 ms on MiniLM's last one or two layers + pooler + classifier."""
    return graph_reads(losses, leaves)[0]


def graph_reads(losses: torch.Tensor, leaves: list[torch.Tensor], nodes=()) -> tuple[bool, bool]:
    """One walk of the forward's graph: ``(read_once, only_added)``: whether each of ``leaves`` is read by exactly
    one node (`_read_once`), and whether every node that reads one of ``nodes`` is an addition (an absolute position
    embedding added to the token embeddings of every row)."""
    counts = {id(leaf): 0 for leaf in leaves}
    wanted, added = set(nodes), True
    for node, child in graph_edges(losses):
        variable = getattr(child, "variable", None)  # an AccumulateGrad: a leaf's end of the graph
        if variable is not None and id(variable) in counts:
            counts[id(variable)] += 1
        if child in wanted and node.name() not in ("AddBackward0", "AddBackward1"):
            added = False
    return all(count == 1 for count in counts.values()), added


@dataclass
class _Use:
    """One layer's call on the batch: its parameters' names, input ``x`` and output ``y`` (with their versions when
    recorded, to see an in-place write after it), and the first backward's ``g = ∂L/∂y``."""

    weight: str
    bias: str | None
    x: torch.Tensor
    y: torch.Tensor
    versions: tuple[int, int]
    g: torch.Tensor | None = None
    input_gradient: int | None = None  # index of the first backward's gradient at x (None: x needs none)
    values: tuple[torch.Tensor, torch.Tensor] | None = None  # x and g detached, as rows (tokens, features)


class LinearProducts:
    """One batch's first backward, taken at the routed layers' outputs and inputs and at every other parameter, for
    Hessian-vector products assembled as the module docstring says. Build with `build` (None where the batch does
    not allow the route); `accumulate` adds ``alpha · H v`` into parameter-shaped targets."""

    def __init__(self, uses: list[_Use], input_gradients: list[torch.Tensor], others: list[str],
                 other_leaves: list[torch.Tensor], other_gradients: list[torch.Tensor]):
        self._uses, self._input_gradients = uses, input_gradients
        self._others, self._other_leaves, self._other_gradients = others, other_leaves, other_gradients
        self._freed = False

    @classmethod
    def build(cls, fm: FunctionalModel, leaves: Mapping[str, torch.Tensor], batch,
              reduction: str) -> tuple[LinearProducts | None, torch.Tensor]:
        """``(the route's graph or None, the batch's per-row losses)``: None where the batch does not allow the route
        (the caller then runs autograd's route from those losses: the forward is not run twice)."""
        table = {} if any_global_hooks() else {m: names for m, names in linear_layers(fm, list(leaves)).items()
                                           if is_plain_layer(m)}
        uses: list[_Use] = []

        def record(module, args, output):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor):
                uses.append(_Use(*table[module], x, output, (x._version, output._version)))
            else:  # called with keywords or returning a structure: not a plain linear call
                uses.append(_Use(*table[module], None, None, (0, 0)))

        handles = [module.register_forward_hook(record) for module in table]
        try:
            losses, _ = fm.values_without_l2(leaves, batch)
        finally:
            for handle in handles:
                handle.remove()
        calls = [u.weight for u in uses]
        if not uses or len(set(calls)) != len(calls) or any(
                u.x is None or (u.x._version, u.y._version) != u.versions or not u.y.requires_grad
                or not u.x.dtype == u.y.dtype == leaves[u.weight].dtype for u in uses):
            return None, losses  # a layer called twice, written in place after its call, outside autograd, ...
        routed = [leaves[n] for u in uses for n in (u.weight, u.bias) if n is not None]
        if not _read_once(losses, routed):
            return None, losses  # a weight or bias read outside its layer on this batch
        loss = losses.mean() if reduction == "mean" else losses.sum()
        names = {u.weight for u in uses} | {u.bias for u in uses if u.bias is not None}
        others = [n for n in leaves if n not in names]
        inputs: list[torch.Tensor] = []
        for u in uses:
            if u.x.requires_grad:
                found = next((i for i, x in enumerate(inputs) if x is u.x), None)
                if found is None:
                    inputs.append(u.x)
                    found = len(inputs) - 1
                u.input_gradient = found
        try:
            grads = torch.autograd.grad(loss, [u.y for u in uses] + inputs + [leaves[n] for n in others],
                                        create_graph=True, allow_unused=True)
        except RuntimeError:  # (the graph is kept: create_graph) autograd's route raises its own error, if any
            return None, losses
        gs, rest = grads[:len(uses)], grads[len(uses):]
        input_gradients, other_gradients = list(rest[:len(inputs)]), list(rest[len(inputs):])
        if any(g is None for g in gs) or any(g is None for g in input_gradients) or any(
                g is None for g in other_gradients):
            return None, losses  # a parameter the loss does not reach: autograd's route names it
        for u, g in zip(uses, gs):
            u.g = g
            u.values = (u.x.detach().reshape(-1, u.x.shape[-1]), g.detach().reshape(-1, g.shape[-1]))
        return cls(uses, input_gradients, others, [leaves[n] for n in others], other_gradients), losses

    def accumulate(self, vector: Mapping[str, torch.Tensor], into: Mapping[str, torch.Tensor], alpha: float,
                   last: bool, stacked: bool = False) -> None:
        """``into[n] += alpha · (H v)_n`` for every parameter ``n``, ``vector`` and ``into`` parameter-shaped
        (``vector`` in each parameter's dtype), or with a leading dimension of m vectors (``stacked``: one batched
        second backward, as autograd's route takes a stack); ``last=True`` frees the graph."""
        if self._freed:
            raise RuntimeError("This graph was freed by a product with last=True; build another.")
        if not stacked:
            vector = {n: t.unsqueeze(0) for n, t in vector.items()}
            into = {n: t.unsqueeze(0) for n, t in into.items()}
        m = next(iter(vector.values())).shape[0]
        outputs, grad_outputs = [], []  # (a gradient that is a constant, as a loss linear in y makes g, adds none)
        for u in self._uses:  # s = Σ ⟨g, x Vᵀ + b_v⟩ over the layers: its derivatives at g and at x
            v_w = vector[u.weight]
            x, g = u.values
            if u.g.requires_grad:
                at_g = x @ v_w.transpose(1, 2)  # (m, tokens, out)
                if u.bias is not None:
                    at_g = at_g.add_(vector[u.bias].unsqueeze(1))
                outputs.append(u.g)
                grad_outputs.append(at_g.view(m, *u.g.shape))
            if u.input_gradient is not None:
                outputs.append(u.x)
                grad_outputs.append((g @ v_w).view(m, *u.x.shape))
        for name, gradient in zip(self._others, self._other_gradients):
            if gradient.requires_grad:
                outputs.append(gradient)
                grad_outputs.append(vector[name])
        varying = [t for t in self._input_gradients if t.requires_grad]
        wanted = [u.y for u in self._uses] + varying + self._other_leaves
        try:
            if not outputs:  # the loss is linear in every parameter: H = 0
                adjoints = [None] * len(wanted)
            elif stacked:
                adjoints = batched_grad(outputs, wanted, grad_outputs, allow_unused=True)
            else:
                adjoints = [None if a is None else a.unsqueeze(0) for a in torch.autograd.grad(
                    outputs, wanted, grad_outputs=[t[0] for t in grad_outputs], retain_graph=not last,
                    allow_unused=True)]
        finally:
            if last:
                self._freed = True
        at_y = adjoints[:len(self._uses)]
        found = iter(adjoints[len(self._uses):len(self._uses) + len(varying)])
        at_inputs = [next(found) if t.requires_grad else None for t in self._input_gradients]
        for u, y_bar in zip(self._uses, at_y):
            target = into[u.weight]  # (m, out, in)
            x, g = u.values
            y_bar = g.new_zeros((m, *g.shape)) if y_bar is None else y_bar.reshape(m, *g.shape)
            x_bar = None if u.input_gradient is None else at_inputs[u.input_gradient]
            add_weight_block(target, y_bar, g.expand(m, *g.shape), x.expand(m, *x.shape),
                             None if x_bar is None else x_bar.reshape(m, *x.shape), alpha)
            if u.bias is not None:
                into[u.bias].add_(y_bar.sum(1), alpha=alpha)
        for name, product in zip(self._others, adjoints[len(self._uses) + len(varying):]):
            if product is not None:
                into[name].add_(product, alpha=alpha)
        if last:
            self._uses, self._input_gradients, self._other_gradients = [], [], []


def add_weight_block(target: torch.Tensor, y_bar: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                     x_bar: torch.Tensor | None, alpha: float) -> None:
    """``target += alpha · (ȳᵀx + gᵀx̄)`` for a batch of linear layers' weight blocks (``target`` ``(b, out, in)``,
    ``ȳ`` and ``g`` ``(b, n, out)``, ``x`` and ``x̄`` ``(b, n, in)``): ``[ȳ; g]ᵀ [x; x̄]`` in one product, or ``ȳᵀx``
    alone where ``x̄`` is None (the layer's input needs no gradient)."""
    if x_bar is None:
        left, right = y_bar, x
    else:
        left, right = torch.cat([y_bar, g], dim=1), torch.cat([x, x_bar], dim=1)
    target.baddbmm_(cast_like(left, target).transpose(1, 2), cast_like(right, target), alpha=alpha)


def cast_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s dtype (itself where it already is)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)
