"""Data augmentation with unseen data (FastIF §5.4): the correction loop, but the rows come from a pool the model
never saw (the HANS train set: +2.8% in the paper; the ANLI train set for a 3-label MNLI model: +1.7%).

The Hessian is still that of the training loss; only the candidates (kNN index and scoring) are the pool's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from torch import nn
from transformers.utils import logging

from ..arguments import InfluenceArguments
from ..data import load_anli, load_hans, tokenize_nli
from ..data.loaders import local_columns
from ..parsing import check_positive_counts
from ..utils import quiet_datasets
from .common import ApplicationData, check_num_labels, refuse_shared_rows, shared_rows, two_label_loss
from .correction import CorrectionArguments, CorrectionResult, check_correction, run_correction
from .prepare import Setup

logger = logging.get_logger(__name__)

POOL_FORMATS = ("auto", "hans", "nli")


@dataclass
class PoolArguments:
    """Where the unseen candidates come from."""

    pool: str = field(default="generated", metadata={
        "help": "'generated' (the generated HANS-style pool, disjoint from the evaluation split), or a file / Hub id: "
                "HANS train (heuristics_train_set.txt, or 'hans' with --pool_split train), ANLI (facebook/anli)."})
    pool_format: str = field(default="auto", metadata={
        "help": "hans (HANS columns) or nli (MNLI/ANLI columns); auto: hans if the name or the file's header says so."})
    pool_split: str | None = field(default=None, metadata={
        "help": "Hub split of --pool (default: train for HANS, train_r1 for ANLI)."})
    max_pool_samples: int | None = field(default=None, metadata={"help": "Use a seeded subset of the pool."})

    def __post_init__(self):
        check_positive_counts(self, "max_pool_samples")  # (-5 dropped 5 rows, 0 failed late)
        if self.pool_format not in POOL_FORMATS:
            raise ValueError(f"--pool_format must be one of {', '.join(POOL_FORMATS)}, got {self.pool_format!r}.")


def pool_format(name_or_path: str, declared: str = "auto") -> str:
    """``hans`` or ``nli``: declared, or guessed from a local file's columns (a ``heuristic`` column: HANS; a text
    file's header, a jsonl / json file's first record, a parquet file's schema) or a Hub id's name."""
    if declared != "auto":
        return declared
    path = Path(name_or_path).expanduser()
    columns = local_columns(path)
    if columns is not None:
        return "hans" if "heuristic" in columns else "nli"
    return "hans" if "hans" in path.name.lower() else "nli"


def load_pool(pool_args: PoolArguments, num_labels: int) -> Dataset | None:
    """The raw pool file / Hub dataset (None for the generated pool, which `prepare` makes), loaded and checked
    before any training; a `ValueError` naming the fix for a pool the model cannot use."""
    if pool_args.pool == "generated":
        return None
    kind = pool_format(pool_args.pool, pool_args.pool_format)
    if kind == "hans":
        if num_labels != 2:
            raise ValueError(f"A HANS pool has 2 labels (entailment / non_entailment) and cannot train a {num_labels}"
                             "-label model; use a 2-label (MNLI-2) model, or an NLI pool such as ANLI.")
        return load_hans(pool_args.pool, split=pool_args.pool_split or "train")
    return load_anli(pool_args.pool, split=pool_args.pool_split or "train_r1", num_labels=num_labels)


def pool_dataset(pool_args: PoolArguments, raw_pool: Dataset | None, setup: Setup) -> tuple[Dataset, str]:
    """The tokenized pool and a name for it (subsampled to ``max_pool_samples``, seeded; the subset keeps each row's
    place in the whole pool as its ``pool_row`` column: the protocol's ids are positions in the subset)."""
    if raw_pool is None:
        if setup.pool is None:
            raise ValueError("--pool generated needs the generated data (the embedded default, or unset "
                             "--train_dataset); pass a pool file or Hub id, e.g. --pool heuristics_train_set.txt.")
        pool, name = setup.pool, "generated HANS-style pool"
    else:
        pool = tokenize_nli(raw_pool, setup.tokenizer, max_length=setup.data_args.max_length)
        name = f"pool {pool_args.pool}"
    n = pool_args.max_pool_samples
    if n is not None and n < len(pool):
        rows = np.sort(np.random.default_rng(setup.args.seed).permutation(len(pool))[:n])
        with quiet_datasets():  # (add_column flattens the selection's indices, with a progress bar of its own)
            pool = pool.select(rows).add_column("pool_row", rows.tolist())
    return pool, name


def run_augmentation(model: nn.Module, data: ApplicationData, args: InfluenceArguments,
                     protocol: CorrectionArguments, *, pool_name: str = "unseen pool",
                     progress: bool = True) -> CorrectionResult:
    """`run_correction` whose helpful / harmful / random rows come from the pool ``data.candidates``.

    A 3-label model (the paper's ANLI experiment) is corrected on 2-label HANS anchors through
    `two_label_loss` (p(non_entailment) = p(neutral) + p(contradiction)); the pool keeps its 3 labels.
    """
    if data.candidates is None:
        raise ValueError("Augmentation needs the unseen pool as data.candidates (e.g. "
                         "dataclasses.replace(data, candidates=pool)).")
    num_labels = check_num_labels(model, (2, 3), "Data augmentation")
    _refuse_held_out_pairs(data)
    return run_correction(model, data, args, protocol, measurement_fn=two_label_loss if num_labels == 3 else None,
                          progress=progress, title=f"Data augmentation from the {pool_name}")


def check_augmentation(data: ApplicationData, args: InfluenceArguments, protocol: CorrectionArguments) -> None:
    """`check_correction` for a pool as ``data.candidates``, and no pool row among the HANS rows the protocol anchors
    on or evaluates with (the recipe runs this before any training)."""
    _refuse_held_out_pairs(data)
    check_correction(data, args, protocol)


def _refuse_held_out_pairs(data: ApplicationData) -> None:
    """Refuse a pool that holds rows of the HANS splits the protocol anchors on or evaluates with (the same token
    ids, else the same whitespace-normalised premise and hypothesis): stepping on them would train on the test (e.g.
    the evaluation set passed as both --hans_file and --pool). A pool that cannot be compared with them is refused
    too; pool rows that are also training rows only draw a warning (the pool is then not unseen)."""
    for name in ("hans_validation", "hans_test"):
        if getattr(data, name) is not None:
            refuse_shared_rows(data.candidates, "The pool (data.candidates)", getattr(data, name), f"data.{name}",
                               why="augmenting with them would train on the rows the protocol anchors on or "
                                   "evaluates",
                               fix="Use a pool without them (HANS' heuristics_train_set.txt, or ANLI), or hold out "
                                   "other HANS rows.", unchecked="raise")
    seen = shared_rows(data.train, data.candidates)  # the pool's digests in memory: the training rows can be many
    if seen is None:
        logger.warning("Cannot check whether the pool holds training rows (no input_ids, nor premise and hypothesis, "
                       "in both); the pool is taken as unseen.")
    elif len(seen.rows):
        logger.warning(f"{len(seen.rows):,} training rows are also rows of the pool (the same {seen.by}; e.g. training "
                       f"{seen.example}): the 'unseen' pool is partly seen, so stepping on those rows is plain "
                       "correction, not augmentation. Use a pool disjoint from the training data.")
