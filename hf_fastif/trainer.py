"""`InfluenceTrainer`: a `Trainer` that can also say which training rows drove a prediction."""

from __future__ import annotations

import math

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback
from transformers.training_args import ParallelMode
from transformers.utils import logging

from . import distributed as D
from .arguments import InfluenceArguments
from .batches import Batcher, column_rule, dataset_hint, padding_collator_for, validate_dataset
from .builder import build_influence_table
from .engine import InfluenceEngine
from .influence import default_arguments
from .loss import LossFn, default_loss_smoothing
from .mode import evaluating
from .table import InfluenceTable
from .utils import HALF_DTYPES

logger = logging.get_logger(__name__)

LOSS_CHECK_ROWS = 16
"""Training rows, spread evenly over the data (a dataset sorted by label holds one class in its first rows), on which
a trainer's own loss (a ``compute_loss`` override, a ``compute_loss_func``) is compared with a plain Trainer's before
influence uses the model's: several classes, whose weights a class-weighted loss would otherwise cancel."""

COUPLED_OPTIMIZERS = ("SGD", "Adagrad", "RMSprop", "Adam", "Adamax", "NAdam", "RAdam", "ASGD", "SGDScheduleFree")
"""Optimizer classes whose ``weight_decay`` adds wd·θ to the gradient (an L2 term in the loss; NAdam / RAdam unless
``decoupled_weight_decay``); AdamW, Adafactor and the rest decay apart from the loss."""


