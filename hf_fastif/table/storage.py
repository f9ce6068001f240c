"""Where the rows of an influence table live, and how they get there.

A table folder (local, or a snapshot of a Hub dataset repo)::

    data/train-00000-of-00002-<digest>.parquet ...   the rows, sharded; row groups carry min/max statistics of
                                                     test_id; <digest>: of the shards' contents
    influence_metadata.json                  how the table was made + the list of shards (rows, bytes, sha256,
                                             the footer's sha256)
    README.md                                a dataset card (YAML: license, tags, settings, the parquet config)

Parquet and JSON only: nothing is ever unpickled. Data pages carry CRC32 checksums, checked as they are read,
and each shard's footer is checked against its recorded sha256 at load (`ShardReader.open`). Two readers answer
the same questions (the rows of one test id, most helpful first; every row; the test ids; the row groups), so
`InfluenceTable` has one query path:

- `MemoryRows`: a sorted in-memory (or memory-mapped) `datasets.Dataset`, with an index of each test id's slice.
- `ShardReader`: the parquet shards of a folder; footers read at open, and only the row groups whose
  statistics can hold a test id read per query, so tables larger than memory stay fast.

`InfluenceTableWriter` writes a folder incrementally (rows appended as computed, shards closed as they fill,
the metadata JSON last, so a folder that has it is complete; shards named by their contents, so a save over a table
never writes over that table's shards, and an interrupted one leaves it whole).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from datasets import Dataset
from filelock import FileLock
from huggingface_hub.repocard import metadata_load
from transformers.utils import logging

from ..utils import file_digest, library_version, quiet_datasets, to_json, write_atomic, write_error
from .card import dataset_card
from .format import (
    CARD_FILE,
    DATA_DIR,
    DEFAULT_LICENSE,
    LIBRARY,
    METADATA_FILE,
    REQUIRED_COLUMNS,
    ROW_GROUP_ROWS,
    SCHEMA_VERSION,
    SHARD_ROWS,
    STORAGE_KEY,
    DamagedShardError,
    InfluenceTableError,
    check_columns,
    checked_ids,
    normalized_schema,
    pair_keys,
    repeated_pair,
    repeated_pair_message,
)

logger = logging.get_logger(__name__)

LOCK_FILE = ".cache/huggingface/hf_fastif.lock"
"""The lock a writer holds while it finishes a table folder (writers of one folder, e.g. every process of a launch
saving its copy of the table, finish one after the other); in the folder huggingface_hub keeps its own local metadata
in, which uploads leave out."""
SHARD_TAG_CHARS = 12
"""Hex characters of the digest of a table's shards in their names (``train-00000-of-00002-<digest>.parquet``)."""
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
"""This machine, in the names of the partial shards its writers write (a pid means something on its machine only)."""
PARTIAL_GRACE_S = 600
"""A partial shard of another machine's writer (a shared folder) that changed within this many seconds is left alone."""

if TYPE_CHECKING:
    from .table import InfluenceTable

ORDER = ("test_id", "influence")  # rows are kept sorted by this key: most helpful first within a test id


def sort_order(table: pa.Table) -> np.ndarray:
    """Row order of ``table`` by ``(test_id, influence)``; NaN (or null) influence sorts last within its test id."""
    return np.lexsort((table.column("influence").to_numpy(), table.column("test_id").to_numpy()))


def order_key(test_id: int, influence: float | None) -> tuple[int, bool, float]:
    """The key of one row in the order of `sort_order`, comparable with ``<``: NaN and null influence after
    every number of their test id (a bare ``(test_id, nan)`` tuple compares False both ways)."""
    missing = influence is None or math.isnan(influence)
    return test_id, missing, 0.0 if missing else influence


# ---- metadata -----------------------------------------------------------------------------------------------
def _refuse_storage_key(metadata: dict, then: str = "") -> None:
    """A user's metadata entry named `STORAGE_KEY` was dropped without a word: the file's own facts go there."""
    if STORAGE_KEY in metadata:
        raise InfluenceTableError(f"The metadata key {STORAGE_KEY!r} is reserved: a saved table writes its shards' "
                                  f"sizes and sha256 under it. Put that entry under another name.{then}")


