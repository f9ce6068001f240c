"""What an influence table is, on disk and in memory: file names, schema version, required columns, the two
error types and the column checks that every other room of `hf_fastif.table` relies on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

SCHEMA_VERSION = 1
LIBRARY = "hf_fastif"
REQUIRED_COLUMNS = ("test_id", "train_id", "influence")
METADATA_FILE = "influence_metadata.json"
CARD_FILE = "README.md"
DATA_DIR = "data"
SHARD_ROWS = 1_000_000
ROW_GROUP_ROWS = 65_536
STORAGE_KEY = "storage"  # file-level facts in the JSON; not part of `InfluenceTable.metadata`
DEFAULT_LICENSE = "apache-2.0"
TEXT_COLUMNS = ("premise", "hypothesis", "text", "sentence", "label")


class InfluenceTableError(ValueError):
    """A table that cannot be used as asked: missing, not a table, corrupt, of another schema or model."""


class DamagedShardError(InfluenceTableError):
    """A shard whose bytes are not those its metadata records (missing, of another size or sha256, unreadable), or a
    metadata file that is not valid JSON of a table's shape: `InfluenceTable.from_hub` downloads such a copy again
    (a newer schema it does not)."""


class ModelMismatchError(InfluenceTableError):
    """The table was computed with a different model than the one given."""


def label_id(value) -> int | None:
    """``value`` as a label id when it is one (an int, or a float with an integral value as pandas stores a column
    with nulls), else None (a label name, a null, NaN)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def label_text(value, names: Sequence[str] | None) -> str:
    """How a stored label reads: the name of a label id in ``names``, the value itself otherwise (a label stored as
    its name, an id without a name), "" when it is missing (null, NaN)."""
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return ""
    index = label_id(value)
    if index is None:
        return str(value)
    return names[index] if names and 0 <= index < len(names) else str(index)


def check_columns(schema: pa.Schema, what: str) -> None:
    """Raise `InfluenceTableError` unless ``schema`` has integer ``test_id`` / ``train_id`` and float
    ``influence`` columns (``what`` names the rows in the message)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise InfluenceTableError(f"An influence table needs the columns {list(REQUIRED_COLUMNS)}; {what} is "
                                  f"missing {missing} (found {schema.names}).")
    for name, ok, kind in (("test_id", pa.types.is_integer, "integers"), ("train_id", pa.types.is_integer, "integers"),
                           ("influence", pa.types.is_floating, "floats")):
        if not ok(schema.field(name).type):
            raise InfluenceTableError(f"The column {name!r} of {what} must hold {kind}, not "
                                      f"{schema.field(name).type}.")


def pair_keys(test_id: np.ndarray, train_id: np.ndarray) -> np.ndarray | None:
    """One uint64 per ``(test_id, train_id)`` pair, ``test_id << 32 | train_id``, where every id is in ``[0, 2**32)``
    (None otherwise): pairs compared and sorted as single numbers."""
    test_id, train_id = np.asarray(test_id, np.int64), np.asarray(train_id, np.int64)
    if len(test_id) and (min(test_id.min(), train_id.min()) < 0 or max(test_id.max(), train_id.max()) >= 2 ** 32):
        return None
    return (test_id.astype(np.uint64) << np.uint64(32)) | train_id.astype(np.uint64)


def repeated_pair(test_id: np.ndarray, train_id: np.ndarray, keys: np.ndarray | None = None
                  ) -> tuple[int, int, int, int] | None:
    """``(test_id, train_id, times, pairs repeated)`` of a ``(test_id, train_id)`` pair given more than once (the most
    repeated), or None when every pair is unique; ``keys``: the pairs' `pair_keys`, when known. Sorted as one uint64
    each where the ids allow (0.2 s at 3M pairs; sorting the (n, 2) pairs took 2.5 s)."""
    keys = pair_keys(test_id, train_id) if keys is None else keys
    if keys is not None:
        if not len(keys):
            return None
        keys, counts = np.unique(keys, return_counts=True)
        most = int(counts.argmax())
        pair = (int(keys[most] >> np.uint64(32)), int(keys[most] & np.uint64(2 ** 32 - 1)))
    else:
        pairs, counts = np.unique(np.stack([test_id, train_id], 1), axis=0, return_counts=True)
        most = int(counts.argmax())
        pair = (int(pairs[most][0]), int(pairs[most][1]))
    return (*pair, int(counts[most]), int((counts > 1).sum())) if counts[most] > 1 else None


def repeated_pair_message(repeated: tuple[int, int, int, int], what: str) -> str:
    test_id, train_id, times, pairs = repeated
    return (f"{what} hold the pair test_id {test_id}, train_id {train_id} {times} times ({pairs} pairs repeated); a "
            "table holds one influence per pair (queries would count the row twice)")


def checked_ids(table: pa.Table, what: str) -> pa.Table:
    """``table`` with its ids as int64, refusing missing (null) ids and ids int64 cannot hold (both went in: a null id
    read back as NaN among the test ids, a uint64 past 2**63 raised Arrow's bare ArrowInvalid)."""
    for name in ("test_id", "train_id"):
        column = table.column(name)
        if column.null_count:
            raise InfluenceTableError(f"The column {name!r} of {what} has {column.null_count} missing (null) ids; every "
                                      "row needs a test id and a training row id.")
        try:
            column = column.cast(pa.int64())
        except pa.ArrowInvalid as err:
            raise InfluenceTableError(f"The column {name!r} of {what} holds ids int64 cannot hold ({err}); row ids "
                                      "are int64.") from err
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def normalized_schema(schema: pa.Schema) -> pa.Schema:
    """The schema rows are stored with: ids as int64, influence as float64, no pandas/datasets schema metadata."""
    fixed = {"test_id": pa.int64(), "train_id": pa.int64(), "influence": pa.float64()}
    return pa.schema([pa.field(f.name, fixed.get(f.name, f.type)) for f in schema])


def candidate_pool(metadata: dict) -> bool:
    """Whether a table scored a candidate pool (``compute_influences(..., candidate_dataset=pool)``, as augmentation
    does): rows other than the training rows whose Hessian (and, for kNN, index) it used, so its ``train_id`` indexes
    the pool. Told by the metadata's ``candidate_data`` differing from its ``train_data`` in row count or in the
    rows' ``sha256`` (recorded since the engine's caches are keyed on it: two draws of a random ``map`` share a
    datasets fingerprint), else, in tables written before, in datasets fingerprint; False when neither is recorded
    (a table written by hand)."""
    train, candidates = metadata.get("train_data"), metadata.get("candidate_data")
    if not isinstance(train, dict) or not isinstance(candidates, dict):
        return False
    content = "sha256" if train.get("sha256") is not None and candidates.get("sha256") is not None else "fingerprint"
    return any(train.get(key) is not None and candidates.get(key) is not None and train[key] != candidates[key]
               for key in ("num_rows", content))
