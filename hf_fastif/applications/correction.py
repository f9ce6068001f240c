"""Error correction on HANS (FastIF §5.3): fix a model's mistakes with a few steps on its most helpful training points.

Per heuristic, ``num_steps`` times: sample ``num_anchors`` anchors from that heuristic's HANS validation rows,
compute one s_test for their mean loss (``combine="mean"``; kNN candidates of the anchors' mean feature),
and take one plain SGD step on the ``num_points`` most helpful candidates. The model carries over from step
to step. Baselines take the step on the most harmful candidates, on random candidates, or on the anchors
themselves. Every (strategy, replica) starts from the same weights; accuracy is measured on held-out HANS
test rows before, after every step and after. The steps move the model away from the curvature the influence
settings were chosen for: a step whose influence LiSSA refuses is run again at a larger scale (`step_influence`).

All runs step one working copy of the model, whose weights are restored before each run, through one
`InfluenceEngine`: the steps change only the influence parameters, so the frozen trunk's states of the training,
candidate and test rows are computed once for the whole protocol, and evaluation runs only the top.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
from datasets import Dataset
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .. import distributed as D
from ..arguments import InfluenceArguments
from ..engine import InfluenceEngine
from ..loss import LossFn
from ..solvers.lissa import LissaDivergenceError
from ..table import InfluenceTable
from ..utils import markdown_table
from .common import (
    ApplicationData,
    HansEvaluator,
    check_heuristics,
    check_num_labels,
    fmt,
    heuristic_seed,
    heuristics_in,
    keep_finished,
    mean_std,
    refuse_few_candidates,
    refuse_shared_rows,
    sgd_step,
    two_label_loss,
    with_seed,
)

logger = logging.get_logger(__name__)

INFLUENCE_RETRIES = 2
"""How many times a step's influence is run again after LiSSA refused it, each time with the scale (so λ = damping ×
scale) `RETRY_FACTOR` times larger. The correction's steps move the model, and after a few of them its curvature can
leave what the settings were chosen for: on the MiniLM default, four steps into a helpful run the batch Hessians
reached ~27 against the initial model's ~2.3 and the mean Hessian's smallest eigenvalue -3.7 against λ = 3, and
LiSSA's estimate came back pointing away from the anchors' gradient (cos -0.80; the influence negated, so the "most
helpful" rows would have been the most harmful)."""

RETRY_FACTOR = 4.0
"""The factor on influence_scale per retry: λ rises with it while damping, J and so the cost and the convergence
J·damp stay as they were (at the state above, λ 3 → 12 clears -3.7 and 2·scale 24 → 96 clears ~27)."""

STRATEGIES: tuple[str, ...] = ("helpful", "harmful", "random", "anchors")
"""``helpful``: the most negative influence; ``harmful``: the most positive; ``random``: uniform candidates;
``anchors``: the anchors themselves (with their gold labels)."""


@dataclass
class CorrectionArguments:
    """The correction protocol, passed whole to `run_correction` (and `run_augmentation`). The defaults are the
    paper's (FASTIF.md, application 3); the embedded default changes the learning rate (hf_fastif.embedded)."""

    PAPER: ClassVar[dict] = dict(num_steps=10, num_anchors=10, num_points=10, correction_learning_rate=1e-4,
                                 replicas=3)
    """The paper's protocol, for the table of settings that differ from it."""
    QUICK: ClassVar[dict] = dict(num_steps=2, replicas=1)
    """``--quick``: a smoke run (not a measurement)."""

    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES), metadata={
        "help": f"Which rows each SGD step uses: any of {', '.join(STRATEGIES)}."})
    heuristics: list[str] | None = field(default=None, metadata={
        "help": "Heuristics to correct (default: every heuristic of the HANS validation split). HANS' names in any "
                "case; a near miss (lexical, subseq) is refused, a name unlike HANS' kept for one's own data."})
    num_steps: int = field(default=10, metadata={"help": "SGD steps per run; the model carries over."})
    num_anchors: int = field(default=10, metadata={"help": "Anchors sampled from the validation split per step."})
    num_points: int = field(default=10, metadata={"help": "Rows in each SGD step."})
    correction_learning_rate: float = field(default=1e-4, metadata={
        "help": "Learning rate of the plain SGD step on the selected rows (paper 1e-4; embedded default 1e-2)."})
    replicas: int = field(default=3, metadata={"help": "Independent replicas (seeds seed, seed+1, ...)."})
    eval_every_step: bool = field(default=True, metadata={"help": "Record test accuracy after every step."})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` naming the fix for a bad setting (also called by `run_correction`, since
        fields can change after construction)."""
        if isinstance(self.strategies, str):
            self.strategies = [self.strategies]
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(f"Unknown strategies {unknown}; use any of {', '.join(STRATEGIES)}.")
        if len(set(self.strategies)) < len(self.strategies):  # a repeat ran twice and counted as more replicas
            once = list(dict.fromkeys(self.strategies))
            logger.warning(f"strategies (--strategies) names "
                           f"{sorted({s for s in self.strategies if self.strategies.count(s) > 1})} more than once; "
                           f"each strategy runs once per replica (--replicas sets how many): {once}.")
            self.strategies = once
        for name in ("num_steps", "num_anchors", "num_points", "replicas"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if not (math.isfinite(self.correction_learning_rate) and self.correction_learning_rate > 0):
            raise ValueError(f"correction_learning_rate must be a finite number > 0, got {self.correction_learning_rate}.")
        # at parse time, before any training: HANS' spelling, "did you mean" for a near miss, no repeats, not empty
        self.heuristics = check_heuristics(self.heuristics)

    def used(self) -> dict:
        """The settings `PAPER` names, as used."""
        return {k: getattr(self, k) for k in self.PAPER}


def select_points(table: InfluenceTable | None, strategy: str, n: int, rng: np.random.Generator,
                  num_candidates: int, anchor_ids: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows to step on: ``(ids, influence)`` (influence is None for random / anchors).

    ``helpful`` takes the n lowest influences of ``table`` (test_id 0), ``harmful`` the n highest, ``random``
    n distinct rows of the ``num_candidates`` candidates, ``anchors`` the anchor ids. Every strategy steps on
    n rows, as in the paper's protocol, so ``helpful`` / ``harmful`` take the n extremes whatever their sign
    (`InfluenceTable.lowest` / `highest`): when fewer than n candidates are helpful, the selection goes on
    with the least harmful ones (the returned influence shows their sign).
    """
    if strategy in ("helpful", "harmful"):
        if table is None:
            raise ValueError(f"strategy {strategy!r} needs an influence table.")
        frame = table.lowest(0, n) if strategy == "helpful" else table.highest(0, n)
        return frame["train_id"].to_numpy(np.int64), frame["influence"].to_numpy(np.float64)
    if strategy == "random":
        return np.sort(rng.choice(num_candidates, size=min(n, num_candidates), replace=False)).astype(np.int64), None
    if strategy == "anchors":
        return np.asarray(anchor_ids, dtype=np.int64), None
    raise ValueError(f"Unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")


def sample_anchors(heuristics: np.ndarray, heuristic: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct validation rows of ``heuristic`` (row indices into the validation split)."""
    rows = np.flatnonzero(heuristics == heuristic)
    if len(rows) < n:
        raise ValueError(f"The HANS validation split has {len(rows)} rows of heuristic {heuristic!r}, fewer than "
                         f"num_anchors={n}; lower num_anchors or give more validation rows.")
    return np.sort(rng.choice(rows, size=n, replace=False)).astype(np.int64)


@dataclass
class CorrectionResult:
    """Runs of the correction protocol: one per (heuristic, strategy, replica).

    ``runs[i]`` holds ``heuristic``, ``strategy``, ``replica``, ``seed``, ``accuracy_before`` / ``accuracy_after``
    (on the heuristic's test rows), ``accuracy_steps`` (after every step), ``after`` (the metric's full result
    on every test row), and ``steps`` (anchors, selected rows, their influence and labels, the step's loss).
    """

    settings: dict
    before: dict
    runs: list[dict] = field(default_factory=list)
    title: str = "HANS error correction"

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{heuristic: {strategy: {before, after_mean, after_std, delta_mean, delta_std, replicas}}}``."""
        out: dict = {}
        for run in self.runs:
            out.setdefault(run["heuristic"], {}).setdefault(run["strategy"], []).append(run)
        summary: dict = {}
        for heuristic, strategies in out.items():
            for strategy, runs in strategies.items():
                after = mean_std([r["accuracy_after"] for r in runs])
                delta = mean_std([r["accuracy_after"] - r["accuracy_before"] for r in runs])
                loss = mean_std([r["loss_after"] for r in runs])
                summary.setdefault(heuristic, {})[strategy] = {
                    "before": runs[0]["accuracy_before"], "after_mean": after[0], "after_std": after[1],
                    "delta_mean": delta[0], "delta_std": delta[1], "loss_before": runs[0]["loss_before"],
                    "loss_after_mean": loss[0], "loss_after_std": loss[1], "replicas": len(runs),
                }
        return summary

    def to_dict(self) -> dict:
        return {"title": self.title, "settings": self.settings, "before": self.before, "summary": self.summary(),
                "runs": self.runs}

    def signed_rows(self) -> dict[str, tuple[int, int]]:
        """``{strategy: (rows of its sign, rows)}`` over every step of the helpful (influence < 0) and harmful
        (influence > 0) runs: with few or one-signed candidates the extremes hold rows of the other sign (k 15: every
        "helpful" row of a step was harmful), which the report did not say."""
        out = {}
        for strategy, sign in (("helpful", -1.0), ("harmful", 1.0)):
            values = [v for r in self.runs if r["strategy"] == strategy for step in r.get("steps", [])
                      for v in step.get("influence") or []]
            if values:
                out[strategy] = (int(sum(np.sign(v) == sign for v in values)), len(values))
        return out

    def sign_line(self) -> str:
        """The report's line on `signed_rows` ("" without helpful / harmful runs)."""
        signed = self.signed_rows()
        if not signed:
            return ""
        counts = ", ".join(f"{s} (influence {'<' if s == 'helpful' else '>'} 0) {n}/{total}"
                           for s, (n, total) in signed.items())
        mixed = any(n < total for n, total in signed.values())
        return (f"Rows of the strategy's sign, over every step: {counts}"
                + ("; the extremes include rows of the other sign (few or one-signed candidates: raise "
                   "influence_knn_k)." if mixed else "."))

    def _influence_steps(self) -> tuple[list[dict], list[dict]]:
        """``(records of the steps with influence, those of them run again with a larger scale)``."""
        steps = [step for r in self.runs if r["strategy"] in ("helpful", "harmful") for step in r.get("steps", [])]
        return steps, [step for step in steps if step.get("influence_retries")]

    def retried_steps(self) -> tuple[int, int]:
        """``(steps whose influence was run again with a larger scale, steps with influence)`` (`step_influence`)."""
        steps, retried = self._influence_steps()
        return len(retried), len(steps)

    def retry_line(self) -> str:
        """The report's line on `retried_steps` ("" where none was)."""
        steps, retried = self._influence_steps()
        if not retried:
            return ""
        lambdas = sorted({step["influence_lambda"] for step in retried})
        return (f"Influence run again with a larger scale at {len(retried)} of {len(steps)} steps (LiSSA refused it "
                f"at the stepped model's curvature; λ {', '.join(f'{x:.3g}' for x in lambdas)} there, damping and J kept; "
                "each step's record says which).")

    def to_markdown(self) -> str:
        """Per heuristic: test accuracy before and after (mean ± std over replicas) for each strategy, then the
        test loss (mean cross-entropy), which moves even where accuracy cannot."""
        summary = self.summary()
        strategies = [s for s in STRATEGIES if any(s in v for v in summary.values())]
        counts = {v["replicas"] for s in summary.values() for v in s.values()} or {0}
        replicas = max(counts)
        accuracy, loss = [], []
        for heuristic, by_strategy in summary.items():
            first = next(iter(by_strategy.values()))
            acc_cells, loss_cells = [], []
            for s in strategies:
                v = by_strategy.get(s)
                acc_cells.append("" if v is None else f"{fmt(v['after_mean'], v['after_std'])} "
                                 f"({fmt(v['delta_mean'], v['delta_std'], signed=True)})")
                loss_cells.append("" if v is None else f"{v['loss_after_mean']:.3f} ± {v['loss_after_std']:.3f}")
            accuracy.append([heuristic, f"{100 * first['before']:.1f}", *acc_cells])
            loss.append([heuristic, f"{first['loss_before']:.3f}", *loss_cells])
        runs = f"{replicas} replica{'s' if replicas != 1 else ''}"
        if len(counts) > 1:  # (a run stopped part-way: a cell of 1 replica read "± 0.0" as no spread)
            runs = f"{min(counts)} to {replicas} replicas, by cell (the JSON summary's replicas gives each cell's)"
        return "\n".join([
            f"### {self.title}",
            "",
            f"HANS test accuracy (%) per heuristic, before and after {self.settings.get('num_steps')} steps "
            f"(lr {self.settings.get('correction_learning_rate'):g}); mean ± std (population) over {runs}; Δ = after − before.",
            "",
            markdown_table(["heuristic", "before", *[f"{s} (Δ)" for s in strategies]], accuracy),
            "",
            f"HANS test loss (mean cross-entropy) per heuristic, before and after; mean ± std (population) over {runs}.",
            "",
            markdown_table(["heuristic", "before", *strategies], loss),
            *(part for line in (self.sign_line(), self.retry_line()) if line for part in ("", line)),
        ])

    def plot(self) -> Figure:
        """Test accuracy (top) and loss (bottom) of each heuristic after every step, mean ± std over replicas
        (recorded without ``eval_every_step``: before and after only, joined by a dotted line)."""
        heuristics = list(self.summary())
        columns = max(1, len(heuristics))
        fig = Figure(figsize=(4.2 * columns, 6.4))
        axes = fig.subplots(2, columns, squeeze=False, sharex=True)
        colors = {"helpful": "tab:blue", "harmful": "tab:red", "random": "tab:gray", "anchors": "tab:green"}
        for column, heuristic in enumerate(heuristics):
            for strategy in STRATEGIES:
                runs = [r for r in self.runs if r["heuristic"] == heuristic and r["strategy"] == strategy]
                if not runs:
                    continue
                every_step = bool(runs[0]["accuracy_steps"])
                for row, (key, scale) in enumerate((("accuracy", 100.0), ("loss", 1.0))):
                    curves = scale * np.array([[r[f"{key}_before"], *(r[f"{key}_steps"] if every_step
                                                                        else [r[f"{key}_after"]])] for r in runs])
                    x = np.arange(curves.shape[1]) if every_step else np.array([0, self.settings.get("num_steps", 1)])
                    mean, std = curves.mean(0), curves.std(0)
                    ax = axes[row][column]
                    ax.plot(x, mean, label=strategy, color=colors[strategy], marker=None if every_step else "o",
                            linestyle=(":" if not every_step else "--" if strategy in ("random", "anchors") else "-"))
                    ax.fill_between(x, mean - std, mean + std, color=colors[strategy], alpha=0.15)
            axes[0][column].set_title(heuristic)
            axes[1][column].set_xlabel("step")
            axes[1][column].xaxis.set_major_locator(MaxNLocator(integer=True))  # (steps: no 0.5 ticks)
            for row in (0, 1):
                axes[row][column].grid(alpha=0.3)
        axes[0][0].set_ylabel("HANS test accuracy (%)")
        axes[1][0].set_ylabel("HANS test loss")
        axes[0][-1].legend(fontsize=8)
        fig.suptitle(f"{self.title} (lr {self.settings.get('correction_learning_rate'):g})")
        fig.tight_layout()
        return fig


def refuse_test_rows(data: ApplicationData) -> None:
    """Refuse anchors, training rows or candidates that are also HANS test rows (compared by token ids, else by
    whitespace-normalised premise and hypothesis): stepping on them would train on the rows accuracy is measured on.
    Where a pair of splits cannot be compared, a warning says so."""
    test = "data.hans_test"
    refuse_shared_rows(data.hans_validation, "data.hans_validation", data.hans_test, test,
                       why="the anchors would be the very rows the correction is judged on",
                       fix="Split HANS with hf_fastif.data.split_hans (disjoint, and identical pairs kept on one "
                           "side), or drop those rows from one split.")
    for name in ("train", "candidates"):
        rows = getattr(data, name)
        if rows is not None:
            refuse_shared_rows(rows, f"data.{name}", data.hans_test, test,
                               why="a step on them trains on the test, and accuracy gains would be fake",
                               fix=f"Drop the HANS test rows from data.{name}, or hold out other HANS rows as the "
                                   "test split.")


def check_correction(data: ApplicationData, args: InfluenceArguments, protocol: CorrectionArguments) -> list[str]:
    """The heuristics `run_correction` will correct, after checking its settings against the data (also run by the
    recipes before any training): the protocol's fields, the HANS splits given, enough candidates for distinct
    helpful / harmful rows, anchors and test rows for every heuristic, no test row among the rows stepped on."""
    protocol.validate()
    data.require("hans_validation", "hans_test", what="Correction")
    candidates = data.train if data.candidates is None else data.candidates
    if {"helpful", "harmful"} & set(protocol.strategies):
        refuse_few_candidates(len(candidates), args.influence_knn_k, protocol.num_points, "Each step")
    heuristics = heuristics_in(  # each with anchors and with test rows, before any work
        {"data.hans_validation": data.hans_validation["heuristic"], "data.hans_test": data.hans_test["heuristic"]},
        protocol.heuristics, "Correction", "Every heuristic corrected needs rows in both hans_validation (anchors) "
        "and hans_test (accuracy): name others with heuristics=, or split HANS with split_hans (stratified by "
        "subcase).")
    validation_heuristics = np.asarray(data.hans_validation["heuristic"], dtype=object)
    for heuristic in heuristics:  # fail before any work if a heuristic is too small
        sample_anchors(validation_heuristics, heuristic, protocol.num_anchors, np.random.default_rng(0))
    refuse_test_rows(data)
    return heuristics


def run_correction(model: nn.Module, data: ApplicationData, args: InfluenceArguments, protocol: CorrectionArguments,
                   *, loss_fn: LossFn | None = None, measurement_fn: LossFn | None = None,
                   progress: bool = True, title: str = "HANS error correction") -> CorrectionResult:
    """Run the correction protocol and return every run's accuracies and choices.

    Args:
        model: the trained model, with 2 labels or 3 in NLI order (a 3-label model's anchor loss defaults to
            `two_label_loss`, since HANS has 2 labels). It is not modified: the runs step one deep copy, restored to
            the model's weights before each run, with one `InfluenceEngine` for that copy over the whole protocol,
            so the trunk states it caches serve every step, run and evaluation.
        data: ``train`` (H is the Hessian of their mean loss), ``hans_validation`` (anchors are drawn from it),
            ``hans_test`` (held out, for accuracy), ``candidates`` (the rows to choose from; default ``train``)
            and ``collator``. Validation, training or candidate rows that are also test rows (the same token ids,
            else the same whitespace-normalised premise and hypothesis) are refused before any work, as is a
            heuristic without rows in both HANS splits.
        args: the ``influence_*`` settings (k, solver, λ, which parameters take part and are stepped); ``seed``
            seeds replica 0 (replica r: seed + r): its anchors, random rows and LiSSA draws.
        protocol: strategies, heuristics (default: every heuristic of ``hans_validation``, HANS order), steps per
            run, anchors per step, rows per step, the SGD learning rate, replicas.
        loss_fn / measurement_fn: per-example training loss / anchor loss (see `compute_influences`).
        title: the report's title.
    Returns:
        A `CorrectionResult`. An error in a run leaves the protocol with the runs finished before it attached to the
        error (`keep_finished`), which `finished_runs_kept` writes.
    """
    if check_num_labels(model, (2, 3), "HANS correction") == 3 and measurement_fn is None:
        logger.info("A 3-label model: the anchors' loss is two_label_loss (p(non_entailment) = p(neutral) + "
                    "p(contradiction)), since HANS rows have 2 labels.")
        measurement_fn = two_label_loss
    heuristics = check_correction(data, args, protocol)
    candidates = data.train if data.candidates is None else data.candidates
    validation_heuristics = np.asarray(data.hans_validation["heuristic"], dtype=object)
    evaluator = HansEvaluator(data.hans_test, data.collator)
    work = copy.deepcopy(model)
    initial = {name: tensor.detach().clone() for name, tensor in work.state_dict().items()}
    engine = InfluenceEngine(work, args, data_collator=data.collator, loss_fn=loss_fn, measurement_fn=measurement_fn)
    settings = {
        "strategies": list(protocol.strategies), "heuristics": list(heuristics), "num_steps": protocol.num_steps,
        "num_anchors": protocol.num_anchors, "num_points": protocol.num_points,
        "correction_learning_rate": protocol.correction_learning_rate, "replicas": protocol.replicas,
        "seed": args.seed, "num_train": len(data.train), "num_candidates": len(candidates),
        "candidates": "train" if data.candidates is None else "pool", "num_validation": len(data.hans_validation),
        "num_test": len(data.hans_test), "influence": args.influence_settings(),
    }
    total = len(heuristics) * protocol.replicas * len(protocol.strategies) * protocol.num_steps
    bar = tqdm(total=total, desc="correction", disable=not progress or not D.is_main_process())
    with engine:
        before = evaluator(work, engine=engine)
        result = CorrectionResult(settings=settings, before=before, title=title)
        corrector = _Corrector(data, args, protocol, evaluator, validation_heuristics, (loss_fn, measurement_fn), bar,
                               engine, initial)
        runs = [(h, r, s) for h in heuristics for r in range(protocol.replicas) for s in protocol.strategies]
        for heuristic, replica, strategy in runs:
            start = time.perf_counter()
            try:
                run = corrector.run(heuristic, heuristic_seed(heuristic), strategy, args.seed + replica)
            except BaseException as err:  # (an interrupt too: Ctrl-C is how a long run is mostly stopped)
                keep_finished(err, result, f"{heuristic} / {strategy} / replica {replica}", len(result.runs), len(runs))
                raise
            run |= {"replica": replica, "accuracy_before": before[f"accuracy_{heuristic}"],
                    "loss_before": before[f"loss_{heuristic}"], "seconds": time.perf_counter() - start}
            result.runs.append(run)
            logger.info(f"{heuristic} / {strategy} / replica {replica}: {100 * run['accuracy_before']:.1f}% → "
                        f"{100 * run['accuracy_after']:.1f}%")
    bar.close()
    if any(n < total for n, total in result.signed_rows().values()):
        logger.warning(result.sign_line())
    if retried := result.retry_line():
        logger.warning(retried)
    return result


@dataclass
class _Corrector:
    """What every run of one `run_correction` call shares: the working copy's engine and its initial weights; `run`
    is one trajectory."""

    data: ApplicationData
    args: InfluenceArguments
    protocol: CorrectionArguments
    evaluator: HansEvaluator
    validation_heuristics: np.ndarray
    loss_fns: tuple[LossFn | None, LossFn | None]
    bar: tqdm
    engine: InfluenceEngine
    initial: dict

    def run(self, heuristic: str, h_index: int, strategy: str, seed: int) -> dict:
        """The working copy, restored to the initial weights, stepped ``num_steps`` times with one strategy."""
        data, protocol, engine = self.data, self.protocol, self.engine
        work = engine.model
        candidates = data.train if data.candidates is None else data.candidates
        loss_fn, measurement_fn = self.loss_fns
        work.load_state_dict(self.initial)
        # LiSSA draws differ between replicas and heuristics, and are the same for helpful and harmful
        run_seed = int(np.random.SeedSequence([self.args.influence_seed, seed, h_index]).generate_state(1)[0]
                       % (2**31 - 1))
        engine.args = with_seed(self.args, run_seed)
        # the same anchors (and random draws) for every strategy of a replica, so strategies are compared fairly
        anchor_rng = np.random.default_rng([seed, h_index, 0])
        random_rng = np.random.default_rng([seed, h_index, 1])
        steps, curve = [], []
        for step in range(protocol.num_steps):
            anchor_ids = sample_anchors(self.validation_heuristics, heuristic, protocol.num_anchors, anchor_rng)
            anchors = data.hans_validation.select(anchor_ids)
            table, retried = None, {}
            if strategy in ("helpful", "harmful"):
                table, retried = step_influence(engine, data.train, anchors, data.candidates,
                                                f"step {step} of {strategy} / {heuristic}")
            ids, influence = select_points(table, strategy, protocol.num_points, random_rng, len(candidates),
                                           anchor_ids)
            if table is not None and len(ids) < protocol.num_points:  # an approximate index returned fewer than k
                logger.warning(f"Step {step} of {strategy} / {heuristic}: {len(ids)} scored candidates, fewer than "
                               f"num_points={protocol.num_points}; it steps on those (an approximate "
                               "influence_knn_index can return fewer than k rows).")
            rows = anchors if strategy == "anchors" else candidates.select(ids)
            loss = sgd_step(work, rows, protocol.correction_learning_rate, self.args, data_collator=data.collator,
                            loss_fn=loss_fn, measurement_fn=measurement_fn, measurement=strategy == "anchors")
            steps.append(_step_record(step, anchor_ids, ids, influence, rows, loss,
                                      "hans_validation" if strategy == "anchors" else "candidates") | retried)
            if protocol.eval_every_step:
                curve.append(self.evaluator(work, heuristic, engine=engine))
            self.bar.update(1)
        after = self.evaluator(work, engine=engine)
        return {"heuristic": heuristic, "strategy": strategy, "seed": seed,
                "accuracy_after": after[f"accuracy_{heuristic}"], "loss_after": after[f"loss_{heuristic}"],
                "accuracy_steps": [c[f"accuracy_{heuristic}"] for c in curve],
                "loss_steps": [c[f"loss_{heuristic}"] for c in curve], "after": after, "steps": steps}


def step_influence(engine: InfluenceEngine, train: Dataset, anchors: Dataset, candidates: Dataset | None,
                   where: str) -> tuple[InfluenceTable, dict]:
    """The anchors' mean influence on the candidates at this step's weights, run again up to `INFLUENCE_RETRIES`
    times with the scale (and λ) `RETRY_FACTOR` times larger where LiSSA refuses it (its convergence check, its
    growth rules or its alignment check). Returns the table and, for a retried step, what the step record keeps:
    ``influence_retries`` and the ``influence_lambda`` used. The engine's settings are restored either way."""
    base, attempt = engine.args, 0
    try:
        while True:
            try:
                table = engine.compute_influences(train, anchors, combine="mean", candidate_dataset=candidates)
                break
            except LissaDivergenceError as err:
                if attempt == INFLUENCE_RETRIES:
                    raise LissaDivergenceError(
                        f"{where}: LiSSA refused the influence {attempt + 1} times, the last with influence_scale="
                        f"{engine.args.influence_scale:g} ({RETRY_FACTOR:g}x per retry, damping kept): {err} The "
                        "correction's steps moved the model far from the curvature the settings were chosen for: "
                        "lower correction_learning_rate, or start from a larger influence_scale and "
                        "influence_damping.") from err
                attempt += 1
                scale = engine.args.influence_scale * RETRY_FACTOR
                logger.info(f"{where}: LiSSA refused the influence ({str(err).split('. ')[0]}); running it again "
                            f"with influence_scale={scale:g} (λ = {scale * engine.args.influence_damping:.4g}, "
                            "damping and J kept).")
                engine.args = replace(engine.args, influence_scale=scale)
        used = engine.args.influence_scale * engine.args.influence_damping
    finally:
        engine.args = base
    return table, ({} if attempt == 0 else {"influence_retries": attempt, "influence_lambda": used})


def _step_record(step: int, anchor_ids: np.ndarray, ids: np.ndarray, influence: np.ndarray | None, rows: Dataset,
                 loss: float, selected_from: str) -> dict:
    """What one step chose, for the result file: anchors, selected rows (``selected_from``: ``"candidates"``, rows
    of the training data or the pool, or ``"hans_validation"``, the anchors themselves), their labels and influence,
    the loss."""
    label_column = "labels" if "labels" in rows.column_names else "label"
    record = {"step": step, "anchors": anchor_ids.tolist(), "selected": ids.tolist(), "selected_from": selected_from,
              "selected_labels": [int(x) for x in rows[label_column]] if label_column in rows.column_names else None,
              "loss_before_step": loss}
    if influence is not None:
        record["influence"] = influence.tolist()
    return record
