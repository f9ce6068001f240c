"""Which parameters take part in influence, and flatten/unflatten helpers."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The paper's selection for bert-base: layers 10-11, the pooler and the classifier (14.7M parameters).
PAPER_BERT_PARAMS = [r"encoder\.layer\.(10|11)\.", r"pooler\.", r"classifier\."]

_NO_DECAY = re.compile(r"(^|\.)bias$|layer_?norm|LayerNorm|\.ln_|norm\.weight$", re.IGNORECASE)
# the Trainer's own patterns (transformers' Trainer.get_decay_parameter_names), over the lower-cased name
_TRAINER_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def select_parameters(model: nn.Module, patterns: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Parameters that take part, by name in module order.

    Args:
        model: the model.
        patterns: regexes searched in each parameter name; ``None`` selects every parameter with
            ``requires_grad``.
    Returns:
        ``{name: parameter}``, detached (the math is functional).
    """
    named = list(model.named_parameters())
    if patterns is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "No parameter of the model has requires_grad=True; unfreeze some or pass influence_params "
                "(regexes over parameter names). (Inside PEFT's `with model.disable_adapter():` no parameter "
                "requires grad: pass influence_params there. An adapter loaded with PeftModel.from_pretrained is "
                "frozen unless is_trainable=True.)"
            )
    else:
        regexes = [re.compile(p) for p in patterns]
        # a tied weight is listed once, under its first name; a pattern that matches no listed name may name it by
        # another (GPT-2's lm_head.weight is transformer.wte.weight): it selects the tensor, under the listed name. A
        # pattern that matches listed names never reaches through aliases (BERT's `cls\.` would add the embeddings)
        listed: dict[int, str] = {}
        canonical = {n: listed.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)}
        matched, aliased = set(), []
        for regex in regexes:
            own = {n for n, _ in named if regex.search(n)}
            if not own:
                aliases = [n for n in canonical if canonical[n] != n and regex.search(n)]
                own = {canonical[n] for n in aliases}
                aliased += [f"{n} (as {canonical[n]})" for n in aliases]
            matched |= own
        chosen = [(n, p) for n, p in named if n in matched]
        if aliased:
            logger.warning_once(f"influence_params select tied weights by another of their names: "
                                f"{', '.join(sorted(aliased))}; they are the same tensors, listed under those names.")
        if not chosen:
            sample = ", ".join(n for n, _ in named[:8])
            raise ValueError(
                f"influence_params={list(patterns)} matches no parameter of {type(model).__name__}. "
                f"Parameter names look like: {sample}, ... (regexes are searched, e.g. r'classifier\\.')."
            )
        unmatched = [p for p, r in zip(patterns, regexes) if not any(r.search(n) for n in canonical)]
        if unmatched:  # a pattern list written for several architectures may miss a part (RoBERTa has no pooler)
            logger.warning_once(
                f"influence_params {unmatched} match no parameter of {type(model).__name__}; the other patterns "
                f"select {len(chosen)} parameter tensors. Check them for a typo (names look like {chosen[0][0]}).")
    return {n: p.detach() for n, p in chosen}


def decayed_names(names: Sequence[str], model: nn.Module | None = None) -> list[str]:
    """Names that get the explicit L2 term: not biases or normalisation weights, as in the reference code and as the
    Trainer decays (`Trainer.get_decay_parameter_names`: its name patterns, and with ``model`` every parameter of an
    ``nn.LayerNorm``). PEFT's copy of a norm (``model.norm.modules_to_save.default.weight``) escaped the reference
    code's patterns and got the L2 term; a BatchNorm weight named otherwise keeps it, as the Trainer decays it."""
    def in_a_layer_norm(name: str) -> bool:
        owner, _, _ = name.rpartition(".")
        try:
            return isinstance(model.get_submodule(owner), nn.LayerNorm)
        except AttributeError:
            return False

    return [n for n in names if not _NO_DECAY.search(n) and not _TRAINER_NO_DECAY.search(n.lower())
            and not (model is not None and in_a_layer_norm(n))]


def num_parameters(params: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())


def flatten(tensors: Sequence[torch.Tensor] | dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one vector. With a leading batch dimension ``lead``: ``(lead, p)``."""
    if isinstance(tensors, dict):
        tensors = list(tensors.values())
    return torch.cat([t.reshape(-1) for t in tensors])


def flatten_batched(tensors: Sequence[torch.Tensor] | dict[str, torch.Tensor], lead: int) -> torch.Tensor:
    """Concatenate tensors with a leading dimension of size ``lead`` into ``(lead, p)``."""
    if isinstance(tensors, dict):
        tensors = list(tensors.values())
    return torch.cat([t.reshape(lead, -1) for t in tensors], dim=1)


def flat_ranges(like: Mapping[str, torch.Tensor | torch.Size]) -> dict[str, tuple[int, int]]:
    """Where each tensor of ``like`` (or a tensor of each shape) sits in their flat vector (`flatten`): name →
    ``(start, end)``."""
    out, offset = {}, 0
    for name, ref in like.items():
        out[name] = (offset, offset + ref.numel())
        offset += ref.numel()
    return out


def unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a vector ``(p,)`` or ``(m, p)`` back into tensors shaped like ``like`` (with the leading m)."""
    lead = vector.shape[:-1]
    ranges = flat_ranges(like)
    out = {name: vector[..., start:end].reshape(*lead, *like[name].shape) for name, (start, end) in ranges.items()}
    total = sum(end - start for start, end in ranges.values())
    if total != vector.shape[-1]:
        raise ValueError(f"Vector of length {vector.shape[-1]} does not match {total} parameters.")
    return out


def unflatten_cast(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`unflatten`, each part in its parameter's dtype (a bfloat16 pooler next to a float32 classifier keeps float32
    there): what a product with the parameters is given."""
    return {n: t.to(like[n].dtype) for n, t in unflatten(vector, like).items()}
