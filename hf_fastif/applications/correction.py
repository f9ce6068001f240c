"""Error correction on HANS (FastIF §5.3): fix a model's mistakes with a few steps on its most helpful training points.

Per heuristic, ``num_steps`` times: sample ``num_anchors`` anchors from that heuristic's HANS validation rows,
compute one s_test for their mean loss (``combine="mean"``; kNN candidates of the anchors' mean feature),
and take one plain SGD step on the ``num_points`` most helpful candidates. The model carries over from step
to step. Baselines take the step on the most harmful candidates, on random candidates, or on the anchors
themselves. Every (strategy, replica) starts from a deep copy of the same model; accuracy is measured on
held-out HANS test rows before and after.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .. import distributed as D
from ..arguments import InfluenceArguments
from ..data import HANS_HEURISTICS
from ..influence import compute_influences
from ..loss import LossFn
from ..table import InfluenceTable
from .common import HansEvaluator, fmt, markdown_table, mean_std, pyplot, sgd_step, with_seed

logger = logging.get_logger(__name__)

STRATEGIES: tuple[str, ...] = ("helpful", "harmful", "random", "anchors")
"""``helpful``: the most negative influence; ``harmful``: the most positive; ``random``: uniform candidates;
``anchors``: the anchors themselves (with their gold labels)."""

PAPER_CORRECTION: dict = dict(num_steps=10, num_anchors=10, num_points=10, learning_rate=1e-4, replicas=3)
"""The paper's protocol (FASTIF.md, application 3)."""

EMBEDDED_LEARNING_RATE = 1e-2
"""SGD learning rate of the embedded default (see the README section "Applications (recipes)" for the sweep)."""


@dataclass
class CorrectionArguments:
    """Flags of the correction protocol (the defaults are the paper's, except where noted)."""

    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES), metadata={
        "help": f"Which rows each SGD step uses: any of {', '.join(STRATEGIES)}."})
    heuristics: list[str] | None = field(default=None, metadata={
        "help": "Heuristics to correct (default: lexical_overlap subsequence constituent)."})
    num_steps: int = field(default=10, metadata={"help": "SGD steps per run; the model carries over."})
    num_anchors: int = field(default=10, metadata={"help": "Anchors sampled from the validation split per step."})
    num_points: int = field(default=10, metadata={"help": "Rows in each SGD step."})
    learning_rate: float | None = field(default=None, metadata={
        "help": f"Plain SGD learning rate (paper 1e-4; default: 1e-4, or {EMBEDDED_LEARNING_RATE:g} for the "
                "embedded default, whose small model is trained with lr 1e-3)."})
    replicas: int = field(default=3, metadata={"help": "Independent replicas (seeds seed, seed+1, ...)."})
    eval_every_step: bool = field(default=True, metadata={"help": "Record test accuracy after every step."})

    def resolved_learning_rate(self, embedded: bool) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return EMBEDDED_LEARNING_RATE if embedded else PAPER_CORRECTION["learning_rate"]

    def protocol(self, embedded: bool) -> dict:
        """The settings `PAPER_CORRECTION` names, as used."""
        return dict(num_steps=self.num_steps, num_anchors=self.num_anchors, num_points=self.num_points,
                    learning_rate=self.resolved_learning_rate(embedded), replicas=self.replicas)


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

    def to_markdown(self) -> str:
        """Per heuristic: test accuracy before and after (mean ± std over replicas) for each strategy, then the
        test loss (mean cross-entropy), which moves even where accuracy cannot."""
        summary = self.summary()
        strategies = [s for s in STRATEGIES if any(s in v for v in summary.values())]
        replicas = max((v["replicas"] for s in summary.values() for v in s.values()), default=0)
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
        return "\n".join([
            f"### {self.title}",
            "",
            f"HANS test accuracy (%) per heuristic, before and after {self.settings.get('num_steps')} steps "
            f"(lr {self.settings.get('learning_rate'):g}); mean ± std over {runs}; Δ = after − before.",
            "",
            markdown_table(["heuristic", "before", *[f"{s} (Δ)" for s in strategies]], accuracy),
            "",
            f"HANS test loss (mean cross-entropy) per heuristic, before and after; mean ± std over {runs}.",
            "",
            markdown_table(["heuristic", "before", *strategies], loss),
        ])

    def plot(self):
        """Test accuracy (top) and loss (bottom) of each heuristic after every step, mean ± std over replicas."""
        plt = pyplot()
        heuristics = list(self.summary())
        columns = max(1, len(heuristics))
        fig, axes = plt.subplots(2, columns, figsize=(4.2 * columns, 6.4), squeeze=False, sharex=True)
        colors = {"helpful": "tab:blue", "harmful": "tab:red", "random": "tab:gray", "anchors": "tab:green"}
        for column, heuristic in enumerate(heuristics):
            for strategy in STRATEGIES:
                runs = [r for r in self.runs if r["heuristic"] == heuristic and r["strategy"] == strategy]
                if not runs or not runs[0]["accuracy_steps"]:
                    continue
                for row, (key, scale) in enumerate((("accuracy", 100.0), ("loss", 1.0))):
                    curves = scale * np.array([[r[f"{key}_before"], *r[f"{key}_steps"]] for r in runs])
                    x = np.arange(curves.shape[1])
                    mean, std = curves.mean(0), curves.std(0)
                    ax = axes[row][column]
                    ax.plot(x, mean, label=strategy, color=colors[strategy],
                            linestyle="--" if strategy in ("random", "anchors") else "-")
                    ax.fill_between(x, mean - std, mean + std, color=colors[strategy], alpha=0.15)
            axes[0][column].set_title(heuristic)
            axes[1][column].set_xlabel("step")
            for row in (0, 1):
                axes[row][column].grid(alpha=0.3)
        axes[0][0].set_ylabel("HANS test accuracy (%)")
        axes[1][0].set_ylabel("HANS test loss")
        axes[0][-1].legend(fontsize=8)
        fig.suptitle(f"{self.title} (lr {self.settings.get('learning_rate'):g})")
        fig.tight_layout()
        return fig