def complete_metadata(metadata: dict | None) -> dict:
    """The metadata as plain JSON values, with the schema version, library and creation time filled in."""
    metadata = json.loads(to_json(dict(metadata or {})))
    _refuse_storage_key(metadata)
    metadata.setdefault("schema_version", SCHEMA_VERSION)
    metadata.setdefault("library", LIBRARY)
    metadata.setdefault("library_version", library_version())
    metadata.setdefault("created_at", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return metadata


def _check_metadata(metadata: dict) -> None:
    """Refuse metadata entries that must be objects (the card and `repr` read their fields) but are not."""
    for key in ("model", "train_data", "test_data", "settings"):
        if metadata.get(key) is not None and not isinstance(metadata[key], dict):
            raise ValueError(f"metadata[{key!r}] must be a dict (e.g. {{'name_or_path': ...}} for 'model', "
                             f"{{'name': ..., 'split': ...}} for the data), got {type(metadata[key]).__name__} "
                             f"{metadata[key]!r}.")


AGAIN = ("Download it again (a Hub table: from_hub downloads a damaged cached copy again once; "
         "force_download=True, `hf-fastif pull --force-download`) or rebuild it.")
"""What to do about a table whose metadata file is damaged."""


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
        raise DamagedShardError(f"{meta_path} is not valid JSON ({err}); the table is corrupt. {AGAIN}") from err
    if not isinstance(metadata, dict):
        raise DamagedShardError(f"{meta_path} must hold a JSON object; the table is corrupt. {AGAIN}")
    version = metadata.get("schema_version")
    if version is None or isinstance(version, bool) or not isinstance(version, int):
        found = "no schema_version" if version is None else f"schema_version {version!r}, not a whole number"
        raise DamagedShardError(f"{meta_path} has {found}: it is not an influence table's metadata, or it is "
                                f"corrupt. {AGAIN}")
    if version != SCHEMA_VERSION:
        raise InfluenceTableError(f"{directory} has influence-table schema version {version!r}; this hf_fastif reads "
                                  f"version {SCHEMA_VERSION}. Upgrade hf_fastif or rebuild the table.")
    problem = _metadata_shape_problem(metadata)
    if problem:  # (read as it came: a string "false" for sorted was true, an entry without a path a bare KeyError)
        raise DamagedShardError(f"{meta_path} is corrupt: {problem}. {AGAIN}")
    return metadata


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _metadata_shape_problem(metadata: dict) -> str | None:
    """What is wrong with the shape of a table's metadata as read from disk (None: nothing): the entries the card,
    ``repr`` and the readers use must be objects, the storage entry's counts whole numbers, ``sorted`` a boolean,
    and each shard an object with its path (and its rows, bytes and sha256 where given)."""
    try:
        _check_metadata(metadata)
    except ValueError as err:
        return str(err)
    storage = metadata.get(STORAGE_KEY)
    if storage is None:
        return None
    if not isinstance(storage, dict):
        return f"{STORAGE_KEY!r} must be an object, got {type(storage).__name__}"
    if "num_rows" in storage and not _is_count(storage["num_rows"]):
        return f"{STORAGE_KEY}.num_rows must be a whole number, got {storage['num_rows']!r}"
    if "sorted" in storage and not isinstance(storage["sorted"], bool):
        return f"{STORAGE_KEY}.sorted must be true or false, got {storage['sorted']!r}"
    shards = storage.get("shards")
    if shards is None:
        return None
    if not isinstance(shards, list):
        return f"{STORAGE_KEY}.shards must be a list, got {type(shards).__name__}"
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or not isinstance(shard.get("path"), str):
            return f"{STORAGE_KEY}.shards[{i}] must be an object with a 'path', got {shard!r}"
        for key in ("rows", "bytes"):
            if key in shard and not _is_count(shard[key]):
                return f"{STORAGE_KEY}.shards[{i}].{key} must be a whole number, got {shard[key]!r}"
        for key in ("sha256", "footer_sha256"):
            if key in shard and not isinstance(shard[key], str):
                return f"{STORAGE_KEY}.shards[{i}].{key} must be a string, got {shard[key]!r}"
    return None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    return file_digest(path, hashlib.sha256)


def footer_sha256(path: Path) -> str:
    """sha256 of a parquet file's footer (its schema, row groups and their statistics) and the 8 bytes after it:
    what the pages' checksums do not cover, a few kB, checked at every load of a table that records it (of 448
    one-byte flips in a footer, 18 loaded with other rows: statistics that hid a test id's row group, say)."""
    with open(path, "rb") as handle:
        handle.seek(-8, os.SEEK_END)
        tail = handle.read(8)
        handle.seek(-(8 + int.from_bytes(tail[:4], "little")), os.SEEK_END)  # (a damaged length: another range)
        return hashlib.sha256(handle.read()).hexdigest()


def _holds(target: Path, entry: dict) -> bool:
    """Whether the shard file ``target`` exists with the bytes `_describe_file` recorded as ``entry`` (its size first,
    then its sha256: read only where the size agrees)."""
    try:
        return target.stat().st_size == entry["bytes"] and file_sha256(target) == entry["sha256"]
    except OSError:
        return False


def _describe_file(path: Path) -> dict:
    return {"path": f"{DATA_DIR}/{path.name}", "rows": pq.read_metadata(path).num_rows,
            "bytes": path.stat().st_size, "sha256": file_sha256(path), "footer_sha256": footer_sha256(path)}


def as_arrow(rows) -> pa.Table:
    """Rows given as an `InfluenceTable`, `datasets.Dataset`, `pyarrow.Table`, DataFrame or dict of columns, as Arrow."""
    if hasattr(rows, "to_arrow"):  # an InfluenceTable (not imported here: table.py imports this module)
        return rows.to_arrow()
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


# ---- readers ------------------------------------------------------------------------------------------------
class MemoryRows:
    """The rows of an in-memory table: a `datasets.Dataset` already sorted by ``(test_id, influence)``, with
    the slice of every test id found once (a table in one piece is a one-shard reader)."""

    sorted = True

    def verify(self) -> None:
        """Nothing to check: no shard files, the rows were made in this process."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.table: pa.Table = dataset.data.table
        self.schema = self.table.schema
        self.num_rows = self.table.num_rows
        ids = self.table.column("test_id").to_numpy()
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.array([], dtype=np.int64)
        stops = np.r_[starts[1:], len(ids)]
        self._slices = {int(ids[s]): (int(s), int(e)) for s, e in zip(starts, stops)}

    def rows_for(self, test_id: int) -> pa.Table:
        """Every row of one test id, most helpful first (empty if the table has none)."""
        if test_id not in self._slices:
            return self.schema.empty_table()
        start, stop = self._slices[test_id]
        return self.table.slice(start, stop - start)

    def test_ids(self) -> list[int]:
        return list(self._slices)

    def batches(self, rows: int = ROW_GROUP_ROWS) -> Iterator[pa.Table]:
        for start in range(0, self.num_rows, rows):
            yield self.table.slice(start, rows)

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        return self.table if columns is None else self.table.select(list(columns))

    def to_dataset(self) -> Dataset:
        return self.dataset


CHECKED_PAGES = pds.ParquetFragmentScanOptions(page_checksum_verification=True)
"""How `datasets` reads a table's shards (`ShardReader.to_dataset`): checking each page's CRC32 where it was written
with one (`InfluenceTableWriter` writes them)."""


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class ShardReader:
    """The parquet shards of a table folder: footers read at open, row groups read on demand."""

    def __init__(self, directory: Path, files: list[Path], schema: pa.Schema, sorted_: bool,
                 files_meta: list[pq.FileMetaData], identities: list[tuple] | None = None,
                 sha256: list[str | None] | None = None):
        self.directory, self.files, self.schema, self.sorted = directory, files, schema, sorted_
        self._sha256 = sha256 or [None] * len(files)  # as the metadata lists them (`verify`)
        # each file as its footer was read (inode, size, modification time): a row group read later from a file
        # that was saved over since (a build re-run into the folder of a table in use) would come from another table
        self._identities = identities
        self.num_rows = sum(m.num_rows for m in files_meta)
        self.row_groups_read = 0  # for tests and diagnostics: how much a query touched
        self._open: dict[int, pq.ParquetFile] = {}
        # a ParquetFile's reads are not thread-safe (its read cache and memory map are shared): a Space serves
        # queries from several threads at once, which crashed the process or read "corrupt" shards without this
        self._lock = threading.Lock()
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
    def open(cls, directory: Path, storage: dict, verify: bool = False) -> ShardReader:
        """Check the shards listed in ``storage`` (the metadata's ``storage`` entry) are there, of the recorded
        size (and sha256 if ``verify``), with the required columns and one schema; read their footers."""
        data = directory / DATA_DIR
        listed = storage.get("shards")
        if listed:
            files = [data / Path(s["path"]).name for s in listed]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise DamagedShardError(f"{directory} is incomplete: the shards {missing} listed in {METADATA_FILE} "
                                        "are missing. Download or rebuild the table.")
            for f, s in zip(files, listed):
                if f.stat().st_size != s.get("bytes", f.stat().st_size):
                    raise DamagedShardError(f"The shard {f} is corrupt or incomplete: {f.stat().st_size} bytes, "
                                            f"{s['bytes']} expected. Download or rebuild the table.")
                if "footer_sha256" in s:  # (the pages carry their own checksums, read as they are read)
                    try:
                        footer = footer_sha256(f)
                    except OSError:  # (a damaged length that points before the file's start)
                        footer = None
                    if footer != s["footer_sha256"]:
                        raise DamagedShardError(f"The shard {f} is corrupt: its footer (the row groups and their "
                                                f"statistics) differs from {METADATA_FILE}. Download or rebuild the "
                                                "table.")
        else:
            files = sorted(data.glob("*.parquet"))
        if not files:
            raise InfluenceTableError(f"{directory} has no parquet shards under {DATA_DIR}/; the table is incomplete.")
        metas, schema, identities = [], None, []
        for f in files:
            identities.append(_identity(f))
            try:
                meta = pq.read_metadata(f)
                file_schema = meta.schema.to_arrow_schema()
            except Exception as err:  # pyarrow raises several types for damaged files
                raise DamagedShardError(f"The shard {f} is corrupt ({err}); download or rebuild the table.") from err
            check_columns(file_schema, f"The shard {f}")
            file_schema = normalized_schema(file_schema)
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
        reader = cls(directory, files, schema, bool(storage.get("sorted", False)), metas, identities,
                     [s.get("sha256") for s in listed] if listed else None)
        if verify:
            reader.verify()
        return reader

    def verify(self) -> None:
        """Check every shard's sha256 against the metadata's (reads every byte); a shard written over since the table
        was loaded is that, not "corrupt"."""
        for i, (f, digest) in enumerate(zip(self.files, self._sha256)):
            self._check_unchanged(i)
            if digest and file_sha256(f) != digest:
                raise DamagedShardError(f"The shard {f} is corrupt: its sha256 differs from {METADATA_FILE}. "
                                        "Download or rebuild the table.")

    def _gone(self, f: int) -> InfluenceTableError:
        return InfluenceTableError(f"{self.files[f]} was deleted since this table was loaded (another table saved "
                                   f"into {self.directory}, a cleaned cache, a removed folder); download or load the "
                                   "table again.")

    def _check_unchanged(self, f: int) -> None:
        """Refuse file ``f`` if it is no longer the file this table was loaded from."""
        if not self.files[f].exists():
            raise self._gone(f)
        if self._identities is not None and _identity(self.files[f]) != self._identities[f]:
            raise InfluenceTableError(f"{self.files[f]} was written over since this table was loaded (another table "
                                      f"was saved into {self.directory}); load the table again.")

    def _file(self, f: int) -> pq.ParquetFile:
        if f not in self._open:
            try:
                # (pages written with a CRC, as `InfluenceTableWriter` writes them, are checked as they are read)
                handle = pq.ParquetFile(self.files[f], memory_map=True, page_checksum_verification=True)
            except FileNotFoundError:
                raise self._gone(f) from None
            try:
                self._check_unchanged(f)  # (checked once open: a replacement after this does not reach the handle)
            except InfluenceTableError:
                handle.close()
                raise
            self._open[f] = handle  # held open: a later replacement of the file does not change what it reads
        return self._open[f]

    def _read_group(self, f: int, g: int, columns: Sequence[str] | None = None) -> pa.Table:
        try:
            with self._lock:
                self.row_groups_read += 1
                group = self._file(f).read_row_group(g, columns=columns)
            return group.cast(
                self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns]))
        except (OSError, pa.ArrowException) as err:
            raise InfluenceTableError(f"The shard {self.files[f]} is corrupt ({err}); download or rebuild the "
                                      "table.") from err

    def rows_for(self, test_id: int) -> pa.Table:
        """Every row of one test id, most helpful first, from the row groups whose statistics can hold it."""
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

    def batches(self, rows: int = ROW_GROUP_ROWS) -> Iterator[pa.Table]:
        """The rows one row group at a time, in file order (``rows`` is the row groups' size, fixed on disk)."""
        for f, g, _, _ in self.ranges:
            yield self._read_group(f, g)

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The given columns of every row (all columns: sorted by ``(test_id, influence)``)."""
        parts = [self._read_group(f, g, columns) for f, g, _, _ in self.ranges]
        table = pa.concat_tables(parts) if parts else self.schema.empty_table()
        if not self.sorted and columns is None:
            table = table.take(sort_order(table))
        return table

    def to_dataset(self) -> Dataset:
        """The rows as a memory-mapped `datasets.Dataset` (converted into the datasets cache)."""
        # the dataset reads the files by path: every one must still be the file this table was loaded from,
        # whether or not a query opened it since
        for f in range(len(self.files)):
            self._check_unchanged(f)
        if not self.num_rows:  # (datasets cannot read a parquet file without rows: "BatchSize must be greater than 0")
            return Dataset(self.schema.empty_table())
        with quiet_datasets():
            try:  # (each page's CRC checked as datasets reads it, as `_file`'s handles check theirs)
                dataset = Dataset.from_parquet([str(f) for f in self.files], split="train",
                                               fragment_scan_options=CHECKED_PAGES)
            except Exception as err:  # (datasets wraps what pyarrow raised: "An error occurred while generating")
                raise InfluenceTableError(f"The shards under {self.directory / DATA_DIR} could not be read "
                                          f"({err.__cause__ or err}); the table is corrupt, download or rebuild "
                                          "it.") from err
            if not self.sorted:
                dataset = dataset.sort(list(ORDER)).flatten_indices()
        return dataset


# ---- incremental writing ------------------------------------------------------------------------------------
def _live_partial(path: Path) -> bool:
    """Whether ``path`` is a shard another writer is still writing (``.partial-<pid>-<host>-<tag>-<n>.parquet``):
    a writer of this machine whose process runs; another machine's (a shared folder), or another writer of this
    process, that changed it within `PARTIAL_GRACE_S`. A crashed writer's partial shards are removed by the next
    save (a killed process of this machine's at once)."""
    if not path.name.startswith(".partial-"):
        return False
    parts = path.name.split("-")
    try:
        pid = int(parts[1])
    except (IndexError, ValueError):
        return False
    if (len(parts) < 5 or parts[2] == HOST_TAG) and pid != os.getpid():  # (4 parts: before the host was written)
        try:
            os.kill(pid, 0)
            return True
        except PermissionError:  # another user's process
            return True
        except OSError:  # no such process: it crashed
            return False
    try:
        return time.time() - path.stat().st_mtime < PARTIAL_GRACE_S
    except FileNotFoundError:
        return False


def is_table_card(path: Path) -> bool:
    """Whether the ``README.md`` at ``path`` is an influence table's card, by its YAML (the ``hf_fastif`` tag and the
    ``influence`` entry `dataset_card` writes), not by its text: a project's own README that mentions hf_fastif was
    taken for one, and a save replaced it."""
    try:
        data = metadata_load(path) or {}
    except Exception:  # YAML that does not parse: not this library's
        return False
    tags = data.get("tags")
    return isinstance(tags, list) and "hf_fastif" in tags and isinstance(data.get("influence"), dict)


def _check_folder_holds_a_table(directory: Path) -> None:
    """Refuse a folder whose ``data/*.parquet`` or ``README.md`` are not an influence table's (a saved dataset's
    own files): closing a writer replaces them. A table's folder (its metadata, or only its card: a save that was
    interrupted) and a new or empty one are fine; other files are left alone."""
    if (directory / METADATA_FILE).exists():
        return
    card = directory / CARD_FILE
    if card.is_file() and is_table_card(card):
        return  # this library's card without the metadata: a save of a table that was interrupted
    data = directory / DATA_DIR
    foreign = [p for p in data.glob("*.parquet") if not p.name.startswith(".partial-")] if data.is_dir() else []
    foreign += [card] if card.exists() else []
    if foreign:
        names = ", ".join(str(p.relative_to(directory)) for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InfluenceTableError(
            f"{directory} holds files that are not an influence table's ({names}; no {METADATA_FILE}): saving "
            "there would replace them. Save to a new or empty folder, or to one an influence table was saved in.")


class InfluenceTableWriter:
    """Write an influence table incrementally: rows are appended as they are computed and shards are closed
    as they fill, so a table never has to fit in memory. ``close()`` writes the metadata and card and
    returns the table (lazily loaded). Use as a context manager; an exception discards the partial shards.

    Args:
        directory: the table folder (old shards there are replaced at ``close()``).
        metadata: how the table was made (can also be given to ``close``); checked now, before any row is written.
        shard_rows / row_group_rows: rows per parquet file / per row group (the unit a query reads).
        schema: the Arrow schema of the rows (default: that of the first rows written).
    """

    def __init__(self, directory: str | os.PathLike, metadata: dict | None = None, *, shard_rows: int = SHARD_ROWS,
                 row_group_rows: int = ROW_GROUP_ROWS, license: str | None = None, repo_id: str | None = None,
                 schema: pa.Schema | None = None):
        if shard_rows < 1 or row_group_rows < 1:
            raise ValueError(f"shard_rows and row_group_rows must be >= 1, got {shard_rows} and {row_group_rows}.")
        self.directory = Path(directory)
        self.metadata = dict(metadata or {})
        # (before any row is computed, not at close: metadata refused there discarded every row written)
        _check_metadata(complete_metadata(self.metadata))
        self.shard_rows, self.row_group_rows = shard_rows, min(row_group_rows, shard_rows)
        self.license, self.repo_id = license, repo_id
        self.schema = normalized_schema(schema) if schema is not None else None
        self.num_rows = 0
        self.sorted = True
        self._last: tuple[int, bool, float] | None = None  # `order_key` of the last row written
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._parts: list[Path] = []
        self._placed: list[Path] = []  # shards moved to their names by a `close` that has not written the metadata yet
        # for `close`'s check of repeated pairs: each write's `pair_keys` (8 bytes a row), or the ids themselves
        # once a write's ids are past 2**32
        self._keys: list[np.ndarray] = []
        self._pairs: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._writer: pq.ParquetWriter | None = None
        self._shard_filled = 0
        self._closed = False
        _check_folder_holds_a_table(self.directory)
        (self.directory / DATA_DIR).mkdir(parents=True, exist_ok=True)
        self._tag = f"{os.getpid()}-{HOST_TAG}-{os.urandom(4).hex()}"

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
        table = as_arrow(rows)
        check_columns(table.schema, "the rows written")
        if self.schema is None:
            self.schema = normalized_schema(table.schema)
        if set(table.column_names) != set(self.schema.names):
            raise ValueError(f"Rows written to one table must have the same columns: expected {self.schema.names}, "
                             f"got {table.column_names}.")
        table = checked_ids(table, "the rows written").select(self.schema.names).cast(self.schema)
        if not table.num_rows:
            return
        test_id, train_id = table.column("test_id").to_numpy(), table.column("train_id").to_numpy()
        keys = pair_keys(test_id, train_id) if self._pairs is None else None
        if keys is not None:
            self._keys.append(keys)
        else:
            if self._pairs is None:  # ids past 2**32: the pairs themselves from here on, those kept so far unpacked
                self._pairs = [((k >> np.uint64(32)).astype(np.int64), (k & np.uint64(2 ** 32 - 1)).astype(np.int64))
                               for k in self._keys]
                self._keys = []
            self._pairs.append((test_id, train_id))
        table = table.take(sort_order(table))
        first = order_key(table.column("test_id")[0].as_py(), table.column("influence")[0].as_py())
        if self._last is not None and first < self._last:
            self.sorted = False  # the readers sort on read, with NaN last like `sort_order`
        self._last = order_key(table.column("test_id")[-1].as_py(), table.column("influence")[-1].as_py())
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.num_rows += table.num_rows
        while self._buffered >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _flush(self, rows: int) -> None:
        try:
            self._write_rows(rows)
        except OSError as err:  # (pyarrow's "[Errno 28] Error writing bytes to file" names no file)
            raise write_error(self.directory, err) from err

    def _write_rows(self, rows: int) -> None:
        pending = pa.concat_tables(self._buffer)
        out, rest = pending.slice(0, rows), pending.slice(rows)
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows
        while out.num_rows:
            if self._writer is None:
                path = self.directory / DATA_DIR / f".partial-{self._tag}-{len(self._parts):05d}.parquet"
                self._parts.append(path)
                self._writer = pq.ParquetWriter(path, self.schema, write_page_checksum=True)
                self._shard_filled = 0
            piece = out.slice(0, self.shard_rows - self._shard_filled)
            self._writer.write_table(piece, row_group_size=self.row_group_rows)
            self._shard_filled += piece.num_rows
            out = out.slice(piece.num_rows)
            if self._shard_filled >= self.shard_rows:
                self._writer.close()
                self._writer = None

    def close(self, metadata: dict | None = None) -> InfluenceTable:
        """Finish the shards, then write the card and (last, so a folder with it is complete) the metadata. Any
        error on the way (a full disk while the last rows are flushed) discards the partial shards, as `abort`
        does, and is raised; metadata it refuses (a reserved key, an entry that must be a dict) keeps the rows, to be
        closed again."""
        if self._closed:
            raise ValueError("This InfluenceTableWriter is closed.")
        _refuse_storage_key(metadata or {}, " The rows written are kept: call close() again without it.")
        complete = complete_metadata(self.metadata | (metadata or {}))
        try:
            _check_metadata(complete)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{err} The rows written are kept: call close() again with the metadata fixed.") from err
        try:
            if self._pairs is not None:
                repeated = repeated_pair(*(np.concatenate(ids) for ids in zip(*self._pairs)))
            else:
                repeated = repeated_pair(None, None, keys=np.concatenate(self._keys)) if self._keys else None
            if repeated:  # (a chunk written twice: a retried write)
                raise InfluenceTableError(repeated_pair_message(repeated, "The rows written") + "; nothing was saved "
                                          f"(a chunk written twice?), {self.directory} keeps what it held.")
            return self._finish(complete)
        except BaseException:
            # a failed flush left .partial-*.parquet files (a full disk: filling it) that nothing removed
            self.abort()
            raise

    def _finish(self, metadata: dict) -> InfluenceTable:
        """`close` once ``metadata`` (complete, checked) is known good."""
        from .table import InfluenceTable  # here, not at the top: table.py imports this module

        if self.schema is None:
            self.schema = normalized_schema(pa.schema([("test_id", pa.int64()), ("train_id", pa.int64()),
                                                       ("influence", pa.float64())]))
        if self._buffered:
            self._flush(self._buffered)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._parts:  # an empty table still has one (empty) shard with the schema
            self._parts.append(self.directory / DATA_DIR / f".partial-{self._tag}-00000.parquet")
            pq.write_table(self.schema.empty_table(), self._parts[0], write_page_checksum=True)
        # the license recorded in the metadata too, so a loaded table keeps it (a pull, a save and a push again
        # published tables of cc-by-sa text as apache-2.0): the one given, else the table's own, else the default
        metadata = metadata | {"license": self.license or metadata.get("license") or DEFAULT_LICENSE}
        # the card is made before anything of a previous table is touched: metadata it cannot render (or any error
        # up to here) leaves that table as it was
        card = dataset_card(metadata, self.num_rows, repo_id=self.repo_id, license=metadata["license"],
                            columns=self.schema.names)
        self._closed = True
        # the shards' names carry a digest of the new shards' contents: a save never writes over a shard of the table
        # already in the folder (a shard of the same name holds the same rows), so that table stays whole, and is what
        # loads, until the new metadata replaces its own in one rename. (Its metadata was deleted first and its shards
        # replaced one by one: a full disk, a Ctrl-C or a killed process while finishing left no table at all.)
        described = [_describe_file(part) for part in self._parts]
        digest = hashlib.sha256("".join(d["sha256"] for d in described).encode()).hexdigest()[:SHARD_TAG_CHARS]
        names = [f"train-{i:05d}-of-{len(self._parts):05d}-{digest}.parquet" for i in range(len(self._parts))]
        data, card_path = self.directory / DATA_DIR, self.directory / CARD_FILE
        # one writer at a time finishes a folder: every process of a launch saving the table it holds (each has the
        # whole table) replaced and deleted the others' shards mid-save, and the launch failed with the table lost
        (self.directory / LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.directory / LOCK_FILE)):
            if not (self.directory / METADATA_FILE).exists():
                # a first save: the card before any shard is placed, so a save interrupted from here on leaves a
                # folder known as a table's (`_check_folder_holds_a_table`), which a new save or a resumed build may
                # replace
                write_atomic(card_path, str(card))
            for part, name, entry in zip(self._parts, names, described):
                target = data / name
                if _holds(target, entry):  # the same rows, saved before (a reader may hold it open: left as it is)
                    part.unlink()
                elif target.is_file():  # the same name, damaged (truncated, a byte changed): kept, it was never
                    # repaired, and every rerun of a build failed on it; replaced in one rename (a reader holding the
                    # damaged one keeps it)
                    logger.warning(f"{target} did not hold the rows its name stands for (damaged): written again.")
                    os.replace(part, target)
                else:
                    os.replace(part, target)
                    self._placed.append(target)
                entry["path"] = f"{DATA_DIR}/{name}"
            storage = {"format": "parquet", "num_rows": self.num_rows, "sorted": self.sorted, "shards": described,
                       "columns": {f.name: str(f.type) for f in self.schema}}
            write_atomic(self.directory / METADATA_FILE, to_json(metadata | {STORAGE_KEY: storage}, indent=2))
            self._placed = []  # (the new table is the folder's now)
            write_atomic(card_path, str(card))
            for old in data.glob("*.parquet"):  # the previous table's shards, and those of interrupted saves
                if old.name not in names and not _live_partial(old):
                    old.unlink(missing_ok=True)
            return InfluenceTable.load(self.directory)

    def abort(self) -> None:
        """Discard what was written (the folder keeps any previous table)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        for part in self._parts + self._placed:  # (shards placed for metadata that was never written: not the table's)
            with contextlib.suppress(OSError):  # (one that cannot be removed: the others still are)
                part.unlink(missing_ok=True)
        self._placed = []
        self._buffer, self._buffered = [], 0
        self._closed = True
