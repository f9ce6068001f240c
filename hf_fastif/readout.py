"""The read position: the last layer's per-position work done only where the loss reads it.

A sequence classifier reads the last layer of its stack at one position: BERT's pooler, RoBERTa's, ELECTRA's and
DistilBERT's heads take the first token. A layer mixes positions only in its attention; what follows (the output
projection's residual and norm, the feed-forward block) works on each position alone, so at every other position
it computes values no loss reads. On MiniLM's last layer + pooler + classifier from the cached trunk, a single-row
Hessian-vector product's matrix products drop from 0.47 to 0.13 GFLOP with the cut, and the product costs ~1.4x less
(docs/benchmarks.md, "Against the 2021 reference code").

`find_readout` cuts the last layer there, generically, and only where it can show that nothing changes:

1. The loss (and the measurement, if one is set) must have a gradient with respect to the last layer's output that
   is zero at every position but the first, and not zero at the first, on probe rows: a head that reads any other
   position (GPT-2's last token, token classification, a mean over tokens, a causal LM, a `loss_fn` reading hidden
   states) is never cut, and neither is one that reads nothing at the current weights (a zero-initialised
   classifier: undecided; the engine decides again when the weights change).
2. Cuts are tried in the order the layer calls its direct submodules: for each, first at the inputs of each of its
   own submodules that is a block of modules, in their call order (a forward pre-hook keeps position 0 of the first
   tensor argument and of every argument of that shape, the same arguments on every forward as on the probes; not
   at a single linear layer or norm, whose hook would keep it off the products' fast routes), then after its output
   (a forward hook keeps position 0). The first cut is used
   where, on every probe, the cut layer runs once and returns one position, and the losses, the measurements and
   the parameter gradients equal the uncut ones within float rounding. BERT-style layers are cut at the inputs of
   ``attention.output`` (the context and the residual: the attention's output projection and its norm then run at
   one position too; a cut after ``attention``, as before, left them at every position: MiniLM's first calls of the
   reference benchmark 7.79 → 6.70 s, the tiny BERT's 2.86 → 2.57 s, medians of 4 interleaved each, at a slow hour
   of this host). A cut at ``attention.self``'s inputs would take the keys and values too and is refused by the
   comparison. DistilBERT is cut after ``sa_layer_norm`` (its attention's residual is added outside the attention
   module, so no cut inside the attention returns one position); a layer whose submodules are shared with other
   layers (ALBERT) fails the comparison and is not cut.

The cut applies only to the forwards `hf_fastif.loss.FunctionalModel` runs (losses and measurements: Hessian-vector
products, gradients, JVP scoring); predictions and kNN features run the whole layer. Where the last layer is in the
cached trunk (only a pooler and a head take part), the engine uses a cut found on the whole model to compute that
trunk at the first position (`hf_fastif.trunk.TrunkCache`'s ``first_position``). A cut forward that raises on a
batch unlike the probes (a model that pads internally, as Longformer does to its attention window) marks the cut
failed and runs whole, with a warning. ``influence_skip_unread_positions=False`` turns it off. Under a ``loss_fn`` or
``measurement_fn`` of one's own (``reads``) there is no cut where it reads any of the model's outputs that hold a
value per position (`per_position_outputs`): the probes cannot show every row's read of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .trunk import layer_stacks, output_entries, reads_any
from .utils import relative_difference

READOUT_TOLERANCE = 1e-5
"""Largest relative difference between cut and uncut probe losses that counts as float rounding (20 machine
epsilons of the model's dtype where that is more: float16 0.02, bfloat16 0.16)."""


INPUTS_SUFFIX = " (inputs)"
"""How a cut at a block's inputs is named, after the block's dotted name (a table's ``cut_after``)."""


def cut_in_words(name: str | None) -> str:
    """A `Readout`'s name (a table's ``cut_after``) in words: "after X", "at the inputs of X", or "none"."""
    if name is None:
        return "none (the last layer runs at every position)"
    return f"at the inputs of {name.removesuffix(INPUTS_SUFFIX)}" if name.endswith(INPUTS_SUFFIX) else f"after {name}"


@dataclass
class Readout:
    """Where the last layer of a stack is cut to its first position.

    Attributes:
        module: the submodule of the last layer (or of one of its direct submodules, with ``inputs``) where the cut
            is.
        name: its dotted name in the model, followed by " (inputs)" where the cut is at its inputs (for logs and a
            table's diagnostics).
        failed: why a cut forward raised, if one did (a batch unlike the probe rows); the cut is then not used.
        inputs: cut ``module``'s inputs rather than its output: its first tensor argument, and every other argument
            of that same shape (BERT's attention output block takes the attention's context and the residual, both
            ``(batch, positions, hidden)``), keep only position 0.
        arguments: with ``inputs``, which arguments those were at the first forward through the cut (a probe's):
            ``(positional indices, keyword names)``. A later forward whose arguments of the lead's shape are others
            (an argument of a fixed length equal to this batch's padded length, say) raises ``ValueError``, so that
            forward runs whole and the cut is marked failed, instead of cutting that argument too.
    """

    module: nn.Module
    name: str
    failed: str | None = None  # set when a cut forward raised: the cut is not used again (see `FunctionalModel`)
    inputs: bool = False
    arguments: tuple[tuple[int, ...], tuple[str, ...]] | None = None

    fired: bool = False  # whether a forward inside `active` reached the cut

    @property
    def where(self) -> str:
        """Where the cut is, in words (for logs): "after X", or "at the inputs of X"."""
        return cut_in_words(self.name)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, ``module``'s output (or, with ``inputs``, its inputs) keeps only position 0 (dimension
        1)."""
        self.fired = False

        def first_positions(module, args, kwargs):
            self.fired = True
            lead = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
            if lead is None or lead.dim() < 3:
                raise TypeError(f"{type(module).__name__} takes no (batch, positions, ...) tensor to cut.")

            def like(t) -> bool:
                return isinstance(t, torch.Tensor) and t.shape == lead.shape

            found = (tuple(i for i, a in enumerate(args) if like(a)),
                     tuple(sorted(k for k, v in kwargs.items() if like(v))))
            if self.arguments is None:
                self.arguments = found
            elif found != self.arguments:
                raise ValueError(f"{type(module).__name__}'s arguments of shape {tuple(lead.shape)} are {found}, not "
                                 f"{self.arguments} as on the rows the cut was checked on")
            return (tuple(a[:, :1] if i in found[0] else a for i, a in enumerate(args)),
                    {k: v[:, :1] if k in found[1] else v for k, v in kwargs.items()})

        def first_position(module, args, output):
            self.fired = True
            if isinstance(output, torch.Tensor):
                return output[:, :1]
            if type(output) is tuple and output and isinstance(output[0], torch.Tensor):
                return (output[0][:, :1], *output[1:])
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}: cannot keep its first "
                            "position.")

        if self.inputs:
            handle = self.module.register_forward_pre_hook(first_positions, with_kwargs=True)
        else:
            handle = self.module.register_forward_hook(first_position)
        try:
            yield
        finally:
            handle.remove()


def _hidden(output) -> torch.Tensor | None:
    """The hidden states of a layer's output: the tensor, or the first of a plain tuple (not of a named tuple, whose
    fields the model reads by name and a rebuilt tuple would lose)."""
    if isinstance(output, torch.Tensor):
        return output
    if type(output) is tuple and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _replace_hidden(output, hidden: torch.Tensor):
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


@torch.enable_grad()
def find_readout(fm, params: Mapping[str, torch.Tensor], batches: Sequence[Mapping],
                 test_batches: Sequence[Mapping] = (), *,
                 reads: Callable[[object, dict], torch.Tensor] | None = None) -> tuple[Readout | None, str]:
    """Where ``fm``'s model can run its last layer at the first position only; ``(None, reason)`` where it cannot
    (see the module docstring).

    Args:
        fm: a `hf_fastif.loss.FunctionalModel` without a readout (its losses and measurements are what must not
            change).
        params: the selected parameters' values.
        batches: training probe batches, collated with their labels (and trunk states, if the call has them):
            their losses are checked. Give rows of different lengths alone and padded together (a model that pads
            internally, such as Longformer to its attention window, shows up only on some lengths).
        test_batches: test probe batches: their measurements are checked (a measurement may need test labels the
            training rows do not have); default: the training batches.
        reads: the caller's own ``loss_fn`` / ``measurement_fn``, ``(outputs, batch) -> values``: no cut where they
            read any of the model's outputs that hold a value per position (`per_position_outputs`; read: their
            values' graph reaches it, `hf_fastif.trunk.reads_any`), which they may read at positions the probes
            do not show.
    """
    if isinstance(batches, Mapping) or isinstance(test_batches, Mapping):
        raise TypeError("find_readout takes lists of collated batches (batches=[batch, ...]), not one batch.")
    model = fm.model
    stacks = layer_stacks(model)
    if len(stacks) != 1:
        return None, f"{type(model).__name__} has {len(stacks)} layer stacks; the cut needs exactly one"
    path, layers = stacks[0]
    last = layers[-1]
    if fm.split is not None and fm.split.first >= len(layers):
        return None, f"{path}.{len(layers) - 1} is in the cached trunk (it does not run)"
    probes = [(b, False) for b in batches] + [(b, True) for b in (test_batches or batches)]
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    if reads is not None and probes:
        # (on two probes of different lengths where there are: a classifier's (b, classes) logits may be as wide as
        # one batch's positions, not as both)
        rows = probes[0][0]
        other = next((b for b, _ in probes if _positions(b) != _positions(rows)), None)
        with torch.no_grad():
            outputs = fm.outputs(leaves, rows)
            paths = per_position_outputs(outputs, _positions(rows))
            if paths and other is not None:
                wide = set(per_position_outputs(fm.outputs(leaves, other), _positions(other)))
                paths = [path for path in paths if path in wide]
        if paths and reads_any(reads, outputs, paths, dict(rows)):
            names = ", ".join(dict.fromkeys(str(path[0]) if path else "outputs" for path in paths))
            return None, (f"a loss_fn or measurement_fn of one's own reads the model's per-position outputs "
                          f"({names}), which it may read at any position, and the cut would leave at one")
    weights = torch.Generator().manual_seed(0)

    def values(rows, measurement: bool) -> torch.Tensor:
        return fm.values_without_l2(leaves, rows, measurement)[0].reshape(-1)

    # 1. which positions of the last layer's output do the loss and the measurement read?
    seen: dict = {}

    def leaf(module, args, output):  # the layer's output as a leaf, so its gradient is defined without the params'
        hidden = _hidden(output)
        if hidden is None:
            return None
        seen["hidden"] = hidden.detach().requires_grad_(True)
        return _replace_hidden(output, seen["hidden"])

    # the last layer's direct submodules and theirs, each list in the order of the calls
    called: dict[nn.Module | None, list[nn.Module]] = {}

    def recorder(parent: nn.Module | None):
        def record(module, args):
            if module not in called.setdefault(parent, []):
                called[parent].append(module)
        return record

    handles = [last.register_forward_hook(leaf)]
    for child in last.children():
        handles.append(child.register_forward_pre_hook(recorder(None)))
        handles += [inner.register_forward_pre_hook(recorder(child)) for inner in child.children()]
    try:
        for rows, measurement in probes:
            seen.clear()
            out = values(rows, measurement)
            hidden = seen.get("hidden")
            if hidden is None or hidden.dim() < 3:
                return None, f"{path}.{len(layers) - 1} does not return (batch, positions, hidden) states"
            grad = torch.autograd.grad(out.sum(), hidden, allow_unused=True)[0] if out.requires_grad else None
            if grad is not None and bool((grad[:, 1:] != 0).any()):
                return None, "the loss reads the last layer at other positions than the first"
            if grad is None or not bool((grad[:, 0] != 0).any()):  # e.g. a zero-initialised head: undecided
                return None, "the loss does not depend on the last layer's first position at these weights"
    finally:
        for handle in handles:
            handle.remove()
    if all(_positions(rows) < 2 for rows, _ in probes):
        return None, "the probe rows have one position: nothing to cut"
    reference = []  # per probe: the values and the gradient of a random combination of them w.r.t. the parameters
    for rows, measurement in probes:
        out = values(rows, measurement)
        if not out.requires_grad:  # (the gradient's own check names the parameters the loss does not read)
            return None, "the loss reads none of the influence parameters"
        mix = torch.randn(out.shape, generator=weights, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
        grads = torch.autograd.grad(out @ mix, list(leaves.values()), allow_unused=True)
        reference.append((out.detach().double(), mix, _flat(grads, leaves)))
        if not bool((reference[-1][2] != 0).any()):  # saturated rows: nothing left to compare a cut against
            return None, "the probe rows' parameter gradients vanish at these weights"

    # 2. the earliest cut in the last layer that gives the same values and gradients: at the inputs of a direct
    # submodule's own submodules (BERT's attention output block: its projection and norm then run at one position
    # too), or after a direct submodule, in the order the layer calls them
    names = {id(m): n for n, m in last.named_modules()}
    tolerance = max(READOUT_TOLERANCE, 20 * torch.finfo(next(iter(params.values())).dtype).eps)
    layer = f"{path}.{len(layers) - 1}"
    for child in called.get(None, []):
        # (blocks only: a hook on a linear layer or a norm keeps it off the products' fast routes,
        # `hf_fastif.linear_products`, and the cut would save its own work only)
        cuts = [Readout(inner, f"{layer}.{names[id(inner)]}{INPUTS_SUFFIX}", inputs=True)
                for inner in called.get(child, []) if next(inner.children(), None) is not None]
        for readout in [*cuts, Readout(child, f"{layer}.{names[id(child)]}")]:
            if _agrees(readout, last, probes, reference, values, leaves, tolerance):
                return readout, ""
    return None, f"no submodule of {layer} can be cut without changing the loss"


def per_position_outputs(outputs, positions: int) -> list[tuple]:
    """The paths (keys and indices from the top) of the floating tensors in a model's ``outputs`` (nested mappings and
    sequences followed; the loss aside) with a value per position of a ``positions``-long batch: ``(b, s, ...)``
    states (``hidden_states``, ``last_hidden_state``, token logits), ``(b, heads, s, s)`` attentions, ``(b, s)``
    scores. Under the cut the last layer's hold one position, so a ``loss_fn`` of one's own reading them at a
    position that depends on the row (a marker token's state, in a review: 1.6% off, or an IndexError) is never
    cut; one that reads only a classifier's ``(b, classes)`` logits reads what the cut leaves as it was."""
    return [path for path, value in output_entries(outputs)
            if isinstance(value, torch.Tensor) and value.is_floating_point()
            and (value.dim() >= 3 or (value.dim() == 2 and value.shape[1] == positions))]


def _agrees(readout: Readout, last: nn.Module, probes, reference, values, leaves, tolerance: float) -> bool:
    """Whether every probe, cut at ``readout``, runs the last layer once at one position and gives the uncut values
    and gradients (relative to their largest entry)."""
    lengths: list[int] = []  # the positions of each output of the last layer

    def length(module, args, output):
        hidden = _hidden(output)
        lengths.append(-1 if hidden is None or hidden.dim() < 3 else hidden.shape[1])

    for (rows, measurement), (out_ref, mix, grad_ref) in zip(probes, reference):
        lengths.clear()
        handle = last.register_forward_hook(length)
        try:
            with readout.active():
                out = values(rows, measurement)
                grads = torch.autograd.grad(out @ mix, list(leaves.values()), allow_unused=True)
        except (RuntimeError, IndexError, ValueError, TypeError, AssertionError):
            return False  # the layer's own code cannot continue from one position there
        finally:
            handle.remove()
        if lengths != [1] or out.shape != out_ref.shape:
            return False  # no saving there (a residual broadcast the cut back), or a layer run more than once
        for cut, whole in ((out.detach().double(), out_ref), (_flat(grads, leaves), grad_ref)):
            # relative to their own size, however small (near-saturated probe rows have tiny losses and gradients)
            if not relative_difference(cut, whole) <= tolerance:
                return False
    return True


def _flat(grads, leaves) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, leaves.values())])


def _positions(batch: Mapping) -> int:
    ids = batch.get("input_ids", batch.get("attention_mask"))
    return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else 2