def run_correction(
    model: nn.Module,
    train_dataset: Dataset,
    hans_validation: Dataset,
    hans_test: Dataset,
    args: InfluenceArguments,
    *,
    strategies: Sequence[str] | str = STRATEGIES,
    heuristics: Sequence[str] | None = None,
    num_steps: int = 10,
    num_anchors: int = 10,
    num_points: int = 10,
    learning_rate: float = 1e-4,
    replicas: int = 3,
    seed: int = 0,
    candidate_dataset: Dataset | None = None,
    data_collator: Callable | None = None,
    loss_fn: LossFn | None = None,
    measurement_fn: LossFn | None = None,
    eval_every_step: bool = True,
    evaluator: HansEvaluator | None = None,
    progress: bool = True,
    title: str = "HANS error correction",
) -> CorrectionResult:
    """Run the correction protocol and return every run's accuracies and choices.

    Args:
        model: the trained model (not modified: each run steps a deep copy).
        train_dataset: tokenized training rows; H is the Hessian of their mean loss.
        hans_validation: tokenized HANS rows with ``labels`` and ``heuristic``; anchors are drawn from them.
        hans_test: held-out tokenized HANS rows with ``labels`` and ``heuristic``, for accuracy.
        args: the ``influence_*`` settings (k, solver, λ, which parameters take part and are stepped).
        strategies: any of `STRATEGIES`.
        heuristics: heuristics to correct (default: every heuristic of the validation split, HANS order).
        num_steps / num_anchors / num_points: steps per run, anchors per step, rows per SGD step.
        learning_rate: of the plain SGD step (the paper: 1e-4).
        replicas: independent repetitions (seeds ``seed``, ``seed + 1``, ...): anchors, random rows, LiSSA draws.
        candidate_dataset: rows to choose from (default: ``train_dataset``); an unseen pool for augmentation.
        data_collator: pads rows (e.g. ``DataCollatorWithPadding(tokenizer)``).
        loss_fn / measurement_fn: per-example training loss / anchor loss (see `compute_influences`).
        eval_every_step: also record the heuristic's test accuracy after every step (for the plot).
        evaluator: a `HansEvaluator` over ``hans_test`` to reuse (built if None).
    Returns:
        A `CorrectionResult`.
    """
    strategies = [strategies] if isinstance(strategies, str) else list(strategies)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"Unknown strategies {unknown}; use any of {', '.join(STRATEGIES)}.")
    for name, value in (("num_steps", num_steps), ("num_anchors", num_anchors), ("num_points", num_points),
                        ("replicas", replicas)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    if "heuristic" not in hans_validation.column_names:
        raise ValueError(f"hans_validation needs a 'heuristic' column (found {hans_validation.column_names}); "
                         "load it with hf_fastif.data.load_hans and split it with split_hans.")
    candidates = train_dataset if candidate_dataset is None else candidate_dataset
    validation_heuristics = np.asarray(hans_validation["heuristic"], dtype=object)
    present = set(validation_heuristics.tolist())
    if heuristics is None:
        heuristics = [h for h in HANS_HEURISTICS if h in present] + sorted(present - set(HANS_HEURISTICS))
    missing = [h for h in heuristics if h not in present]
    if missing:
        raise ValueError(f"Heuristics {missing} have no rows in hans_validation (it has {sorted(present)}).")
    for heuristic in heuristics:  # fail before any work if a heuristic is too small
        sample_anchors(validation_heuristics, heuristic, num_anchors, np.random.default_rng(0))
    evaluator = evaluator or HansEvaluator(hans_test, data_collator)
    before = evaluator(model)
    settings = {
        "strategies": strategies, "heuristics": list(heuristics), "num_steps": num_steps, "num_anchors": num_anchors,
        "num_points": num_points, "learning_rate": learning_rate, "replicas": replicas, "seed": seed,
        "num_train": len(train_dataset), "num_candidates": len(candidates),
        "candidates": "train" if candidate_dataset is None else "pool", "num_validation": len(hans_validation),
        "num_test": len(hans_test), "influence": args.influence_settings(),
    }
    result = CorrectionResult(settings=settings, before=before, title=title)
    total = len(heuristics) * replicas * len(strategies) * num_steps
    bar = tqdm(total=total, desc="correction", disable=not progress or not D.is_main_process())
    for h_index, heuristic in enumerate(heuristics):
        for replica in range(replicas):
            run_seed = seed + replica
            for strategy in strategies:
                start = time.perf_counter()
                run = _one_run(model, train_dataset, candidate_dataset, hans_validation, validation_heuristics,
                               evaluator, args, heuristic=heuristic, h_index=h_index, strategy=strategy,
                               seed=run_seed, num_steps=num_steps, num_anchors=num_anchors, num_points=num_points,
                               learning_rate=learning_rate, data_collator=data_collator, loss_fn=loss_fn,
                               measurement_fn=measurement_fn, eval_every_step=eval_every_step, bar=bar)
                run |= {"replica": replica, "accuracy_before": before[f"accuracy_{heuristic}"],
                        "loss_before": before[f"loss_{heuristic}"], "seconds": time.perf_counter() - start}
                result.runs.append(run)
                logger.info(f"{heuristic} / {strategy} / replica {replica}: {100 * run['accuracy_before']:.1f}% → "
                            f"{100 * run['accuracy_after']:.1f}%")
    bar.close()
    return result


def _one_run(model, train_dataset, candidate_dataset, hans_validation, validation_heuristics, evaluator, args, *,
             heuristic, h_index, strategy, seed, num_steps, num_anchors, num_points, learning_rate, data_collator,
             loss_fn, measurement_fn, eval_every_step, bar) -> dict:
    """One trajectory: a deep copy of ``model`` stepped ``num_steps`` times with one strategy."""
    candidates = train_dataset if candidate_dataset is None else candidate_dataset
    work = copy.deepcopy(model)
    # the same anchors (and random draws) for every strategy of a replica, so strategies are compared fairly
    anchor_rng = np.random.default_rng([seed, h_index, 0])
    random_rng = np.random.default_rng([seed, h_index, 1])
    steps, curve = [], []
    for step in range(num_steps):
        anchor_ids = sample_anchors(validation_heuristics, heuristic, num_anchors, anchor_rng)
        anchors = hans_validation.select(anchor_ids)
        table = None
        if strategy in ("helpful", "harmful"):
            step_args = with_seed(args, int(np.random.SeedSequence([args.influence_seed, seed, h_index, step])
                                            .generate_state(1)[0] % (2**31 - 1)))
            table = compute_influences(work, train_dataset, anchors, step_args, combine="mean",
                                       data_collator=data_collator, candidate_dataset=candidate_dataset,
                                       loss_fn=loss_fn, measurement_fn=measurement_fn)
        ids, influence = select_points(table, strategy, num_points, random_rng, len(candidates), anchor_ids)
        rows = anchors if strategy == "anchors" else candidates.select(ids)
        loss = sgd_step(work, rows, learning_rate, args, data_collator=data_collator, loss_fn=loss_fn,
                        measurement_fn=measurement_fn, measurement=strategy == "anchors")
        label_column = "labels" if "labels" in rows.column_names else "label"
        record = {"step": step, "anchors": anchor_ids.tolist(), "selected": ids.tolist(),
                  "selected_labels": [int(x) for x in rows[label_column]] if label_column in rows.column_names else None,
                  "loss_before_step": loss}
        if influence is not None:
            record["influence"] = influence.tolist()
        steps.append(record)
        if eval_every_step:
            curve.append(evaluator(work, heuristic))
        bar.update(1)
    after = evaluator(work)
    return {"heuristic": heuristic, "strategy": strategy, "seed": seed,
            "accuracy_after": after[f"accuracy_{heuristic}"], "loss_after": after[f"loss_{heuristic}"],
            "accuracy_steps": [c[f"accuracy_{heuristic}"] for c in curve],
            "loss_steps": [c[f"loss_{heuristic}"] for c in curve], "after": after, "steps": steps}
