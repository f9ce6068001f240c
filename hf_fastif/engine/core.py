"""`InfluenceEngine` itself: its state, the pipeline of a call, stage 0 (checks, parameters, batchers), the scores
and the table's metadata; the other stages are its bases, one module each (see the package's docstring)."""

from __future__ import annotations

import contextlib
import datetime
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers.utils import logging

from .. import distributed as D
from ..arguments import PER_PROCESS_SETTINGS, InfluenceArguments, validate_influence_settings
from ..batches import (
    Batcher,
    check_values,
    column_rule,
    decoder_inputs_from_labels,
    padding_collator_for,
    validate_dataset,
)
from ..fingerprint import (
    callable_fingerprint,
    collator_key,
    collator_settings,
    description_key,
    global_values,
    model_fingerprint,
    module_state_description,
    note_records,
    portable_fingerprint,
    settings_differences,
    tensor_digests,
)
from ..gradient_index import check_index_factory, check_projection_dim
from ..knn import check_feature_methods
from ..loss import (
    TOKEN_WEIGHTING,
    LossFn,
    default_loss_smoothing,
    find_logits,
    influence_model,
    token_loss_kind,
)
from ..mode import influence_mode, uncompiled
from ..params import num_parameters, select_parameters
from ..readout import Readout
from ..scoring import score_pairs
from ..solvers import LowRankSolve
from ..solvers.exact import check_exact_size
from ..table import InfluenceTable
from ..trunk import TrunkCache, TrunkSplit, forward_context, model_inputs
from ..utils import half_dtypes, library_version, overflow_advice
from .call import Call
from .candidates import CandidateStage
from .kept_graphs import KeptHessians
from .padding import PaddingChecks
from .s_test import STestStage
from .saved_caches import SavedCaches
from .trunk_states import TrunkStates

logger = logging.get_logger(__name__)

COMBINE = ("none", "mean")
MAX_STORED_LENGTHS = 8
"""Datasets (by the content of the columns read) whose stored row lengths the engine keeps between calls
(`Batcher.share_lengths`: what the padding probes and the trunk states' layout read); a few KB to a few MB each."""


def non_finite_scores(rows: np.ndarray, values: np.ndarray) -> dict | None:
    """``diagnostics.non_finite_scores`` of a table's ``train_id`` / ``influence`` columns: how many values are not
    finite, and of which rows (the first 100 of them, and their number); None when every value is finite."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    named = np.unique(rows[bad])
    return {"count": int(bad.sum()), "train_ids": named[:100].tolist(), "num_train_ids": len(named)}


def loss_key(loss_fn: LossFn | None, args, fingerprint: Callable = callable_fingerprint) -> str:
    """What keys an engine's loss: the function's fingerprint and the default loss's label smoothing (``args``')."""
    smoothing = default_loss_smoothing(args, loss_fn)
    return fingerprint(loss_fn) + (f"|label_smoothing={smoothing!r}" if smoothing else "")


@dataclass
class _Watch:
    """What a held engine knows of a described state (the modules', `module_state_description`; the collator's,
    `collator_settings`) between its calls, to tell records from changes (`settings_differences`). A list that grew
    during one of its calls is a record (a hook appending gradient norms or activations, in the engine's forwards or
    an SGD step's between calls); what else changed during a call (activations by layer a hook writes, a collator's
    last batch or call count) is a record once it changed during two calls in a row: the first time it may be a
    setting moved while the call ran (another thread, a loss function, a curriculum collator), and the next call is
    keyed anew. Between calls, only records that grew are no change: a setting list extended by the user is one."""

    last: object = None  # the description the last call left (None: key anew)
    start: object = None  # the description this call started with
    grows: set = field(default_factory=set)  # paths of lists seen growing during a call
    changing: set = field(default_factory=set)  # paths that changed otherwise during the last call

    def unchanged(self, now) -> bool:
        """At a call's start: ``now`` is what the last call left, but for records that grew."""
        if self.last is None:
            return False
        return all(kind == "grew" and path in self.grows for path, kind in settings_differences(self.last, now).items())

    def ended(self, now) -> None:
        """At a call's end: ``now`` carries the call's key on if what changed since its start are records."""
        if self.start is None:
            return
        differences = settings_differences(self.start, now)
        grew = {path for path, kind in differences.items() if kind == "grew"}
        others = set(differences) - grew
        self.grows |= grew
        self.last = now if others <= self.changing else None
        self.changing = others


TRAINER_SETTINGS = ("label_smoothing_factor", "remove_unused_columns", "label_names")
"""The `TrainingArguments` fields influence reads besides the ``influence_*`` settings: the default loss's label
smoothing and the columns kept (`hf_fastif.batches.column_rule`)."""


def read_settings(args) -> dict:
    """What influence reads of ``args``: its ``influence_*`` settings and `TRAINER_SETTINGS` (`InfluenceEngine.serves`
    takes over an engine for arguments equal in these)."""
    return args.influence_settings() | {name: getattr(args, name, None) for name in TRAINER_SETTINGS}


