"""Stage 0 of `InfluenceEngine`: whether a model's numbers change with the padding around a row.

Every stage batches rows of different lengths, so a model whose output for a row depends on its batch's padding
(left padding without position ids, a head that pools over padded positions) is refused before any work; rows stored
padded drop the positions after every row's last token where a probe shows that changes nothing
(``influence_skip_trailing_padding``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..batches import Batcher, without_trailing_padding
from ..loss import shifts_labels
from ..utils import HALF_DTYPES, first_line, relative_difference
from .call import Call

logger = logging.get_logger(__name__)

PADDING_PROBE_ROWS = 64
"""Rows among which `InfluenceEngine` picks the shortest and the longest for its padding probe when the data stores
no token ids (a collator that tokenises text); otherwise every row's stored lengths decide (`Batcher.padding_probes`)."""

PADDING_TOLERANCE = 1e-3
"""Largest relative change of a row's loss under padding that counts as float rounding (20 machine epsilons of
the model's dtype where that is more: float16 0.02, bfloat16 0.16)."""

TRAILING_PROBE_ROWS = 8
"""Rows of different real lengths (the shortest, the longest and spread between, both parities where there are)
on which `InfluenceEngine` compares a batch with and without its trailing padding before it drops it."""

TRAILING_TOLERANCE = 100
"""Largest difference, in machine epsilons of the model's dtype and relative to the largest value compared, between
a probe's values and outputs with and without its trailing padding (float32: 1.2e-5; float64: 2.2e-14): other widths
only reorder sums there. Looser, a fitted question-answering loss of 3.5e-4 passed the padding check's 1e-3 while
influence moved by 35% (a softmax over every position, padding included), and a ConvBERT's 6e-5."""


def _per_row_logits_error(alone, padded) -> float:
    """How far a per-row head's logits ``(b, classes)`` move when the row is padded (the outputs of the row alone and
    padded first in a batch), relative to their own scale (0 for other outputs). The loss alone hides it where the
    head is fresh: a classifier at initialisation (std 0.02) keeps its loss near log k whatever its inputs, so logits
    that moved by 30-300% with left padding moved the loss by less than the tolerance, while the gradients influence
    uses moved a lot (12% off between batch sizes 1 and 10, pretrained MiniLM with a new head padded on the left)."""
    alone, padded = getattr(alone, "logits", None), getattr(padded, "logits", None)
    if not (isinstance(alone, torch.Tensor) and isinstance(padded, torch.Tensor) and alone.dim() == 2
            and padded.dim() == 2 and alone.shape[1] == padded.shape[1] and alone.is_floating_point()):
        return 0.0
    alone, padded = alone.double(), padded[:1].double()
    return relative_difference(padded, alone, floor=1e-12)


def _trailing_probes(batcher: Batcher) -> list[list[int]]:
    """The probe batches of `InfluenceEngine._skips_padding`: up to `TRAILING_PROBE_ROWS` rows of different real
    lengths (of a stored attention mask, else of the stored ids), each alone: the shortest, the longest, rows between
    them, and a row of each parity; then the padding check's pairs (the narrowest next to the widest); then the first
    row alone (a dataset of one row has no pair)."""
    lengths = None
    if len(batcher) > 1:
        lengths = batcher.stored_lengths("attention_mask", "tokens")
        lengths = batcher.stored_lengths() if lengths is None else lengths
    singles: list[int] = []
    if lengths is not None and len(lengths):
        distinct, first = np.unique(lengths, return_index=True)  # (the shortest first: where it has no trailing
        # padding, `InfluenceEngine._skips_padding` probes no more)
        picks = set(np.linspace(0, len(distinct) - 1, min(TRAILING_PROBE_ROWS, len(distinct))).round().astype(int))
        for parity in (0, 1):  # (a model that pools by pairs of positions changes with the length's parity)
            same = np.flatnonzero(distinct % 2 == parity)
            if len(same) and not any(distinct[i] % 2 == parity for i in picks):
                picks.add(int(same[0]))
        singles = [int(first[i]) for i in sorted(picks)]
    pairs = [list(pair) for pair in batcher.padding_probes(PADDING_PROBE_ROWS)]
    return [[row] for row in singles] + pairs + [[0]] * (len(batcher) > 0)


