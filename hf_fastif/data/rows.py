"""What identifies an NLI row across datasets: its token ids, else its whitespace-normalised premise and hypothesis
(`split_hans` keeps identical rows on one side; the applications refuse training or anchor rows that are test rows)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset


def row_key_kind(*datasets: Dataset) -> str | None:
    """What rows of ``datasets`` can be compared by: their token ids where all have ``input_ids``, else their
    premise and hypothesis where all have them, else None."""
    if all("input_ids" in d.column_names for d in datasets):
        return "input_ids"
    if all({"premise", "hypothesis"} <= set(d.column_names) for d in datasets):
        return "premise / hypothesis"
    return None


def row_keys(dataset: Dataset, by: str, batch_size: int = 8192) -> Iterator[bytes]:
    """A 16-byte digest of each row's content, in row order: of its token ids (``by="input_ids"``, as int64), or of
    its whitespace-normalised premise and hypothesis (``by="premise / hypothesis"``). Reads ``batch_size`` rows at a
    time, so hundreds of thousands of rows (MNLI's 393k) take seconds and a few tens of MB."""
    columns = ["input_ids"] if by == "input_ids" else ["premise", "hypothesis"]
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=batch_size):
        if by == "input_ids":
            column = table.column("input_ids").combine_chunks()
            ends = np.cumsum(pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False))
            values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.int64)
            for start, end in zip(np.r_[0, ends[:-1]], ends):
                yield hashlib.blake2b(values[start:end].tobytes(), digest_size=16).digest()
        else:
            for premise, hypothesis in zip(table.column("premise").to_pylist(), table.column("hypothesis").to_pylist()):
                text = " ".join(str(premise).split()) + "\t" + " ".join(str(hypothesis).split())
                yield hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
