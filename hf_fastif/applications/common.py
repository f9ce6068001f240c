"""Pieces the four applications share: the data they run on, predictions (through an `InfluenceEngine`'s cached
trunk where one is at hand), HANS accuracy, the model's report, one plain SGD step, label checks, heuristic names,
rows shared between splits, mean ± std, and writing a result as JSON + markdown + PNG."""

from __future__ import annotations

import copy
import difflib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers.utils import logging

from ..arguments import InfluenceArguments
from ..batches import Batcher, in_row_order, model_input_columns, padding_collator_for
from ..data import HANS_HEURISTICS
from ..data.rows import row_key_kind, row_keys
from ..engine import InfluenceEngine
from ..hvp import batch_gradient
from ..loss import LossFn, influence_model, logits_of
from ..metrics import load_hans_accuracy
from ..mode import evaluating, influence_mode, uncompiled
from ..params import select_parameters, unflatten
from ..utils import HALF_DTYPES, check_output_dir, markdown_table, to_json, write_atomic

logger = logging.get_logger(__name__)

EVAL_BATCH_SIZE = 128
TRAIN_ACCURACY_ROWS = 2000
"""Training rows (a seeded sample) on which `model_report` measures training accuracy when none was recorded."""


@dataclass
class ApplicationData:
    """The tokenized rows an application runs on, passed whole.

    Args:
        train: the training rows (with ``labels``); H is the Hessian of their mean loss.
        hans_validation: HANS rows with ``labels`` and ``heuristic``: the anchors of correction and augmentation,
            and the default test points of simulatability.
        hans_test: held-out HANS rows with ``labels`` and ``heuristic``: accuracy before / after a correction,
            and the test points of the influence graph.
        candidates: the rows a correction step chooses from (default: ``train``); an unseen pool for augmentation.
        collator: pads rows (e.g. ``DataCollatorWithPadding(tokenizer)``).
        raw_train: the untokenized training rows (premise, hypothesis, genre), to label results with text.
    """

    train: Dataset
    hans_validation: Dataset | None = None
    hans_test: Dataset | None = None
    candidates: Dataset | None = None
    collator: Callable | None = None
    raw_train: Dataset | None = None

    def require(self, *names: str, what: str) -> None:
        """Raise a `ValueError` naming the missing splits (and the ``heuristic`` column HANS splits need)."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{what} needs data.{' and data.'.join(missing)}; pass them in ApplicationData.")
        for name in names:
            if name.startswith("hans_") and "heuristic" not in getattr(self, name).column_names:
                raise ValueError(f"data.{name} needs a 'heuristic' column (found {getattr(self, name).column_names});"
                                 " load it with hf_fastif.data.load_hans and split it with split_hans.")


def batcher(model: nn.Module, dataset: Dataset, data_collator: Callable | None = None) -> Batcher:
    """A `Batcher` over the model's input columns (and labels) of ``dataset``, on the model's device."""
    return Batcher(dataset, model_input_columns(model, dataset), data_collator, next(model.parameters()).device,
                   padding_collator=padding_collator_for(model))


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, data_collator: Callable | None = None,
            batch_size: int = EVAL_BATCH_SIZE, *, engine: InfluenceEngine | None = None) -> np.ndarray:
    """Logits ``(N, num_labels)`` of every row (eval mode; the model's mode is restored).

    With ``engine`` (bound to ``model``), through `InfluenceEngine.logits`: the frozen trunk's states of
    ``dataset`` are computed once and kept by the engine, and each later call runs only the top, which is what
    changes between the SGD steps of a correction run."""
    if engine is not None:
        if engine.model is not uncompiled(model):
            raise ValueError("predict(engine=...) needs an engine bound to the same model object.")
        return engine.logits(dataset, batch_size=batch_size)
    rows = batcher(model, dataset, data_collator)
    order = rows.length_order()  # (batches of like length; each row's logits put back at its place)
    out = []
    with evaluating(model):
        for _, batch in rows.batches(order, batch_size):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out.append(model(**inputs).logits.float().cpu().numpy())
    return in_row_order(out, order)


def two_label_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``(b, 2)`` log-probabilities of entailment / non_entailment; for 3-label NLI logits the
    non_entailment probability is p(neutral) + p(contradiction)."""
    log_probs = torch.log_softmax(logits.float() if logits.dtype in HALF_DTYPES else logits, dim=-1)
    if log_probs.shape[-1] == 2:
        return log_probs
    return torch.stack([log_probs[:, 0], torch.logsumexp(log_probs[:, 1:], dim=-1)], dim=-1)


def hans_predictions(logits) -> np.ndarray:
    """0 (entailment) / 1 (non_entailment) predictions on HANS from ``(b, 2)`` or 3-label NLI logits: the argmax
    over the model's own labels, a 3-label model's neutral and contradiction then counted as non_entailment (HANS's
    rule, the `hans_accuracy` metric's ``binarize``). Not the argmax of `two_label_log_probs`: merging p(neutral) and
    p(contradiction) first, the loss's rule, turned a row at (0.40, 0.35, 0.25), entailment by the model's own
    argmax, into a non_entailment prediction."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    return np.minimum(np.asarray(logits).argmax(-1), 1)


def two_label_loss(outputs, batch) -> torch.Tensor:
    """Per-example cross-entropy against 2-label (HANS) labels, for 2- or 3-label NLI models: a
    ``measurement_fn`` that lets a 3-label MNLI model be corrected on HANS anchors."""
    return -two_label_log_probs(logits_of(outputs)).gather(1, batch["labels"].long().unsqueeze(1)).squeeze(1)


class HansEvaluator:
    """Per-heuristic HANS accuracy of a model on a fixed HANS split, through the `hans_accuracy` metric module,
    plus the mean 2-label cross-entropy (``loss``, ``loss_<heuristic>``). A 3-label model's prediction is its argmax,
    neutral and contradiction counted as non_entailment (`hans_predictions`); its loss takes p(neutral) +
    p(contradiction) as p(non_entailment) (`two_label_log_probs`).

    Args:
        dataset: tokenized HANS rows with ``labels`` (0 = entailment, 1 = non_entailment) and ``heuristic``.
        data_collator: pads the rows (e.g. ``DataCollatorWithPadding``).
    """

    def __init__(self, dataset: Dataset, data_collator: Callable | None = None):
        missing = [c for c in ("labels", "heuristic") if c not in dataset.column_names]
        if missing:
            raise ValueError(f"The HANS split needs the columns labels and heuristic; missing {missing} "
                             f"(found {dataset.column_names}). Load it with hf_fastif.data.load_hans and "
                             "tokenize it with tokenize_nli.")
        self.dataset = dataset
        self.data_collator = data_collator
        self.heuristics = np.asarray(dataset["heuristic"], dtype=object)
        self.labels = np.asarray(dataset["labels"], dtype=np.int64)
        self.metric = load_hans_accuracy(keep_in_memory=True)
        self._by_heuristic: dict[str, Dataset] = {}

    def __call__(self, model: nn.Module, heuristic: str | None = None, *,
                 engine: InfluenceEngine | None = None) -> dict[str, float]:
        """The metric's results (``accuracy``, ``accuracy_<heuristic>``, ...) on all rows or one heuristic's.

        With ``engine`` (bound to ``model``) the logits of every row come from `InfluenceEngine.logits` (the
        split's trunk states computed once, then only the top runs) and the heuristic's rows are picked from
        them; without, only the heuristic's rows run through the whole model."""
        rows = np.arange(len(self.dataset)) if heuristic is None else np.flatnonzero(self.heuristics == heuristic)
        if len(rows) == 0:
            raise ValueError(f"The HANS split has no rows of heuristic {heuristic!r}; it has "
                             f"{sorted(set(self.heuristics.tolist()))}.")
        if engine is not None:
            logits = torch.from_numpy(predict(model, self.dataset, engine=engine)[rows])
        else:
            if heuristic is not None and heuristic not in self._by_heuristic:
                self._by_heuristic[heuristic] = self.dataset.select(rows)
            dataset = self.dataset if heuristic is None else self._by_heuristic[heuristic]
            logits = torch.from_numpy(predict(model, dataset, self.data_collator))
        if not bool(torch.isfinite(logits).all()):  # an argmax over NaN was reported as an accuracy
            raise ValueError(f"The model's logits on {int((~torch.isfinite(logits).all(-1)).sum())} of {len(rows)} "
                             "HANS rows are not finite (inf/NaN): its weights overflowed (a learning rate too large?); "
                             "no accuracy can be reported.")
        log_probs = two_label_log_probs(logits).numpy()
        labels, heuristics = self.labels[rows], self.heuristics[rows]
        results = self.metric.compute(predictions=hans_predictions(logits).tolist(), references=labels.tolist(),
                                      heuristics=heuristics.tolist())
        losses = -log_probs[np.arange(len(rows)), labels]
        results["loss"] = float(losses.mean())
        for name in sorted(set(heuristics.tolist())):
            results[f"loss_{name}"] = float(losses[heuristics == name].mean())
        return results


def training_accuracy(model: nn.Module, train: Dataset, data_collator: Callable | None = None, *, seed: int = 0,
                      max_rows: int = TRAIN_ACCURACY_ROWS) -> tuple[float, int, bool]:
    """``(accuracy, rows, sampled)`` of the model's own predictions on ``train`` (``labels``), over a seeded sample of
    at most ``max_rows`` rows."""
    sampled = len(train) > max_rows
    if sampled:
        train = train.select(np.sort(np.random.default_rng([seed, 13]).choice(len(train), max_rows, replace=False)))
    predictions = predict(model, train, data_collator).argmax(-1)
    return float(np.mean(predictions == np.asarray(train["labels"]))), len(train), sampled


def at_chance(accuracy: float, labels) -> str | None:
    """A warning when a trained model's training accuracy is no better than always predicting its commonest label
    (within 2 points): it learned nothing from its rows, and influence on it ranks them by noise (a new user's
    ``hf-fastif build --embedded_model tiny --max_train_samples 200``: training loss ln 2, every test row predicted
    alike, values tied to the fourth digit, a test row's own training copy ranked 9th-38th of 50)."""
    labels = np.asarray(labels, dtype=np.int64)
    labels = labels[labels >= 0]
    if not len(labels):
        return None
    share = float(np.bincount(labels).max() / len(labels))
    if accuracy > share + 0.02:
        return None
    return (f"The model's training accuracy, {accuracy:.1%}, is no better than always predicting its commonest label "
            f"({share:.1%} of the {len(labels):,} training rows): it learned nothing from them, so its influence "
            "values nearly tie and rank the rows by noise. Train it on more rows (the embedded default: drop "
            "--max_train_samples) or for more epochs (--num_train_epochs).")


def model_report(model: nn.Module, hans: Dataset, data_collator: Callable | None = None, *,
                 train: Dataset | None = None, train_accuracy: float | None = None, seed: int = 0,
                 max_train_rows: int = TRAIN_ACCURACY_ROWS) -> dict:
    """What the trained model gets right: ``train_accuracy`` (given, e.g. recorded when the model was fine-tuned, or
    measured on a seeded sample of at most ``max_train_rows`` rows of ``train``: ``train_accuracy_rows`` says how
    many, ``train_accuracy_sampled`` whether they are a sample), and on ``hans`` (rows with ``labels``, ``heuristic``
    and, if present, ``subcase``) the `hans_accuracy` metric's results (overall, per heuristic, per heuristic and
    gold label) and per subcase its gold label, rows and accuracy. The training accuracy is over the model's own
    labels; on HANS a 3-label model's argmax counts neutral and contradiction as non_entailment (`hans_predictions`)."""
    rows, sampled = None, False
    if train_accuracy is None and train is not None:
        # over the model's own labels (a 3-label model's neutral and contradiction merged made an always-neutral
        # classifier's 0.26 read 0.53, beside the fine-tuning's own 0.26 in the same results)
        train_accuracy, rows, sampled = training_accuracy(model, train, data_collator, seed=seed,
                                                          max_rows=max_train_rows)
    predictions = hans_predictions(predict(model, hans, data_collator))
    labels = np.asarray(hans["labels"], dtype=np.int64)
    heuristics = np.asarray(hans["heuristic"], dtype=object)
    report = {"train_accuracy": train_accuracy, "train_accuracy_rows": rows, "train_accuracy_sampled": sampled,
              "hans_rows": len(hans), "heuristics": sorted(set(heuristics.tolist()), key=heuristic_order),
              "hans": load_hans_accuracy(keep_in_memory=True).compute(
                  predictions=predictions.tolist(), references=labels.tolist(), heuristics=heuristics.tolist())}
    if "subcase" in hans.column_names:
        subcases = np.asarray(hans["subcase"], dtype=object)
        report["subcases"] = {
            name: {"heuristic": str(heuristics[subcases == name][0]), "label": int(labels[subcases == name][0]),
                   "rows": int((subcases == name).sum()),
                   "accuracy": float(np.mean(predictions[subcases == name] == labels[subcases == name]))}
            for name in sorted(set(subcases.tolist()))}
    return report


def _train_accuracy_text(report: dict) -> str:
    """``"95.8% (on 2,000 sampled training rows)"``, ``"... (recorded when the model was fine-tuned)"``."""
    accuracy, rows = report.get("train_accuracy"), report.get("train_accuracy_rows")
    if accuracy is None:
        return "not measured"
    if rows is None:
        return f"{100 * accuracy:.1f}% (recorded when the model was fine-tuned)"
    which = f"{rows:,} sampled" if report.get("train_accuracy_sampled") else f"all {rows:,}"
    return f"{100 * accuracy:.1f}% (on {which} training rows)"


def model_report_markdown(report: dict) -> str:
    """The model report as markdown: training accuracy, HANS accuracy per heuristic (all / entailment /
    non_entailment rows) and per subcase."""
    if not report:
        return ""
    hans, heuristics = report["hans"], report["heuristics"]

    def cell(key):
        return f"{100 * hans[key]:.1f}" if key in hans else ""

    rows = [[h, cell(f"accuracy_{h}"), cell(f"accuracy_{h}_entailment"), cell(f"accuracy_{h}_non_entailment")]
            for h in heuristics] + [["all", cell("accuracy"), "", ""]]
    lines = ["### The model", "",
             f"Training accuracy: {_train_accuracy_text(report)}. HANS-style accuracy "
             f"(%) on {report['hans_rows']:,} rows (validation and test splits together):", "",
             markdown_table(["heuristic", "all rows", "entailment rows", "non_entailment rows"], rows)]
    if report.get("subcases"):
        names = ("entailment", "non_entailment")
        subcase_rows = [[name, v["heuristic"], names[v["label"]] if v["label"] in (0, 1) else v["label"], v["rows"],
                         f"{100 * v['accuracy']:.1f}"]
                        for name, v in sorted(report["subcases"].items(),
                                              key=lambda kv: (heuristic_order(kv[1]["heuristic"]), kv[0]))]
        lines += ["", "Per subcase:", "", markdown_table(["subcase", "heuristic", "gold", "rows", "accuracy (%)"],
                                                         subcase_rows)]
    return "\n".join(lines)


def heuristic_order(name: str) -> tuple:
    """Sort key of heuristic names: HANS' in HANS' order, then any others by name."""
    return (HANS_HEURISTICS.index(name) if name in HANS_HEURISTICS else len(HANS_HEURISTICS), name)


def sgd_step(model: nn.Module, rows: Dataset, learning_rate: float, args: InfluenceArguments, *,
             data_collator: Callable | None = None, loss_fn: LossFn | None = None,
             measurement_fn: LossFn | None = None, measurement: bool = False) -> float:
    """One plain SGD step ``θ ← θ - lr·∇(mean loss of rows)`` on the parameters that take part in influence.

    The loss is the one influence uses (`hf_fastif.loss.influence_model`: the training loss with the Trainer's
    label smoothing and, with ``influence_weight_decay_in_gradients``, the explicit L2 term; or the measurement when
    ``measurement``), in eval mode, as in the reference code's ``pseudo_gradient_step``. Returns the mean
    loss of the rows before the step.
    """
    params = select_parameters(model, args.influence_params)
    names = list(params)
    with influence_mode(model, names):
        fm = influence_model(model, names, args, loss_fn, measurement_fn)
        batch = batcher(model, rows, data_collator).batch(range(len(rows)))
        with torch.no_grad():
            values = (fm.measurements if measurement else fm.losses)(params, batch)
        gradient = batch_gradient(fm, params, batch, measurement=measurement, reduction="sum") / len(rows)
        named = dict(model.named_parameters())
        with torch.no_grad():
            parts = unflatten(gradient, {name: named[name] for name in names})
            updated = {name: named[name] - learning_rate * part.to(named[name].dtype) for name, part in parts.items()}
            broken = [name for name, value in updated.items() if not bool(torch.isfinite(value).all())]
            if broken:  # the weights are left as they were
                raise ValueError(
                    f"The SGD step (learning rate {learning_rate:g}) on {len(rows)} row(s) would make {len(broken)} "
                    f"influence parameter(s) non-finite (inf/NaN), e.g. {broken[0]}: "
                    + ("the rows' gradient is not finite (check their losses)"
                       if not bool(torch.isfinite(gradient).all()) else "the learning rate is too large")
                    + "; the weights are unchanged. Lower the learning rate.")
            for name, value in updated.items():
                named[name].copy_(value)
    return float(values.mean())


def with_seed(args: InfluenceArguments, seed: int) -> InfluenceArguments:
    """A shallow copy of ``args`` with another ``influence_seed`` (no re-validation of TrainingArguments)."""
    out = copy.copy(args)
    out.influence_seed = int(seed)
    return out


NLI_ORDER = {2: ("entailment", "non_entailment"), 3: ("entailment", "neutral", "contradiction")}
"""The label ids of NLI data here (`hf_fastif.data.load_mnli`, `load_hans`, `generate_nli`), by label count."""


def check_num_labels(model, expected: int | Sequence[int], what: str) -> int:
    """Raise a `ValueError` naming the fix unless the head (a model, or its config) has one of the ``expected``
    label counts and, where ``config.id2label`` names its labels, the NLI order of `NLI_ORDER`."""
    expected = (expected,) if isinstance(expected, int) else tuple(expected)
    config = getattr(model, "config", model)
    num = getattr(config, "num_labels", None)
    name = getattr(config, "_name_or_path", None) or type(model).__name__
    if num not in expected:
        raise ValueError(
            f"{what} needs a model with {' or '.join(map(str, expected))} labels, but {name!r} has {num}. "
            + ("Use a 2-label (entailment / non_entailment, MNLI-2) checkpoint, or fine-tune one with "
               "--num_labels 2 (MNLI-2 maps neutral and contradiction to non_entailment)."
               if expected == (2,) else "Use a checkpoint whose label count matches the data.")
        )
    names = _label_names(config, num)
    order = NLI_ORDER.get(num)
    generic = [_generic(n) for n in names]
    if order is not None and not all(g or _same_label(n, want) for g, n, want in zip(generic, names, order)):
        raise ValueError(
            f"The labels of {name!r} are {names} (config.id2label), but NLI data here uses "
            f"{', '.join(f'{i} = {w}' for i, w in enumerate(order))}: its predictions and losses would be read as "
            "the wrong classes. Use a checkpoint with that label order, or fix config.id2label if only the names "
            "are wrong."
        )
    return num


def generic_labels(config) -> bool:
    """Whether ``config.id2label`` names none of its labels (transformers' ``LABEL_0``, ``LABEL_1``, ... of a
    checkpoint fine-tuned without names): they say nothing about the order of its classes."""
    return all(map(_generic, _label_names(config, getattr(config, "num_labels", 0))))


def _label_names(config, num: int) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), ""))).lower() for i in range(num)]


