"""`InfluenceTable`: influence scores as a `datasets.Dataset` plus the metadata of how they were made, and the
questions asked of them.

Rows are kept sorted by ``(test_id, influence)``. Influence is ``-∇L(z_train) · s_test``: negative is helpful,
positive harmful. The lists are honest about the sign: ``helpful`` returns only rows with negative influence
and ``harmful`` only positive ones, so a test point with 2 helpful candidates shows 2, never a harmful row
ranked as "most helpful". ``lowest`` / ``highest`` return the n extremes whatever their sign, and ``describe``
says how many of each there are and how degenerate the values are.

Every query reads through one reader (`storage.MemoryRows` for a table in memory, `storage.ShardReader` for a
loaded folder, which reads only the row groups a test id can be in).
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from datasets import Dataset
from huggingface_hub.repocard import metadata_load
from transformers.utils import logging

from ..fingerprint import adapter_state, fingerprint_scheme, model_fingerprint, tensor_digests
from ..mode import uncompiled
from ..utils import quiet_datasets
from . import hub
from .format import (
    CARD_FILE,
    ROW_GROUP_ROWS,
    SHARD_ROWS,
    STORAGE_KEY,
    TEXT_COLUMNS,
    DamagedShardError,
    InfluenceTableError,
    ModelMismatchError,
    check_columns,
    checked_ids,
    repeated_pair,
    repeated_pair_message,
)
from .storage import (
    InfluenceTableWriter,
    MemoryRows,
    ShardReader,
    complete_metadata,
    read_metadata,
    sort_order,
)

logger = logging.get_logger(__name__)

class InfluenceTable:
    """Influence of training rows on test rows. Negative = helpful, positive = harmful.

    Args:
        dataset: columns at least ``test_id``, ``train_id``, ``influence`` (more are kept, e.g. text).
        metadata: how the table was made (model, data, settings, λ, library and schema version, time).
    """

    def __init__(self, dataset: Dataset, metadata: dict | None = None, *, _sorted: bool = False):
        check_columns(dataset.features.arrow_schema, "dataset")
        with quiet_datasets():
            if dataset._indices is not None:  # the reader slices the Arrow table in row order
                dataset = dataset.flatten_indices()
            if not _sorted:  # (not a table's own rows, re-wrapped: those were checked when they were made)
                ids = checked_ids(dataset.data.table.select(["test_id", "train_id"]), "the dataset")
                repeated = repeated_pair(ids.column("test_id").to_numpy(), ids.column("train_id").to_numpy())
                if repeated:
                    raise InfluenceTableError(repeated_pair_message(repeated, "The rows of the dataset") + ".")
            if not _sorted and len(dataset):
                order = sort_order(dataset.data.table)
                if not np.array_equal(order, np.arange(len(order))):
                    dataset = dataset.select(order).flatten_indices()
        self._reader: MemoryRows | ShardReader = MemoryRows(dataset)
        self._dataset: Dataset | None = dataset
        self.metadata = complete_metadata(metadata)

    @classmethod
    def _from_reader(cls, reader: ShardReader, metadata: dict) -> InfluenceTable:
        table = cls.__new__(cls)
        table._reader, table._dataset = reader, None
        table.metadata = complete_metadata(metadata)
        return table

    @classmethod
    def from_arrays(cls, test_id: Sequence[int], train_id: Sequence[int], influence: Sequence[float],
                    metadata: dict | None = None, *, pairs_unique: bool = False, **columns) -> InfluenceTable:
        """A table from parallel arrays (any order; extra keyword columns are kept). Every array is taken by position
        (a pandas Series too, whatever its index); arrays of unequal lengths, ids that are not whole numbers and a
        ``(test_id, train_id)`` pair given twice raise `InfluenceTableError` (``pairs_unique=True``: the caller
        made them unique, the check is skipped: 2.5 s at 3M pairs)."""
        given = {"test_id": test_id, "train_id": train_id, "influence": influence, **columns}
        values = {k: list(v) if k in columns else np.asarray(v) for k, v in given.items()}
        lengths = {k: len(v) for k, v in values.items()}
        if len(set(lengths.values())) > 1:
            raise InfluenceTableError(f"from_arrays needs arrays of one length; got {lengths}.")
        test_id, train_id = _whole_ids(values["test_id"], "test_id"), _whole_ids(values["train_id"], "train_id")
        influence = values["influence"].astype(np.float64)
        repeated = None if pairs_unique else repeated_pair(test_id, train_id)
        if repeated:
            raise InfluenceTableError(repeated_pair_message(repeated, "The arrays given to from_arrays") + ".")
        order = np.lexsort((influence, test_id))
        data = {"test_id": test_id[order], "train_id": train_id[order], "influence": influence[order],
                **{k: [values[k][i] for i in order] for k in columns}}
        return cls(Dataset.from_dict(data), metadata, _sorted=True)

    # ---- what it holds -----------------------------------------------------------------------------
    @property
    def dataset(self) -> Dataset:
        """The rows as a `datasets.Dataset`, sorted by ``(test_id, influence)``. A loaded table converts
        its parquet shards into memory-mapped Arrow (in the datasets cache) on first use."""
        if self._dataset is None:
            self._dataset = self._reader.to_dataset()
        return self._dataset

    def __len__(self) -> int:
        return self._reader.num_rows

    def __repr__(self) -> str:
        model = (self.metadata.get("model") or {}).get("name_or_path")
        return (f"InfluenceTable(rows={len(self)}, model={model!r}, "
                f"solver={self.metadata.get('settings', {}).get('influence_solver')!r})")

    @property
    def column_names(self) -> list[str]:
        return list(self._reader.schema.names)

    @property
    def test_ids(self) -> list[int]:
        return self._reader.test_ids()

    def to_arrow(self) -> pa.Table:
        """Every row as a `pyarrow.Table`, sorted by ``(test_id, influence)``."""
        return self._reader.read()

    def to_pandas(self) -> pd.DataFrame:
        """Every row as a DataFrame, sorted by ``(test_id, influence)``."""
        return self.to_arrow().to_pandas()

    def tests(self) -> pd.DataFrame:
        """One row per test id with the table's ``test_*`` columns (text, label, prediction...), if any."""
        columns = ["test_id", *[c for c in self.column_names if c.startswith("test_") and c != "test_id"]]
        frame = self._reader.read(columns).to_pandas()
        return frame.drop_duplicates("test_id").sort_values("test_id").reset_index(drop=True)

    # ---- the rows of one test point ----------------------------------------------------------------
    def _rows(self, test_id: int) -> pa.Table:
        """Every row of one test point as Arrow, lowest influence (most helpful) first."""
        if isinstance(test_id, bool) or not isinstance(test_id, numbers.Integral):
            raise TypeError(f"test_id must be an integer id, got {test_id!r}.")
        rows = self._reader.rows_for(int(test_id))
        if rows.num_rows:
            return rows
        known = self._reader.test_ids()
        raise KeyError(f"test_id {test_id} is not in this table; it holds {len(known)} test ids "
                       f"(e.g. {known[:5]}).")

    def for_test(self, test_id: int = 0) -> pd.DataFrame:
        """Every candidate row of one test point, lowest influence (most helpful) first."""
        return self._rows(test_id).to_pandas()

    def helpful(self, test_id: int = 0, n: int = 10) -> pd.DataFrame:
        """Up to n helpful training rows (influence < 0), most helpful first. Fewer than n when fewer
        candidates have a negative influence; `describe` says how many do."""
        rows = self._rows(test_id)
        values = rows.column("influence").to_numpy()
        return rows.take(np.flatnonzero(values < 0)[: _count(n)]).to_pandas()

    def harmful(self, test_id: int = 0, n: int = 10) -> pd.DataFrame:
        """Up to n harmful training rows (influence > 0), most harmful first. Fewer than n when fewer
        candidates have a positive influence; `describe` says how many do."""
        rows = self._rows(test_id)
        values = rows.column("influence").to_numpy()
        return rows.take(np.flatnonzero(values > 0)[::-1][: _count(n)]).to_pandas()

    def lowest(self, test_id: int = 0, n: int = 10) -> pd.DataFrame:
        """The n rows of lowest influence, lowest first, whatever their sign (a fixed-size selection, e.g. a
        protocol that always steps on n rows; for "the helpful rows" use `helpful`)."""
        return self._rows(test_id).slice(0, _count(n)).to_pandas()

    def highest(self, test_id: int = 0, n: int = 10) -> pd.DataFrame:
        """The n rows of highest influence, highest first, whatever their sign (NaN influence, if any, last);
        for "the harmful rows" use `harmful`."""
        rows = self._rows(test_id)
        values = rows.column("influence").to_numpy()
        nan = int(np.isnan(values).sum())  # the rows are sorted with NaN last
        order = np.r_[np.arange(len(values) - nan - 1, -1, -1), np.arange(len(values) - nan, len(values))]
        return rows.take(order[: _count(n)]).to_pandas()

    def caveats(self, test_id: int = 0) -> list[str]:
        """What a test id's helpful / harmful lists mean beyond their headings, as sentences for anything that
        shows them (`hf-fastif show`, the Space): influence on a ``measurement_fn`` (the signs are the
        measurement's: for a score such as a logit, 'harmful' reads as helpful) and the one test id of a
        ``combine="mean"`` table (the mean of every test row, not one of them)."""
        md = self.metadata
        measurement = (md.get("functions") or {}).get("measurement_fn") or {}
        notes = []
        if measurement:  # helpful / harmful read the other way for a score, where higher is better
            notes.append(f"Influence here is on the measurement {measurement.get('name')!r} (a measurement_fn), not "
                         "on the test loss: negative influence lowers it, so 'helpful' rows are helpful only if a "
                         "lower value is better (for a score such as a logit, read 'harmful' as helpful).")
        if md.get("combine") == "mean":
            rows = (md.get("test_data") or {}).get("num_rows")
            of = f"{rows:,} test rows'" if isinstance(rows, int) else "test rows'"
            notes.append(f"Test {test_id} is the mean of the {of} measurements (combine='mean'), not one test row.")
        return notes

    def candidates_note(self) -> str | None:
        """How the candidates of each test id were chosen, when they are a subset of the training rows, as a sentence
        for anything that shows `describe`'s counts (None when every row was scored): with gradient-space
        candidates half come from each end, so the helpful / harmful counts reflect that choice and not the
        training set; with kNN in the model's feature space the most influential rows may lie outside them."""
        md = self.metadata
        settings, diagnostics = md.get("settings") or {}, md.get("diagnostics") or {}
        k, method = settings.get("influence_knn_k"), diagnostics.get("candidates")
        total = (md.get("candidate_data") or {}).get("num_rows")
        if k is None or method in (None, "all") or (isinstance(total, int) and k >= total):
            return None  # (k >= the rows: every row was scored, the counts are the training set's)
        of = f" of the {total:,} training rows" if isinstance(total, int) else ""
        if method == "gradient":
            ends = ("points most along -s_test" if k == 1 else  # (ceil(k/2) from the helpful end)
                    "points most along -s_test (half) and along +s_test (half)")
            return (f"Candidates: the {k:,}{of} whose projected gradient {ends}, then scored exactly; the helpful / "
                    "harmful counts show that choice, not how many training rows help or harm.")
        features = "features=" if "callable" in str(method) else settings.get("influence_knn_features")
        return (f"Candidates: the {k:,}{of} nearest in the model's feature space ({features}), then scored exactly; "
                "the most influential training rows can lie outside them (gradient-space candidates, "
                "influence_knn_features='gradient', hold far more of them: docs/benchmarks.md).")

    def describe(self, test_id: int = 0) -> dict:
        """How the influence of one test point's candidates is distributed: ``num_candidates``,
        ``num_helpful`` (< 0), ``num_harmful`` (> 0), ``num_zero``, ``num_nan``, ``num_distinct_values`` (ties
        count once) and ``min`` / ``median`` / ``max`` (of the non-NaN values; None if there are none), as
        plain Python values."""
        values = self._rows(test_id).column("influence").to_numpy()
        finite = values[~np.isnan(values)]
        stats = ({"min": float(finite.min()), "median": float(np.median(finite)), "max": float(finite.max())}
                 if len(finite) else {"min": None, "median": None, "max": None})
        return {"test_id": int(test_id), "num_candidates": int(len(values)),
                "num_helpful": int((values < 0).sum()), "num_harmful": int((values > 0).sum()),
                "num_zero": int((values == 0).sum()), "num_nan": int(len(values) - len(finite)),
                "num_distinct_values": int(len(np.unique(finite))), **stats}

    # ---- more columns, and the model it belongs to ---------------------------------------------------
    def add_text(self, train_dataset: Dataset | None = None, test_dataset: Dataset | None = None,
                 columns: Sequence[str] = TEXT_COLUMNS) -> InfluenceTable:
        """A copy carrying ``train_<col>`` / ``test_<col>`` for the given columns that the datasets have,
        so the table is readable on its own.

        Args:
            train_dataset: the rows ``train_id`` indexes: the candidate rows the table was computed on (the
                ``candidate_dataset``, or the training rows when none was given), in the same order; their
                untokenized version is fine.
            test_dataset: the rows ``test_id`` indexes, in the order the table was computed on. A table of
                ``combine="mean"`` has one test id, 0, for the mean loss of all its test rows: it takes none (it
                labelled that row with the first test row's text, as if the influences were on it alone).
        Raises:
            ValueError: a dataset with another row count than the metadata records (``candidate_data`` /
                ``test_data``), or one the metadata identifies (by its datasets fingerprint) as another of the
                table's datasets. A same-length dataset in another order (shuffled, re-selected) cannot be
                told from the untokenized rows, whose fingerprint differs from the recorded one anyway.
        """
        if test_dataset is not None and self.metadata.get("combine") == "mean":
            rows = (self.metadata.get("test_data") or {}).get("num_rows")
            raise ValueError(f"This table's test id 0 is the mean loss of {rows if rows is not None else 'all'} test "
                             "rows (combine='mean'), not one of them: it takes no test_dataset. Pass train_dataset "
                             "only, and describe the anchors in the metadata (e.g. metadata['test_data']).")
        table = self.to_arrow()
        for name, values in _text_columns(table, train_dataset, test_dataset, columns, self.metadata).items():
            if name in table.column_names:
                table = table.drop_columns([name])
            table = table.append_column(name, values)
        metadata = dict(self.metadata)
        if not metadata.get("label_names"):  # the labels' names, where a dataset's label column is a ClassLabel (the
            for source in (train_dataset, test_dataset):  # table's columns hold its ids only: show printed 0 / 1)
                names = getattr((source.features if source is not None else {}).get("label"), "names", None)
                if names and any(c in ("label", "labels") for c in columns):
                    metadata["label_names"] = list(names)
                    break
        return InfluenceTable(Dataset(table), metadata, _sorted=True)

    def check_model(self, model) -> None:
        """Raise `ModelMismatchError` unless ``model`` is the model this table was computed with (class,
        parameter count, Hub revision, and the fingerprint of its weights where the table records them); a
        ``torch.compile`` wrapper is checked as the model it wraps, which is what influence is computed with."""
        model = uncompiled(model)
        recorded = self.metadata.get("model") or {}
        found = {"class": type(model).__name__, "num_parameters": sum(p.numel() for p in model.parameters())}
        revision = getattr(getattr(model, "config", None), "_commit_hash", None)
        problems = [f"{key} {recorded[key]!r} in the table, {found[key]!r} in the model" for key in found
                    if recorded.get(key) is not None and recorded[key] != found[key]]
        if recorded.get("revision") and revision and recorded["revision"] != revision:
            problems.append(f"revision {recorded['revision']!r} in the table, {revision!r} in the model")
        fingerprint = recorded.get("fingerprint")  # computed as it was recorded (tables made before xxh3: sha256)
        if not problems and fingerprint:
            scheme = fingerprint_scheme(fingerprint)
            digests = tensor_digests(model, scheme)  # (hashed once for both fingerprints below)
            if fingerprint != model_fingerprint(model, digests, scheme):
                if fingerprint == model_fingerprint(model, digests, scheme, inferred_problem_type=False):
                    pass  # recorded before an inferred problem_type counted as unset: the same model
                elif adapter_state(model) and fingerprint in (
                        model_fingerprint(model, digests, scheme, adapter_settings=False),
                        model_fingerprint(model, digests, scheme, adapter_settings=False, inferred_problem_type=False)):
                    logger.warning("This influence table was recorded before hf_fastif fingerprinted a PEFT model's "
                                   "adapter settings: the weights match, its adapters' scaling and disabled / merged "
                                   "state cannot be checked.")
                else:
                    problems.append("the weights differ (fingerprint mismatch)")
        if problems:
            raise ModelMismatchError(
                f"This influence table was computed with {recorded.get('name_or_path')!r}, not with the given model: "
                f"{'; '.join(problems)}. Load the model the table was made with, or rebuild the table for this one.")

    # ---- files -------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, shard_rows: int = SHARD_ROWS, row_group_rows: int = ROW_GROUP_ROWS,
             license: str | None = None, repo_id: str | None = None) -> Path:
        """Write ``data/train-XXXXX-of-XXXXX-<digest>.parquet`` shards, the metadata JSON and a dataset card
        (``license``: the card's; by default the table's own, ``metadata["license"]``, else apache-2.0)."""
        with InfluenceTableWriter(directory, self.metadata, shard_rows=shard_rows, row_group_rows=row_group_rows,
                                  license=license, repo_id=repo_id, schema=self._reader.schema) as writer:
            for batch in self._reader.batches(row_group_rows):
                writer.write(batch)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, verify: bool = False) -> InfluenceTable:
        """Open a table written by `save` or `InfluenceTableWriter`: the metadata JSON and the parquet footers are
        read and validated now, the rows when they are asked for.

        Args:
            verify: also check every shard's sha256 against the metadata (reads every byte).
        Raises:
            InfluenceTableError: not a table, unknown schema version, missing columns, missing or corrupt shards.
        """
        directory = Path(directory)
        metadata = read_metadata(directory)
        storage = metadata.pop(STORAGE_KEY, None) or {}
        if not isinstance(metadata.get("license"), str):  # (a table saved before the metadata recorded it: its card's)
            metadata.pop("license", None)
            with contextlib.suppress(Exception):
                card = metadata_load(directory / CARD_FILE) or {}
                if isinstance(card.get("license"), str):
                    metadata["license"] = card["license"]
        return cls._from_reader(ShardReader.open(directory, storage, verify=verify), metadata)

    def verify(self) -> InfluenceTable:
        """Check that the shard files a loaded table reads still hold what its metadata's sha256 says (reads every
        byte; `push_to_hub` does it before uploading); an in-memory table has nothing to check. Returns self.

        Raises:
            InfluenceTableError: a shard whose bytes changed since the table was saved."""
        self._reader.verify()
        return self

    # ---- Hub ---------------------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload influence table with hf_fastif", revision: str | None = None,
                    license: str | None = None, shard_rows: int = SHARD_ROWS) -> str:
        """Create (or update) the dataset repo ``repo_id`` with this table; returns the commit id, which
        `from_hub(repo_id, revision=...)` takes to pin exactly this version (``license``: the card's; by default the
        table's own, ``metadata["license"]``, else apache-2.0).

        The token (argument, ``HF_TOKEN`` or the saved login) goes to `huggingface_hub` only; it is never
        logged or put in an error message."""
        return hub.push_table(self, repo_id, private=private, token=token, commit_message=commit_message,
                              revision=revision, license=license, shard_rows=shard_rows)

    @classmethod
    def from_hub(cls, repo_id: str, *, revision: str | None = None, token: str | None = None,
                 cache_dir: str | None = None, verify: bool = True, force_download: bool = False) -> InfluenceTable:
        """Download a table pushed with `push_to_hub` (a dataset repo; ``revision``: branch, tag or commit).

        Args:
            verify: check every shard's sha256 against the metadata (the Hub client checks only sizes: a damaged
                copy loaded silently). A cached copy that fails is downloaded again, once.
            force_download: download again even if the Hub cache holds this commit."""
        def download(force: bool) -> Path:
            return hub.download_table(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                      force_download=force)

        folder = download(force_download)
        try:
            return cls.load(folder, verify=verify)
        except DamagedShardError as err:  # a newer schema or a bad metadata file is not downloaded again
            if force_download:
                raise
            why = hub.unreachable(repo_id, folder.name, token)
            if why is not None:
                raise DamagedShardError(f"{err} The cached copy in {folder} is damaged or incomplete and the Hub cannot "
                                        f"be reached ({why}): go online and run it again to download it again, or "
                                        "delete that folder.") from err
            logger.warning(f"The cached copy of {repo_id} in {folder} failed its check ({err}); downloading it again.")
        folder = download(True)
        try:
            return cls.load(folder, verify=verify)
        except DamagedShardError as err:
            raise DamagedShardError(f"{err} It was downloaded again from dataset repo {repo_id!r} (commit "
                                    f"{folder.name}) and still fails: the copy on the Hub is damaged; push the table "
                                    "again.") from err


