"""LiSSA's repetitions of one step as one batched computation: ``H_r @ v_r`` for every repetition r at once.

At a step, repetition r multiplies its own iterates (one per test vector) by the Hessian of its own sampled batch.
The engine's default runs those R products one after another, each from a kept first-backward graph
(`hf_fastif.hvp`). Here the R batches are collated together and the products come from one ``torch.func.vmap``
over the batches of a Hessian-vector product (the vector-Jacobian product of the gradient: one forward and one first
backward per batch, its m vectors sharing them), batch r with vectors r: one forward, one first and one second
backward for all R, each with R times the work. On a GPU, where a single-row step is bound by its ~800 kernel
launches rather than by arithmetic (docs/benchmarks.md, "On a GPU"), R products then cost about one; on a CPU, where a
step is bound by its operators' work, the same computation measured slower than the kept graphs, which is why
``influence_stack_repetitions="auto"`` stacks this way on CUDA devices only. Where every influence parameter sits in an
``nn.Linear``, ``nn.LayerNorm`` or ``nn.Embedding``, the engine takes the grouped route instead, on any device
(`hf_fastif.grouped_products`: the R groups' products from one forward and one backward without vmap).

Under vmap the model's own 2-D attention-mask code cannot run (it branches on the mask's values), so the model is
given the batch's ``(b, s)`` 0/1 mask as the ``(b, 1, s, s)`` additive mask it would build (causal as well where the
model's attention is, `is_causal`; the loss still reads the 0/1 mask); the rows of all R batches are padded to one
length, as rows in one batch always are. A model whose attention sees a window of the positions, or whose layers
build masks of several kinds, cannot take one such mask and is not stacked (`unstackable_attention`). The engine
checks the stacked products against the ones taken one batch at a time (`StackedHessian.alone`,
`hf_fastif.utils.relative_difference`) on each call's first step and again on any step whose rows are longer than
every row checked before, so a model whose forward does not survive vmap, or whose masks differ from the ones built
here, falls back to the default with a log line instead of giving other numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .arguments import STACK_MODES
from .hvp import batch_hvp
from .loss import FunctionalModel, stacking
from .params import flatten_batched, unflatten_cast
from .trunk import split_tolerance
from .utils import HALF_DTYPES, input_embeddings


class NotStackable(ValueError):
    """The batch cannot be split into the repetitions' batches (a tensor that is not laid out by rows, an attention
    mask that is not ``(b, s)``)."""


def stacks(mode: str, device: torch.device, repetitions: int, grouped: bool = False) -> bool:
    """Whether a LiSSA call with ``repetitions`` repetitions here stacks its steps under ``mode`` (`STACK_MODES`):
    only with at least two repetitions; ``"auto"`` on CUDA devices, and on any device where ``grouped`` (the
    products can be taken per group from activations, `hf_fastif.grouped_products`)."""
    if mode not in STACK_MODES:
        raise ValueError(f"influence_stack_repetitions must be one of {', '.join(STACK_MODES)}; got {mode!r}.")
    if repetitions < 2 or mode == "no":
        return False
    return mode == "yes" or grouped or torch.device(device).type == "cuda"


def is_causal(model: nn.Module) -> bool:
    """Whether the model's attention is causal (an attention module says ``is_causal = True``, as GPT-2's, Llama's
    and every decoder's in transformers do)."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


WINDOW_SETTINGS = ("sliding_window", "attention_chunk_size", "local_attention", "attention_window")
"""Config fields of attention that sees a window of the positions (Mistral's and Qwen2's sliding window, Llama 4's
chunks, ModernBERT's local layers, Longformer's window): one 4-D mask for every layer cannot say that."""


def unstackable_attention(model: nn.Module) -> str | None:
    """Why the model's attention cannot take the one 4-D mask `additive_mask` builds (``None`` where it can): a window
    or chunk of positions in some layer, or layers of several kinds (``config.layer_types``), for which transformers
    builds a mask per kind and would use a given 4-D mask for all of them. Such a model gives the same products on
    rows shorter than its window, so the first step's check cannot be trusted to see it."""
    configs, seen = [getattr(model, "config", None)], []
    while configs:
        config = configs.pop()
        if config is None or any(config is c for c in seen):
            continue
        seen.append(config)
        if getattr(config, "use_sliding_window", True) is not False:
            for name in WINDOW_SETTINGS:
                if getattr(config, name, None) not in (None, 0, False, [], ()):
                    return f"its attention sees a window of the positions (config.{name})"
        kinds = set(getattr(config, "layer_types", None) or ())
        if kinds - {"full_attention"}:
            return f"its layers' attention is of other kinds than full attention (config.layer_types: {sorted(kinds)})"
        configs += [v for v in getattr(config, "__dict__", {}).values()
                    if hasattr(v, "to_dict") and hasattr(v, "model_type")]  # (sub-configs: text_config, ...)
    return None