def _generic(name: str) -> bool:
    return name == "" or name.startswith("label_")  # (such names say nothing about the order)


def _same_label(name: str, want: str) -> bool:
    """Whether a label name is the NLI label ``want`` (``non-entailment``, ``not_entailment``: non_entailment)."""
    negated = name.startswith(("non", "not"))
    if want == "non_entailment":
        return negated and "entail" in name
    return not negated and name.startswith(want[:4])


def check_heuristics(names: Sequence[str] | str | None, flag: str = "heuristics (--heuristics)") -> list[str] | None:
    """The heuristics asked for, checked when the arguments are made (before any data are loaded or model trained).

    None stays None (every heuristic of the data). A name equal to a HANS heuristic but for case becomes HANS'
    spelling; one close to a HANS heuristic (a typo, a prefix or a part of it: ``lexical``, ``subseq``) raises a
    `ValueError` asking "did you mean"; a name unlike any HANS heuristic is kept (HANS-style data of one's own may
    have other heuristics; the application checks it against the data). Repeats are dropped with a warning (each
    heuristic runs once); an empty list raises (omit the flag for every heuristic)."""
    if names is None:
        return None
    names = [names] if isinstance(names, str) else [str(n) for n in names]
    known = ", ".join(HANS_HEURISTICS)
    if not names:
        raise ValueError(f"{flag} is an empty list; omit it to use every heuristic of the HANS split, or name some "
                         f"(HANS' are {known}).")
    out: list[str] = []
    repeated: list[str] = []
    for name in names:
        lower = name.strip().lower()
        if not lower:
            raise ValueError(f"{flag} holds an empty name; name HANS heuristics ({known}) or omit the flag.")
        if lower in HANS_HEURISTICS:
            name = lower
        else:
            close = difflib.get_close_matches(lower, HANS_HEURISTICS, n=1, cutoff=0.6)
            close = close or [h for h in HANS_HEURISTICS if len(lower) >= 3 and lower in h]
            if close:
                raise ValueError(f"Unknown heuristic {name!r}: did you mean {close[0]!r}? HANS' heuristics are {known} "
                                 "(a name unlike all of them is taken as a heuristic of your own HANS-style data).")
        if name in out:
            repeated.append(name)
        else:
            out.append(name)
    if repeated:
        logger.warning(f"{flag} names {sorted(set(repeated))} more than once; each heuristic runs once: "
                       f"{out}.")
    return out