def _count(n) -> int:
    """``n`` of a query, checked: a non-negative integer."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an integer number of rows, got {n!r}.")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    return int(n)


# what each id of a table indexes: the metadata entry describing those rows, and what to pass for them
INDEXED_DATA = {"train_id": ("candidate_data", "the candidate rows the table was computed on (its candidate_dataset, "
                                               "or its train_dataset when it was given none)"),
                "test_id": ("test_data", "the test rows the table was computed on")}


def _check_indexed_data(source: Dataset, prefix: str, key: str, metadata: dict) -> None:
    """Refuse ``source`` as the rows ``key`` indexes where the metadata proves it is not: another row count
    than recorded, or the datasets fingerprint of another of the table's datasets. (A fingerprint that merely
    differs proves nothing: the recorded one is of the tokenized rows, and users pass the untokenized ones.)"""
    entry, what = INDEXED_DATA[key]
    recorded = metadata.get(entry) or {}
    fix = f"pass {what}, in the same order (untokenized rows are fine; not shuffled, selected or filtered)"
    num_rows = recorded.get("num_rows")
    if isinstance(num_rows, int) and num_rows != len(source):
        raise ValueError(f"The table's {key} indexes the {num_rows} rows of its {entry}, but the {prefix}_dataset "
                         f"given has {len(source)} rows; {fix}.")
    fingerprint = getattr(source, "_fingerprint", None)
    if fingerprint is None or fingerprint == recorded.get("fingerprint"):
        return
    for other in ("train_data", "test_data", "candidate_data"):
        if other != entry and (metadata.get(other) or {}).get("fingerprint") == fingerprint:
            raise ValueError(f"The {prefix}_dataset given is the table's {other} (the same datasets fingerprint), "
                             f"but its {key} indexes its {entry}, another dataset; {fix}.")


def _text_columns(table: pa.Table, train_dataset: Dataset | None, test_dataset: Dataset | None,
                  columns: Sequence[str], metadata: dict) -> dict[str, pa.ChunkedArray]:
    """``train_<col>`` / ``test_<col>`` of the rows of ``table``, taken from the datasets by id."""
    sources = [(p, s, k) for p, s, k in (("train", train_dataset, "train_id"), ("test", test_dataset, "test_id"))
               if s is not None]
    for prefix, source, key in sources:
        _check_indexed_data(source, prefix, key, metadata)
    out = {}
    for prefix, source, key in sources:
        ids = table.column(key).to_numpy()
        if len(ids) and (ids.min() < 0 or ids.max() >= len(source)):
            raise ValueError(f"The table's {key} goes up to {ids.max()} but the {prefix} dataset has {len(source)} "
                             "rows; pass the dataset the table was computed on.")
        wanted = [c for c in dict.fromkeys(columns) if c in source.column_names]
        if wanted:
            values = source.select_columns(wanted).with_format("arrow")[:]
            for col in wanted:
                out[f"{prefix}_{col}"] = values.column(col).take(pa.array(ids))
    return out


def _whole_ids(ids: np.ndarray, name: str) -> np.ndarray:
    """``ids`` as int64: integers, or floats that are whole numbers (a float column of pandas); others refused (0.7
    and 1.5 became 0 and 1), and so are ids int64 cannot hold (uint64 past 2**63, floats past 2**53)."""
    if not len(ids):
        return ids.astype(np.int64)
    whole = ids.dtype.kind in "iu" or (ids.dtype.kind == "f" and np.isfinite(ids).all() and (ids == np.round(ids)).all())
    # (uint64 past 2**63 and floats past 2**53, where a float is no longer one whole number, wrapped to other ids)
    limit = np.iinfo(np.int64).max if ids.dtype.kind in "iu" else 2.0 ** 53
    if whole and (ids.dtype.kind == "i" or np.abs(ids).max() <= limit):
        return ids.astype(np.int64)
    if whole:
        raise InfluenceTableError(f"from_arrays: {name} holds ids out of range (largest magnitude "
                                  f"{np.abs(ids).max().item()}): row ids are int64, and floats are exact up to 2**53 "
                                  "(as int64 they would wrap round to other, negative ids).")
    raise InfluenceTableError(f"from_arrays: {name} must hold whole numbers (row ids); got {ids.dtype} values such as "
                              f"{ids[:3].tolist()}.")