def _outputs_difference(whole, cut, batch: Mapping) -> float:
    """The largest relative difference between the floating tensors of two forwards' outputs, one of a batch with
    its trailing padding and one of ``batch``, the same without: tensors of the same shape whole, those laid out by
    position (``(sequences, positions, ...)``) at the positions ``batch``'s attention mask marks as tokens; others
    (attention maps) are not compared. 0 where nothing is comparable."""
    mask = batch.get("attention_mask")
    real = mask.reshape(-1, mask.shape[-1]).bool() if isinstance(mask, torch.Tensor) else None

    def tensors(outputs):
        if isinstance(outputs, torch.Tensor):
            return [outputs]
        values = outputs.values() if isinstance(outputs, Mapping) else outputs if isinstance(
            outputs, (tuple, list)) else ()
        return [t for v in values for t in tensors(v)]

    worst = 0.0
    for a, b in zip(tensors(whole), tensors(cut)):
        if not (a.is_floating_point() and b.is_floating_point()):
            continue
        if a.shape == b.shape:
            worst = max(worst, relative_difference(b.double(), a.double()))
        elif (real is not None and a.dim() >= 2 and a.shape[0] == b.shape[0] == real.shape[0]
              and b.shape[1] == real.shape[1] <= a.shape[1] and a.shape[2:] == b.shape[2:]):
            worst = max(worst, relative_difference(b[real].double(), a[:, : b.shape[1]][real].double()))
    return worst


def _padding_cause(model: nn.Module, batch: dict) -> str:
    """What to do about a row whose loss changes with padding, from what the padded ``batch`` shows."""
    labels, mask = batch.get("labels"), batch.get("attention_mask")
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    # token labels laid out like the inputs (a decoder-only model's), position by position
    aligned = (not encoder_decoder and isinstance(labels, torch.Tensor) and isinstance(mask, torch.Tensor)
               and labels.shape == mask.shape)
    if aligned and bool(((mask == 0) & (labels != -100)).any()):
        return ("Its padding positions carry labels other than -100 (the collator pads the labels with the pad "
                "token id), so the loss reads them: pad labels with -100 (DataCollatorForLanguageModeling(tokenizer, "
                "mlm=False), DataCollatorForSeq2Seq, or DataCollatorForTokenClassification).")
    if (aligned and shifts_labels(model) and labels.dim() == 2
            and bool(((labels[:, 1:] != -100) & (mask[:, :-1] == 0)).any())):
        return ("It is a causal LM padded on the left, and its first token is a target predicted from a padding "
                "position (each position predicts the next token; alone, that token has nothing before it and is "
                "not a target), so its loss changes with its batch even with position ids: pad on the right "
                "(tokenizer.padding_side = 'right').")
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if (encoder_decoder and isinstance(labels, torch.Tensor) and labels.dim() == 2 and pad is not None
            and pad != getattr(config, "eos_token_id", None) and bool((labels[:, [0, -1]] == pad).any())):
        # targets are padded apart from the inputs, so the mask above does not show them
        return ("Its targets are padded with the pad token id (DataCollatorForSeq2Seq(label_pad_token_id=...) "
                "other than -100), so the loss reads the padding as targets: pad labels with -100 "
                "(DataCollatorForSeq2Seq's default).")
    if encoder_decoder and isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] > 1:
        pads = labels == -100
        if bool((pads[:, 0] & ~pads[:, -1]).any()):
            return ("Its targets are padded on the left (DataCollatorForSeq2Seq pads labels on "
                    "tokenizer.padding_side), so the decoder reads padding before them: pad on the right "
                    "(tokenizer.padding_side = 'right').")
    return ("The usual causes: left padding without position ids (GPT-2 and other absolute-position models count "
            "positions from the first pad): pad on the right (tokenizer.padding_side = 'right'), or use a collator "
            "that adds position_ids = attention_mask.cumsum(-1) - 1; or a loss that reads the padded positions (a "
            "softmax over every position, as question answering's start / end logits): pass a loss_fn that masks "
            "them, e.g. logits.masked_fill(batch['attention_mask'] == 0, -1e4).")


def _non_finite_cause(model: nn.Module, batch: dict, finite_alone: bool) -> str:
    """What to do about a row whose loss is not finite alone or padded, from the padded ``batch`` (the row first)
    and the model's config: a position whose attention sees no position at all gives NaN in eager attention, which
    the next layer spreads into the row (its keys and values at that position are NaN, and a masked weight of 0
    times NaN is NaN). A sliding window is named only for a row finite alone and padded on the right by the window
    or more (a row NaN alone, with Mistral's default window of 4,096, was blamed on it in a review)."""
    mask = batch.get("attention_mask")
    flat = isinstance(mask, torch.Tensor) and mask.dim() == 2
    left = flat and bool((mask[:, 0] == 0).any())
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    real = mask[0].nonzero() if flat else None
    trailing = int(mask.shape[1] - 1 - real[-1]) if real is not None and len(real) else 0
    if left:
        return ("With left padding, the usual cause is a row whose attention sees no position at all (a causal or "
                "sliding-window mask in eager attention): pad on the right (tokenizer.padding_side = 'right').")
    if finite_alone and isinstance(window, int) and not isinstance(window, bool) and 0 < window <= trailing:
        return (f"The model's sliding-window attention (config.sliding_window = {window}) leaves the padding "
                f"positions {window} or more after a row's last token no position to attend to, and eager attention "
                "(which influence needs) turns them into NaN that the next layer spreads into the row (a review's "
                "Mistral, padded on the right). Every stage pads rows next to others: the rows' lengths must differ "
                "by less than the window (truncate or filter them). Where no row is longer than the window (rows "
                "stored padded beyond it), model.config.sliding_window = None changes nothing for the rows and "
                "removes it.")
    return "Check the rows' token ids and labels, and whether the model's forward is finite on them alone."