def refuse_few_candidates(num_candidates: int, k: int | None, num_points: int, each: str) -> None:
    """Refuse ``num_points`` helpful and harmful rows out of fewer than twice as many scored candidates
    (``min(k, num_candidates)``): the two groups would share rows (all of them below ``num_points``), reported as two
    results (k 15 with 10 rows each: 5 rows in both)."""
    scored = num_candidates if k is None else min(k, num_candidates)
    if scored < 2 * num_points:
        raise ValueError(f"{each} scores {scored} candidate rows (influence_knn_k={k}, {num_candidates} candidates), "
                         f"fewer than 2 × num_points = {2 * num_points}: 'helpful' and 'harmful' would share "
                         f"{2 * num_points - scored} rows. Raise influence_knn_k or lower num_points.")


def heuristic_seed(heuristic: str) -> int:
    """A heuristic's own number for its seeds (HANS order, else from its name): a run of one heuristic draws the rows
    it draws among all of them, wherever it sits in the heuristics named."""
    if heuristic in HANS_HEURISTICS:
        return HANS_HEURISTICS.index(heuristic)
    return int.from_bytes(hashlib.sha256(heuristic.encode("utf-8")).digest()[:4], "little")


def heuristics_in(splits: dict[str, Sequence[str]], requested: Sequence[str] | None, what: str, fix: str) -> list[str]:
    """The heuristics an application runs: ``requested``, or every heuristic of the first split (HANS' order, then
    the others by name), each checked to have rows in every split; ``splits`` maps a split's name (for messages) to
    its rows' ``heuristic`` column. A `ValueError` ("``what``: ...", then ``fix``) for an empty split or a heuristic
    missing from one, before any work."""
    present = {name: set(column) for name, column in splits.items()}
    for name, found in present.items():
        if not found:
            raise ValueError(f"{what}: {name} has no rows; pass a non-empty HANS split (hf_fastif.data.split_hans).")
    first = next(iter(present.values()))
    wanted = list(requested) if requested is not None else sorted(first, key=heuristic_order)
    for name, found in present.items():
        missing = [h for h in wanted if h not in found]
        if missing:
            raise ValueError(f"{what}: heuristics {missing} have no rows in {name} (it has {sorted(found)}). {fix}")
    return wanted


