"""Make an influence table readable on its own, then save it: where its model and data came from, the label
names, the text of its training and test rows and the model's predictions. One home for what ``hf-fastif
build``, the Space's default table, the quickstart and the influence-graph recipe all do before saving."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from datasets import Dataset
from torch import nn

from .fingerprint import model_fingerprint

if TYPE_CHECKING:
    from . import InfluenceTable

TRAIN_TEXT: tuple[str, ...] = ("premise", "hypothesis", "label", "genre")
"""Columns of the training rows a table carries as ``train_<column>`` (where the rows have them)."""
TEST_TEXT: tuple[str, ...] = ("premise", "hypothesis", "label", "prediction", "heuristic", "subcase")
"""Columns of the test rows a table carries as ``test_<column>`` (where the rows have them)."""


@dataclass
class TextSource:
    """Untokenized rows of a table's training or test data (row i = ``train_id`` / ``test_id`` i), and where
    they came from (recorded in the table's metadata when given)."""

    rows: Dataset
    name: str | None = None
    split: str | None = None


def save_with_text(table: InfluenceTable, directory: str | os.PathLike, *, train: TextSource | None = None,
                   test: TextSource | None = None, model: nn.Module | None = None, model_name: str | None = None,
                   predictions: Sequence[int] | None = None,
                   label_names: Sequence[str] | None = None) -> InfluenceTable:
    """Record the model (name, weights fingerprint, label names) and the data (name, split) in ``table``'s
    metadata, add the rows' text (`TRAIN_TEXT`, `TEST_TEXT`) and the model's ``predictions`` on the test rows,
    save the result to ``directory`` and return it.

    Args:
        table: the influence table; its metadata is updated in place.
        train / test: the untokenized rows the table's ids refer to.
        model: the model the table was computed with; ``model_name`` is recorded as its ``name_or_path``.
        predictions: the model's label for each test row (a ``test_prediction`` column).
        label_names: the labels' names, index = label id (default: the model's ``config.id2label``).
    """
    metadata = table.metadata
    if model is not None:
        metadata["model"] = (metadata.get("model") or {}) | {"name_or_path": model_name,
                                                             "fingerprint": model_fingerprint(model)}
        config = getattr(model, "config", None)
        if getattr(config, "id2label", None):
            metadata["label_names"] = [config.id2label[i] for i in range(config.num_labels)]
    if label_names is not None:
        metadata["label_names"] = list(label_names)
    for key, source in (("train_data", train), ("test_data", test)):
        if source is not None and source.name is not None:
            metadata[key] = (metadata.get(key) or {}) | {"name": source.name, "split": source.split}
    test_rows = test.rows if test is not None else None
    if predictions is not None:
        if test_rows is None:
            raise ValueError("predictions need the test rows: pass test=TextSource(rows).")
        test_rows = test_rows.add_column("prediction", [int(p) for p in predictions])
    table = table.add_text(train.rows if train is not None else None, test_rows, columns=TRAIN_TEXT + TEST_TEXT)
    table.save(directory)
    return table