class _StepsTaken(TrainerCallback):
    """Counts the optimizer steps a trainer takes in this process (`InfluenceTrainer._unseen_training_step`)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


class InfluenceTrainer(Trainer):
    """`Trainer` plus `compute_influences`. Training is the Trainer's, but for one refusal (`train` under a CPU
    ``accelerate launch`` without ``use_cpu=True``, whose processes it would train alone) and one mend
    (`compute_loss`: a head whose loss ignores ``num_items_in_batch`` trains at the Trainer's step under gradient
    accumulation and ``accelerate launch``); the influence pipeline is an `InfluenceEngine` that this trainer holds across calls
    (`influence_engine`), so the frozen trunk's states and the candidate indexes are computed once and rebuilt only
    when the weights or data they depend on change.

    Args:
        influence_loss_fn: per-example training loss ``(outputs, batch) → (b,)`` (default: from the head).
        influence_measurement_fn: per-example test quantity (default: the loss).
        All other arguments are the Trainer's; ``args`` should be `InfluenceArguments`.
    """

    def __init__(self, *args, influence_loss_fn: LossFn | None = None,
                 influence_measurement_fn: LossFn | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._converted_args: tuple[dict, InfluenceArguments] | None = None  # (plain args' to_dict(), converted)
        self._replaced_args: InfluenceArguments | None = None  # the last InfluenceArguments read (`influence_args`)
        self.influence_loss_fn = influence_loss_fn
        self.influence_measurement_fn = influence_measurement_fn
        self._influence_engine: InfluenceEngine | None = None
        self.loss_reads_num_items: bool | None = None  # `compute_loss`: found on the first training step
        # a subclass's training_step that never calls compute_loss trains a loss nothing here sees:
        # `_unseen_training_step`, from the optimizer steps taken in this process and compute_loss's training calls
        self._steps_here = _StepsTaken()
        self.add_callback(self._steps_here)
        self._trained_through_compute_loss = False
        self._unseen_step_warned = False
        # (what the check of that loss against the model's found, at which optimizer step, for which
        # compute_loss_func: `_trained_loss`)
        self._trained_loss_check: tuple[int, str | None, object] | None = None
        # (each weight's dtype as given, by the names `_influence_model` gives them, a compiled model's too: a
        # full-eval conversion is named only where it changed one, `_say_full_eval`)
        given = None if self.model is None else self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self._dtypes_given = {} if given is None else {n: p.dtype for n, p in given.named_parameters()}
        self._decay_said = None  # (the weight decay said: `_say_which_weight_decay`)
        self._say_which_weight_decay()

    def train(self, *args, **kwargs):
        """`Trainer.train`, refused before any step under a launch whose processes the Trainer does not train
        together: ``accelerate launch --multi_gpu`` on a machine without GPUs (the CPU launch docs/parallel.md
        gives) without ``use_cpu=True``, where each process trained the whole model alone on every row (a trial took
        it for data-parallel training; transformers' own line under it asks for ``torch.distributed.launch``), and
        influence then refused processes whose weights differ, after the whole training."""
        processes = D.world()[1]
        if processes > 1 and self.args.parallel_mode != ParallelMode.DISTRIBUTED:
            raise ValueError(
                f"This launch runs {processes} processes, but the Trainer would train in each of them alone "
                f"(parallel_mode {self.args.parallel_mode.value!r}: on a machine without GPUs TrainingArguments "
                "trains the processes together, DDP over gloo, only with use_cpu=True). Set use_cpu=True in the "
                "arguments (--use_cpu), or train in one process.")
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's, once it knows whether the model's loss reads ``num_items_in_batch``.

        The Trainer takes a ``forward`` with ``**kwargs`` (almost every transformers model's) for one that normalises
        its loss by ``num_items_in_batch``, the rows or tokens of the whole optimizer step: it then neither divides
        the loss by ``gradient_accumulation_steps`` nor leaves it alone under a launch (it multiplies it by the
        number of processes). A head whose loss is its own batch's mean (the sequence-classification heads: BERT's,
        RoBERTa's, ...) then steps ``gradient_accumulation_steps`` or ``num_processes`` times too far with SGD and
        logs a loss as many times too large (transformers 5.24; huggingface/transformers#47688). On the first
        training step this asks the model itself: its loss on the step's batch with ``num_items_in_batch`` n and 2n
        (no gradient, eval mode, the model's modes restored). A loss that does not change reads nothing, and
        ``model_accepts_loss_kwargs`` is turned off, as the Trainer's docstring asks for such losses; under a launch
        the processes decide together (one that reads it keeps it on everywhere). Left to the Trainer: a
        ``compute_loss_func`` or label smoothing (the Trainer's own losses, which read it), a model without a loss.
        """
        if model.training:  # (a training step's: evaluation and the loss check here run in eval mode)
            self._trained_through_compute_loss = True
        if (num_items_in_batch is not None and self.model_accepts_loss_kwargs and self.loss_reads_num_items is None
                and self.compute_loss_func is None and self.label_smoother is None):
            self.loss_reads_num_items = self._loss_reads_num_items(model, inputs, num_items_in_batch)
            if self.loss_reads_num_items is False:
                self.model_accepts_loss_kwargs = False
                logger.info("The model's loss does not read num_items_in_batch (the same loss for n and 2n items): "
                            "the Trainer's model_accepts_loss_kwargs is turned off, so that gradient accumulation "
                            "and processes average its loss as for any per-batch mean.")
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _loss_reads_num_items(self, model, inputs, num_items) -> bool:
        """Whether the model's loss on ``inputs`` changes with ``num_items_in_batch`` (every process's answer, or
        True where one could not tell: a zero, non-finite or missing loss, which leaves the Trainer's way)."""
        # (not DDP's forward, which may synchronise buffers; nor a compiled one, which would compile for eval)
        module = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        modes = {m: m.training for m in module.modules()}
        losses = []
        try:
            module.eval()
            with torch.no_grad():
                for n in (num_items, num_items * 2):
                    outputs = module(**inputs, num_items_in_batch=n)
                    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs[0]
                    losses.append(float(loss.detach().float().sum()) if torch.is_tensor(loss) else math.nan)
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError, KeyError):
            losses = [math.nan, math.nan]  # the step's own forward reports what is wrong with the batch
        finally:
            for m, training in modes.items():
                m.training = training
        a, b = losses
        here = None if not (math.isfinite(a) and math.isfinite(b)) or a == 0 else abs(a - b) > 1e-4 * abs(a)
        everyone = D.gather_objects(here)
        return True in everyone or False not in everyone

    @property
    def influence_args(self) -> InfluenceArguments:
        """The influence settings, read from ``self.args`` as it is now (the Trainer trains with whatever
        ``self.args`` is: a ``trainer.args = ...`` after construction was ignored by influence, which kept a snapshot
        taken in ``__init__``, 0.87 off the new settings' values). ``self.args`` itself when it is an
        `InfluenceArguments`; for plain `TrainingArguments`, an `InfluenceArguments` made from them (the paper's
        ``influence_*`` defaults), kept while they stay the same, and made again when they change, with the
        ``influence_*`` settings set on the kept one."""
        if isinstance(self.args, InfluenceArguments):
            # (plain arguments after these are converted anew, and warned of: the conversion of plain arguments
            # read before these served them again, unwarned, with other settings)
            self._replaced_args, self._converted_args = self.args, None
            return self.args
        plain = self.args.to_dict()
        if self._converted_args is None or self._converted_args[0] != plain:
            own = InfluenceArguments.__dataclass_fields__
            fields = {k: v for k, v in plain.items() if k in own and own[k].init}
            if self._converted_args is not None:
                held = self._converted_args[1]
                fields |= {k: getattr(held, k) for k in own if k.startswith("influence_") and own[k].init}
            self._converted_args = (plain, default_arguments(**fields))
            if self._replaced_args is not None:  # (InfluenceArguments replaced by plain ones: a trial's J 1000 run)
                old, new = self._replaced_args.influence_settings(), self._converted_args[1].influence_settings()
                changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
                if changed:
                    logger.warning("trainer.args are plain TrainingArguments now, which replaced InfluenceArguments: "
                                   f"influence takes the paper's settings ({'; '.join(changed)}). Set "
                                   "trainer.args to InfluenceArguments to keep your own (or set them on "
                                   "trainer.influence_args).")
                self._replaced_args = None
        return self._converted_args[1]

    def _say_which_weight_decay(self) -> None:
        """``weight_decay`` of the Trainer is not influence's L2 term (``influence_weight_decay``): say so, louder
        where the optimizer's decay is an L2 term in the loss (SGD-style, coupled), whose influence needs it. The
        optimizer is the one the Trainer holds (made by ``optim``, or passed as ``optimizers=`` /
        ``optimizer_cls_and_kwargs``: those were not looked at), else the one ``optim`` names."""
        if self.influence_args.influence_weight_decay:
            return
        optimizer, given = getattr(self, "optimizer", None), getattr(self, "optimizer_cls_and_kwargs", None)
        inner = getattr(optimizer, "optimizer", None)  # (accelerate's wrapper, after train())
        optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        beyond = False  # biases or norms decayed too, which influence_weight_decay leaves out
        if optimizer is not None:
            groups = optimizer.param_groups
            decay = max((float(g.get("weight_decay", 0.0) or 0.0) for g in groups), default=0.0)
            name = type(optimizer).__name__
            coupled = name in COUPLED_OPTIMIZERS and not any(g.get("decoupled_weight_decay") for g in groups)
            # (trainable ones only: SGD skips a frozen parameter, whose gradient is None, decay and all)
            decayed = {id(p) for g in groups if float(g.get("weight_decay", 0.0) or 0.0) > 0 for p in g["params"]
                       if p.requires_grad}
            model = self._influence_model()
            rule = set(self.get_decay_parameter_names(model))
            beyond = any(id(p) in decayed and n not in rule for n, p in model.named_parameters())
        elif given is not None:
            # the Trainer's create_optimizer puts args.weight_decay into its parameter groups, which overrides a
            # weight_decay among these kwargs (it was read from them: 0.3 there and 0 in args was advised as 0.15)
            decay, name = float(self.args.weight_decay or 0.0), getattr(given[0], "__name__", str(given[0]))
            coupled = name in COUPLED_OPTIMIZERS and not (given[1] or {}).get("decoupled_weight_decay")
        else:
            decay = float(getattr(self.args, "weight_decay", 0.0) or 0.0)
            optim = str(getattr(self.args.optim, "value", self.args.optim))
            # (schedule-free SGD adds wd·θ to the gradient: an L2 term, as SGD; it was called decoupled)
            coupled = optim.startswith(("sgd", "adagrad", "rmsprop")) or optim == "schedule_free_sgd"
            name = f"optim={optim!r}"
        said = (decay, coupled, beyond and coupled)  # (the decoupled wording does not depend on biases and norms)
        if decay <= 0 or said == self._decay_said:
            return
        self._decay_said = said  # (said again after train() where the optimizer that trained
        # decays otherwise than the one said at construction: a create_optimizer of one's own)
        say = logger.warning if coupled else logger.info
        terms = ("it decays biases and norms too, which influence's term leaves out: for the exact trained loss, add "
                 "their wd/2·Σθ² to a loss_fn of your own" if beyond else "without biases and norms, as the Trainer "
                 "decays them")
        say(f"weight_decay={decay:g} trains the model but is no part of influence's loss (influence_weight_decay=0)"
            + (f": {name} decays by adding wd·θ to the gradient, an L2 term wd/2·Σθ² in the loss, so pass "
               f"influence_weight_decay={decay / 2:g} (influence's term is wd·Σθ², {terms})." if coupled else
               f": {name} decays the weights apart from the loss (decoupled, as AdamW), so the loss has no L2 term "
               "and 0 is right."))

    def influence_engine(self, *, loss_fn: LossFn | None = None, measurement_fn: LossFn | None = None,
                         features=None) -> InfluenceEngine:
        """The engine this trainer holds, on the current `influence_args` (made anew when the model, collator,
        functions or the settings influence reads differ from its own; arguments replaced by equal ones are
        taken over by the held engine, with its caches)."""
        model = self._influence_model()
        args = self.influence_args
        loss_fn = loss_fn if loss_fn is not None else self.influence_loss_fn
        measurement_fn = measurement_fn if measurement_fn is not None else self.influence_measurement_fn
        engine = self._influence_engine
        if engine is None or not engine.serves(model, args, self.data_collator, loss_fn, measurement_fn, features):
            if engine is not None:
                engine.clear()
            engine = InfluenceEngine(model, args, data_collator=self.data_collator, loss_fn=loss_fn,
                                     measurement_fn=measurement_fn, features=features)
            self._influence_engine = engine
        engine.use_collator(self.data_collator)  # (an equal one: the engine watches this one now)
        engine.args = args  # (the same settings: later edits of these arguments in place are read by its calls)
        if isinstance(self.train_dataset, Dataset):  # (a call with train_dataset= checks on those rows if unchecked)
            engine.trained_loss = self._trained_loss(self.train_dataset, loss_fn)
        return engine

    @property
    def _trained_on(self) -> str | None:
        """What this trainer trains with beside the model's own loss (named in each table's ``trained_with``), read as
        it is now: a ``compute_loss_func`` set after construction (a subclass's ``__init__`` setting it after
        ``super().__init__()``) went unchecked when this was read once at construction, and a class-weighted loss's
        influence came back as the plain loss's without a word (a review: 0.86 off). Label smoothing is the default
        loss's own (it reads it from the arguments)."""
        trained_on = [what for what, used in (
            ("a compute_loss_func", getattr(self, "compute_loss_func", None) is not None),
            (f"{type(self).__name__}.compute_loss",
             type(self).compute_loss not in (Trainer.compute_loss, InfluenceTrainer.compute_loss))) if used]
        return " and ".join(trained_on) or None

    def _trained_loss(self, train: Dataset | None, loss_fn: LossFn | None = None) -> str | None:
        """What this trainer trains with instead of the model's loss (`InfluenceEngine.trained_loss`), or None (also
        where influence takes a ``loss_fn`` of its own: this call's, else ``influence_loss_fn``).

        A ``compute_loss`` override or a ``compute_loss_func`` may train a plain Trainer's loss (an override that
        counts tokens and returns ``super()``'s was warned about at construction, and its tables carried the note).
        Its loss is compared with a plain Trainer's on `LOSS_CHECK_ROWS` rows spread over ``train`` (eval mode, no
        gradient; the user's function runs once more there) and named, in a warning and in each table's
        ``trained_with``, only where the two differ or could not be compared. A difference is kept; a match is
        checked again after the optimizer stepped (a class-weighted loss ties at some weights, as at
        initialisation)."""
        if (loss_fn if loss_fn is not None else self.influence_loss_fn) is not None:
            return None
        unseen = self._unseen_training_step()
        if unseen is not None or self._trained_on is None:
            return unseen
        step, checked, func = self.state.global_step, self._trained_loss_check, getattr(self, "compute_loss_func", None)
        # (a difference found is kept while the compute_loss_func is the same)
        if checked is None or checked[2] is not func or (checked[1] is None and checked[0] != step):
            compared = self._trainer_and_plain_loss(train)
            same = compared is not None and abs(compared[0] - compared[1]) <= compared[2] * max(
                abs(compared[0]), abs(compared[1])) + 1e-6
            note = None if same else f"trained with {self._trained_on}"
            if same:
                logger.info(f"{self._trained_on} gives the model's own loss (a plain Trainer's) on {LOSS_CHECK_ROWS} "
                            f"training rows ({compared[0]:.6g}): influence uses that loss.")
            else:
                found = (f"could not be compared with the model's own loss on {LOSS_CHECK_ROWS} training rows"
                         if compared is None else f"gives {compared[0]:.6g} on {LOSS_CHECK_ROWS} training rows, "
                         f"where the model's own loss (a plain Trainer's) is {compared[1]:.6g}")
                smoothing = default_loss_smoothing(self.influence_args, None)
                logger.warning(f"This trainer trains with {self._trained_on}, which {found}, but influence uses the "
                               "model's plain loss (the head's own"
                               + (f", with label_smoothing_factor={smoothing:g}, which a compute_loss_func replaces in "
                                  "training" if smoothing and self._trained_on and "compute_loss_func" in
                                  self._trained_on else "")
                               + "): the Hessian and gradients are not those of the loss that was trained. Pass "
                               "InfluenceTrainer(..., influence_loss_fn=(outputs, batch) -> per-row loss) to measure "
                               "that one.")
            self._trained_loss_check = (step, note, func)
        return self._trained_loss_check[1]

    def _unseen_training_step(self) -> str | None:
        """``"trained with <class>.training_step"`` where this trainer took optimizer steps in this process through a
        subclass's ``training_step`` that never called `compute_loss` (a step that computes a weighted loss and calls
        ``accelerator.backward`` itself), warned about once; else None. Its loss cannot be run apart from the step
        (which also steps backward), so it is named without a comparison: a review's class-weighted step went
        unnamed, and its influence (the model's plain loss) was 0.979 in Spearman from that of the loss trained. A
        step through ``super().training_step``, ``Trainer.training_step`` or ``self.compute_loss`` trains through
        `compute_loss` (checked there, `_trained_loss`); a run resumed from a checkpoint at its last step took none
        here."""
        if (type(self).training_step is Trainer.training_step or self._trained_through_compute_loss
                or self._steps_here.steps == 0):
            return None
        what = f"{type(self).__name__}.training_step"
        if not self._unseen_step_warned:
            self._unseen_step_warned = True
            logger.warning(f"This trainer trained through {what}, which never called compute_loss: influence cannot "
                           "tell which loss it trained, and uses the model's plain loss (the head's own). Pass "
                           "InfluenceTrainer(..., influence_loss_fn=(outputs, batch) -> per-row loss) with the loss "
                           "that step trains, or compute it through self.compute_loss (super().training_step does).")
        return f"trained with {what}"

    def _trainer_and_plain_loss(self, train: Dataset | None) -> tuple[float, float, float] | None:
        """``(this trainer's loss, a plain Trainer's, their tolerance)`` on `LOSS_CHECK_ROWS` rows spread evenly over
        ``train``, collated as influence collates them, or None where they cannot be compared: a loss that reads a
        column influence does not keep, a model without a loss, rows of one class only (class weights cancel
        there: a dataset sorted by label). A plain Trainer's loss is the model's own, or with label smoothing the
        default loss's (the engine checks the default loss against the model's own). The tolerance is the
        relative part of the engine's for the model's own loss: 1e-4, or 8 ulp of a half-precision parameter's dtype."""
        model, func = self._influence_model(), getattr(self, "compute_loss_func", None)
        try:
            columns = validate_dataset(train, "train_dataset", model, **column_rule(self.args))
            rows = Batcher(train, columns, self.data_collator, next(model.parameters()).device,
                           padding_collator=padding_collator_for(model))
            batch = rows.batch(np.unique(np.linspace(0, len(train) - 1, LOSS_CHECK_ROWS).round().astype(int)).tolist())
            labels = batch.get("labels")
            if (isinstance(labels, torch.Tensor) and labels.dim() == 1 and not labels.is_floating_point()
                    and len(labels.unique()) < 2):
                return None
            # a compute_loss_func of transformers' documented form divides by num_items_in_batch, and failed on None,
            # and so did a compute_loss override that does (it was named as another loss than the model's, a review's
            # equal one): it gets the count the Trainer passes a training step (`_items`), in one process only (under
            # a launch the Trainer gathers it over the processes and multiplies the loss by their number). The
            # model's own loss is taken both ways, the batch's mean and with that count, and the trained loss is
            # its own where it is either: the count is not always the labels the loss reads (GPT-2's counts the
            # first, never a target; a PEFT prompt's first label is one), so an override returning super()'s loss
            # with the count, and one returning the model's mean, are both the model's own. This class's
            # compute_loss is kept from its num_items probe here (a collective, and the first training step's to make)
            items = None
            if (isinstance(labels, torch.Tensor)
                    and (self.accelerator.num_processes == 1 or not self.args.average_tokens_across_devices)):
                items = self._items(batch, model)
            probe = self.loss_reads_num_items
            with torch.no_grad(), evaluating(model):
                try:
                    self.loss_reads_num_items = True if probe is None else probe  # (no probe in the check)
                    trained = float(self.compute_loss(model, dict(batch), num_items_in_batch=items).detach().float())
                    self.compute_loss_func = None
                    # (the count reaches the model's loss only through model_accepts_loss_kwargs: else once)
                    counts = [None] if items is None or not self.model_accepts_loss_kwargs else [None, items]
                    plains = [float(InfluenceTrainer.compute_loss(self, model, dict(batch), num_items_in_batch=count)
                                    .detach().float()) for count in counts]
                finally:
                    self.loss_reads_num_items = probe
            values = (trained, min(plains, key=lambda plain: abs(plain - trained)))
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError, KeyError) as err:
            logger.debug(f"This trainer's loss could not be compared with a plain Trainer's ({err}).")
            return None
        finally:
            self.compute_loss_func = func
        half = {p.dtype for p in model.parameters()} & set(HALF_DTYPES)
        tolerance = max([1e-4] + [8 * torch.finfo(d).eps for d in half])
        return (*values, tolerance) if all(map(math.isfinite, values)) else None

    def _items(self, batch, model) -> torch.Tensor | None:
        """``num_items_in_batch`` as the Trainer counts it for a training step on ``batch`` in one process (its
        ``_get_num_items_in_batch``: labels not -100, a causal LM's after the first position where its loss type
        shifts them; GPT-2's counts them all), or None where it would not be one number (DataParallel over several
        GPUs gives one per GPU). The own-loss check's trained loss gets it, and the model's own loss is taken with it
        too (a PEFT prompt's first label is a target: counted as shifted by the check, an override that returns
        ``super()``'s loss was named as another loss, 17% off)."""
        count = getattr(self, "_get_num_items_in_batch", None)
        if count is None:  # (a transformers without it: the labels that are not -100)
            return batch["labels"].ne(-100).sum()
        items = count([batch], next(model.parameters()).device)
        return items if items is None or not torch.is_tensor(items) or items.numel() == 1 else None

    def compute_influences(self, test_dataset: Dataset, combine: str = "none", *,
                           candidate_dataset: Dataset | None = None, train_dataset: Dataset | None = None,
                           loss_fn: LossFn | None = None, measurement_fn: LossFn | None = None,
                           features=None) -> InfluenceTable:
        """Influence of the training rows on ``test_dataset`` (see `hf_fastif.compute_influences`).

        ``combine="mean"`` gives one s_test for the mean loss of the rows (e.g. anchors).
        """
        train = self._influence_train(train_dataset, "compute_influences")
        self._say_which_weight_decay()  # (the optimizer that trained: one made since construction is looked at)
        engine = self.influence_engine(loss_fn=loss_fn, measurement_fn=measurement_fn, features=features)
        engine.trained_loss = self._trained_loss(train, loss_fn)
        return engine.compute_influences(train, test_dataset, combine=combine, candidate_dataset=candidate_dataset)

    def build_influence_table(self, test_dataset: Dataset, output_dir: str, *, shard_size: int = 64,
                              train_dataset: Dataset | None = None, **kwargs) -> InfluenceTable:
        """Influence for many test rows, saved shard by shard under ``output_dir`` and resumable
        (see `hf_fastif.build_influence_table`); ``train_dataset``, ``data_collator``, ``loss_fn`` and
        ``measurement_fn`` default to the trainer's, as in `compute_influences`."""
        train = self._influence_train(train_dataset, "build_influence_table")
        kwargs.setdefault("loss_fn", self.influence_loss_fn)
        kwargs.setdefault("measurement_fn", self.influence_measurement_fn)
        kwargs.setdefault("data_collator", self.data_collator)
        if "trained_loss" not in kwargs:
            kwargs["trained_loss"] = self._trained_loss(train, kwargs["loss_fn"])
        return build_influence_table(self._influence_model(), train, test_dataset, output_dir, self.influence_args,
                                     shard_size=shard_size, **kwargs)

    def _say_full_eval(self, model) -> None:
        """Name ``bf16_full_eval`` / ``fp16_full_eval`` where the model's weights are in that dtype: the Trainer's
        ``evaluate()`` / ``predict()`` outside ``train()`` convert the model itself in place (``model.to(dtype)``), so
        a model trained in float32 came to influence in bfloat16, warned of only as 'the model's parameters are
        bfloat16' (a review; influence's precision warning says what that costs). Weight by weight, as given to the
        trainer: not where a weight came in that dtype, but where float32 LoRA adapters on a bfloat16 base were
        rounded."""
        for flag, dtype in (("fp16_full_eval", torch.float16), ("bf16_full_eval", torch.bfloat16)):
            if getattr(self.args, flag, False) and any(
                    p.dtype == dtype and self._dtypes_given.get(n, dtype) != dtype for n, p in model.named_parameters()):
                logger.warning_once(
                    f"{flag}=True: the Trainer's evaluate() / predict() outside train() converted the model itself to "
                    f"{str(dtype).removeprefix('torch.')} in place (its weights rounded), and influence runs on those "
                    f"weights. Set {flag}=False, compute influence before evaluating, or load the weights as they were "
                    "before evaluate() (trainer.save_model() before it, for instance).")
                return

    def _influence_model(self):
        """The model influence is computed on: out of DDP and accelerate's wrappers, and of a ``torch.compile``
        wrapper (compiled graphs refuse double backward; `hf_fastif.mode.uncompiled`); a full-eval conversion of its
        weights named (`_say_full_eval`)."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self._say_full_eval(model)
        return model

    def _influence_train(self, train_dataset: Dataset | None, method: str) -> Dataset:
        """The training rows of an influence call: ``train_dataset``, else the trainer's (a clear error if none)."""
        train = train_dataset if train_dataset is not None else self.train_dataset
        if train is None:
            raise ValueError(f"This trainer has no train_dataset; pass train_dataset= to {method}.")
        if train_dataset is None and not isinstance(train, Dataset):  # (a stream trains; influence reads by position)
            raise TypeError(f"This trainer's train_dataset ({type(train).__name__}) is not a datasets.Dataset; "
                            f"{dataset_hint(train)} Pass that copy as {method}(..., train_dataset=copy): the trainer "
                            "keeps its own.")
        return train