@dataclass
class SharedRows:
    """Rows of one dataset whose content is also in another: their indices, what was compared, one example."""

    rows: np.ndarray
    by: str
    example: str


def shared_rows(rows: Dataset, other: Dataset) -> SharedRows | None:
    """The rows of ``rows`` whose content (token ids, else whitespace-normalised premise and hypothesis) is also a
    row of ``other``; None when the two cannot be compared (neither column set in both). Only ``other``'s digests
    are held in memory: pass the smaller dataset as ``other``."""
    by = row_key_kind(rows, other)
    if by is None:
        return None
    seen = set(row_keys(other, by))
    found = np.fromiter((i for i, key in enumerate(row_keys(rows, by)) if key in seen), dtype=np.int64)
    example = ""
    if len(found):
        row = rows[int(found[0])]
        example = (f"row {found[0]}: {row['premise']!r} / {row['hypothesis']!r}" if "premise" in row and
                   "hypothesis" in row else f"row {found[0]}, token ids {list(row['input_ids'])[:16]}")
    return SharedRows(rows=found, by=by, example=example)


def refuse_shared_rows(rows: Dataset, rows_name: str, other: Dataset, other_name: str, *, why: str, fix: str,
                       unchecked: str = "warn") -> None:
    """Raise a `ValueError` (how many rows, one example, why it matters, ``fix``) when rows of ``rows`` are also rows
    of ``other``. When they cannot be compared, log a warning (``unchecked="warn"``) or raise (``"raise"``)."""
    shared = shared_rows(rows, other)
    if shared is None:
        message = (f"Cannot check whether {rows_name} holds rows of {other_name}: they do not both have input_ids, "
                   "nor both premise and hypothesis columns")
        if unchecked == "raise":
            raise ValueError(f"{message}; keep those columns (tokenize_nli keeps the text) so that the check can run.")
        logger.warning(f"{message}; the overlap was not checked.")
        return
    if len(shared.rows):
        raise ValueError(f"{rows_name} holds {len(shared.rows):,} row{'s' if len(shared.rows) != 1 else ''} of "
                         f"{other_name} (the same {shared.by}; e.g. {shared.example}): {why}. {fix}")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; std 0 for a single value."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std()) if len(array) > 1 else 0.0


