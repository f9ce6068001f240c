"""Simulatability (FastIF §5.1): do influential training rows explain the model? A separate *simulator* model
takes one SGD step on a single training row; if the row explains the task model's prediction, the simulator's
loss on that prediction should drop more than after a step on a random row.

For each test point (``num_correct`` the task model gets right, ``num_incorrect`` it gets wrong): its
``num_points`` most helpful and most harmful training rows (of k kNN candidates: the lowest and highest
influence, of either sign when fewer candidates have that sign, so every group has ``num_points`` rows) and
``num_points`` random rows per label the simulator's step uses (``random_<label>``: rows whose step label, the task
model's prediction by default, is that label); for each row and each learning rate of a sweep, one step
``θ' = θ - lr·∇L_sim(row)`` on the simulator, then the simulator's loss on the test point labelled with the
task model's prediction. By default the training rows carry the task model's predictions both in their
influence and in the simulator's step (``row_labels``; the reference code mixes gold labels for influence with
predictions for the step, which turns rows the task model gets wrong upside down).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from datasets import Dataset
from matplotlib.figure import Figure
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging

from .. import distributed as D
from ..arguments import InfluenceArguments
from ..data import load_mnli, tokenize_nli
from ..embedded import embedded_model, train_embedded_model
from ..engine import InfluenceEngine
from ..fingerprint import model_fingerprint
from ..hvp import batch_gradient
from ..loss import influence_model
from ..mode import influence_mode
from ..params import select_parameters, unflatten
from ..trainer import InfluenceTrainer
from ..utils import markdown_table, quiet_datasets
from .common import ApplicationData, batcher, check_num_labels, keep_finished, predict, refuse_few_candidates
from .prepare import (
    Setup,
    check_launch_training,
    config_positions,
    freeze_lower_layers,
    is_sequence_classifier,
    resolve_model,
)

logger = logging.get_logger(__name__)

PAPER_LEARNING_RATES: tuple[float, ...] = tuple(np.logspace(-5, -2.5, 50).tolist())
"""The reference code's sweep for bert-base: 50 rates from 1e-5 to 10^-2.5."""

ROW_LABELS = ("prediction", "gold", "mixed")
ROW_LABEL_WORDS = {"prediction": "the task model's predictions", "gold": "their gold labels",
                   "mixed": "their gold labels for influence and the predictions for the step"}
"""How the report names each ``row_labels``."""
SIMULATORS = ("trained", "copy")


def describe_rates(rates: Sequence[float]) -> str:
    """``"50 log-spaced rates, 1e-05 … 0.00316"`` for a log-spaced sweep, else the rates themselves."""
    rates = [float(r) for r in rates]
    if len(rates) > 2 and np.allclose(np.diff(np.log(rates)), np.log(rates[1] / rates[0])):
        return f"{len(rates)} log-spaced rates, {rates[0]:.3g} … {rates[-1]:.3g}"
    return ", ".join(f"{r:g}" for r in rates)


