"""Stage 1 of `InfluenceEngine`: the frozen trunk's states, computed once per row and kept, and the
read-position cut of the last layer (`hf_fastif.trunk`, `hf_fastif.readout` hold the mechanics; this module decides
where to split, checks the split and the cut on probe rows, and owns the engine's trunk caches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers.utils import logging

from ..batches import (
    Batcher,
    column_rule,
    decoder_inputs_from_labels,
    in_row_order,
    padding_collator_for,
    validate_dataset,
)
from ..fingerprint import tensor_digests
from ..knn import model_features
from ..loss import logits_of
from ..mode import influence_mode
from ..params import select_parameters
from ..readout import READOUT_TOLERANCE, Readout, cut_in_words, find_readout
from ..trunk import (
    FirstPositionError,
    TrunkCache,
    TrunkLayoutError,
    TrunkSplit,
    find_split,
    forward_context,
    model_inputs,
    split_tolerance,
    verify_split,
)
from ..utils import half_dtypes, relative_difference
from . import padding  # (its constants read as padding.X: one place to patch them)
from .call import Call

logger = logging.get_logger(__name__)

MAX_TRUNK_CACHES = 4
"""Trunk caches (one per dataset content, weights below the split and collator) an engine holds; past it the least
recently used is dropped (`TrunkStates._evict_trunks`)."""

READOUT_PROBE_ROWS = 4
"""The first training rows and the first test rows (each collated together) on which
`hf_fastif.readout.find_readout` checks a cut, besides the shortest training row alone and next to the longest."""


def _same_features(model: nn.Module, method: str, cut: Readout, batches: Sequence[dict]) -> bool:
    """Whether ``method``'s kNN features of each batch are the same with the last layer cut at ``cut`` (the whole
    model either way) as without, within `hf_fastif.readout.READOUT_TOLERANCE`."""
    for batch in batches:
        try:
            with torch.no_grad():
                whole = model_features(model, batch, method)
                with cut.active():
                    part = model_features(model, batch, method)
        except (RuntimeError, IndexError, ValueError, TypeError):
            return False
        if whole.shape != part.shape or not relative_difference(part.double(), whole.double()) <= READOUT_TOLERANCE:
            return False
    return True


def verification_rows(batcher: Batcher) -> list[int]:
    """Rows a trunk cache is checked on: the first 8, and the shortest and longest rows (`Batcher.padding_probes`:
    in one batch, the shortest is padded to the longest)."""
    return sorted(set(range(min(8, len(batcher)))) | {i for pair in batcher.padding_probes(padding.PADDING_PROBE_ROWS)
                                                       for i in pair})


class TrunkStates:
    """`InfluenceEngine`'s trunk split, read-position cut and trunk caches, and predictions through the same
    trunk (`logits`). State (made in `InfluenceEngine.__init__`): ``_split``, ``_split_error``, ``_readout``,
    ``_trunk_cut``, ``_trunks`` (restored by saved_caches.py too)."""

    def _attach_trunks(self, call: Call) -> None:
        """Give every batcher its dataset's cached trunk states when the model splits cleanly."""
        split = self._find_split(call.names, call.train, call.module_state)
        below = None if split is None else split.fingerprint(call.digests)  # (once: 5 ms each on MiniLM)
        cut = None if split is None else self._first_position_cut(call, split)
        for name in ("train", "test", "cand"):
            if split is not None:
                setattr(call, name, self._with_trunk(split, getattr(call, name), below, call.module_state,
                                                     call.progress and name != "test", cut))
                split = self._split[1]  # None if a new cache failed its check
                cut = cut and self._trunk_cut[1]  # None if a cut cache failed it (the next ones keep every position)
        if split is None:
            for name in ("train", "test", "cand"):
                setattr(call, name, getattr(call, name).with_trunk(None))
            call.info["trunk"] = {"split": None, "reason": self._split[2]}
            return
        call.fm.split = split
        call.info["trunk"] = {"split": f"{split.path}.{split.first}", "verified_relative_error": self._split_error}
        if split.first == len(split.layers):
            call.info["trunk"]["first_position_cut"] = (cut_in_words(cut.name) if cut is not None
                                                        else f"none ({self._trunk_cut[2]})")

    def _readout_probes(self, call: Call) -> tuple[list[dict], list[dict]]:
        """The batches a cut of the last layer is checked on (`hf_fastif.readout.find_readout`): the first training
        rows together, the shortest alone and next to the longest, and the first test rows together."""
        first = range(min(READOUT_PROBE_ROWS, len(call.train)))
        probes = [call.train.batch(first)]
        for pair in call.train.padding_probes(padding.PADDING_PROBE_ROWS):  # alone and padded together (internal
            probes += [call.train.batch([pair[0]]), call.train.batch(list(pair))]  # padding shows up there)
        return probes, [call.test.batch(range(min(READOUT_PROBE_ROWS, len(call.test))))]

    def _first_position_cut(self, call: Call, split: TrunkSplit) -> Readout | None:
        """For a split after the whole stack (only a pooler and a head hold influence parameters), the cut that
        computes and keeps the stack's last layer at its first position only (`TrunkCache`'s ``first_position``),
        where nothing this call reads from the trunk changes: the loss and the measurement
        (`hf_fastif.readout.find_readout`, on the whole model) and the kNN features of every method the call extracts
        through the trunk (equal with and without the cut on the same probe rows). Decided again when the weights,
        the parameters, the training data or the feature methods change. Only under the default loss and
        measurement, which read the head's logits: a ``loss_fn`` or ``measurement_fn`` of one's own may read the
        states at a position that depends on the row (a review's loss reading a marker token's state: 0.44 off on
        rows the probes did not include, without a word), and the trunk then keeps every position. New test rows
        are not probed again: every new cache is checked against the full model's logits, as every trunk cache is,
        and one that fails keeps every position instead (probing each new test point had made the Space's
        settings' later calls 0.06 -> 0.26 s)."""
        on = getattr(self.args, "influence_skip_unread_positions", True)
        key = (on, tuple(call.names), call.model_key, f"{split.path}.{split.first}", call.train.fingerprint,
               self._functions["loss"], self._functions["measurement"], call.feature_methods)
        if split.first != len(split.layers):
            return None
        if not on:
            self._trunk_cut = (key, None, "influence_skip_unread_positions=False")
        elif self._own_reads() is not None:
            # (a function of one's own may read the last layer's states at a position that depends on the row: the
            # probes cannot show it for every row, and a cut trunk would answer with the first position's state)
            self._trunk_cut = (key, None, "a loss_fn or measurement_fn of one's own may read other positions")
        elif self._trunk_cut is None or self._trunk_cut[0] != key:
            probes, tests = self._readout_probes(call)
            cut, reason = find_readout(call.fm, call.params, probes, tests)
            if cut is not None:
                reason = next((f"influence_knn_features={m!r} reads other positions" for m in call.feature_methods
                               if not _same_features(self.model, m, cut, [*probes, *tests])), "")
                cut = None if reason else cut
            if cut is None:
                logger.info(f"The trunk keeps every position of {split.path}.{split.first - 1}: {reason}.")
            self._trunk_cut = (key, cut, reason)
        return self._trunk_cut[1]

    def _attach_readout(self, call: Call) -> None:
        """Cut the last layer to the position the loss reads, where `hf_fastif.readout.find_readout` shows that
        nothing changes (probe rows of the training and test data; decided again when the weights, the parameters,
        the split or the data change)."""
        split, on = call.fm.split, getattr(self.args, "influence_skip_unread_positions", True)
        key = (on, tuple(call.names), call.model_key, None if split is None else f"{split.path}.{split.first}",
               call.train.fingerprint, call.test.fingerprint,
               self._functions["loss"], self._functions["measurement"])  # (what the cut was checked on)
        if not on:
            self._readout = (key, None, "influence_skip_unread_positions=False")
        elif self._readout is None or self._readout[0] != key:
            probes, tests = self._readout_probes(call)
            readout, reason = find_readout(call.fm, call.params, probes, tests, reads=self._own_reads())
            if readout is None:
                logger.info(f"The last layer runs at every position: {reason}.")
            self._readout = (key, readout, reason)
        readout, reason = self._readout[1:]
        if readout is not None and readout.failed is not None:
            readout, reason = None, f"the cut {readout.where} failed on a batch ({readout.failed})"
        call.fm.readout = readout
        call.info["readout"] = {"cut_after": readout.name} if readout is not None else {"cut_after": None,
                                                                                          "reason": reason}

    def _find_split(self, names: list[str], batcher: Batcher, module_state: str) -> TrunkSplit | None:
        """The split of the model for the influence parameters ``names``, found once and kept; found again where the
        parameters change, where its modules are no longer the model's (a layer stack replaced), and where one dropped
        in one state of the modules (``module_state``: a hook that made the top-only forward differ) meets another (the
        hook removed: the split was kept off for good, every forward the whole model's)."""
        if not getattr(self.args, "influence_trunk_cache", True):
            self._split = ("off", None, "influence_trunk_cache=False")
            return None
        key = ",".join(names)
        if self._split is not None and self._split[1] is not None and self._split[1].failed is not None:
            self._drop_split(f"the cached states did not line up with a batch ({self._split[1].failed})", module_state)
        if self._split is not None and self._split[1] is not None and not self._split[1].part_of(self.model):
            self._drop_split("the model's modules were replaced", None)
            self._split = None
        dropped_in = self._split[3] if self._split is not None and len(self._split) > 3 else None
        if self._split is None or self._split[0] != key or (dropped_in is not None and dropped_in != module_state):
            probe = model_inputs(batcher.batch(range(min(2, len(batcher))), trunk=False), self.model)
            split, reason = find_split(self.model, names, probe)
            if split is None:
                logger.info(f"No frozen-trunk cache: {reason}; every forward runs the whole model.")
            self._split, self._split_error = (key, split, reason), None
        return self._split[1]

    def _with_trunk(self, split: TrunkSplit, batcher: Batcher, below: str, module_state: str,
                    progress: bool, cut: Readout | None = None, any_layout: bool = False) -> Batcher:
        """``batcher`` with its dataset's trunk states (cached by content; ``below``: the trunk's
        `TrunkSplit.fingerprint`; ``cut``: states of the first position only, `TrunkCache`'s ``first_position``). The
        first cache of a split is checked against the full model on its first rows; a split that changes the logits
        is dropped for this engine. ``any_layout``: without a cache of every position, one of the first position is
        served too (predictions: a cut cache passed the same check of the logits)."""
        prefix = "|".join([below, module_state, batcher.fingerprint, str(len(batcher)), self._functions["collator"],
                           ",".join(batcher.dataset.column_names), str(batcher.device),
                           *batcher.layout_key])
        key = f"{prefix}|" + ("every position" if cut is None else f"first position, {cut.name}")
        reads = self._own_reads()
        if reads is not None:  # (checked on the outputs such a function reads, not the logits alone: `verify_split`; a cache
            key += "|every output checked"  # checked on the logits is not served to it)
        if any_layout and key not in self._trunks:
            key = next((k for k in reversed(self._trunks) if k.startswith(f"{prefix}|first position, ")), key)
        new, state = key not in self._trunks, (below, module_state)
        try:  # (a new one-row cache of a split checked before, in this state of the model, keeps the whole model's
            # outputs for its check: one forward fewer; a cut one then keeps the first position of that forward)
            cache = self._trunk_cache(split, batcher, key, progress, cut=cut,
                                      full_forward=new and len(batcher) == 1 and state in split.verified)
        except FirstPositionError as err:  # (the cut's own doing: the trunk keeps every position instead)
            return self._keep_every_position(str(err), split, batcher, below, module_state, progress)
        except TrunkLayoutError as err:
            logger.warning(f"No frozen-trunk cache: {err}; every forward runs the whole model.")
            self._drop_split(str(err), module_state)
            return batcher.with_trunk(None)
        if new:  # every new cache is checked against the full model, on its first rows and padded ones
            error = verify_split(split, cache, batcher, verification_rows(batcher), reads=reads)
            if error > split_tolerance(self.model) and cut is not None:  # the cut's doing: keep every position
                self._trunks.pop(key).close()
                self._replaced("trunk", key)
                return self._keep_every_position(f"the first position alone changed the logits by {error:.2g}", split,
                                                 batcher, below, module_state, progress)
            self._split_error = max(error, self._split_error or 0.0)
            if error > split_tolerance(self.model):
                half = half_dtypes(dict(self.model.named_parameters()))  # (a GPU's kernels may round by batch shape)
                what = ("the model's outputs that a loss_fn or measurement_fn of one's own reads (hidden states "
                        "below the split are not computed under it)" if reads is not None else "the logits")
                logger.warning(f"The top-only forward from {split.path}.{split.first} changes {what} by {error:.2g} "
                               "(relative): not using the trunk cache for this model; the full forward runs instead"
                               + (f" ({' / '.join(half)} rounding can differ this much between batch shapes: a float32 "
                                  "copy of the model may keep the cache)." if half else "."))
                self._drop_split(f"the top-only {'logits' if reads is None else 'outputs'} differ by {error:.2g} "
                                 "(relative)", module_state)
                return batcher.with_trunk(None)
        split.verified.add(state)  # (the cache passed its check, here or when it was built: an engine keeps, saves
        # and loads no other)
        return batcher.with_trunk(cache)

    def _own_reads(self) -> Callable[[object, dict], torch.Tensor] | None:
        """``(outputs, batch) ->`` the values of this engine's ``loss_fn`` and ``measurement_fn`` of one's own (those
        it has), or None where it has neither (the default loss and measurement read the logits): what the split's
        check and the read-position cut ask such functions read (`hf_fastif.trunk.reads_any`)."""
        own = [fn for fn in (self.loss_fn, self.measurement_fn) if fn is not None]
        if not own:
            return None

        def values(outputs, batch: dict) -> torch.Tensor:
            return torch.cat([fn(outputs, batch).reshape(-1) for fn in own])

        return values

    def _keep_every_position(self, reason: str, split: TrunkSplit, batcher: Batcher, below: str, module_state: str,
                             progress: bool) -> Batcher:
        """A cut cache failed (``reason``): no cut for the rest of this decision's key, and ``batcher`` with a cache
        of every position."""
        half = half_dtypes(dict(self.model.named_parameters()))
        logger.warning(f"The trunk keeps every position (only speed is lost): {reason}"
                       + (f" ({' / '.join(half)} rounding, most likely: the cut changes the shapes of the last layer's "
                          "products; a float32 copy of the model keeps the cut)." if half else "."))
        self._trunk_cut = (self._trunk_cut[0], None, reason)
        return self._with_trunk(split, batcher, below, module_state, progress)

    def _drop_split(self, reason: str, module_state: str | None) -> None:
        """Stop using the current split for this engine (the full forward runs), and free the states cached for it;
        ``module_state``: the modules' state it failed in (found again in another), None for good."""
        split = self._split[1]
        for key in [k for k, cache in self._trunks.items() if split is not None and cache.split is split]:
            self._trunks.pop(key).close()
            self._replaced("trunk", key)
        self._split = (self._split[0], None, reason, module_state)

    # ---- predictions through the same trunk -------------------------------------------------------------------
    def logits(self, dataset: Dataset, batch_size: int = 128) -> np.ndarray:
        """Logits of every row of ``dataset`` (``(N, ...)`` float32; token logits padded with NaN to the longest
        batch's length), in eval mode, the rows run in batches of like length (`Batcher.length_order`). Where the
        model splits, only the top runs from the cached trunk states (which stay valid while only the top changes,
        e.g. over the SGD steps of HANS correction); otherwise the full model."""
        model = self.model
        self._refresh_collator_key()  # (the trunk states are keyed on it: a collator changed in place was not seen)
        names = list(select_parameters(model, self.args.influence_params))
        device = next(model.parameters()).device
        batcher = Batcher(dataset, validate_dataset(dataset, "dataset", model, **column_rule(self.args)),
                          self.data_collator, device, decoder_inputs=decoder_inputs_from_labels(model),
                          padding_collator=padding_collator_for(model))
        out = []
        # the modules' state as `_start` reads it, before influence_mode turns gradient checkpointing and its
        # input-gradient hook off: read inside, it keyed the same rows' trunk states anew (computed and held twice)
        module_state = self._module_state()
        with influence_mode(model, names), torch.no_grad():
            split = self._find_split(names, batcher, module_state)
            if split is not None:
                self._share_lengths(batcher)
                batcher = self._with_trunk(split, batcher, split.fingerprint(tensor_digests(model)), module_state,
                                           progress=False, any_layout=True)
                split = self._split[1]
            order = batcher.length_order()  # (batches of like length; each row's logits put back at its place)
            for _, batch in batcher.batches(order, batch_size):
                with forward_context(split, batch):
                    out.append(logits_of(model(**model_inputs(batch, model))).float().cpu().numpy())
        widest = np.max([o.shape[1:] for o in out], 0) if out and out[0].ndim > 1 else None
        if widest is not None:  # token logits of batches padded to different lengths: NaN beyond a batch's own
            out = [np.pad(o, [(0, 0)] + [(0, int(w) - d) for w, d in zip(widest, o.shape[1:])],
                          constant_values=np.nan) for o in out]
        self._ended()
        return in_row_order(out, order)

    def _trunk_cache(self, split: TrunkSplit, batcher: Batcher, key: str, progress: bool,
                     full_forward: bool = False, cut: Readout | None = None) -> TrunkCache:
        if key in self._trunks:
            self._trunks.move_to_end(key)
            self._served("trunk", key)
            return self._trunks[key]
        cache = TrunkCache(split, batcher, key, directory=getattr(self.args, "influence_cache_dir", None),
                           batch_size=self.args.influence_hvp_batch_size, progress=progress,
                           full_forward=full_forward, first_position=cut)
        self._trunks[key] = cache
        self._replaced("trunk", key)
        for old in self._evict_trunks():
            old.close()
        return cache

    def _evict_trunks(self) -> list[TrunkCache]:
        """Drop the least recently used trunk caches beyond `MAX_TRUNK_CACHES`; returns them, for the caller to close
        (a load closes them only once the whole folder was read)."""
        evicted = []
        while len(self._trunks) > MAX_TRUNK_CACHES:
            key, old = self._trunks.popitem(last=False)
            self._replaced("trunk", key)
            evicted.append(old)
        return evicted