def additive_mask(mask: torch.Tensor, dtype: torch.dtype, causal: bool) -> torch.Tensor:
    """The ``(b, 1, s, s)`` additive mask for a ``(b, s)`` 0/1 attention mask: 0 where a query may attend to a key,
    the dtype's lowest value where not (a padded key; with ``causal``, a later one too)."""
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
    if causal:
        allowed = allowed & torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool, device=mask.device).tril()
    out = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def _hidden_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's hidden states, which its attention scores and so its additive mask take: its input
    embeddings' (a bfloat16 model with a float32 head, as PEFT trains one, is bfloat16 there); float32 where the
    model has none."""
    weight = getattr(input_embeddings(model), "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


def stack_tolerance(model: nn.Module) -> float:
    """The largest difference, relative to the largest entry, the engine's check of a stacked step accepts between
    the stacked products and the products one at a time (`hf_fastif.utils.relative_difference`): 1e-2 where a
    parameter is bfloat16 / float16 (two such computations round apart by ~3e-4 on a BERT layer), else the trunk
    split's (`hf_fastif.trunk.split_tolerance`: 1e-9 for a float64 model, 1e-4 otherwise)."""
    if any(p.dtype in HALF_DTYPES for p in model.parameters()):
        return 1e-2
    return split_tolerance(model)


class GroupsHessian:
    """Products of R groups' Hessians (each group's mean training loss, without the L2 term) with their own vectors:
    what the two ways of taking them in one computation (`StackedHessian` here, vmapped;
    `hf_fastif.grouped_products.GroupedHessian`, from activations) share, and what both are checked against."""

    def __init__(self, fm: FunctionalModel, params: Mapping[str, torch.Tensor]):
        self._fm = fm
        self._primals = {n: p.detach() for n, p in params.items()}

    def alone(self, batches: Sequence[Mapping[str, torch.Tensor]], vectors: torch.Tensor) -> torch.Tensor:
        """``(R, m, p)``: the products of ``batches`` (group r's rows collated alone) with ``vectors`` one batch at a
        time (`batch_hvp`, what the products in one computation are checked against)."""
        return torch.stack([batch_hvp(self._fm, self._primals, b, v, l2_term=False).to(vectors.dtype)
                            for b, v in zip(batches, vectors)])


class StackedHessian(GroupsHessian):
    """Products of R batches' Hessians (each batch's mean training loss, without the L2 term) with R stacks of m
    vectors, in one vmapped computation: per batch one forward and one first backward, the m vectors sharing them
    (a vmapped vector-Jacobian product of the gradient).

    Args:
        fm: the functional model (with its trunk split and last-layer cut: they run under vmap as they run alone).
        params: the influence parameters.
    """

    def __init__(self, fm: FunctionalModel, params: Mapping[str, torch.Tensor]):
        super().__init__(fm, params)
        self._causal = is_causal(fm.model)
        self._mask_dtype = _hidden_dtype(fm.model)

    def split(self, batch: Mapping[str, torch.Tensor], groups: int) -> tuple[dict, dict]:
        """``batch`` (``groups · B`` rows, group r's B rows together) as ``(groups, B, ...)`` tensors, twice: for
        the model, its attention mask additive (`additive_mask`), and as it is, for the loss."""
        rows = None
        model, loss = {}, {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                raise NotStackable(f"the batch's {key!r} is not a tensor of rows")
            if rows is None:
                rows = value.shape[0]
            if value.shape[0] != rows or rows % groups:
                raise NotStackable(f"the batch's {key!r} has {value.shape[0]} rows, not {groups} groups of "
                                   f"{(rows or 0) // groups}")
            loss[key] = value.reshape(groups, rows // groups, *value.shape[1:])
            if key == "attention_mask":
                if value.dim() != 2:
                    raise NotStackable(f"the attention mask is {value.dim()}-D, not (b, s)")
                value = additive_mask(value, self._mask_dtype, self._causal)
            model[key] = value.reshape(groups, rows // groups, *value.shape[1:])
        return model, loss

    def products(self, batch: Mapping[str, torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
        """``(R, m, p)``: ``[r, i]`` is the Hessian of the mean loss of group r of ``batch`` (its rows
        ``r·B … (r+1)·B - 1``) times ``vectors[r, i]`` (``(R, m, p)``), in ``vectors``' dtype."""
        groups, m, p = vectors.shape
        model_batches, loss_batches = self.split(batch, groups)
        fm, primals = self._fm, self._primals

        def one(model_batch: dict, loss_batch: dict, stack: torch.Tensor) -> dict:
            def mean_loss(w):
                return fm.value_fn()(fm.outputs(w, model_batch), loss_batch).mean()

            _, along = torch.func.vjp(torch.func.grad(mean_loss), primals)  # (the Hessian is symmetric: H u)

            def product(u: torch.Tensor) -> dict:
                return along(unflatten_cast(u, primals))[0]

            return torch.func.vmap(product)(stack) if m > 1 else {n: t[None] for n, t in product(stack[0]).items()}

        with stacking():
            out = torch.func.vmap(one)(model_batches, loss_batches, vectors)
        return torch.stack([flatten_batched([out[n][:, i].to(vectors.dtype) for n in primals], groups)
                            for i in range(m)], dim=1)
