"""A model as a function of the selected parameters: per-example training loss and test measurement.

A loss function maps ``(outputs, batch)`` to a tensor of shape ``(batch_size,)``: one value per row.
``outputs`` is what the model returns for the batch without its ``labels``. The default is the model's own
loss, per row: sequence classification follows transformers' rule (``config.problem_type``, or when unset:
regression for one output, single-label for integer labels, multi-label otherwise; a multiple-choice head's is
always cross-entropy over its choices, as its own) with cross-entropy,
binary cross-entropy averaged over the labels of the row, or squared error averaged over the outputs of
the row; causal LMs get the mean token cross-entropy of each row (shifted), token classification, and the LM
heads of XLNet, XLM and Flaubert, which transformers scores unshifted, the mean token cross-entropy (unshifted); a
PEFT prompt-learning model's virtual tokens (its logits' first positions) are labelled -100, as PEFT labels them. The mean over rows is the model's own ``loss``.
A *measurement* (kronfluence's term) is the test-side quantity whose influence is asked for; it defaults
to the same loss.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers.utils import logging

from .params import decayed_names
from .trunk import forward_context, model_inputs, transformers_model
from .utils import HALF_DTYPES

logger = logging.get_logger(__name__)

LossFn = Callable[[object, Mapping[str, torch.Tensor]], torch.Tensor]

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def find_logits(outputs) -> torch.Tensor | None:
    """The logits of a model output: ``.logits``, ``["logits"]``, or the tensor itself; None for an output without
    (question answering's start / end logits)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    return logits


def logits_of(outputs) -> torch.Tensor:
    """The logits of a model output (`find_logits`), or a TypeError that names the fix."""
    logits = find_logits(outputs)
    if logits is None:
        raise TypeError(
            f"The model returned {type(outputs).__name__} without `logits`; return an object with `.logits` "
            "(the transformers convention) or pass your own `loss_fn(outputs, batch)`."
        )
    return logits


def problem_type(model: nn.Module, num_outputs: int, labels: torch.Tensor) -> str:
    """The sequence-classification loss transformers models use: ``config.problem_type`` when set, else
    ``regression`` for one output, ``single_label_classification`` for int/long labels and
    ``multi_label_classification`` otherwise (the rule of ``ForSequenceClassificationLoss``)."""
    declared = getattr(getattr(model, "config", None), "problem_type", None)
    if declared is not None:
        if declared not in PROBLEM_TYPES:
            raise ValueError(f"config.problem_type={declared!r} is unknown; use one of {PROBLEM_TYPES}, or pass "
                             "`loss_fn(outputs, batch)`.")
        return declared
    if num_outputs == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def multiple_choice(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers multiple-choice head (``*ForMultipleChoice``, under a PEFT wrapper too),
    whose loss is cross-entropy over its choices whatever ``config.problem_type`` says: read as a sequence
    classifier's, a config with ``problem_type`` set to multi-label or regression was refused with a message about
    integer labels, and a one-choice head was given a regression loss (a review's BERT multiple-choice models)."""
    return type(transformers_model(model)).__name__.endswith("ForMultipleChoice")


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str,
                                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-row loss ``(b,)`` of ``(b, k)`` logits whose mean over rows is the model's own loss for ``kind`` (with
    ``label_smoothing``, the Trainer's `LabelSmoother` loss for single-label classification)."""
    b, k = logits.shape
    if kind == "single_label_classification":
        if labels.is_floating_point() or labels.numel() != b:
            hint = (" These look like multi-hot rows: store them as floats, or set config.problem_type = "
                    "'multi_label_classification' (transformers reads integer labels as class ids)."
                    if labels.numel() == b * k else "")
            raise ValueError(f"single_label_classification needs one integer class id per row; got labels of "
                             f"shape {tuple(labels.shape)} and dtype {labels.dtype} for logits {(b, k)}.{hint}")
        return F.cross_entropy(logits, labels.reshape(b), reduction="none", label_smoothing=label_smoothing)
    if labels.numel() != logits.numel():
        need = "multi-hot labels" if kind == "multi_label_classification" else "one target per output"
        hint = (" Integer class ids mean single-label classification: store them as int, or set "
                "config.problem_type='single_label_classification'.") if labels.numel() == b else ""
        raise ValueError(f"{kind} needs {need}, shape {(b, k)}; got labels of shape {tuple(labels.shape)}.{hint}")
    target = labels.to(logits.dtype).reshape(b, k)
    if kind == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
    return ((logits - target) ** 2).mean(1)


PREPENDING_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
"""PEFT prompt-learning methods that put their virtual tokens' outputs before a row's own (prefix tuning feeds
them as past keys and values instead; CPT labels them with tokens, which a loss_fn must do)."""


def prepended_positions(model: nn.Module) -> int:
    """How many positions a PEFT prompt-learning model puts before each row's own (its virtual tokens), else 0."""
    try:
        config = model.active_peft_config
    except (AttributeError, KeyError, TypeError):  # not PEFT; no adapter left; several active
        return 0
    kind = getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None))
    if not getattr(config, "is_prompt_learning", False) or kind not in PREPENDING_PEFT_TYPES:
        return 0
    return int(getattr(config, "num_virtual_tokens", 0) or 0)


def positions_before_rows(model: nn.Module) -> int:
    """How many positions of the model's table come before each row's own: `prepended_positions`, and prefix
    tuning's virtual tokens, fed as past keys and values, which models with an absolute position table (GPT-2, OPT,
    BERT) number the row's tokens after; a row that fit without them overran the table with a bare IndexError."""
    try:
        config = model.active_peft_config
    except (AttributeError, KeyError, TypeError):
        return 0
    kind = getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None))
    prefix = int(getattr(config, "num_virtual_tokens", 0) or 0) if kind == "PREFIX_TUNING" else 0
    return prepended_positions(model) + prefix