class InfluenceEngine(PaddingChecks, TrunkStates, STestStage, CandidateStage, SavedCaches):
    """Influence of training rows on test rows for one model, with caches owned by this object.

    Args:
        model: a transformers model (or any module called with a batch dict returning ``.logits``).
        args: the ``influence_*`` settings (default: `hf_fastif.influence.default_arguments`).
        data_collator: collates rows (default: transformers' ``default_data_collator``).
        loss_fn / measurement_fn: per-example ``(outputs, batch) → (b,)`` training loss / test quantity.
        features: ``(model, batch) → (b, d)`` kNN features instead of ``influence_knn_features``.

    Public methods, by the module that holds them: `compute_influences`, `clear`, `trained_with` (here);
    `candidate_recall` (candidates.py); `logits` (trunk_states.py); `save_caches`, `load_caches`,
    `unused_loaded_caches`, `forget_unused_loaded` (saved_caches.py).
    """

    def __init__(self, model: nn.Module, args: InfluenceArguments | None = None, *,
                 data_collator: Callable | None = None, loss_fn: LossFn | None = None,
                 measurement_fn: LossFn | None = None, features: Callable | None = None):
        from ..influence import default_arguments  # influence.py builds on this package

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a transformers model, e.g. from "
                            f"AutoModelForSequenceClassification.from_pretrained), got {type(model).__name__}.")
        self.model = uncompiled(model)
        self.args = args if args is not None else default_arguments()
        if not hasattr(self.args, "influence_solver"):
            raise TypeError(f"args must be an InfluenceArguments (the influence_* settings), got "
                            f"{type(self.args).__name__}; use hf_fastif.InfluenceArguments(output_dir=..., ...), "
                            "which takes every TrainingArguments field too.")
        validate_influence_settings(self.args)
        self.data_collator = data_collator
        self.loss_fn = loss_fn
        self.measurement_fn = measurement_fn
        self.features = features
        self.trained_loss: str | None = None
        """What the model was trained on instead of its own loss, where the caller knows and influence uses the
        default loss all the same (`InfluenceTrainer`: "a compute_loss_func"): recorded in each table's diagnostics
        as ``trained_with``, so a table keeps what its trainer's warning said."""
        settings = collator_settings(data_collator)
        self._collator_watch = _Watch(last=settings)  # (what a call changes in the collator's settings: `_Watch`)
        self._functions = {"collator": collator_key(data_collator, settings), "loss": self._loss_key(),
                           "measurement": callable_fingerprint(measurement_fn),
                           "features": callable_fingerprint(features)}
        # the state each stage keeps between calls, by the module whose methods read and write it (every entry
        # keyed on content; `clear` drops the caches, `_align_caches` those built together by processes)
        # core: the call's checks
        self._warned_backward: list | None = None  # (the backward hooks warned about: modules, registrations)
        self._module_key: str | None = None  # (the modules' state the caches are keyed on: `_module_state`)
        self._module_watch = _Watch()
        self._global_values: dict = {}  # (`hf_fastif.fingerprint.global_values` at the last call's start)
        self._stored_lengths: OrderedDict[tuple, dict] = OrderedDict()  # (content, columns) -> `Batcher.share_lengths`
        # (weights, dataset, ...) whose stored values passed `check_values` → the row of its longest sequence
        self._values_checked: dict[tuple, int | None] = {}
        self._test_row_offset = 0  # (what errors call test row 0: `test_rows_named_from`)
        self._features_checked: tuple | None = None  # (the model's fingerprint, the kNN feature methods) last passed
        # (weights, training data) → the model's own loss and the default one, where they differ
        self._own_loss: dict[tuple, dict | None] = {}
        # padding: the probes' verdicts (candidates' features= padding check adds ("features", ...) keys)
        self._padding_checked: set[tuple] = set()
        # (weights, dataset, collator, loss, ...) → None where its batches drop their trailing padding, else why not
        self._trailing_padding: dict[tuple, str | None] = {}
        # (weights, collator, loss, measurement) → what showed the model reads its padding (every dataset keeps it)
        self._reads_padding: dict[tuple, str] = {}
        # trunk_states: the split, its states, the read-position cut
        # (key, split or None, reason[, the modules' state it was dropped in])
        self._split: tuple[str, TrunkSplit | None, str] | tuple[str, None, str, str | None] | None = None
        self._split_error: float | None = None
        self._readout: tuple[tuple, Readout | None, str] | None = None  # (key, the cut or None, why not)
        # the trunk's own cut for a split after the whole stack (`_first_position_cut`): (key, the cut or None, why not)
        self._trunk_cut: tuple[tuple, Readout | None, str] | None = None
        self._trunks: OrderedDict[str, TrunkCache] = OrderedDict()
        # s_test: curvature estimates, the low-rank and exact Hessians, LiSSA's kept graphs
        self._curvature: dict[tuple, dict] = {}
        self._low_rank: tuple[tuple, tuple] | None = None
        self._exact: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, eigenvalues, eigenvectors) of H
        self._prepared_solve: tuple[tuple, LowRankSolve] | None = None  # (low-rank key, λ) -> its solve
        self._lissa_graphs: tuple[tuple, KeptHessians] | None = None  # (key, LiSSA's kept graphs) between calls
        self._stack_refused: tuple[tuple, str] | None = None  # (key, why) where stacked LiSSA steps failed their check
        self._spread_warned: set[tuple] = set()  # (LiSSA's repetitions' spread, warned once per key: `_lissa`)
        # candidates: the indexes
        self._feature_index: tuple[tuple, Dataset] | None = None
        self._gradient_index: tuple[tuple, object] | None = None
        # saved_caches: what load_caches read, and whether it has served a call
        self._saved_gradient_index: tuple | None = None  # (key, path, dtype, digest) from load_caches, read on first use
        self._from_disk: dict[tuple[str, object], bool] = {}  # (kind, key) read by load_caches -> served a call since

    @contextlib.contextmanager
    def test_rows_named_from(self, offset: int):
        """Within it, errors name the test rows of a call counted from ``offset`` (test row 0 is row ``offset``): for
        a caller that hands the engine a slice of its test set (`hf_fastif.builder`'s shards), so that a bad row is
        named by its place in the whole set. Nothing but the naming changes."""
        previous, self._test_row_offset = self._test_row_offset, int(offset)
        try:
            yield self
        finally:
            self._test_row_offset = previous

    # ---- the pipeline ------------------------------------------------------------------------------------------
    def compute_influences(self, train_dataset: Dataset, test_dataset: Dataset, *, combine: str = "none",
                           candidate_dataset: Dataset | None = None) -> InfluenceTable:
        """Influence of training rows on test rows: ``-∇L(z_train) · (H + λI)⁻¹ ∇L(z_test)``.

        Args:
            train_dataset: tokenized training rows with labels; H is the Hessian of their mean loss.
            test_dataset: tokenized test rows with labels.
            combine: ``"none"``: one s_test per test row; ``"mean"``: one s_test for the mean test loss
                (``test_id`` 0 in the table), the kNN query being the mean test feature.
            candidate_dataset: rows to score (default ``train_dataset``), e.g. an unseen pool for augmentation;
                ``train_id`` then indexes this dataset.
        Returns:
            An `InfluenceTable` (negative influence = helpful), identical on every process.
        """
        call = self._start(train_dataset, test_dataset, candidate_dataset, combine)
        with influence_mode(self.model, call.names):
            self._prepare(call)
            queries = None
            if not self._candidates_read_s_test(call):  # first: a bad feature or index setting fails before s_test
                with call.timer("candidates"):
                    queries = self._candidates(call, None)
            s_test = self._s_test_of(call)
            if queries is None:
                with call.timer("candidates"):
                    queries = self._candidates(call, s_test)
            with call.timer("scoring"):
                pair_tests, pair_rows, values = self._scores(call, queries, s_test)
            self._flag_non_finite(call, pair_rows, values)
            if self.args.influence_measure_recall and call.k is not None:
                with call.timer("recall"):
                    call.info["candidate_recall"] = self._recall_of(call, s_test, queries)
        readout, split = call.fm.readout, call.fm.split
        if readout is not None and readout.failed is not None:  # dropped during this call: say so in the table
            call.info["readout"] = {"cut_after": readout.name, "failed_on_a_batch": readout.failed,
                                    "note": "the whole layer ran from that batch on"}
        if split is not None and split.failed is not None:
            call.info["trunk"] |= {"failed_on_a_batch": split.failed,
                                   "note": "the batches that did not line up ran the whole model"}
        if call.fm.no_forward_ad is not None:
            call.info["scored_by"] = {"method": "per-example gradients", "why": call.fm.no_forward_ad}
        metadata = self._metadata(call, train_dataset, test_dataset, candidate_dataset or train_dataset)
        self._ended()
        return InfluenceTable.from_arrays(pair_tests, pair_rows, values, metadata, pairs_unique=True)  # (per query:
        # distinct candidate rows)

    @staticmethod
    def _flag_non_finite(call: Call, rows: np.ndarray, values: np.ndarray) -> None:
        """Say which scores are not finite (kept as NaN / inf in the table, with what was computed around them): a
        candidate's gradient overflowed, as a float16 causal LM's do on longer rows, or its loss is inf / NaN."""
        summary = non_finite_scores(rows, values)
        if summary is None:
            return
        call.info["non_finite_scores"] = summary
        named = summary["train_ids"]
        logger.warning(f"{summary['count']} of {len(values)} influence values are not finite, of candidate rows "
                       f"{named[:10]}{' ...' if summary['num_train_ids'] > 10 else ''} (the table keeps them, and "
                       "names them under diagnostics.non_finite_scores): those rows' loss is inf / NaN, or their "
                       "gradients overflowed" + (f" ({advice})" if (advice := overflow_advice(call.params)) else "")
                       + ".")

    def _prepare(self, call: Call) -> None:
        """The padding probe, the trunk caches, the read position, and the default loss against the model's own:
        what every later stage runs on."""
        # each stage every process runs by itself is a collective block (`D.together`): an error that one process alone
        # meets (an out-of-memory on one GPU) stops every process, the others naming it; they went on into the next
        # stage's gather and failed with a bare gloo error or, where the script caught the error and called again,
        # waited for ever
        D.together(lambda: self._check_padding(call), "The padding probe")
        with call.timer("trunk"):
            # each process computes its own trunk states (its own file, its own disk space)
            D.together(lambda: self._attach_trunks(call), "The trunk states")
            D.together(lambda: self._attach_readout(call), "The last layer's cut")
        D.together(lambda: self._check_own_loss(call), "The check of the default loss against the model's own")

    def _label_smoothing(self) -> float:
        return default_loss_smoothing(self.args, self.loss_fn)

    def _loss_key(self, fingerprint: Callable = callable_fingerprint) -> str:
        return loss_key(self.loss_fn, self.args, fingerprint)

    def _module_state(self) -> str:
        """The key of the modules' state (`module_state_description`) this call's caches are keyed on: the last
        call's when nothing changed since it ended but records it saw grow (`_Watch`), else the state's own."""
        now = module_state_description(self.model)
        if self._module_key is None or not self._module_watch.unchanged(now):
            self._module_key = description_key(now)
        self._module_watch.start = now
        return self._module_key

    def _ended(self) -> None:
        """After a call: what the modules and the collator hold now, against what they held at its start (`_Watch`)."""
        self._module_watch.ended(module_state_description(self.model))
        self._collator_watch.ended(collator_settings(self.data_collator))
        # a value the functions' module-level objects changed during the call (a loss counting its calls) is a record
        note_records(self._global_values, self._functions_globals())

    def _functions_globals(self) -> dict:
        """`hf_fastif.fingerprint.global_values` of the loss, measurement and features functions."""
        return global_values(self.loss_fn, self.measurement_fn, self.features)

    def _refresh_collator_key(self) -> None:
        """Key the collator anew when its settings changed since the last call left them (padding side, pad id, what
        it reads; records seen growing are no change, `_Watch`): every cache is keyed on it. Its settings are read on
        every call; its key reads the tokenizer's vocabulary (34 ms on MiniLM's), so not."""
        settings = collator_settings(self.data_collator)
        if not self._collator_watch.unchanged(settings):
            self._functions["collator"] = collator_key(self.data_collator, settings)
        self._collator_watch.start = settings

    def _warn_backward_hooks(self, model: nn.Module) -> None:
        """Warn (once per set of hooks: their modules and registrations) about backward hooks: the gradients and
        Hessian-vector products run through them and the forward-mode scoring does not, so the values mix the hooked
        and the unhooked model (a hook that doubled the pooler's input gradients moved a table by 5e-4 where the
        hooked model's influence is another)."""
        from torch.nn.modules import module as torch_module

        registered = [(name or type(model).__name__, tuple(m._backward_hooks), tuple(m._backward_pre_hooks))
                      for name, m in model.named_modules() if m._backward_hooks or m._backward_pre_hooks]
        if torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks:
            registered.append(("every module (torch's global backward hooks)",
                               tuple(torch_module._global_backward_hooks),
                               tuple(torch_module._global_backward_pre_hooks)))
        if registered and self._warned_backward != registered:
            self._warned_backward = registered
            hooked = [name for name, *_ in registered]
            logger.warning(f"Backward hooks are registered on {', '.join(hooked[:3])}"
                           f"{f' and {len(hooked) - 3} more' if len(hooked) > 3 else ''}: influence's gradients and "
                           "Hessian-vector products run through them, its forward-mode scoring does not, so the values "
                           "mix the hooked and the unhooked model. Remove them for influence (handle.remove()).")

    def _portable_functions(self) -> dict:
        """The collator, loss, measurement and features as `portable_fingerprint` describes them: what processes of
        a launch compare (`_functions`, the caches' keys, tell two live objects apart by address, which differs
        between processes even when they run the same script)."""
        return {"collator": portable_fingerprint(self.data_collator), "loss": self._loss_key(portable_fingerprint),
                "measurement": portable_fingerprint(self.measurement_fn), "features": portable_fingerprint(self.features)}

    def serves(self, model: nn.Module, args: InfluenceArguments, data_collator, loss_fn: LossFn | None,
               measurement_fn: LossFn | None, features) -> bool:
        """Whether this engine computes what one made with these would, with its caches (a trainer keeps one engine
        across calls): the same model, arguments equal in what influence reads (`read_settings`), functions with the
        same keys, and the same collator or one of equal settings (its key reads the tokenizer's vocabulary, 34 ms on
        MiniLM's: not per call; the same object's changes are seen by the call's own check). Take an equal collator
        over with `use_collator`."""
        wanted = [loss_key(loss_fn, args), callable_fingerprint(measurement_fn), callable_fingerprint(features)]
        return (self.model is model and (self.args is args or read_settings(self.args) == read_settings(args))
                and [self._functions[k] for k in ("loss", "measurement", "features")] == wanted
                and (self.data_collator is data_collator
                     or self._functions["collator"] == collator_key(data_collator)))

    def use_collator(self, data_collator) -> None:
        """Run with ``data_collator``, one that `serves` found equal to this engine's (its caches kept; its settings
        watched from now on)."""
        if data_collator is not self.data_collator:  # (its key is this one's, as `serves` found: not keyed again)
            self.data_collator, self._collator_watch = data_collator, _Watch(last=collator_settings(data_collator))

    @property
    def measures_default_loss(self) -> bool:
        """Whether the test rows are measured by the default loss (no ``loss_fn``, and no ``measurement_fn``, which
        would otherwise fall back to it): the loss that reads the rows' targets, so each test row needs one."""
        return self.loss_fn is None and self.measurement_fn is None

    def trained_with(self) -> str | None:
        """The tables' ``trained_with`` note: `trained_loss` where influence uses the default loss, else None."""
        if self.trained_loss is None or self.loss_fn is not None:
            return None
        return f"{self.trained_loss}; influence used the model's default loss"

    def _check_own_loss(self, call: Call) -> None:
        """With the default loss, compare it with the loss the model itself returns, once per weights and data (a
        loss term can be invisible at some weights: class weights while every row's loss is the same, a penalty
        that is zero at initialisation): for a classifier on the first 8 training rows together (class weights
        cancel on one row), for token losses on the first row alone (the model weights rows by their tokens). A
        model that weights classes, smooths labels or adds a term in its own forward trains on another loss than
        the head's plain one, and influence would silently be of the plain one. Only the top runs, from the cached
        trunk states (1.5 ms on MiniLM). A mixture of experts' router loss is left out (it is not a per-row loss,
        and takes no part in a head's derivatives); the model's config is restored afterwards (transformers sets
        ``problem_type`` on the first forward with labels, which would change the model's fingerprint)."""
        note = self.trained_with()
        if note is not None:
            call.info["trained_with"] = note
        if self.loss_fn is not None or self._label_smoothing():  # (smoothing: the Trainer's loss, not the model's)
            return
        key = (call.model_key, call.train.fingerprint)
        if key not in self._own_loss:
            compared = self._own_and_default_loss(call, list(range(min(8, len(call.train)))))
            if compared is not None and compared[4] is not None and compared[4].dim() != 2:  # token losses
                compared = self._own_and_default_loss(call, [0])
            self._own_loss[key] = None  # (also where there is nothing to compare at these weights)
            if compared is None:
                return
            own, ours, tolerance, floor, _, rows = compared
            if abs(own - ours) > tolerance * max(abs(own), abs(ours)) + floor:
                self._own_loss[key] = {"rows": rows, "model_loss": own, "default_loss": ours}
                what = "row 0" if len(rows) == 1 else f"rows 0-{len(rows) - 1}"
                logger.warning(
                    f"On train_dataset {what} the model's own loss is {own:.6g}, and the mean of the default per-row "
                    f"loss (the head's plain one, hf_fastif.loss) is {ours:.6g}: the model computes its loss "
                    "otherwise (class weights, label smoothing or an extra term in its forward), so the influence "
                    "computed would be of another loss than the one it trains on. Pass loss_fn=(outputs, batch) -> "
                    "per-row loss that matches it (InfluenceTrainer: influence_loss_fn=). A penalty on the "
                    "parameters (AdaLoRA's orthogonal regularisation) cannot go through loss_fn, which runs outside "
                    "the parameters' derivatives: an L2 term is influence_weight_decay, others are left out.")
        if self._own_loss.get(key) is not None:
            call.info["own_loss_differs"] = self._own_loss[key]

    def _own_and_default_loss(self, call: Call, rows: list[int]):
        """``(the model's own loss, the mean default loss over the rows it counts, the relative and the absolute
        tolerance of the logits' dtype, the logits, rows)`` on these training rows, or None where there is nothing to
        compare."""
        batch = call.train.batch(rows)
        if not isinstance(batch.get("labels"), torch.Tensor):
            return None
        config = getattr(self.model, "config", None)
        saved = dict(vars(config)) if config is not None else None
        with torch.no_grad(), forward_context(call.fm.split, batch):
            try:
                outputs = self.model(**model_inputs(batch, self.model), labels=batch["labels"])
            except Exception as err:  # a model that cannot take labels this way: nothing to compare
                logger.debug(f"The model's own loss could not be compared with the default one ({err}).")
                return None
            finally:
                if saved is not None:
                    vars(config).clear()
                    vars(config).update(saved)
            own = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
            # (outside the try: the default loss is the library's own, and its error is a bug to see, not a model
            # that cannot be compared)
            ours = call.fm.loss_fn(outputs, batch) if isinstance(own, torch.Tensor) else None
        if ours is None or own.numel() != 1 or len(ours) != len(rows):
            return None
        aux, coefficient = getattr(outputs, "aux_loss", None), getattr(config, "router_aux_loss_coef", None)
        if isinstance(aux, torch.Tensor) and coefficient:
            own = own - coefficient * aux.to(own.dtype)
        labels = batch["labels"]
        if labels.dim() == 1 and not labels.is_floating_point():
            ours = ours[labels != -100]  # the model's mean counts the labelled rows only
        logits = find_logits(outputs)
        if not len(ours) or not torch.isfinite(own):
            return None
        floating = isinstance(logits, torch.Tensor) and logits.is_floating_point()
        dtype = logits.dtype if floating else torch.float32
        # the model's own loss is computed in its logits' dtype: log-sum-exp minus the label's logit cancels to the
        # logits' rounding, eps·max|z| (bf16: a confident row's 3e-4 is 0), besides the relative part
        floor = 1e-6
        if floating and logits.numel():
            floor = max(floor, 4 * torch.finfo(dtype).eps * float(logits.detach().abs().max()))
        return float(own), float(ours.mean()), max(1e-4, 8 * torch.finfo(dtype).eps), floor, logits, rows

    def clear(self) -> None:
        """Drop every cache (they are rebuilt on the next call)."""
        for cache in self._trunks.values():
            cache.close()
        self._trunks.clear()
        self._stored_lengths.clear()
        self._lissa_graphs = None
        self._split = self._readout = self._trunk_cut = self._stack_refused = None
        self._feature_index = self._gradient_index = self._low_rank = self._prepared_solve = self._exact = None
        self._saved_gradient_index = None
        self._curvature.clear()
        self._from_disk.clear()

    def __enter__(self) -> InfluenceEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.clear()

    # ---- stage 0: checks, parameters, batchers -------------------------------------------------------------
    def _start(self, train_dataset, test_dataset, candidate_dataset, combine, methods=None) -> Call:
        """Checks before any work, then the call's parameters, fingerprints and batchers. ``methods``: the candidate
        methods a recall measurement will use (instead of the settings' own k and method)."""
        args, model = self.args, self.model
        # checks that can fail in one process only (its copy of a dataset lost a column): every process raises,
        # naming it, instead of a script that caught the error meeting the others' call at the settings check
        with D.collectively("The call's input checks"):
            validate_influence_settings(args)
            meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
            if meta is not None:
                raise ValueError(f"The model's parameter {meta!r} is on the 'meta' device: its weights were never loaded "
                                 "(a model built under init_empty_weights / device_map='meta'). Load the weights "
                                 "(from_pretrained without it, or model.to_empty(device=...) and load_state_dict) first.")
            self._refresh_collator_key()
            # a loss changed in place (a temperature, a closure's value) keys the curvature caches anew (µs each)
            self._functions |= {"loss": self._loss_key(),
                                "measurement": callable_fingerprint(self.measurement_fn),
                                "features": callable_fingerprint(self.features)}
            self._global_values = self._functions_globals()
            if combine not in COMBINE:
                raise ValueError(f"combine={combine!r} is unknown; use 'none' (one s_test per test row) or 'mean'.")
            candidate_dataset = train_dataset if candidate_dataset is None else candidate_dataset
            rule = column_rule(args)
            train_cols = validate_dataset(train_dataset, "train_dataset", model, **rule)
            test_cols = validate_dataset(test_dataset, "test_dataset", model, **rule)
            # the training rows as candidates: their columns were read above (said once, not again as candidate_dataset)
            cand_cols = (train_cols if candidate_dataset is train_dataset
                         else validate_dataset(candidate_dataset, "candidate_dataset", model, **rule))
            # (a numpy integer, which the settings accept, reached faiss as it was: a bare SWIG TypeError)
            k = None if args.influence_knn_k is None else int(args.influence_knn_k)
            if k is not None and k >= len(candidate_dataset) and methods is None:
                if k > len(candidate_dataset):
                    logger.warning(f"influence_knn_k={k} exceeds the {len(candidate_dataset)} candidate rows; scoring all "
                                   "of them.")
                k = None  # (k = N is every row too: an approximate index searched at k = N returned fewer)
            params = select_parameters(model, args.influence_params)
            names = list(params)
            weights = dict(model.named_parameters())
            half = half_dtypes(weights)  # (any of them: a bf16 trunk under float32 influence parameters moved rankings too)
            if half:  # (documented as 0.2% off, but rankings moved: Spearman 0.84 in a review's check, unwarned)
                count = sum(p.numel() for p in weights.values() if str(p.dtype).removeprefix("torch.") in half)
                logger.warning_once(
                    f"{count:,} of the model's parameters are {' / '.join(half)}: its forwards and Hessian-vector "
                    "products run in that precision (solvers and scores in float32), so influence values come out ~0.1-2% "
                    "off and close ones swap places (a bfloat16 tiny BERT: Spearman 0.84 with float64, 1.000 for its "
                    "float32 copy; 0.83 with only its influence parameters in float32; 0.76 on another, 160 rows, "
                    "so it can be lower). For rankings to act on, compute "
                    "influence on a float32 copy of the model: copy.deepcopy(model).float().")
            if args.influence_solver == "exact":
                check_exact_size(num_parameters(params))
            # (the method as `_candidates` reads it: a features="gradient" engine skipped these checks, and its
            # index failed after s_test)
            gradient = (k is not None and self._candidate_method() == "gradient" if methods is None
                        else "gradient" in methods)
            if gradient:
                check_projection_dim(args.influence_projection_dim, num_parameters(params))
                check_index_factory(args.influence_knn_index, len(candidate_dataset), args.influence_projection_dim)
            digests = tensor_digests(model)
            fingerprint = model_fingerprint(model, digests)
            module_state = self._module_state()  # before anything is installed for the call (1.4 ms on MiniLM)
            self._warn_backward_hooks(model)
            device = next(model.parameters()).device
            rows = dict(decoder_inputs=decoder_inputs_from_labels(model), padding_collator=padding_collator_for(model))
            train = Batcher(train_dataset, train_cols, self.data_collator, device, name="train_dataset", **rows)
            test = Batcher(test_dataset, test_cols, self.data_collator, device, name="test_dataset",
                           row_offset=self._test_row_offset, **rows)
            cand = train if candidate_dataset is train_dataset else Batcher(
                candidate_dataset, cand_cols, self.data_collator, device, name="candidate_dataset", **rows)
            for batcher in dict.fromkeys((train, test, cand)):
                self._share_lengths(batcher)
        # every cache of a dataset is keyed on the hash of its rows (`Batcher.fingerprint`, computed here once per
        # call), never on datasets' _fingerprint, which datasets with other rows can share
        rank, world_size = D.world()
        if world_size > 1:  # processes that differ in anything that decides the numbers would mix results
            portable = self._portable_functions()
            D.check_same_everywhere({
                "settings": {k: v for k, v in args.influence_settings().items() if k not in PER_PROCESS_SETTINGS},
                "combine": combine, "parameters": names,
                "model": fingerprint, "functions": portable, **_data_description("train", train),
                **_data_description("test", test),
                **({"candidates": "the training rows"} if cand is train else _data_description("candidates", cand)),
            })
            self._align_caches(portable)
        default_loss = self.loss_fn is None
        kind = token_loss_kind(model) if default_loss else None
        if kind is not None:  # (documented, and recorded for causal LMs, but said nowhere a user would see it)
            logger.warning_once(TOKEN_WEIGHTING.format(kind=kind))
        own = self.measures_default_loss
        checks = [(train, train_dataset, train_cols, "train_dataset", default_loss, False),
                  (test, test_dataset, test_cols, "test_dataset", own, own and combine == "none")]
        if candidate_dataset is not train_dataset:
            checks.append((cand, candidate_dataset, cand_cols, "candidate_dataset", default_loss, False))
        longest = {}
        for batcher, dataset, columns, name, loss, target in checks:
            key = (fingerprint, batcher.fingerprint, tuple(columns), name, loss, target)
            if key not in self._values_checked:  # a scan of the stored columns, once per dataset and model
                self._values_checked[key] = check_values(dataset, columns, name, model, default_loss=loss,
                                                         needs_target=target)
            longest[name] = self._values_checked[key]
        batchers = [(train, "train_dataset"), (test, "test_dataset")]
        batchers += [] if cand is train else [(cand, "candidate_dataset")]
        for batcher, name in batchers:  # (after the stored rows' checks)
            # every call (~1 ms): a collator can change in ways no key sees
            batcher.check_collator(name, model, longest=longest[name])
        if self.loss_fn is None:  # the default loss reads `labels`; a loss_fn reads what it reads (QA: positions)
            for batcher, name in ((train, "train_dataset"), (cand, "candidate_dataset")):
                batcher.check_labels(name)
        if self.measures_default_loss:
            test.check_labels("test_dataset")
        dtypes = {p.dtype for p in params.values()}
        work = torch.float64 if torch.float64 in dtypes else torch.float32
        fm = influence_model(model, names, args, self.loss_fn, self.measurement_fn)
        named = [self._candidate_method()] if methods is None and k is not None else methods or []
        checked = (fingerprint, tuple(m for m in named if isinstance(m, str)))
        if checked != self._features_checked:  # (its probe rows run a forward where the model marks nothing causal)
            check_feature_methods(model, named)
            self._features_checked = checked
        return Call(names=names, params=params, fm=fm, train=train, test=test, cand=cand, k=k, combine=combine,
                     feature_methods=tuple(m for m in named if isinstance(m, str) and m not in ("gradient", "random")),
                     digests=digests, model_fingerprint=fingerprint, work_dtype=work,
                     module_state=module_state,
                     progress=not getattr(args, "disable_tqdm", False) and rank == 0)

    def _share_lengths(self, batcher: Batcher) -> None:
        """Give ``batcher`` the stored row lengths this engine keeps for its dataset's content (filled as read),
        keeping the `MAX_STORED_LENGTHS` datasets used last."""
        key = (batcher.fingerprint, tuple(batcher.dataset.column_names))
        lengths = self._stored_lengths.pop(key, {})
        self._stored_lengths[key] = lengths
        while len(self._stored_lengths) > MAX_STORED_LENGTHS:
            self._stored_lengths.popitem(last=False)
        batcher.share_lengths(lengths)

    # the padding probes of stage 0: padding.py; stage 1, the frozen trunk: trunk_states.py; stages 2-3, test
    # gradients and s_test: s_test.py (its kept graphs: kept_graphs.py); stage 4, candidates: candidates.py; the
    # caches on disk: saved_caches.py
    # ---- stage 5: scores --------------------------------------------------------------------------------------
    def _scores(self, call: Call, queries: list[np.ndarray], s_test: torch.Tensor):
        """Influence of each (query, candidate) pair; each process scores its share of the candidate rows and the
        ``(pair, value)`` rows are gathered."""
        pair_tests = np.concatenate([np.full(len(rows), t, dtype=np.int64) for t, rows in enumerate(queries)])
        pair_rows = np.concatenate(queries)
        mine = np.flatnonzero(np.isin(pair_rows, D.shard(np.unique(pair_rows))))
        local = D.together(lambda: score_pairs(call.fm, call.params, call.cand, pair_tests[mine], pair_rows[mine],
                                               s_test, batch_size=self.args.influence_scoring_batch_size,
                                               method=self.args.influence_scoring, progress=call.progress),
                           "Scoring the candidates")
        gathered = D.gather_rows(np.column_stack([mine.astype(np.float64), local]))
        values = np.empty(len(pair_rows))
        values[gathered[:, 0].astype(np.int64)] = gathered[:, 1]
        return pair_tests, pair_rows, values

    # ---- stage 6: the table's metadata ---------------------------------------------------------------------
    def _metadata(self, call: Call, train_dataset, test_dataset, candidate_dataset) -> dict:
        model, args = self.model, self.args
        config = getattr(model, "config", None)
        return {
            "library_version": library_version(),
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "name_or_path": getattr(config, "_name_or_path", None) or type(model).__name__,
                "revision": getattr(config, "_commit_hash", None),
                "class": type(model).__name__,
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "num_influence_parameters": num_parameters(call.params),
                "fingerprint": call.model_fingerprint,  # (recorded: the weights, not the cache key)
                # the weights' dtypes (parameters of each) and the one the solvers and scores ran in: a bf16 model's
                # table was told from a float32 one's by its fingerprint alone
                "dtypes": _parameter_dtypes(model),
                "work_dtype": str(call.work_dtype).removeprefix("torch."),
            },
            "train_data": describe_data(train_dataset, call.train.fingerprint),
            "test_data": describe_data(test_dataset, call.test.fingerprint),
            "candidate_data": describe_data(candidate_dataset, call.cand.fingerprint),
            "combine": call.combine,
            "settings": args.influence_settings() | {"influence_knn_k_used": call.k}
            | ({"label_smoothing_factor": self._label_smoothing()} if self._label_smoothing() else {}),
            "lambda": args.influence_lambda,
            "num_processes": D.world()[1],
            # a table of another loss or test quantity said nothing of it (its values are another quantity)
            "functions": {"loss_fn": _describe_function(self.loss_fn, self._functions["loss"]),
                          "measurement_fn": _describe_function(self.measurement_fn, self._functions["measurement"])},
            "semantics": SEMANTICS if self.measurement_fn is None else SEMANTICS | MEASUREMENT_SEMANTICS,
            "diagnostics": call.info | call.timer.seconds,
        }


