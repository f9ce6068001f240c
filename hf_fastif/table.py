"""`InfluenceTable`: influence scores as a `datasets.Dataset` plus the metadata of how they were made.

Rows are kept sorted by ``(test_id, influence)``, so the most helpful rows of a test point come first and
the most harmful last. On disk (and on the Hub) a table is a folder::

    data/train-00000-of-00002.parquet ...   the rows, sharded; row groups carry min/max statistics of test_id
    influence_metadata.json                  how the table was made + the list of shards (rows, bytes, sha256)
    README.md                                a dataset card (YAML: license, tags, settings, the parquet config)

Parquet and JSON only: nothing is ever unpickled. `InfluenceTable.load` reads the JSON and the parquet
footers only; ``helpful`` / ``harmful`` / ``for_test`` then read just the row groups whose statistics can hold
the test id, so queries on tables larger than memory stay fast. ``table.dataset`` converts the shards into a
memory-mapped `datasets.Dataset` on first use. `InfluenceTableWriter` writes a table incrementally (rows
appended as they are computed, shards closed as they fill). The same folder loads with plain
``datasets.load_dataset(repo_id)`` once pushed.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset
from transformers.utils import logging

from .fingerprint import model_fingerprint
from .quiet import quiet_datasets

logger = logging.get_logger(__name__)

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


class ModelMismatchError(InfluenceTableError):
    """The table was computed with a different model than the one given."""


class InfluenceTable:
    """Influence of training rows on test rows. Negative = helpful, positive = harmful.

    Args:
        dataset: columns at least ``test_id``, ``train_id``, ``influence`` (more are kept, e.g. text).
        metadata: how the table was made (model, data, settings, λ, library and schema version, time).
    """

    def __init__(self, dataset: Dataset, metadata: dict | None = None, *, _sorted: bool = False):
        _check_columns(dataset.features.arrow_schema, "dataset")
        with quiet_datasets():
            if dataset._indices is not None:  # queries below read the Arrow table in row order
                dataset = dataset.flatten_indices()
            if not _sorted and len(dataset):
                order = np.lexsort((dataset.data.column("influence").to_numpy(),
                                    dataset.data.column("test_id").to_numpy()))
                if not np.array_equal(order, np.arange(len(order))):
                    dataset = dataset.select(order).flatten_indices()
        self._dataset: Dataset | None = dataset
        self._shards: _Shards | None = None
        self.metadata = _complete_metadata(metadata)
        self._offsets: dict[int, tuple[int, int]] | None = None

    @classmethod
    def _from_shards(cls, shards: _Shards, metadata: dict) -> InfluenceTable:
        table = cls.__new__(cls)
        table._dataset, table._shards, table._offsets = None, shards, None
        table.metadata = _complete_metadata(metadata)
        return table

    @classmethod
    def from_arrays(cls, test_id: Sequence[int], train_id: Sequence[int], influence: Sequence[float],
                    metadata: dict | None = None, **columns) -> InfluenceTable:
        """A table from parallel arrays (any order; extra keyword columns are kept)."""
        test_id, influence = np.asarray(test_id, dtype=np.int64), np.asarray(influence, dtype=np.float64)
        order = np.lexsort((influence, test_id))
        data = {"test_id": test_id[order], "train_id": np.asarray(train_id, dtype=np.int64)[order],
                "influence": influence[order], **{k: [v[i] for i in order] for k, v in columns.items()}}
        return cls(Dataset.from_dict(data), metadata, _sorted=True)

    # ---- what it holds -----------------------------------------------------------------------------
    @property
    def dataset(self) -> Dataset:
        """The rows as a `datasets.Dataset`, sorted by ``(test_id, influence)``. A loaded table converts
        its parquet shards into memory-mapped Arrow (in the datasets cache) on first use."""
        if self._dataset is None:
            self._dataset = self._shards.to_dataset()
        return self._dataset

    def __len__(self) -> int:
        return self._shards.num_rows if self._shards is not None else len(self._dataset)

    def __repr__(self) -> str:
        model = (self.metadata.get("model") or {}).get("name_or_path")
        return (f"InfluenceTable(rows={len(self)}, model={model!r}, "
                f"solver={self.metadata.get('settings', {}).get('influence_solver')!r})")

    @property
    def column_names(self) -> list[str]:
        return self._shards.schema.names if self._shards is not None else list(self._dataset.column_names)

    @property
    def test_ids(self) -> list[int]:
        if self._shards is not None:
            return self._shards.test_ids()
        return list(self._index())

    def _index(self) -> dict[int, tuple[int, int]]:
        if self._offsets is None:
            ids = np.asarray(self._dataset.data.column("test_id").to_numpy())
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.array([], dtype=int)
            stops = np.r_[starts[1:], len(ids)]
            self._offsets = {int(ids[s]): (int(s), int(e)) for s, e in zip(starts, stops)}
        return self._offsets

    def _rows(self, test_id: int) -> pa.Table:
        """Every row of one test point as Arrow, most helpful first."""
        if self._shards is not None:
            rows = self._shards.rows_for(int(test_id))
            if rows.num_rows:
                return rows
            known = self._shards.test_ids()
        else:
            index = self._index()
            if int(test_id) in index:
                start, stop = index[int(test_id)]
                return self._dataset.data.table.slice(start, stop - start)
            known = list(index)
        raise KeyError(f"test_id {test_id} is not in this table; it holds {len(known)} test ids "
                       f"(e.g. {known[:5]}).")

    def for_test(self, test_id: int = 0) -> pd.DataFrame:
        """Every row of one test point, most helpful first."""
        return self._rows(test_id).to_pandas()

    def helpful(self, test_id: int = 0, n: int = 10) -> pd.DataFrame:
        """The n most helpful training rows (most negative influence first)."""
        return self._rows(test_id).slice(0, max(0, int(n))).to_pandas()

    def harmful(self, test_id: int = 0, n: int = 10) -> pd.DataFrame:
        """The n most harmful training rows (most positive influence first)."""
        rows = self._rows(test_id)
        n = min(max(0, int(n)), rows.num_rows)
        return rows.take(np.arange(rows.num_rows - 1, rows.num_rows - 1 - n, -1)).to_pandas()

    def tests(self) -> pd.DataFrame:
        """One row per test id with the table's ``test_*`` columns (text, label, prediction...), if any."""
        columns = ["test_id", *[c for c in self.column_names if c.startswith("test_") and c != "test_id"]]
        if self._shards is not None:
            frame = self._shards.read(columns).to_pandas()
        else:
            frame = self._dataset.data.table.select(columns).to_pandas()
        return frame.drop_duplicates("test_id").sort_values("test_id").reset_index(drop=True)

    def to_pandas(self) -> pd.DataFrame:
        if self._dataset is None and self._shards.sorted:
            return self._shards.read().to_pandas()
        return self.dataset.to_pandas()

    def add_text(self, train_dataset: Dataset | None = None, test_dataset: Dataset | None = None,
                 columns: Sequence[str] = TEXT_COLUMNS) -> InfluenceTable:
        """A copy carrying ``train_<col>`` / ``test_<col>`` for the given columns that the datasets have,
        so the table is readable on its own."""
        table = self.dataset.data.table
        for name, values in _text_columns(table, train_dataset, test_dataset, columns).items():
            if name in table.column_names:
                table = table.drop_columns([name])
            table = table.append_column(name, values)
        return InfluenceTable(Dataset(table), self.metadata, _sorted=True)

    def check_model(self, model) -> None:
        """Raise `ModelMismatchError` unless ``model`` is the model this table was computed with (class,
        parameter count, Hub revision, and the fingerprint of its weights where the table records them)."""
        recorded = self.metadata.get("model") or {}
        found = {"class": type(model).__name__, "num_parameters": sum(p.numel() for p in model.parameters())}
        revision = getattr(getattr(model, "config", None), "_commit_hash", None)
        problems = [f"{key} {recorded[key]!r} in the table, {found[key]!r} in the model" for key in found
                    if recorded.get(key) is not None and recorded[key] != found[key]]
        if recorded.get("revision") and revision and recorded["revision"] != revision:
            problems.append(f"revision {recorded['revision']!r} in the table, {revision!r} in the model")
        if not problems and recorded.get("fingerprint") and recorded["fingerprint"] != model_fingerprint(model):
            problems.append("the weights differ (fingerprint mismatch)")
        if problems:
            raise ModelMismatchError(
                f"This influence table was computed with {recorded.get('name_or_path')!r}, not with the given model: "
                f"{'; '.join(problems)}. Load the model the table was made with, or rebuild the table for this one.")

    def _batches(self, rows: int = ROW_GROUP_ROWS) -> Iterator[pa.Table]:
        if self._shards is not None and self._dataset is None:
            yield from self._shards.batches()
            return
        table = self._dataset.data.table
        for start in range(0, table.num_rows, rows):
            yield table.slice(start, rows)

    # ---- files -------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, shard_rows: int = SHARD_ROWS, row_group_rows: int = ROW_GROUP_ROWS,
             license: str = DEFAULT_LICENSE, repo_id: str | None = None) -> Path:
        """Write ``data/train-XXXXX-of-XXXXX.parquet`` shards, the metadata JSON and a dataset card."""
        with InfluenceTableWriter(directory, self.metadata, shard_rows=shard_rows, row_group_rows=row_group_rows,
                                  license=license, repo_id=repo_id, schema=_arrow_schema(self)) as writer:
            for batch in self._batches(row_group_rows):
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
        shards = _Shards.open(directory, storage, verify=verify)
        return cls._from_shards(shards, metadata)

    # ---- Hub -----------------------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload influence table with hf_fastif", revision: str | None = None,
                    license: str = DEFAULT_LICENSE, shard_rows: int = SHARD_ROWS) -> str:
        """Create (or update) the dataset repo ``repo_id`` with this table; returns the commit id, which
        `from_hub(repo_id, revision=...)` takes to pin exactly this version.

        The token (argument, ``HF_TOKEN`` or the saved login) goes to `huggingface_hub` only; it is never
        logged or put in an error message."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                self.save(tmp, shard_rows=shard_rows, license=license, repo_id=url.repo_id)
                info = api.upload_folder(repo_id=url.repo_id, repo_type="dataset", folder_path=tmp,
                                         commit_message=commit_message, revision=revision,
                                         delete_patterns=[f"{DATA_DIR}/*.parquet"])
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            hint = (" Pass a token with write access (token=..., HF_TOKEN or `hf auth login`)."
                    if status in (401, 403) else "")
            raise InfluenceTableError(f"Could not push the influence table to dataset repo {repo_id!r}: "
                                      f"HTTP {status}.{hint}") from err
        logger.info(f"Pushed {len(self)} influence rows to {url.repo_id} (commit {info.oid}).")
        return info.oid

    @classmethod
    def from_hub(cls, repo_id: str, *, revision: str | None = None, token: str | None = None,
                 cache_dir: str | None = None, verify: bool = False) -> InfluenceTable:
        """Download a table pushed with `push_to_hub` (a dataset repo; ``revision``: branch, tag or commit)."""
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"dataset repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
        try:
            # the metadata first: it says whether this is a table at all before any shard is downloaded,
            # and its snapshot folder names the commit, so the shards come from the very same commit
            meta = Path(hf_hub_download(repo_id, METADATA_FILE, repo_type="dataset", revision=revision, token=token,
                                        cache_dir=cache_dir))
            commit = meta.parent.name
            path = snapshot_download(repo_id, repo_type="dataset", revision=commit, token=token, cache_dir=cache_dir,
                                     allow_patterns=[METADATA_FILE, CARD_FILE, f"{DATA_DIR}/*.parquet"])
        except RevisionNotFoundError as err:
            raise InfluenceTableError(f"Revision {revision!r} does not exist in dataset repo {repo_id!r}; use a "
                                      "branch, tag or commit id of that repo.") from err
        except RepositoryNotFoundError as err:
            raise InfluenceTableError(f"No dataset repo {repo_id!r} on the Hub (or it is private or gated: pass "
                                      "token=... of an account with access).") from err
        except LocalEntryNotFoundError as err:
            raise InfluenceTableError(f"Could not reach the Hub for {where}, and it is not in the local cache "
                                      "(offline, HF_HUB_OFFLINE=1, or a network error). Go online or download it "
                                      "once while online.") from err
        except EntryNotFoundError as err:
            raise InfluenceTableError(f"{where} is not an influence table: it has no {METADATA_FILE}. Push tables "
                                      "with InfluenceTable.push_to_hub or `hf-fastif push`.") from err
        except HFValidationError as err:
            raise InfluenceTableError(f"{repo_id!r} is not a valid Hub repo id (expected 'user/name').") from err
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            raise InfluenceTableError(f"The Hub answered HTTP {status} for {where}.") from err
        return cls.load(path, verify=verify)


# ---- incremental writing ---------------------------------------------------------------------------------
class InfluenceTableWriter:
    """Write an influence table incrementally: rows are appended as they are computed and shards are closed
    as they fill, so a table never has to fit in memory. ``close()`` writes the metadata and card and
    returns the table (lazily loaded). Use as a context manager; an exception discards the partial shards.

    Args:
        directory: the table folder (old shards there are replaced at ``close()``).
        metadata: how the table was made (can also be given to ``close``).
        shard_rows / row_group_rows: rows per parquet file / per row group (the unit a query reads).
        schema: the Arrow schema of the rows (default: that of the first rows written).
    """

    def __init__(self, directory: str | os.PathLike, metadata: dict | None = None, *, shard_rows: int = SHARD_ROWS,
                 row_group_rows: int = ROW_GROUP_ROWS, license: str = DEFAULT_LICENSE, repo_id: str | None = None,
                 schema: pa.Schema | None = None):
        if shard_rows < 1 or row_group_rows < 1:
            raise ValueError(f"shard_rows and row_group_rows must be >= 1, got {shard_rows} and {row_group_rows}.")
        self.directory = Path(directory)
        self.metadata = dict(metadata or {})
        self.shard_rows, self.row_group_rows = shard_rows, min(row_group_rows, shard_rows)
        self.license, self.repo_id = license, repo_id
        self.schema = _normalized_schema(schema) if schema is not None else None
        self.num_rows = 0
        self.sorted = True
        self._last: tuple[int, float] | None = None
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._parts: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._shard_filled = 0
        self._closed = False
        (self.directory / DATA_DIR).mkdir(parents=True, exist_ok=True)
        self._tag = f"{os.getpid()}-{os.urandom(4).hex()}"

    def __enter__(self) -> InfluenceTableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, rows: InfluenceTable | Dataset | pa.Table | pd.DataFrame | Mapping[str, Sequence]) -> None:
        """Append rows (any order; each call's rows are sorted by ``(test_id, influence)``)."""
        if self._closed:
            raise ValueError("This InfluenceTableWriter is closed.")
        table = _as_arrow(rows)
        _check_columns(table.schema, "the rows written")
        if self.schema is None:
            self.schema = _normalized_schema(table.schema)
        if set(table.column_names) != set(self.schema.names):
            raise ValueError(f"Rows written to one table must have the same columns: expected {self.schema.names}, "
                             f"got {table.column_names}.")
        table = table.select(self.schema.names).cast(self.schema)
        if not table.num_rows:
            return
        order = np.lexsort((table.column("influence").to_numpy(), table.column("test_id").to_numpy()))
        table = table.take(order)
        first = (table.column("test_id")[0].as_py(), table.column("influence")[0].as_py())
        if self._last is not None and first < self._last:
            self.sorted = False
        self._last = (table.column("test_id")[-1].as_py(), table.column("influence")[-1].as_py())
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.num_rows += table.num_rows
        while self._buffered >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _flush(self, rows: int) -> None:
        pending = pa.concat_tables(self._buffer)
        out, rest = pending.slice(0, rows), pending.slice(rows)
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows
        while out.num_rows:
            if self._writer is None:
                path = self.directory / DATA_DIR / f".partial-{self._tag}-{len(self._parts):05d}.parquet"
                self._parts.append(path)
                self._writer = pq.ParquetWriter(path, self.schema)
                self._shard_filled = 0
            piece = out.slice(0, self.shard_rows - self._shard_filled)
            self._writer.write_table(piece, row_group_size=self.row_group_rows)
            self._shard_filled += piece.num_rows
            out = out.slice(piece.num_rows)
            if self._shard_filled >= self.shard_rows:
                self._writer.close()
                self._writer = None

    def close(self, metadata: dict | None = None) -> InfluenceTable:
        """Finish the shards, then write the card and (last, so a folder with it is complete) the metadata."""
        if self._closed:
            raise ValueError("This InfluenceTableWriter is closed.")
        if self.schema is None:
            self.schema = _normalized_schema(pa.schema([("test_id", pa.int64()), ("train_id", pa.int64()),
                                                        ("influence", pa.float64())]))
        if self._buffered:
            self._flush(self._buffered)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._parts:  # an empty table still has one (empty) shard with the schema
            self._parts.append(self.directory / DATA_DIR / f".partial-{self._tag}-00000.parquet")
            pq.write_table(self.schema.empty_table(), self._parts[0])
        self._closed = True
        metadata = _complete_metadata(self.metadata | (metadata or {}))
        (self.directory / METADATA_FILE).unlink(missing_ok=True)
        names = [f"train-{i:05d}-of-{len(self._parts):05d}.parquet" for i in range(len(self._parts))]
        for old in (self.directory / DATA_DIR).glob("*.parquet"):
            if old.name not in names and old not in self._parts:
                old.unlink()
        shards = []
        for part, name in zip(self._parts, names):
            os.replace(part, self.directory / DATA_DIR / name)
            shards.append(_describe_file(self.directory / DATA_DIR / name))
        storage = {"format": "parquet", "num_rows": self.num_rows, "sorted": self.sorted, "shards": shards,
                   "columns": {f.name: str(f.type) for f in self.schema}}
        dataset_card(metadata, self.num_rows, repo_id=self.repo_id, license=self.license,
                     columns=self.schema.names).save(str(self.directory / CARD_FILE))
        _write_json_atomic(self.directory / METADATA_FILE, metadata | {STORAGE_KEY: storage})
        return InfluenceTable.load(self.directory)

    def abort(self) -> None:
        """Discard what was written (the folder keeps any previous table)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        for part in self._parts:
            part.unlink(missing_ok=True)
        self._closed = True


# ---- reading shards lazily ---------------------------------------------------------------------------------
class _Shards:
    """The parquet shards of a table on disk: footers read at open, row groups read on demand."""

    def __init__(self, directory: Path, files: list[Path], schema: pa.Schema, sorted_: bool,
                 files_meta: list[pq.FileMetaData]):
        self.directory, self.files, self.schema, self.sorted = directory, files, schema, sorted_
        self.num_rows = sum(m.num_rows for m in files_meta)
        self.row_groups_read = 0  # for tests and diagnostics: how much a query touched
        self._open: dict[int, pq.ParquetFile] = {}
        ranges = []  # (file, row group, min test_id, max test_id)
        column = schema.get_field_index("test_id")
        for f, meta in enumerate(files_meta):
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(column).statistics
                if stats is not None and stats.has_min_max:
                    ranges.append((f, g, stats.min, stats.max))
                else:
                    ranges.append((f, g, -math.inf, math.inf))
        self.ranges = ranges
        self._test_ids: list[int] | None = None

    @classmethod
    def open(cls, directory: Path, storage: dict, verify: bool) -> _Shards:
        data = directory / DATA_DIR
        listed = storage.get("shards")
        if listed:
            files = [data / Path(s["path"]).name for s in listed]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InfluenceTableError(f"{directory} is incomplete: the shards {missing} listed in {METADATA_FILE} "
                                          "are missing. Download or rebuild the table.")
            for f, s in zip(files, listed):
                if f.stat().st_size != s.get("bytes", f.stat().st_size):
                    raise InfluenceTableError(f"The shard {f} is corrupt or incomplete: {f.stat().st_size} bytes, "
                                              f"{s['bytes']} expected. Download or rebuild the table.")
                if verify and s.get("sha256") and _sha256(f) != s["sha256"]:
                    raise InfluenceTableError(f"The shard {f} is corrupt: its sha256 differs from {METADATA_FILE}. "
                                              "Download or rebuild the table.")
        else:
            files = sorted(data.glob("*.parquet"))
        if not files:
            raise InfluenceTableError(f"{directory} has no parquet shards under {DATA_DIR}/; the table is incomplete.")
        metas, schema = [], None
        for f in files:
            try:
                meta = pq.read_metadata(f)
                file_schema = meta.schema.to_arrow_schema()
            except Exception as err:  # pyarrow raises several types for damaged files
                raise InfluenceTableError(f"The shard {f} is corrupt ({err}); download or rebuild the table.") from err
            _check_columns(file_schema, f"The shard {f}")
            file_schema = _normalized_schema(file_schema)
            if schema is None:
                schema = file_schema
            elif not file_schema.equals(schema):
                raise InfluenceTableError(f"The shard {f} has the columns {file_schema} but {files[0].name} has "
                                          f"{schema}; the shards of one table must agree. Rebuild the table.")
            metas.append(meta)
        rows = sum(m.num_rows for m in metas)
        if "num_rows" in storage and storage["num_rows"] != rows:
            raise InfluenceTableError(f"{directory} holds {rows} rows but {METADATA_FILE} says {storage['num_rows']}; "
                                      "the table is incomplete or corrupt.")
        return cls(directory, files, schema, bool(storage.get("sorted", False)), metas)

    def _file(self, f: int) -> pq.ParquetFile:
        if f not in self._open:
            self._open[f] = pq.ParquetFile(self.files[f], memory_map=True)
        return self._open[f]

    def _read_group(self, f: int, g: int, columns: Sequence[str] | None = None) -> pa.Table:
        self.row_groups_read += 1
        try:
            return self._file(f).read_row_group(g, columns=columns).cast(
                self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns]))
        except (OSError, pa.ArrowException) as err:
            raise InfluenceTableError(f"The shard {self.files[f]} is corrupt ({err}); download or rebuild the "
                                      "table.") from err

    def rows_for(self, test_id: int) -> pa.Table:
        parts = []
        for f, g, lo, hi in self.ranges:
            if lo <= test_id <= hi:
                part = self._read_group(f, g)
                parts.append(part.filter(pc.equal(part.column("test_id"), test_id)))
        if not parts:
            return self.schema.empty_table()
        rows = pa.concat_tables(parts)
        if not self.sorted:
            rows = rows.take(np.argsort(rows.column("influence").to_numpy(), kind="stable"))
        return rows

    def test_ids(self) -> list[int]:
        if self._test_ids is None:
            ids = self.read(["test_id"]).column("test_id").to_numpy()
            self._test_ids = np.unique(ids).tolist()
        return self._test_ids

    def batches(self) -> Iterator[pa.Table]:
        for f, g, _, _ in self.ranges:
            yield self._read_group(f, g)

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        parts = [self._read_group(f, g, columns) for f, g, _, _ in self.ranges]
        table = pa.concat_tables(parts) if parts else self.schema.empty_table()
        if not self.sorted and columns is None:
            order = np.lexsort((table.column("influence").to_numpy(), table.column("test_id").to_numpy()))
            table = table.take(order)
        return table

    def to_dataset(self) -> Dataset:
        with quiet_datasets():
            try:
                dataset = Dataset.from_parquet([str(f) for f in self.files], split="train")
            except Exception as err:
                raise InfluenceTableError(f"The shards under {self.directory / DATA_DIR} could not be read ({err}); "
                                          "the table is corrupt, download or rebuild it.") from err
            if not self.sorted:
                dataset = dataset.sort(["test_id", "influence"]).flatten_indices()
        return dataset


# ---- metadata, schema and card -----------------------------------------------------------------------------
def read_metadata(directory: str | os.PathLike) -> dict:
    """The validated metadata JSON of a table folder (including the ``storage`` entry)."""
    directory = Path(directory)
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        raise InfluenceTableError(f"{directory} is not an influence table: {METADATA_FILE} is missing. "
                                  "Write tables with InfluenceTable.save(dir) or push_to_hub.")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InfluenceTableError(f"{meta_path} is not valid JSON ({err}); the table is corrupt, download it "
                                  "again.") from err
    if not isinstance(metadata, dict):
        raise InfluenceTableError(f"{meta_path} must hold a JSON object; the table is corrupt.")
    version = metadata.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InfluenceTableError(f"{directory} has influence-table schema version {version!r}; this hf_fastif reads "
                                  f"version {SCHEMA_VERSION}. Upgrade hf_fastif or rebuild the table.")
    return metadata


def _check_columns(schema: pa.Schema, what: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise InfluenceTableError(f"An influence table needs the columns {list(REQUIRED_COLUMNS)}; {what} is "
                                  f"missing {missing} (found {schema.names}).")
    for name, ok, kind in (("test_id", pa.types.is_integer, "integers"), ("train_id", pa.types.is_integer, "integers"),
                           ("influence", pa.types.is_floating, "floats")):
        if not ok(schema.field(name).type):
            raise InfluenceTableError(f"The column {name!r} of {what} must hold {kind}, not "
                                      f"{schema.field(name).type}.")


def _normalized_schema(schema: pa.Schema) -> pa.Schema:
    """ids as int64, influence as float64, no pandas/datasets schema metadata."""
    fixed = {"test_id": pa.int64(), "train_id": pa.int64(), "influence": pa.float64()}
    return pa.schema([pa.field(f.name, fixed.get(f.name, f.type)) for f in schema])


def _arrow_schema(table: InfluenceTable) -> pa.Schema:
    if table._shards is not None and table._dataset is None:
        return table._shards.schema
    return table._dataset.data.table.schema


def _as_arrow(rows) -> pa.Table:
    if isinstance(rows, InfluenceTable):
        return pa.concat_tables(list(rows._batches())) if len(rows) else _arrow_schema(rows).empty_table()
    if isinstance(rows, Dataset):
        return rows.with_format("arrow")[:] if len(rows) else rows.data.table.slice(0, 0)
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pd.DataFrame):
        return pa.Table.from_pandas(rows, preserve_index=False)
    if isinstance(rows, Mapping):
        return pa.table({k: np.asarray(v) if k in REQUIRED_COLUMNS else v for k, v in rows.items()})
    raise TypeError(f"Cannot write {type(rows).__name__} rows; pass an InfluenceTable, Dataset, pyarrow.Table, "
                    "DataFrame or a dict of columns.")


def _text_columns(table: pa.Table, train_dataset: Dataset | None, test_dataset: Dataset | None,
                  columns: Sequence[str]) -> dict[str, pa.ChunkedArray]:
    """``train_<col>`` / ``test_<col>`` of the rows of ``table``, taken from the datasets by id."""
    out = {}
    for prefix, source, key in (("train", train_dataset, "train_id"), ("test", test_dataset, "test_id")):
        if source is None:
            continue
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


def _complete_metadata(metadata: dict | None) -> dict:
    """The metadata as plain JSON values, with the schema version, library and creation time filled in."""
    metadata = json.loads(json.dumps(dict(metadata or {}), default=_json_default))
    metadata.pop(STORAGE_KEY, None)
    metadata.setdefault("schema_version", SCHEMA_VERSION)
    metadata.setdefault("library", LIBRARY)
    metadata.setdefault("library_version", _library_version())
    metadata.setdefault("created_at", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return metadata


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def _library_version() -> str:
    from . import __version__

    return __version__


def _describe_file(path: Path) -> dict:
    return {"path": f"{DATA_DIR}/{path.name}", "rows": pq.read_metadata(path).num_rows,
            "bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)


def _size_category(rows: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")):
        if rows < bound:
            return name
    return "n>1B"


def dataset_card(metadata: dict, rows: int, *, repo_id: str | None = None, license: str = DEFAULT_LICENSE,
                 columns: Sequence[str] = REQUIRED_COLUMNS):
    """A `huggingface_hub.DatasetCard`: YAML (license, tags, the parquet config, the influence settings) and a
    text saying what the table is, how it was made and how to load it."""
    from huggingface_hub import DatasetCard, DatasetCardData

    settings = metadata.get("settings") or {}
    model = metadata.get("model") or {}
    name = model.get("name_or_path") or "unknown"
    train, test = metadata.get("train_data") or {}, metadata.get("test_data") or {}
    influence = {
        "model": name, "model_revision": model.get("revision"),
        "train_data": train.get("name"), "train_split": train.get("split"), "train_fingerprint": train.get("fingerprint"),
        "test_data": test.get("name"), "test_split": test.get("split"), "test_fingerprint": test.get("fingerprint"),
        "combine": metadata.get("combine"), "lambda": metadata.get("lambda"),
        "settings": settings, "library_version": metadata.get("library_version"),
        "schema_version": metadata.get("schema_version"), "created_at": metadata.get("created_at"),
    }
    data = DatasetCardData(
        license=license, size_categories=_size_category(rows), pretty_name=f"Influence table of {name}",
        tags=["influence-functions", "fastif", "hf_fastif", "interpretability"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/*.parquet"}]}],
        influence={k: v for k, v in influence.items() if v is not None},
    )
    repo = repo_id or "<user>/<repo>"
    extra = [c for c in columns if c not in REQUIRED_COLUMNS]
    body = [
        f"# Influence table of `{name}`",
        "",
        "For each test example, the training examples that most helped or hurt the model's prediction on it: "
        "influence functions (Koh & Liang, 2017) made fast with FastIF (Guo et al., 2021: kNN candidates, "
        f"fast inverse-Hessian-vector products), computed with `hf_fastif` {metadata.get('library_version', '')}.",
        "",
        f"- Rows: {rows}. Columns: `test_id` (row of the test data), `train_id` (row of the training data), "
        "`influence`" + (f", and {', '.join(f'`{c}`' for c in extra)}" if extra else "") + ".",
        "- `influence = -∇L(z_train) · s_test`, `s_test = (H + λI)⁻¹ ∇L(z_test)`: **negative is helpful** (upweighting "
        "the training row lowers the test loss), positive is harmful.",
        "",
        "## How it was made",
        "",
        f"- Model: `{name}`" + (f" (revision `{model['revision']}`)" if model.get("revision") else "")
        + (f", {model['num_parameters']:,} parameters" if isinstance(model.get("num_parameters"), int) else ""),
        f"- Training data: {train.get('name') or 'unnamed'} (split {train.get('split')}, fingerprint "
        f"`{train.get('fingerprint')}`, {train.get('num_rows')} rows)",
        f"- Test data: {test.get('name') or 'unnamed'} (split {test.get('split')}, fingerprint "
        f"`{test.get('fingerprint')}`, {test.get('num_rows')} rows)",
        f"- λ = damping × scale = {metadata.get('lambda')}; created {metadata.get('created_at')}",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in settings.items()],
        "",
        "## Load",
        "",
        "```python",
        "from hf_fastif import InfluenceTable",
        f'table = InfluenceTable.from_hub("{repo}")',
        "table.helpful(test_id=0, n=10)   # most helpful training rows first",
        "table.harmful(test_id=0, n=10)",
        "",
        "# or without hf_fastif:",
        "from datasets import load_dataset",
        f'rows = load_dataset("{repo}", split="train")',
        "```",
        "",
        f"or in a terminal: `hf-fastif show {repo} --test-id 0`.",
        "",
    ]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