def default_loss_smoothing(args, loss_fn: LossFn | None) -> float:
    """The label smoothing of the default loss: the ``label_smoothing_factor`` of ``args`` (they are
    `TrainingArguments` too; the default loss is the one such a Trainer trains on), 0 with a ``loss_fn`` of one's
    own, which is used as it is."""
    return 0.0 if loss_fn is not None else float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)


# generating LM heads that score each position against its own label, as transformers computes their loss (XLNet's
# permutation LM, XLM's and Flaubert's): the shift gave another loss than the one they train on
UNSHIFTED_GENERATORS = ("xlnet", "xlm", "flaubert")


def shifts_labels(model: nn.Module) -> bool:
    """Whether the default loss shifts token labels by one (a causal LM: position t predicts token t + 1)."""
    config = getattr(model, "config", None)
    return (bool(getattr(model, "can_generate", lambda: False)()) and not getattr(config, "is_encoder_decoder", False)
            and getattr(config, "model_type", None) not in UNSHIFTED_GENERATORS)


TOKEN_HEADS = ("ForTokenClassification", "ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM",
               "EncoderDecoderModel")
"""Heads whose default loss is over tokens (``*ForTokenClassification``, language models, sequence-to-sequence,
transformers' (Vision / Speech) ``EncoderDecoderModel``)."""


def token_loss_kind(model: nn.Module) -> str | None:
    """The kind of head (its class name) where the default loss is a mean over each row's tokens, else None."""
    name = type(transformers_model(model)).__name__
    return name if name.endswith(TOKEN_HEADS) or shifts_labels(model) else None


TOKEN_WEIGHTING = (
    "Influence's default loss for {kind} is each row's mean over its labelled tokens, so every training row weighs "
    "alike in the Hessian and the scores; transformers' model loss, which a Trainer trains on, is the mean over all "
    "the labelled tokens of a batch, which weighs rows by their token counts. Where rows hold different numbers of "
    "labelled tokens the two rank rows differently (a review's token classifier: Spearman 0.25-0.56 between them). "
    "For the trained loss's weighting, pass a loss_fn giving each row's sum of token losses divided by the training "
    "rows' mean count of labelled tokens (docs/safety.md, 'Loss per problem type').")
"""Said once a process where the default loss is a token loss (`token_loss_kind`)."""


