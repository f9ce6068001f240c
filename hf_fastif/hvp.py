"""Gradients and Hessian-vector products of a `FunctionalModel` on one batch.

Vectors are flat: ``(p,)`` or a stack ``(m, p)`` in the order of ``FunctionalModel.names``. Hessian-vector
products use double backward (reverse-over-reverse): measured faster than forward-over-reverse on CPU.
Several vectors share one forward and one first backward (``is_grads_batched``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .loss import FunctionalModel
from .params import flatten, flatten_batched, unflatten


def _leaves(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}


def _gradient(outputs: torch.Tensor, leaves: Mapping[str, torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """``autograd.grad`` of ``outputs`` w.r.t. the parameters, with a clear error naming any parameter the loss does
    not use (autograd's own names an index only)."""
    grads = torch.autograd.grad(outputs, list(leaves.values()), allow_unused=True, **kwargs)
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


def _batched_grad(outputs: torch.Tensor, inputs: list[torch.Tensor], grad_outputs: torch.Tensor,
                  create_graph: bool = False) -> list[torch.Tensor]:
    """``autograd.grad`` for a stack of ``grad_outputs``; falls back to a loop where vmap cannot go."""
    try:
        return list(torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, is_grads_batched=True,
                                        retain_graph=True, create_graph=create_graph))
    except RuntimeError:
        rows = [torch.autograd.grad(outputs, inputs, grad_outputs=g, retain_graph=True, create_graph=create_graph)
                for g in grad_outputs]
        return [torch.stack(parts) for parts in zip(*rows)]


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
    leaves = _leaves(params)
    values, l2 = fm.values_without_l2(leaves, batch, measurement)
    inputs = list(leaves.values())
    if reduction == "sum":
        gradient = flatten(_gradient(values.sum(), leaves))
        return gradient + values.shape[0] * fm.l2_gradient(params).to(gradient.dtype) if l2 else gradient
    rows = values.shape[0]
    eye = torch.eye(rows, dtype=values.dtype, device=values.device)
    try:
        gradients = flatten_batched(_batched_grad(values, inputs, eye), rows).detach()
    except RuntimeError as err:
        if "not have been used in the graph" in str(err):
            _gradient(values.sum(), leaves, retain_graph=True)  # raises, naming the unused parameters
        raise
    if row_batch is not None and rows > 1 and not bool(torch.isfinite(gradients).all()):
        return torch.cat([batch_gradient(fm, params, row_batch(i), measurement=measurement, reduction="none")
                          for i in range(rows)])
    return gradients + fm.l2_gradient(params).to(gradients.dtype) if l2 else gradients


def batch_hvp(fm: FunctionalModel, params: Mapping[str, torch.Tensor], batch, vectors: torch.Tensor,
              *, reduction: str = "mean", out: torch.Tensor | None = None, l2_term: bool = True) -> torch.Tensor:
    """Hessian of the batch's training loss times ``vectors`` (``(p,)`` or ``(m, p)``), same shape out.

    ``reduction="mean"`` uses the mean loss of the batch (LiSSA), ``"sum"`` the summed loss (to accumulate
    the mean over a whole dataset exactly, whatever the batch size). One vector (``(p,)``, or a ``(1, p)`` stack)
    takes the plain double backward (no batched-gradient machinery), with the vector handed to autograd per
    parameter; ``out`` (``(p,)``, for a ``(p,)`` vector) receives the result without an extra copy.
    ``l2_term=False`` leaves out the L2 term's Hessian (the data term alone, e.g. for the low-rank solver, which
    keeps the L2 term exactly).
    """
    if vectors.dim() == 2 and vectors.shape[0] == 1:  # a stack of one: the single-vector path
        return batch_hvp(fm, params, batch, vectors[0], reduction=reduction, l2_term=l2_term).unsqueeze(0)
    leaves = _leaves(params)
    inputs = list(leaves.values())
    losses, _ = fm.values_without_l2(leaves, batch)
    l2 = fm.l2_in_hessian and l2_term
    loss = losses.mean() if reduction == "mean" else losses.sum()
    grads = _gradient(loss, leaves, create_graph=True)
    weight = 1.0 if reduction == "mean" else float(losses.shape[0])  # the L2 term's Hessian: weight · 2wd · I
    if vectors.dim() == 1:
        parts = [t.to(g.dtype) for t, g in zip(unflatten(vectors, leaves).values(), grads)]
        products = torch.autograd.grad(grads, inputs, grad_outputs=parts)
        if out is None:
            out = flatten(products)
        else:
            torch.cat([t.reshape(-1).to(out.dtype) for t in products], out=out)
        if l2:
            out.addcmul_(fm.l2_mask(params).to(out.dtype), vectors.to(out.dtype), value=weight)
        return out
    flat = flatten(grads)
    products = flatten_batched(_batched_grad(flat, inputs, vectors.to(flat.dtype)), vectors.shape[0]).detach()
    return products + weight * fm.l2_mask(params).to(products.dtype) * vectors.to(products.dtype) if l2 else products


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

    with torch.no_grad():
        if vectors.shape[0] == 1:
            out = one({n: t[0] for n, t in tangents.items()}).unsqueeze(0)
        else:
            out = torch.func.vmap(one)(tangents)
        if fm.decayed and fm.l2_in_gradients:  # the L2 term's directional derivative, the same for every row
            out = out + (vectors.to(out.dtype) @ fm.l2_gradient(params).to(out.dtype))[:, None]
    return out.T.detach()