@dataclass
class SimulatabilityArguments:
    """The simulatability protocol, passed whole to `run_simulatability` (defaults: the paper's; the embedded
    default changes the sweep and k, hf_fastif.embedded)."""

    PAPER: ClassVar[dict] = dict(num_correct=10, num_incorrect=10, num_points=10,
                                 learning_rates=describe_rates(PAPER_LEARNING_RATES), test_points="MNLI dev (matched)")
    """The paper's protocol, for the table of settings that differ from it."""
    PAPER_INFLUENCE: ClassVar[dict] = dict(influence_knn_k=10000)
    """The paper's k for simulatability (its other influence settings are the HANS ones)."""
    QUICK: ClassVar[dict] = dict(num_correct=2, num_incorrect=2, learning_rates=[0.01, 0.1, 1.0], influence_knn_k=None)
    """``--quick``: a smoke run (not a measurement). Every training row scored, as without --quick: the 200
    candidates of the other recipes' --quick were all helpful to every test point, so the "harmful" group held the
    least helpful rows, and the smoke run could not show a sign error on that side."""

    num_correct: int = field(default=10, metadata={"help": "Test points the task model predicts correctly."})
    num_incorrect: int = field(default=10, metadata={"help": "Test points it predicts wrongly."})
    num_points: int = field(default=10, metadata={"help": "Helpful, harmful and random rows (per label) per test point."})
    learning_rates: list[float] | None = field(default=None, metadata={
        "help": "The sweep of step sizes (unset: the reference code's 50 log-spaced rates 1e-5 … 10^-2.5; the embedded "
                "default: 8 rates 1e-3 … 10^0.5)."})
    explain: str = field(default="prediction", metadata={
        "help": "Influence on the loss of the task model's prediction ('prediction', what the simulator imitates) "
                "or of the gold label ('gold', as the reference code computes it)."})
    row_labels: str = field(default="prediction", metadata={
        "help": "Labels of the training rows, for their influence and for the simulator's step: 'prediction' (the "
                "task model's), 'gold', or 'mixed' (gold for influence, prediction for the step: the reference code)."})
    simulator: str = field(default="trained", metadata={
        "help": "'trained': a simulator trained here (the task model's architecture and initialisation, another order "
                "of the training rows, the task model's predictions as labels); 'copy': a copy of the task model (a "
                "control: does influence predict what one step does to the model itself?); or a checkpoint."})
    test_dataset: str | None = field(default=None, metadata={
        "help": "NLI test points (a Hub id such as nyu-mll/multi_nli, or a file). Unset: the HANS validation split."})
    test_split: str = field(default="validation_matched", metadata={"help": "Hub split of --test_dataset."})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` naming the fix for a bad setting (also called by `run_simulatability`)."""
        if self.explain not in ("prediction", "gold"):
            raise ValueError(f"explain (--explain) must be 'prediction' or 'gold', got {self.explain!r}.")
        if self.row_labels not in ROW_LABELS:
            raise ValueError(f"row_labels (--row_labels) must be one of {', '.join(ROW_LABELS)}, got "
                             f"{self.row_labels!r}.")
        for name in ("num_correct", "num_incorrect"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if int(self.num_correct) + int(self.num_incorrect) == 0:
            raise ValueError("num_correct and num_incorrect are both 0: there would be no test point to explain; "
                             "ask for at least one (e.g. --num_correct 10 --num_incorrect 10).")
        if int(self.num_points) < 1:
            raise ValueError(f"num_points must be a positive integer, got {self.num_points}.")
        if not self.rates or not all(math.isfinite(r) and r > 0 for r in self.rates):  # a NaN rate gave NaN columns
            raise ValueError(f"learning_rates must be a non-empty list of finite positive step sizes, got "
                             f"{self.learning_rates}.")

    @property
    def rates(self) -> list[float]:
        """The sweep as used: ``learning_rates``, or the paper's when unset."""
        return [float(r) for r in (PAPER_LEARNING_RATES if self.learning_rates is None else self.learning_rates)]

    def used(self) -> dict:
        """The settings `PAPER` names, as used."""
        return dict(num_correct=self.num_correct, num_incorrect=self.num_incorrect, num_points=self.num_points,
                    learning_rates=describe_rates(self.rates),
                    test_points="HANS validation split" if self.test_dataset is None else self.test_dataset)


SIMULATOR_WORDS = {
    "trained": "trained here (`--simulator trained`: the task model's starting point, another order of the training "
               "rows, the task model's predictions as labels)",
    "copy": "a copy of the task model (`--simulator copy`: a control, whether influence predicts what one step does "
            "to the model itself)",
    "given": "a model of its own passed to run_simulatability (not the task model's weights)"}
"""How `SimulatabilityResult.to_markdown` names each ``simulator`` setting (any other is a checkpoint)."""


def simulator_kind(task_model: nn.Module, simulator: nn.Module, named: str) -> str:
    """What the results record as the simulator: ``"copy"`` where it holds the task model's weights and settings
    (`model_fingerprint`), whatever ``named`` (``SimulatabilityArguments.simulator``) says; ``named`` otherwise, or
    ``"given"`` where that is ``"copy"`` (another model). A name the model contradicts is warned of: the API's default
    protocol named a copy "trained"."""
    same = model_fingerprint(simulator) == model_fingerprint(task_model)
    kind = "copy" if same else "given" if named == "copy" else named
    if kind != named:
        logger.warning(f"The simulator {'holds' if same else 'does not hold'} the task model's weights, but the "
                       f"protocol names it {named!r}: the results record it as {kind!r}.")
    return kind

@dataclass
class SimulatabilityResult:
    """Simulator losses after one step on each row of each group, per test point and learning rate.

    ``points[i]`` holds the test row, whether the task model got it right, its loss before any step, and for
    each group (``helpful``, ``harmful``, ``random_<label>``: random rows whose step label is ``<label>``) the
    selected rows and a ``(rows, rates)`` list of the simulator's loss after the step.
    """

    settings: dict
    learning_rates: list[float]
    points: list[dict] = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        return list(self.points[0]["losses"]) if self.points else []

    def loss_change(self, group: str, correct: bool | None = None) -> np.ndarray:
        """``(test points × rows, rates)``: simulator loss after the step minus before (negative = it dropped)."""
        out = [np.asarray(p["losses"][group]) - p["loss_before"] for p in self.points
               if correct is None or p["correct"] == correct]
        return np.concatenate(out, 0) if out else np.zeros((0, len(self.learning_rates)))

    def summary(self) -> dict:
        """Per subset (all / correct / incorrect): each group's mean loss change at every rate, and for helpful and
        harmful the difference to the random groups' mean per test point (mean, std) and the number of test points
        where the group's mean change is below the random groups' (every rate: no rate is picked after the fact)."""
        out: dict = {}
        for subset, correct in (("all", None), ("correct", True), ("incorrect", False)):
            per_point = self._per_point_means(correct)
            if not len(next(iter(per_point.values()), [])):
                continue
            random_mean = np.mean([per_point[g] for g in self.groups if g.startswith("random")], axis=0)
            entry = {"test_points": int(random_mean.shape[0])}
            for group, change in per_point.items():
                entry[group] = {"mean_change": change.mean(0).tolist()}
                if group in ("helpful", "harmful"):
                    diff = change - random_mean  # (test points, rates)
                    entry[group] |= {"minus_random_mean": diff.mean(0).tolist(), "minus_random_std": diff.std(0).tolist(),
                                     "below_random": (diff < 0).sum(0).astype(int).tolist()}
            out[subset] = entry
        return out

    def _per_point_means(self, correct: bool | None) -> dict[str, np.ndarray]:
        """``{group: (test points, rates)}``: mean loss change over a test point's rows."""
        points = [p for p in self.points if correct is None or p["correct"] == correct]
        return {g: np.array([np.mean(np.asarray(p["losses"][g]) - p["loss_before"], 0) for p in points])
                for g in self.groups}

    def to_dict(self) -> dict:
        return {"title": "Simulatability", "settings": self.settings, "learning_rates": self.learning_rates,
                "summary": self.summary(), "points": self.points}

    def to_markdown(self) -> str:
        """Mean simulator loss change per group at a few rates of the sweep, for all / correct / incorrect points,
        and on how many test points helpful (harmful) rows beat the random ones."""
        summary = self.summary()
        rates = self.learning_rates
        shown = sorted({0, len(rates) // 4, len(rates) // 2, (3 * len(rates)) // 4, len(rates) - 1})
        header = ["test points", "rows", *[f"lr {rates[i]:.3g}" for i in shown]]
        rows = []
        for subset, entry in summary.items():
            n = entry["test_points"]
            for group in self.groups:
                mean = entry[group]["mean_change"]
                rows.append([f"{subset} ({n})", group, *[f"{mean[i]:+.2e}" for i in shown]])
            for group in ("helpful", "harmful"):
                below = entry[group]["below_random"]
                rows.append([f"{subset} ({n})", f"{group} < random (test points)", *[f"{below[i]}/{n}" for i in shown]])
        sizes = {g: sum(len(p["rows"][g]) for p in self.points) for g in ("helpful", "harmful")}
        signed = {g: sum(p.get("rows_of_the_groups_sign", {}).get(g, 0) for p in self.points) for g in sizes}
        k = (self.settings.get("influence") or {}).get("influence_knn_k")
        every_row = k is None or k >= self.settings.get("num_train", float("inf"))
        sign_line = (f"Rows of the group's sign: helpful (influence < 0) {signed['helpful']}/{sizes['helpful']}, harmful "
                     f"(influence > 0) {signed['harmful']}/{sizes['harmful']}"
                     + ("; **a group holds rows of the other sign** ("
                        + ("every training row was scored and too few have that sign" if every_row else
                           "too few candidates of that sign: raise influence_knn_k")
                        + "), so it is the least of the other kind, not what its name says."
                        if signed != sizes else "."))
        explain = self.settings.get("explain", "prediction")
        simulator = self.settings.get("simulator")  # (a copy and a trained one answer oppositely: docs/applications.md)
        simulator_line = ("The simulator: " + ("not recorded (a result of an older hf_fastif)" if simulator is None
                                               else SIMULATOR_WORDS.get(simulator, f"the checkpoint `{simulator}`"))
                          + ".")
        gold_note = (["**Influence on the gold label** (`--explain gold`, as the reference code), while the change "
                      "below is measured on the task model's prediction: on an incorrect test point the helpful rows "
                      "(toward the gold label) move the simulator away from the prediction, so the correct and "
                      "incorrect rows read in opposite directions and `all` mixes them.", ""]
                     if explain == "gold" else [])
        return "\n".join([
            "### Simulatability",
            "",
            sign_line,
            "",
            simulator_line,
            "",
            *gold_note,
            "Change of the simulator's loss on the task model's prediction after one SGD step on one training row "
            f"(mean over the {self.settings.get('num_points')} rows of a group, then over test points; negative = "
            "the simulator agrees more with the task model; influence on the loss of the "
            f"{'gold label' if explain == 'gold' else 'prediction'}, training rows labelled by "
            f"{ROW_LABEL_WORDS[self.settings.get('row_labels', 'prediction')]}). `< random`: "
            "test points where the group's mean change is below the random groups' mean.",
            "",
            markdown_table(header, rows),
        ])

    def plot(self) -> Figure:
        """Mean simulator loss change vs learning rate per group; one panel per subset (correct / incorrect)."""
        subsets = [s for s in ("correct", "incorrect") if any(p["correct"] == (s == "correct") for p in self.points)]
        fig = Figure(figsize=(5 * max(1, len(subsets)), 3.6))
        axes = fig.subplots(1, max(1, len(subsets)), squeeze=False)
        styles = {"helpful": ("tab:blue", "-"), "harmful": ("tab:red", "-")}
        grays = iter(["tab:gray", "tab:olive", "tab:brown"])
        colors = {g: styles.get(g) or (next(grays), "--") for g in self.groups}
        for ax, subset in zip(axes[0], subsets):
            for group in self.groups:
                change = self.loss_change(group, subset == "correct")
                mean, sem = change.mean(0), change.std(0) / np.sqrt(max(1, len(change)))
                color, style = colors[group]
                ax.plot(self.learning_rates, mean, color=color, linestyle=style, label=group)
                ax.fill_between(self.learning_rates, mean - sem, mean + sem, color=color, alpha=0.15)
            ax.set_xscale("log")
            ax.axhline(0, color="black", linewidth=0.5)
            ax.set_xlabel("learning rate of the simulator's step")
            ax.set_title(f"{subset} predictions")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("simulator loss change")
        axes[0][-1].legend(fontsize=8)
        fig.suptitle("Simulatability: one SGD step on a training row")
        fig.tight_layout()
        return fig


def select_test_points(predictions: np.ndarray, labels: np.ndarray, num_correct: int, num_incorrect: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, correct)``: up to ``num_correct`` correctly and ``num_incorrect`` wrongly predicted rows, seeded."""
    rng = np.random.default_rng([seed, 7])
    right = np.flatnonzero(predictions == labels)
    wrong = np.flatnonzero(predictions != labels)
    if len(right) < num_correct or len(wrong) < num_incorrect:
        logger.warning(f"Only {len(right)} correct and {len(wrong)} incorrect predictions; asked for {num_correct} "
                       f"and {num_incorrect}.")
    right = rng.choice(right, size=min(num_correct, len(right)), replace=False)
    wrong = rng.choice(wrong, size=min(num_incorrect, len(wrong)), replace=False)
    rows = np.concatenate([right, wrong]).astype(np.int64)
    return rows, np.r_[np.ones(len(right), bool), np.zeros(len(wrong), bool)]


def with_labels(dataset: Dataset, labels: Sequence[int]) -> Dataset:
    """``dataset`` with its ``labels`` column replaced."""
    column = "labels" if "labels" in dataset.column_names else "label"
    with quiet_datasets():  # (add_column flattens a selection's indices, with a progress bar of its own)
        return dataset.remove_columns(column).add_column("labels", [int(x) for x in labels])


class _SimulatorSteps:
    """Losses of the simulator on a test row after one step ``θ - lr·g`` on each of several training rows."""

    def __init__(self, simulator: nn.Module, args: InfluenceArguments, data_collator):
        self.model = simulator
        self.params = select_parameters(simulator, args.influence_params)
        self.names = list(self.params)
        self.fm = influence_model(simulator, self.names, args)
        self.data_collator = data_collator

    def losses(self, rows: Dataset, labels: Sequence[int], test_row: Dataset, test_label: int,
               rates: Sequence[float]) -> tuple[float, np.ndarray]:
        """``(loss before, (len(rows), len(rates)) losses after)``; ``labels`` replace the rows' labels."""
        with influence_mode(self.model, self.names):
            rows_batch = batcher(self.model, rows, self.data_collator).batch(range(len(rows)))
            rows_batch["labels"] = torch.as_tensor(np.asarray(labels), device=rows_batch["labels"].device)
            test_batch = batcher(self.model, test_row, self.data_collator).batch([0])
            test_batch["labels"] = torch.full_like(test_batch["labels"], int(test_label))
            grads = batch_gradient(self.fm, self.params, rows_batch, reduction="none")  # (rows, p)
            with torch.no_grad():
                before = float(self.fm.loss_fn(self.fm.outputs(self.params, test_batch), test_batch)[0])
                after = np.empty((len(rows), len(rates)))
                inputs = {k: v for k, v in test_batch.items() if k != "labels"}
                for i in range(len(rows)):
                    step = unflatten(grads[i], self.params)
                    for j, rate in enumerate(rates):
                        moved = {n: p - rate * step[n] for n, p in self.params.items()}
                        out = functional_call(self.model, moved, args=(), kwargs=inputs)
                        after[i, j] = float(self.fm.loss_fn(out, test_batch)[0])
        bad = ~np.isfinite(after)
        if bad.any():  # (a NaN loss counted as "not below random": 320 of 480 at rate 1e30, and exit status 0)
            rate = rates[int(np.argwhere(bad)[0][1])]
            raise ValueError(f"A simulator step at learning rate {rate:g} gives a test loss that is not finite "
                             f"({int(bad.sum())} of {bad.size} losses of this test point): the step's weights "
                             "overflow. Use smaller --learning_rates.")
        return before, after


def run_simulatability(task_model: nn.Module, simulator: nn.Module, data: ApplicationData, args: InfluenceArguments,
                       protocol: SimulatabilityArguments, *, test_dataset: Dataset | None = None,
                       progress: bool = True) -> SimulatabilityResult:
    """Run the simulatability protocol.

    Args:
        task_model: the model to explain: 2 or 3 labels in NLI order, the labels of ``data.train`` and the test
            points (a reversed ``id2label`` or another label count is refused: the data's labels would be misread).
        simulator: a separate model with the same labels (not modified: steps are functional).
        data: ``train`` (tokenized training rows with gold ``labels``: influence, and the rows stepped on),
            ``hans_validation`` (the test points unless ``test_dataset`` is given) and ``collator``.
        args: the ``influence_*`` settings (also which simulator parameters are stepped); ``seed`` seeds the
            choice of test points and random rows.
        protocol: test points (correct / incorrect), rows per group, the sweep of step sizes, ``explain``
            (influence on the task model's prediction or the gold label) and ``row_labels`` (the training rows'
            labels, both in their influence and in the simulator's step: ``"prediction"``, the task model's, what
            the simulator imitates; ``"gold"``; or ``"mixed"``, gold for influence and prediction for the step, as
            the reference code does, so rows the task model gets wrong push the simulator the opposite way from
            what their influence says). Each random group ``random_<label>`` is drawn from the training rows whose
            step label (the task model's prediction, or the gold label with ``row_labels="gold"``) is ``<label>``,
            so every row of it is stepped with that label. Its ``simulator`` names ``simulator`` in the results
            (``"trained"`` or a checkpoint's path; one with the task model's weights is recorded as ``"copy"``, and
            another model named ``"copy"`` as ``"given"``: `simulator_kind`).
        test_dataset: tokenized test rows with gold ``labels`` (default: ``data.hans_validation``).
    Returns:
        A `SimulatabilityResult`.
    """
    protocol.validate()
    refuse_few_candidates(len(data.train), args.influence_knn_k, protocol.num_points, "Each test point")
    default_tests = test_dataset is None
    test_dataset = data.hans_validation if test_dataset is None else test_dataset
    if test_dataset is None:
        raise ValueError("Simulatability needs test points: pass test_dataset= or data.hans_validation.")
    task_labels = check_num_labels(task_model, (2, 3), "Simulatability")  # the data's labels, read as its classes
    sim_labels = getattr(getattr(simulator, "config", None), "num_labels", None)
    if task_labels != sim_labels:
        raise ValueError(f"The simulator has {sim_labels} labels and the task model {task_labels}; train the simulator "
                         "on the task model's label set.")
    check_num_labels(simulator, task_labels, "The simulator")
    _check_data_labels(data.train, task_labels, "data.train")
    _check_data_labels(test_dataset, task_labels, "The test points (data.hans_validation)" if default_tests
                       else "test_dataset")
    rates, seed = protocol.rates, args.seed
    gold = np.asarray(test_dataset["labels"])
    train_gold = np.asarray(data.train["labels"])
    with InfluenceEngine(task_model, args, data_collator=data.collator) as engine:
        # predictions through the engine: the training rows' trunk states serve them and, with gold labels, influence
        test_predictions = predict(task_model, test_dataset, engine=engine).argmax(-1)
        rows, correct = select_test_points(test_predictions, gold, protocol.num_correct, protocol.num_incorrect, seed)
        if len(rows) == 0:
            raise ValueError("No test points to explain; pass a non-empty test dataset.")
        targets = test_predictions[rows] if protocol.explain == "prediction" else gold[rows]
        tests = with_labels(test_dataset.select(rows), targets)
        train_predictions = predict(task_model, data.train, engine=engine).argmax(-1)
        influence_train = (data.train if protocol.row_labels in ("gold", "mixed")
                           else with_labels(data.train, train_predictions))
        step_labels = train_gold if protocol.row_labels == "gold" else train_predictions
        table = engine.compute_influences(influence_train, tests)

    names = getattr(task_model.config, "id2label", None) or {}
    label_ids = sorted(set(np.asarray(step_labels).tolist()))  # random rows: drawn by the label of their step
    rng = np.random.default_rng([seed, 11])
    steps = _SimulatorSteps(copy.deepcopy(simulator), args, data.collator)
    kind = simulator_kind(task_model, simulator, protocol.simulator)
    result = SimulatabilityResult(
        settings={"num_correct": int(correct.sum()), "num_incorrect": int((~correct).sum()),
                  "num_points": protocol.num_points, "explain": protocol.explain, "row_labels": protocol.row_labels,
                  "simulator": kind,
                  "seed": seed, "train_accuracy": float((train_predictions == train_gold).mean()),
                  "num_train": len(data.train), "influence": args.influence_settings()},
        learning_rates=rates)
    for t in tqdm(range(len(rows)), desc="simulatability", disable=not progress or not D.is_main_process()):
        # groups of num_points rows each, like the random groups: the extremes whatever their sign
        lowest, highest = table.lowest(t, protocol.num_points), table.highest(t, protocol.num_points)
        groups = {"helpful": lowest["train_id"].to_numpy(), "harmful": highest["train_id"].to_numpy()}
        # how many of each extreme group have the group's sign (with few or one-signed candidates, "harmful"
        # can be the least helpful rows: said in the report, not hidden)
        signed = {"helpful": int((lowest["influence"] < 0).sum()), "harmful": int((highest["influence"] > 0).sum())}
        for label in label_ids:
            pool = np.flatnonzero(step_labels == label)
            groups[f"random_{names.get(label, label)}"] = np.sort(
                rng.choice(pool, size=min(protocol.num_points, len(pool)), replace=False))
        point = {"test_row": int(rows[t]), "correct": bool(correct[t]), "task_prediction": int(test_predictions[rows[t]]),
                 "gold": int(gold[rows[t]]), "rows": {}, "losses": {}, "rows_of_the_groups_sign": signed}
        for group, ids in groups.items():
            # the simulator imitates the task model: its loss is measured on the task model's prediction
            try:
                before, after = steps.losses(data.train.select(ids), step_labels[ids],
                                             test_dataset.select([int(rows[t])]), int(test_predictions[rows[t]]), rates)
            except BaseException as err:  # (an interrupt too)
                keep_finished(err, result, f"test point {t} (test row {int(rows[t])}), group {group}",
                              len(result.points), len(rows), "test points")
                raise
            point["loss_before"] = before
            point["rows"][group] = ids.tolist()
            point["losses"][group] = after.tolist()
        result.points.append(point)
    return result


def _check_data_labels(dataset: Dataset, num_labels: int, name: str) -> None:
    """Raise a `ValueError` naming the fix when ``dataset``'s labels are not the model's: a ``labels`` ClassLabel with
    another number of classes (HANS' 2 for a 3-label model), or label ids the model does not have."""
    feature = dataset.features.get("labels")
    classes = getattr(feature, "num_classes", None)
    labels = np.asarray(dataset["labels"])
    if (classes is not None and classes != num_labels) or (len(labels) and int(labels.max()) >= num_labels):
        found = feature.names if classes is not None else sorted(set(labels.tolist()))
        raise ValueError(f"{name} has labels {found}, but the task model has {num_labels}: its predictions would be "
                         "compared with labels of another set. Use data with the model's labels (for a 3-label model, "
                         "MNLI-format test points: --test_dataset nyu-mll/multi_nli), or a model with the data's.")


def load_test_points(protocol: SimulatabilityArguments, num_labels: int) -> Dataset | None:
    """The raw test points of ``--test_dataset`` (None: the HANS validation split), checked before training."""
    if protocol.test_dataset is None:
        if num_labels != 2:
            raise ValueError("The default test points (HANS validation) have 2 labels; for a 3-label model pass "
                             "--test_dataset nyu-mll/multi_nli (or an MNLI-format file).")
        return None
    return load_mnli(protocol.test_dataset, split=protocol.test_split, num_labels=num_labels)  # (no rows: refused)


def test_points(raw: Dataset | None, setup: Setup) -> Dataset:
    """Tokenized test points: ``raw`` or, when None, the HANS validation split."""
    if raw is None:
        return setup.data.hans_validation
    return tokenize_nli(raw, setup.tokenizer, max_length=setup.data_args.max_length)


def check_simulatability(setup: Setup, protocol: SimulatabilityArguments) -> str | None:
    """Check the protocol against a `Setup` (also one whose model is not built yet: the recipe calls this before any
    training): enough candidates for distinct helpful / harmful groups, and a simulator that can be had (a checkpoint
    that exists, is a sequence classifier with the task's labels and positions, and reads the task model's token ids
    as the same tokens: `check_simulator_checkpoint`; ``trained`` only for a task model trained here). Returns the
    simulator checkpoint, if one."""
    protocol.validate()
    refuse_few_candidates(len(setup.data.train), setup.args.influence_knn_k, protocol.num_points, "Each test point")
    if protocol.simulator not in SIMULATORS:
        checkpoint = resolve_model(protocol.simulator, remote_code_flag=None)
        check_simulator_checkpoint(checkpoint, setup)
        return checkpoint
    if protocol.simulator == "trained" and setup.name != "embedded" and not setup.description["trained_here"]:
        raise ValueError("The task model was given as a fine-tuned checkpoint, so its base model is unknown: pass "
                         "--simulator CHECKPOINT (a model trained on the task model's predictions), or --simulator copy.")
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")
"""Files one of which a folder with a saved tokenizer holds."""
PROBE_PAIRS = (("The doctor near the actor danced.", "The actor danced."),
               ("Since the lawyers resigned, the senators called the judges.", "The lawyers resigned."))
"""Pairs both tokenizers encode, with (up to `PROBE_ROWS`) training rows: the same ids, or the simulator is refused."""
PROBE_ROWS = 64


def check_simulator_checkpoint(checkpoint: str, setup: Setup) -> None:
    """Refuse, before any work, a ``--simulator`` checkpoint the simulator's steps cannot use as given: not a sequence
    classifier (a base model would get a new random head, silently), another label count or order, fewer positions
    than ``--max_length``, or a tokenizer that gives other ids than the task model's. The simulator is fed the task
    model's token ids (the rows are tokenized once, by the task model's tokenizer), so its tokenizer must map every
    token of the task model's vocabulary to the same id and encode the same pairs (`PROBE_PAIRS` and the first
    `PROBE_ROWS` training rows) to the same ids: another vocabulary read other words, silently, or failed with a bare
    IndexError after the task model's influence was computed."""
    flag = f"--simulator {checkpoint!r}"
    config = AutoConfig.from_pretrained(checkpoint)
    if not is_sequence_classifier(config):
        raise ValueError(f"{flag} is not a sequence-classification checkpoint (architectures {config.architectures}): "
                         "it would get a new, random classification head, and the steps would measure that head. Pass "
                         "a classifier trained on the task model's predictions, or --simulator trained or copy.")
    check_num_labels(config, setup.data_args.num_labels, f"The simulator ({flag})")
    positions, max_length = config_positions(config), setup.data_args.max_length
    if positions and max_length is not None and max_length > positions:
        raise ValueError(f"{flag} has {positions} positions, fewer than --max_length {max_length} (the task model's "
                         f"rows): pass --max_length {positions} or a simulator with as many positions.")
    missing = Path(checkpoint).is_dir() and not any((Path(checkpoint) / name).is_file() for name in TOKENIZER_FILES)
    try:  # (transformers 5 gives a folder without tokenizer files a near-empty tokenizer, not an error)
        tokenizer = None if missing else AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:
        missing = err
    if tokenizer is None:
        raise ValueError(f"{flag} has no tokenizer to check against the task model's"
                         f"{f' ({missing})' if isinstance(missing, Exception) else ''}; the simulator reads the task "
                         "model's token ids. Save the tokenizer it was trained with next to it "
                         "(tokenizer.save_pretrained(folder)).")
    problem = different_token_ids(setup.tokenizer, tokenizer, _probe_pairs(setup.data.raw_train))
    if problem:
        raise ValueError(f"{flag} tokenizes differently from the task model ({problem}), and the simulator is fed the "
                         "task model's token ids: it would read other words, or fail on ids past its vocabulary. Pass "
                         "a simulator trained with the task model's tokenizer, or --simulator trained or copy.")


def _probe_pairs(raw: Dataset | None) -> list[tuple[str, str]]:
    pairs = list(PROBE_PAIRS)
    if raw is not None and {"premise", "hypothesis"} <= set(raw.column_names):
        rows = raw.select(range(min(PROBE_ROWS, len(raw))))
        pairs += list(zip(rows["premise"], rows["hypothesis"]))
    return pairs


def different_token_ids(task: PreTrainedTokenizerBase, simulator: PreTrainedTokenizerBase,
                        pairs: Sequence[tuple[str, str]]) -> str | None:
    """How the two tokenizers differ (a token of ``task``'s vocabulary with another id or none in ``simulator``'s, or a
    pair of ``pairs`` encoded to other ids), or None where they give the same ids."""
    task_vocab, simulator_vocab = task.get_vocab(), simulator.get_vocab()
    moved = [token for token, i in task_vocab.items() if simulator_vocab.get(token) != i]
    if moved:
        token = sorted(moved, key=task_vocab.get)[0]
        return (f"{len(moved):,} of the task tokenizer's {len(task_vocab):,} tokens have another id or none in the "
                f"simulator's {len(simulator_vocab):,}; e.g. {token!r} is {task_vocab[token]} for the task model and "
                f"{simulator_vocab.get(token)} for the simulator")
    for premise, hypothesis in pairs:
        ids = [t(premise, hypothesis, return_token_type_ids=True) for t in (task, simulator)]
        if ids[0]["input_ids"] != ids[1]["input_ids"]:
            return (f"the pair {premise!r} / {hypothesis!r} is {ids[0]['input_ids'][:12]}... for the task model and "
                    f"{ids[1]['input_ids'][:12]}... for the simulator")
    return None


def build_simulator(setup: Setup, protocol: SimulatabilityArguments) -> nn.Module:
    """The simulator (see ``SimulatabilityArguments.simulator``): a copy of the task model, a checkpoint, or a model
    trained here from the task model's starting point on its predictions, in another order of the rows."""
    data_args = setup.data_args
    num_labels = setup.model.config.num_labels
    checkpoint = check_simulatability(setup, protocol)
    if protocol.simulator == "copy":
        return copy.deepcopy(setup.model)
    if checkpoint is not None:
        simulator = AutoModelForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager")
        check_num_labels(simulator, num_labels, "The simulator")
        if data_args.trainable_layers is not None:
            freeze_lower_layers(simulator, data_args.trainable_layers)
        return simulator.to(next(setup.model.parameters()).device).eval()
    predictions = predict(setup.model, setup.data.train, setup.data.collator).argmax(-1)
    relabelled = with_labels(setup.data.train, predictions)
    # the same starting point as the task model (as two fine-tunings of one pretrained BERT share theirs), another
    # order of the training rows, and the task model's predictions as labels
    args = copy.copy(setup.args)
    args.data_seed, args.output_dir = setup.args.seed + 1, f"{setup.args.output_dir}/simulator"
    kind = setup.description.get("embedded_model")
    if kind == "minilm":  # fine-tuned (once per content: cached) on the task model's predictions
        raw = setup.data.raw_train.remove_columns("label").add_column("label", [int(x) for x in predictions])
        simulator, _ = train_embedded_model(raw, relabelled, setup.tokenizer, args, kind=kind,
                                            trainable_layers=data_args.trainable_layers,
                                            max_length=data_args.max_length,
                                            description={"labels": "predictions of the task model",
                                                         "task_model": setup.description.get("fine_tuning", {})})
        return simulator
    if setup.name == "embedded":
        simulator = embedded_model(setup.tokenizer, seed=setup.args.seed, kind="tiny")
    else:
        torch.manual_seed(setup.args.seed)  # the new head's initialisation (unseeded, every run drew its own)
        simulator = AutoModelForSequenceClassification.from_pretrained(
            data_args.model_name_or_path, attn_implementation="eager", num_labels=num_labels,
            id2label=setup.model.config.id2label, label2id=setup.model.config.label2id, ignore_mismatched_sizes=True)
    if data_args.trainable_layers is not None:
        freeze_lower_layers(simulator, data_args.trainable_layers)
    check_launch_training(args)
    trainer = InfluenceTrainer(model=simulator, args=args, train_dataset=relabelled, processing_class=setup.tokenizer)
    trainer.train()
    return trainer.model.eval()