def drops_first_label(model: nn.Module) -> bool:
    """Whether the default loss reads no row's first token label: a causal LM's shift (position 0 predicts none),
    unless a PEFT prompt's virtual tokens come first (the row's first label is then predicted from the last of them)."""
    return shifts_labels(model) and not prepended_positions(model)


def rows_without_targets(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[int]:
    """Rows of ``batch`` whose token labels leave the default loss nothing to read: every label -100 once a causal
    LM's shift drops the first position (a one-token row, or a row labelled at its first token only), so the row's
    loss, and every influence on it, is 0; and a class label -100 (a sequence classifier's unlabelled row). Empty for
    float targets."""
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 1 and not labels.is_floating_point():
        return (labels == -100).nonzero().flatten().tolist()
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.is_floating_point():
        return []
    if drops_first_label(model):
        labels = labels[:, 1:]
    return (labels != -100).sum(1).eq(0).nonzero().flatten().tolist()


def make_default_loss(model: nn.Module, label_smoothing: float = 0.0) -> LossFn:
    """The per-example loss matching ``model``'s head (see the module docstring). ``label_smoothing``: the
    Trainer's ``label_smoothing_factor``, which trains a cross-entropy head on ``(1 - ε)·NLL + ε·mean_k(-log p_k)``
    (its `LabelSmoother`), per row here (per token and averaged over the row's tokens for token losses)."""
    shift = shifts_labels(model)
    virtual = prepended_positions(model)
    choices = multiple_choice(model)

    def loss(outputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:
            raise ValueError("The batch has no `labels`; influence needs labels for the training and test loss.")
        logits = logits_of(outputs)
        if logits.dtype in HALF_DTYPES:  # the loss (and its derivatives) in float32, as HF does
            logits = logits.float()
        labels = batch["labels"]
        if logits.dim() == 2:
            if choices and logits.shape[-1] == 1:
                raise ValueError("The multiple-choice rows have one choice each: cross-entropy over one choice is 0 "
                                 "for every row (the model's own loss too), so every influence would be 0. Give each "
                                 "row its candidate answers as choices (input_ids of (rows, choices, tokens)).")
            if choices and (labels.is_floating_point() or labels.numel() != logits.shape[0]):
                raise ValueError(f"A multiple-choice head takes one integer choice id per row; got labels of shape "
                                 f"{tuple(labels.shape)} and dtype {labels.dtype} for {logits.shape[-1]} choices. "
                                 "Store the answer's index as an int (soft labels over the choices, which the "
                                 "model's own cross-entropy also reads, need a loss_fn(outputs, batch) of your own).")
            kind = "single_label_classification" if choices else problem_type(model, logits.shape[-1], labels)
            return sequence_classification_loss(logits, labels, kind, label_smoothing)
        if logits.dim() == 3:
            extra = logits.shape[1] - labels.shape[1] if labels.dim() == 2 else 0
            if extra and extra == virtual:  # labelled -100 (ignored), as PEFT labels them for the model's own loss
                labels = torch.cat([labels.new_full((labels.shape[0], extra), -100), labels], 1)
            elif extra:
                raise ValueError(f"The model gives logits for {logits.shape[1]} positions and the batch has labels for "
                                 f"{labels.shape[1]}: the default loss cannot tell which positions the labels are "
                                 "for. Pass `loss_fn(outputs, batch)` that lines them up.")
            if shift:
                logits, labels = logits[:, :-1], labels[:, 1:]
            tokens = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100,
                                     label_smoothing=label_smoothing)
            valid = (labels != -100).to(tokens.dtype)
            return (tokens * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        raise ValueError(f"Cannot make a default loss for logits of shape {tuple(logits.shape)}; pass `loss_fn`.")

    return loss


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """``{name: the other names of the same tensor}`` for every parameter or buffer registered under several names
    (tied weights); empty for a model without ties."""
    names: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name)  # identity of tensors the model holds, within this walk only
    return {n: [a for a in group if a != n] for group in names.values() if len(group) > 1 for n in group}


ROW_KEYS = ("labels", "input_ids", "attention_mask", "inputs_embeds")
"""Batch entries whose first dimension is the batch's rows (what a user's per-row values are checked against)."""


class PerRowValues:
    """A user's ``loss_fn`` / ``measurement_fn``, its values checked to be one per row of the batch, shape
    ``(batch_size,)``: a batch mean (``F.cross_entropy``'s default ``reduction``) or a ``(batch_size, 1)`` column
    failed deep inside a stage (an ``IndexError`` of the padding probe, a shape mismatch of autograd after the trunk
    and candidate stages had run), and where a stage sums a batch's values (the mean Hessian over a dataset), a batch
    mean would count a whole batch as one row."""

    def __init__(self, fn: LossFn, role: str):
        self.fn, self.role = fn, role

    def __call__(self, outputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        values = self.fn(outputs, batch)
        rows = next((v.shape[0] for k in ROW_KEYS if isinstance(v := batch.get(k), torch.Tensor) and v.dim()), None)
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else None
        if shape is None or len(shape) != 1 or (rows is not None and shape[0] != rows):
            got = f"shape {shape}" if shape is not None else f"a {type(values).__name__}"
            raise ValueError(
                f"{self.role} must return a tensor of one value per row of the batch, shape (batch_size,) = "
                f"({rows if rows is not None else 'batch_size'},); it returned {got}. torch.nn.functional's losses "
                "(cross_entropy, mse_loss, ...) average over the batch unless given reduction='none'; a (batch_size, "
                "1) column needs .squeeze(-1)."
            )
        return values


class FunctionalModel:
    """``model`` evaluated at given values of the selected parameters (others stay as they are).

    Args:
        model: any module called as ``model(**inputs)`` with a batch dict.
        names: the selected parameter names, in the order used by flat vectors.
        loss_fn: per-example training loss; default `make_default_loss`.
        measurement_fn: per-example test quantity; default: the training loss.
        weight_decay: explicit L2 term ``wd·Σθ²`` (not on biases/norm weights) of the training objective: always
            in the Hessian (`hf_fastif.hvp.batch_hvp`).
        l2_in_gradients: also in every row's loss and the test loss (the 2021 reference code's convention), so in
            their gradients; False: each row's own loss (Koh & Liang), as leave-one-out retraining measures.
        split: the model's `hf_fastif.trunk.TrunkSplit`, used when a batch carries cached trunk states.
        readout: where the last layer is cut to the position the loss reads (`hf_fastif.readout`), if anywhere.
        label_smoothing: the Trainer's ``label_smoothing_factor`` for the default loss (`make_default_loss`).
    """

    def __init__(self, model: nn.Module, names: list[str], loss_fn: LossFn | None = None,
                 measurement_fn: LossFn | None = None, weight_decay: float = 0.0, split=None, readout=None,
                 label_smoothing: float = 0.0, l2_in_gradients: bool = False):
        self.model = model
        self.no_forward_ad: str | None = None  # why forward-mode AD failed on this model, once it has (scoring)
        self.split = split
        self.readout = readout
        self.names = list(names)
        self.loss_fn = make_default_loss(model, label_smoothing) if loss_fn is None else _checked(loss_fn, "loss_fn")
        self.measurement_fn = None if measurement_fn is None else _checked(measurement_fn, "measurement_fn")
        self.weight_decay = float(weight_decay)
        self.decayed = decayed_names(self.names, model) if self.weight_decay else []
        self.l2_in_gradients = bool(l2_in_gradients)
        self.aliases = tied_aliases(model)
        # Hessian-vector products' weight blocks from activations (`hf_fastif.linear_products`): the layers that may
        # take the route (found once), and None (not yet checked against autograd), True, or why not
        self.linear_layers: tuple | None = None
        self.linear_products: bool | str | None = None

    def outputs(self, params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]):
        """The model's outputs for ``batch`` at ``params`` (only the top runs when the batch carries trunk states;
        with a `readout`, the last layer's output holds only the position the loss reads: for losses only).

        A parameter tied to others (an LM head sharing the input embedding) is substituted under each of its
        names, as ``functional_call(tie_weights=True)`` does, from the map found once in ``__init__`` (so a model
        re-tied afterwards needs a new `FunctionalModel`): ``functional_call``'s own untying walks every module on
        every call, ~15% of a LiSSA step from the cached trunk on the MiniLM default."""
        values = dict(params)
        for name in params:
            for alias in self.aliases.get(name, ()):
                if alias in params and params[alias] is not params[name]:
                    raise ValueError(f"{name!r} and {alias!r} are the same (tied) parameter of the model; pass a "
                                     "value for one of them only.")
                values[alias] = values[name]
        inputs = model_inputs(batch, self.model)
        with forward_context(self.split, batch):
            readout = self.readout
            if readout is not None and readout.failed is None:
                try:
                    with readout.active():
                        return functional_call(self.model, values, args=(), kwargs=inputs, tie_weights=False)
                except (RuntimeError, IndexError, ValueError, TypeError, AssertionError) as err:  # unlike the probes
                    if (not readout.fired or isinstance(err, torch.OutOfMemoryError) or forward_ad_unsupported(err)
                            or _STACKING.get()):
                        raise  # raised before the cut, out of memory, forward-mode AD or vmap refused: not the cut's
                    readout.failed = f"{type(err).__name__}: {err}"
                    logger.warning(f"The last layer cut {readout.where} failed on a batch ({readout.failed}); "
                                   "the whole layer runs from now on (influence_skip_unread_positions=False avoids "
                                   "the cut).")
            return functional_call(self.model, values, args=(), kwargs=inputs, tie_weights=False)

    def _l2(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | float:
        if not self.decayed:
            return 0.0
        return self.weight_decay * sum((params[n] ** 2).sum() for n in self.decayed)

    def losses(self, params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-example training loss (with the L2 term when it is in every loss), shape ``(batch_size,)``."""
        values = self.loss_fn(self.outputs(params, batch), batch)
        return values + self._l2(params) if self.l2_in_gradients else values

    def measurements(self, params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-example test quantity, shape ``(batch_size,)``; the training loss unless a measurement is set."""
        if self.measurement_fn is None:
            return self.losses(params, batch)
        return self.measurement_fn(self.outputs(params, batch), batch)

    # The L2 term's derivatives are known in closed form (gradient 2·wd·θ, Hessian 2·wd·I on the decayed
    # parameters): `hf_fastif.hvp` differentiates the values below without it and adds these, which keeps
    # weight-shaped elementwise work out of every double backward.
    def values_without_l2(self, params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                          measurement: bool = False) -> tuple[torch.Tensor, bool]:
        """``(per-example values without the L2 term, whether the L2 term belongs to their gradients)``; the
        Hessian takes the L2 term whatever this says (`l2_in_hessian`)."""
        l2 = not (measurement and self.measurement_fn is not None) and bool(self.decayed) and self.l2_in_gradients
        return self.value_fn(measurement)(self.outputs(params, batch), batch), l2

    def value_fn(self, measurement: bool = False) -> LossFn:
        """``(outputs, batch) -> per-example values`` without the L2 term: the measurement (``measurement`` and one
        is set) or the training loss."""
        return self.measurement_fn if measurement and self.measurement_fn is not None else self.loss_fn

    @property
    def l2_in_hessian(self) -> bool:
        """Whether the Hessian has the L2 term (``2·wd`` on the decayed parameters): always, when there is one."""
        return bool(self.decayed)

    def l2_gradient(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(p,)``: the gradient of the L2 term, ``2·wd·θ`` on the decayed parameters, 0 elsewhere."""
        decayed = set(self.decayed)
        return torch.cat([(2.0 * self.weight_decay * p.detach() if n in decayed else torch.zeros_like(p)).reshape(-1)
                          for n, p in params.items()])

    def l2_mask(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(p,)``: ``2·wd`` on the decayed parameters, 0 elsewhere (the L2 term's Hessian diagonal)."""
        key = tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in params.items())
        if getattr(self, "_mask_key", None) != key:
            decayed = set(self.decayed)
            self._mask = torch.cat([torch.full((p.numel(),), 2.0 * self.weight_decay if n in decayed else 0.0,
                                               dtype=p.dtype, device=p.device) for n, p in params.items()])
            self._mask_key = key
        return self._mask


def _checked(fn: LossFn, role: str) -> LossFn:
    return fn if isinstance(fn, PerRowValues) else PerRowValues(fn, role)


def influence_model(model: nn.Module, names: list[str], args, loss_fn: LossFn | None = None,
                    measurement_fn: LossFn | None = None, **kwargs) -> FunctionalModel:
    """The `FunctionalModel` of influence's loss under ``args`` (`InfluenceArguments`): its L2 term
    (``influence_weight_decay``, in the rows' gradients with ``influence_weight_decay_in_gradients``) and, for the
    default loss, the Trainer's label smoothing. Everything that steps or scores on that loss builds it here (an SGD
    step of the correction built it without the smoothing, and descended another loss than the one it ranked by)."""
    return FunctionalModel(model, names, loss_fn, measurement_fn, args.influence_weight_decay,
                           label_smoothing=default_loss_smoothing(args, loss_fn),
                           l2_in_gradients=args.influence_weight_decay_in_gradients, **kwargs)


FORWARD_AD_REFUSALS = ("autograd.Function with functorch transforms", "forward AD", "would mutate a captured Tensor")
"""Parts of the errors torch raises where a model cannot run under forward-mode AD (``torch.func.jvp``): a custom
``torch.autograd.Function`` without ``setup_context`` (Bloom's GeLU, Reformer's reversible layers), or an operator
without a forward-AD formula, or a forward that swaps a captured tensor's storage in place (PEFT's
``target_parameters`` LoRA, through ``torch.nn.utils.parametrize``)."""


DTYPE_CLASHES = ("to have the same dtype", "expected scalar type")
"""Parts of torch's errors where an operator met tensors of two dtypes."""
FLOAT32_IN_ERRORS = re.compile(r"\b(?:float|Float)\b")
"""float32 as torch's errors name it (``float`` / ``Float``; not the ``Float`` inside ``BFloat16``)."""
HALF_TYPES_IN_ERRORS = re.compile(r"\b(?:c10::)?(?:BFloat16|Half)\b")
"""bfloat16 / float16 as torch's errors name them."""
_FORWARD_MODE: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_fastif_forward_mode", default=False)


_STACKING: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_fastif_stacking", default=False)


@contextlib.contextmanager
def _marked(flag: contextvars.ContextVar[bool]):
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def forward_mode():
    """Marks the forwards run inside as forward-mode AD's (`hf_fastif.hvp.directional_derivatives`), for
    `forward_ad_unsupported`."""
    return _marked(_FORWARD_MODE)


def stacking():
    """Marks the forwards run inside as a vmapped stack of batches' (`hf_fastif.stacked`): an error there is vmap's or
    the model's under it, and `FunctionalModel.outputs` does not take it for the last-layer cut failing."""
    return _marked(_STACKING)


def forward_ad_unsupported(err: BaseException, under_jvp: bool | None = None) -> bool:
    """Whether ``err`` says that the model cannot run under forward-mode AD.

    Always for the errors of `FORWARD_AD_REFUSALS`. And, for an error raised under ``torch.func.jvp`` (``under_jvp``;
    default: inside `forward_mode`), a clash between float32 and a half type: a forward-mode formula that gives a
    float32 tangent for a half-precision primal, which the next matrix product refuses to mix with the layer's
    weights. Seen on an NVIDIA H200 (torch 2.11, CUDA) with a bfloat16 BERT: the tangent entering the feed-forward's
    first Linear was float32 where the CPU's kernels keep it bfloat16, so JVP scoring of every bfloat16 BERT on
    that GPU failed (`benchmarks.device_agreement`). The same forward has run in reverse mode by then (the test
    gradients, the s_test products), so such a clash is the forward mode's. A clash between two half types, or
    one that does not involve a half type, is the model's own, and is not taken for it."""
    if not isinstance(err, (RuntimeError, NotImplementedError)):
        return False
    text = str(err)
    if any(s in text for s in FORWARD_AD_REFUSALS):
        return True
    if not (_FORWARD_MODE.get() if under_jvp is None else under_jvp):
        return False
    return (any(s in text for s in DTYPE_CLASHES) and FLOAT32_IN_ERRORS.search(text) is not None
            and HALF_TYPES_IN_ERRORS.search(text) is not None)
