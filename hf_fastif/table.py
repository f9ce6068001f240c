"""`InfluenceTable`: influence scores as a `datasets.Dataset` plus the metadata of how they were made.

Rows are kept sorted by ``(test_id, influence)``, so the most helpful rows of a test point come first and
the most harmful last; `helpful` / `harmful` slice without scanning the table. On disk (and on the Hub) a
table is parquet shards under ``data/``, ``influence_metadata.json`` and a dataset card ``README.md``;
no pickle anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset, concatenate_datasets

SCHEMA_VERSION = 1
REQUIRED_COLUMNS = ("test_id", "train_id", "influence")
METADATA_FILE = "influence_metadata.json"
DATA_DIR = "data"
SHARD_ROWS = 1_000_000


class InfluenceTable:
    """Influence of training rows on test rows. Negative = helpful, positive = harmful.

    Args:
        dataset: columns at least ``test_id``, ``train_id``, ``influence`` (more are kept, e.g. text).
        metadata: how the table was made (model, data, settings, λ, version).
    """

    def __init__(self, dataset: Dataset, metadata: dict | None = None, *, _sorted: bool = False):
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(f"An influence table needs the columns {list(REQUIRED_COLUMNS)}; missing {missing} "
                             f"(found {dataset.column_names}).")
        if not _sorted and len(dataset):
            order = np.lexsort((dataset.data.column("influence").to_numpy(), dataset.data.column("test_id").to_numpy()))
            if not np.array_equal(order, np.arange(len(order))):
                dataset = dataset.select(order)
        self.dataset = dataset
        self.metadata = dict(metadata or {})
        self.metadata.setdefault("schema_version", SCHEMA_VERSION)
        self._offsets: dict[int, tuple[int, int]] | None = None

    @classmethod
    def from_arrays(cls, test_id: Sequence[int], train_id: Sequence[int], influence: Sequence[float],
                    metadata: dict | None = None, **columns) -> InfluenceTable:
        test_id, influence = np.asarray(test_id, dtype=np.int64), np.asarray(influence, dtype=np.float64)
        order = np.lexsort((influence, test_id))
        data = {"test_id": test_id[order], "train_id": np.asarray(train_id, dtype=np.int64)[order],
                "influence": influence[order], **{k: [v[i] for i in order] for k, v in columns.items()}}
        return cls(Dataset.from_dict(data), metadata, _sorted=True)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return (f"InfluenceTable(rows={len(self)}, test_ids={len(self.test_ids)}, "
                f"solver={self.metadata.get('settings', {}).get('influence_solver')!r})")

    @property
    def test_ids(self) -> list[int]:
        return list(self._index())

    def _index(self) -> dict[int, tuple[int, int]]:
        if self._offsets is None:
            ids = np.asarray(self.dataset.data.column("test_id").to_numpy())
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.array([], dtype=int)
            stops = np.r_[starts[1:], len(ids)]
            self._offsets = {int(ids[s]): (int(s), int(e)) for s, e in zip(starts, stops)}
        return self._offsets

    def _rows(self, test_id: int) -> tuple[int, int]:
        index = self._index()
        if test_id not in index:
            raise KeyError(f"test_id {test_id} is not in this table; it holds {len(index)} test ids "
                           f"(e.g. {list(index)[:5]}).")
        return index[test_id]

    def for_test(self, test_id: int = 0) -> pd.DataFrame:
        """Every row of one test point, most helpful first."""
        start, stop = self._rows(test_id)
        return self.dataset.select(range(start, stop)).to_pandas()

    def helpful(self, test_id: int = 0, n: int = 10) -> pd.DataFrame:
        """The n most helpful training rows (most negative influence first)."""
        start, stop = self._rows(test_id)
        return self.dataset.select(range(start, min(stop, start + n))).to_pandas()

    def harmful(self, test_id: int = 0, n: int = 10) -> pd.DataFrame:
        """The n most harmful training rows (most positive influence first)."""
        start, stop = self._rows(test_id)
        return self.dataset.select(range(stop - 1, max(start, stop - n) - 1, -1)).to_pandas()

    def to_pandas(self) -> pd.DataFrame:
        return self.dataset.to_pandas()

    def add_text(self, train_dataset: Dataset | None = None, test_dataset: Dataset | None = None,
                 columns: Sequence[str] = ("premise", "hypothesis", "text", "sentence", "label")) -> InfluenceTable:
        """A copy carrying ``train_<col>`` / ``test_<col>`` for the given columns that the datasets have,
        so the table is readable on its own."""
        extra = {}
        for prefix, source, key in (("train", train_dataset, "train_id"), ("test", test_dataset, "test_id")):
            if source is None:
                continue
            ids = self.dataset.data.column(key).to_numpy()
            for col in [c for c in columns if c in source.column_names]:
                values = source.select_columns([col])[col]
                extra[f"{prefix}_{col}"] = [values[int(i)] for i in ids]
        dataset = self.dataset
        for name, values in extra.items():
            dataset = dataset.remove_columns(name) if name in dataset.column_names else dataset
            dataset = dataset.add_column(name, values)
        return InfluenceTable(dataset, self.metadata, _sorted=True)

    # ---- files -------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, shard_rows: int = SHARD_ROWS) -> Path:
        """Write ``data/train-XXXXX-of-XXXXX.parquet`` shards, the metadata JSON and a dataset card."""
        directory = Path(directory)
        (directory / DATA_DIR).mkdir(parents=True, exist_ok=True)
        for old in (directory / DATA_DIR).glob("*.parquet"):
            old.unlink()
        shards = max(1, -(-len(self.dataset) // shard_rows))
        for i in range(shards):
            part = self.dataset.select(range(i * shard_rows, min(len(self.dataset), (i + 1) * shard_rows)))
            part.to_parquet(str(directory / DATA_DIR / f"train-{i:05d}-of-{shards:05d}.parquet"))
        (directory / METADATA_FILE).write_text(json.dumps(self.metadata, indent=2, default=str))
        (directory / "README.md").write_text(dataset_card(self.metadata, len(self.dataset)))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> InfluenceTable:
        """Load a table written by `save` (parquet is memory-mapped through the datasets cache)."""
        directory = Path(directory)
        meta_path = directory / METADATA_FILE
        if not meta_path.is_file():
            raise ValueError(f"{directory} is not an influence table: {METADATA_FILE} is missing. "
                             "Write tables with InfluenceTable.save(dir) or push_to_hub.")
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path} is not valid JSON ({err}); the table is corrupt, download it again.") from err
        version = metadata.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{directory} has influence-table schema version {version!r}; this hf_fastif reads "
                             f"version {SCHEMA_VERSION}. Upgrade hf_fastif or rebuild the table.")
        files = sorted((directory / DATA_DIR).glob("*.parquet"))
        if not files:
            raise ValueError(f"{directory} has no parquet shards under {DATA_DIR}/; the table is incomplete.")
        try:
            parts = [Dataset.from_parquet(str(f)) for f in files]
        except Exception as err:  # pyarrow raises several types for damaged files
            raise ValueError(f"A parquet shard under {directory / DATA_DIR} is corrupt ({err}); download or "
                             "rebuild the table.") from err
        dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        return cls(dataset, metadata, _sorted=True)

    # ---- Hub -----------------------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload influence table with hf_fastif", shard_rows: int = SHARD_ROWS) -> str:
        """Create (or update) a dataset repo holding this table; returns the commit URL/oid string."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp, shard_rows=shard_rows)
            info = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=tmp,
                                     commit_message=commit_message, delete_patterns=[f"{DATA_DIR}/*.parquet"])
        return getattr(info, "oid", None) or str(info)

    @classmethod
    def from_hub(cls, repo_id: str, *, revision: str | None = None, token: str | None = None,
                 cache_dir: str | None = None) -> InfluenceTable:
        """Download a table pushed with `push_to_hub` (a dataset repo) and load it."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            path = snapshot_download(repo_id, repo_type="dataset", revision=revision, token=token,
                                     cache_dir=cache_dir, allow_patterns=[METADATA_FILE, "README.md", f"{DATA_DIR}/*"])
        except RevisionNotFoundError as err:
            raise ValueError(f"Revision {revision!r} does not exist in dataset repo {repo_id!r}; use a branch, "
                             "tag or commit of that repo.") from err
        except RepositoryNotFoundError as err:
            raise ValueError(f"No dataset repo {repo_id!r} on the Hub (or it is private: pass token=...).") from err
        return cls.load(path)


def dataset_card(metadata: dict, rows: int) -> str:
    """A dataset card (YAML front matter + text) saying what the table is and how to load it."""
    settings = metadata.get("settings", {})
    model = metadata.get("model", {}).get("name_or_path", "unknown")
    yaml = [
        "---",
        "license: apache-2.0",
        "tags:",
        "- influence-functions",
        "- fastif",
        "- hf_fastif",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        f"    path: {DATA_DIR}/*.parquet",
        "---",
    ]
    body = [
        "# Influence table",
        "",
        f"Influence of training rows on test rows of `{model}`, computed with "
        f"[hf_fastif](https://github.com/hf-fastif/hf_fastif) {metadata.get('library_version', '')} "
        "(FastIF, Guo et al. 2021). `influence = -∇L(z_train) · s_test`: negative is helpful, positive harmful.",
        "",
        f"Rows: {rows}. Columns: `test_id`, `train_id`, `influence` (+ any text columns).",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in settings.items()],
        "",
        "## Load",
        "",
        "```python",
        "from hf_fastif import InfluenceTable",
        "table = InfluenceTable.from_hub(REPO_ID)",
        "table.helpful(test_id=0, n=10)",
        "# or, without hf_fastif:",
        "from datasets import load_dataset",
        "ds = load_dataset(REPO_ID, split='train')",
        "```",
        "",
    ]
    return "\n".join(yaml + body)