def _data_description(name: str, batcher: Batcher) -> dict:
    """What processes compare of a dataset, field by field, so that a refusal names what differs (the number of rows,
    the columns read and their order, the format) before the hash of the values."""
    return {f"{name} rows": len(batcher), f"{name} columns": list(batcher.dataset.column_names),
            f"{name} format": batcher.dataset.format.get("type"), f"{name} values (sha256)": batcher.fingerprint}


def _describe_function(function, fingerprint: str) -> dict | None:
    """A table's record of a ``loss_fn`` / ``measurement_fn`` of one's own (None: the default)."""
    if function is None:
        return None
    return {"name": getattr(function, "__qualname__", type(function).__name__),
            "module": getattr(function, "__module__", None), "fingerprint": fingerprint}


MEASUREMENT_SEMANTICS = {
    "influence": "-grad L(z_train) . s_test, s_test = (H + lambda I)^-1 grad m(z_test), m the measurement_fn "
                 "(metadata['functions']); negative = upweighting the row lowers m (helpful when lower m is better)",
}
SEMANTICS = {
    "influence": "-grad L(z_train) . s_test, s_test = (H + lambda I)^-1 grad L(z_test); negative = helpful",
    "hessian": "Hessian of the mean training loss over the selected parameters (LiSSA: sampled B-row batches)",
    "lissa_steps": "exactly J steps per repetition (the 2021 reference code runs J + 2)",
    "lissa_batches": "one batch sequence per (seed, repetition), shared by every test row of a call (the "
                     "reference code draws per s_test): errors are correlated across the test rows of one call",
    "causal_lm_loss": "each row's mean token loss (HF's model loss is the mean over all tokens of the batch)",
}
"""What the numbers mean, recorded in every table's metadata (see docs/safety.md)."""


def describe_data(dataset: Dataset, sha256: str | None = None) -> dict:
    """Name, split, datasets fingerprint and size of a dataset, for a table's metadata, and ``sha256``: the hash of
    the values of the columns read (`Batcher.fingerprint`), which tells apart rows that share a datasets
    fingerprint (a ``map`` that draws at random, run twice)."""
    info = getattr(dataset, "info", None)
    return {
        "name": getattr(info, "dataset_name", None) or getattr(info, "builder_name", None),
        "split": str(dataset.split) if getattr(dataset, "split", None) is not None else None,
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "num_rows": len(dataset),
        **({"sha256": sha256} if sha256 is not None else {}),
    }


def _parameter_dtypes(model: nn.Module) -> dict[str, int]:
    """The model's parameter entries by dtype (``{"bfloat16": 6256, "float32": 34}``), for the table's metadata."""
    out: dict[str, int] = {}
    for p in model.parameters():
        name = str(p.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + p.numel()
    return dict(sorted(out.items()))