class PaddingChecks:
    """`InfluenceEngine`'s padding probes, once per model, data, collator and functions. State (made in
    `InfluenceEngine.__init__`): ``_padding_checked`` (shared with candidates.py's ``features=`` padding check),
    ``_trailing_padding``, ``_reads_padding``."""

    def _check_padding(self, call: Call) -> None:
        """Refuse a model whose output for a row changes with the padding around it (left padding without
        position ids, for instance): every stage batches rows of different lengths, so its numbers would depend
        on the batch sizes. Probes per model and dataset (training, test and candidate rows: a test set can be
        padded where fixed-length training blocks are not): the narrowest row alone, and padded next to the
        widest, and the same by real tokens and by stored targets (`Batcher.padding_probes`).

        First, whether each dataset's batches drop their trailing padding (`_skips_padding`); the probes then see
        the batches every stage will see. Where they fail on batches without it (rows at their own width against
        rows at a wider row's: a model whose outputs depend on the batch's width, as Funnel's pooling does), the
        model is taken to read its padding: every dataset keeps it, and the probes run again on those batches."""
        datasets = [(call.train, "train_dataset", False), (call.test, "test_dataset", True)]
        datasets += [] if call.cand is call.train else [(call.cand, "candidate_dataset", False)]
        keys = [(call.model_key, batcher.fingerprint, measurement, self._functions["collator"],
                 self._functions["loss"], self._functions["measurement"]) for batcher, _, measurement in datasets]
        padding_key = self._padding_key(call)
        while True:
            why_not = [self._skips_padding(call, b, m, key) for (b, _, m), key in zip(datasets, keys)]
            if padding_key in self._reads_padding:  # (found on one dataset: every dataset keeps it)
                why_not = [self._skips_padding(call, b, m, key) for (b, _, m), key in zip(datasets, keys)]
            for (batcher, name, _), why in zip(datasets, why_not):
                batcher.skip_padding = why is None
                call.info.setdefault("trailing_padding", {})[name] = "skipped" if why is None else f"kept: {why}"
            try:
                for (batcher, name, measurement), key in zip(datasets, keys):
                    self._probe_dataset_padding(call, batcher, name, measurement, (*key, batcher.skip_padding))
                return
            except ValueError as err:
                if not any(b.skip_padding for b, _, _ in datasets):
                    raise
                reads = f"rows without their trailing padding change next to wider rows ({first_line(err)})"
                self._reads_padding[padding_key] = reads
                logger.info(f"Batches keep their trailing padding: {reads}.")

    def _probe_dataset_padding(self, call: Call, batcher: Batcher, name: str, measurement: bool, key: tuple) -> None:
        if key in self._padding_checked:
            return
        pairs = batcher.padding_probes(PADDING_PROBE_ROWS)
        for short, long in pairs:
            self._probe_padding(call, batcher, name, measurement, short, long)
        if pairs and shifts_labels(self.model):  # a causal LM: a row whose first token is a target is hurt by
            # left padding whatever its length (the narrowest row's first target was -100 in an SFT-style mix,
            # and the others' values changed with the batch size, 40% off)
            first, width = batcher.stored_lengths("labels", "first_target"), batcher.stored_lengths()
            if first is not None and width is not None:
                hurt = np.flatnonzero((first > 0) & (width < width.max()))
                if len(hurt):
                    self._probe_padding(call, batcher, name, measurement, int(hurt[0]), int(width.argmax()))
        self._padding_checked.add(key)

    def _padding_key(self, call: Call) -> tuple:
        """What decides whether a model reads its padding: the weights, the collator and the functions."""
        return (call.model_key, self._functions["collator"], self._functions["loss"], self._functions["measurement"])

    def _skips_padding(self, call: Call, batcher: Batcher, measurement: bool, key: tuple) -> str | None:
        """None where ``batcher``'s batches may drop their trailing padding (`without_trailing_padding`), else why
        not. Decided once per model, data, collator and functions, on probe rows (`_trailing_probes`: up to
        `TRAILING_PROBE_ROWS` rows of different real lengths, each alone, then the narrowest next to the widest,
        then the first row alone, for a dataset of one row; where the shortest row alone has no trailing padding,
        as rows padded per batch have not, no other is collated): each batch that has trailing padding must give
        the same values and the same floating outputs (logits, start and end logits, hidden states: at the
        positions it keeps) without it as with it, to `TRAILING_TOLERANCE` ulps of the model's dtype. Where one differs or raises
        (a loss or head that reads padded positions, a model that pools by the sequence's length), the model is
        taken to read its padding: this dataset and every other keeps it (`_reads_padding`), as before. Half
        precision keeps it too: its rounding is coarser than what the padding may change."""
        if not getattr(self.args, "influence_skip_trailing_padding", True):  # (read on every call: set in place)
            return "influence_skip_trailing_padding=False"
        padding_key = self._padding_key(call)
        reads = self._reads_padding.get(padding_key)
        if reads is not None:
            return f"the model reads its padding: {reads}"
        if key in self._trailing_padding:
            return self._trailing_padding[key]
        batcher.skip_padding = False
        dtype = next(self.model.parameters()).dtype
        why = "no probe batch has positions after every row's last token"
        if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            why = "an encoder-decoder model (its targets are laid out apart from its inputs)"
        elif dtype in HALF_DTYPES:
            why = f"a {str(dtype).removeprefix('torch.')} model (its rounding hides what the padding may change)"
        else:
            value, tolerance = call.fm.value_fn(measurement), TRAILING_TOLERANCE * torch.finfo(dtype).eps
            for i, rows in enumerate(_trailing_probes(batcher)):
                whole = batcher.batch(rows, trunk=False)
                cut = without_trailing_padding(whole)
                if cut is whole and i == 0:  # (the shortest row alone: rows not stored padded, padded per batch)
                    break
                if cut is whole:
                    continue
                named = batcher.named_rows(rows)
                with torch.no_grad():
                    outputs = call.fm.outputs(call.params, whole)
                    values = value(outputs, whole).double()
                    try:  # (a loss or model that cannot take the narrower batch keeps the padding, as before)
                        cut_outputs = call.fm.outputs(call.params, cut)
                        cut_values = value(cut_outputs, cut).double()
                    except Exception as err:  # noqa: BLE001
                        reads = (f"rows {named} without their trailing padding raise {type(err).__name__} "
                                 f"({first_line(err)})")
                        break
                error = (max(relative_difference(cut_values, values), _outputs_difference(outputs, cut_outputs, cut))
                         if cut_values.shape == values.shape else float("inf"))
                if not error <= tolerance:
                    reads = (f"the values or outputs of rows {named} change by {error:.2g} without their trailing "
                             "padding")
                    break
                why = None
            if reads is not None:  # (every dataset keeps it: `_check_padding` asks again for those before this one)
                self._reads_padding[padding_key] = reads
                logger.info(f"Batches keep their trailing padding: {reads}.")
                return f"the model reads its padding: {reads}"
        self._trailing_padding[key] = why
        return why

    def _probe_padding(self, call: Call, batcher: Batcher, name: str, measurement: bool, short: int,
                       long: int) -> None:
        alone_batch, padded_batch = batcher.batch([short], trunk=False), batcher.batch([short, long], trunk=False)
        value = call.fm.value_fn(measurement)
        with torch.no_grad():  # each row's value, as every stage computes it (any head, any loss_fn)
            alone_outputs, padded_outputs = (call.fm.outputs(call.params, b) for b in (alone_batch, padded_batch))
            alone = value(alone_outputs, alone_batch).double()
            padded = value(padded_outputs, padded_batch)[:1]
        error = relative_difference(padded.double(), alone, floor=1.0)
        error = max(error, _per_row_logits_error(alone_outputs, padded_outputs))
        dtype = next(self.model.parameters()).dtype  # half precision rounds other batch shapes coarser
        finite_alone, finite_padded = bool(torch.isfinite(alone).all()), bool(torch.isfinite(padded).all())
        row, other = batcher.named_rows([short, long])  # (dataset rows, as the error names them)
        if measurement and not finite_alone:  # not the padding's doing: the test gradients' check names such rows
            return
        if not (finite_alone and finite_padded):
            where = "alone" if not finite_alone else f"padded next to row {other}"
            raise ValueError(
                f"The loss of {name} row {row} is not finite {where} ({float(alone[0]):.4g} alone, "
                f"{float(padded[0]):.4g} padded): the model's own forward gives NaN/inf there. "
                + _non_finite_cause(self.model, padded_batch, finite_alone))
        if not error <= max(PADDING_TOLERANCE, 20 * torch.finfo(dtype).eps):
            raise ValueError(
                f"The loss (or per-row logits) of {name} row {row} changes when it is padded next to row {other} "
                f"(relative difference {error:.2g}): every stage of influence batches rows of different lengths, so "
                "its numbers would depend on the batch sizes. "
                + _padding_cause(self.model, padded_batch)
            )