def fmt(mean: float, std: float, percent: bool = True, signed: bool = False) -> str:
    """``"61.2 ± 1.3"`` (percent points) or ``"+0.012 ± 0.003"``."""
    if percent:
        return f"{100 * mean:+.1f} ± {100 * std:.1f}" if signed else f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:+.4g} ± {std:.2g}" if signed else f"{mean:.4g} ± {std:.2g}"


def keep_finished(error: BaseException, result, where: str, done: int, total: int, unit: str = "runs") -> None:
    """Attach ``result``, holding the ``done`` of ``total`` runs (``unit``) finished before ``error`` stopped the
    protocol at ``where``, to the error (`hf_fastif.applications.finished_runs_kept` writes its report): a late
    failure (a LiSSA refusal at run 46 of 120) lost every finished run. Nothing is attached where nothing finished."""
    if done:
        error.finished_result = result
        error.stopped_at = (f"stopped at {where} by {type(error).__name__}{f': {error}' if str(error) else ''} "
                            f"({done} of {total} {unit} finished; the tables hold those only)")


def write_results(output_dir: str | Path, name: str, results: dict, markdown: str, figure=None) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and (given a matplotlib figure) ``<name>.png``; return the paths."""
    directory = check_output_dir(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_atomic(directory / f"{name}.json", to_json(results, indent=2)),
             "markdown": write_atomic(directory / f"{name}.md", markdown + "\n")}
    if figure is not None:
        paths["png"] = directory / f"{name}.png"
        figure.savefig(paths["png"], dpi=120, bbox_inches="tight")
    return paths
