"""Loaders for MNLI, HANS and ANLI, from the Hub or from local files, into one column schema.

Every loader returns a `datasets.Dataset` with `premise`, `hypothesis` and `label` (a ClassLabel:
0 = entailment, 1 = non_entailment for 2 labels; 0 = entailment, 1 = neutral, 2 = contradiction for
3 labels), plus `genre` for MNLI / ANLI and `heuristic`, `subcase`, `template`, `pair_id` for HANS,
the same columns as `generate_nli`.

Local files (`.jsonl`, `.json`, `.csv`, `.tsv`, `.txt`, `.parquet`) may use the Hub's column names
(`premise` / `hypothesis` / `label`) or the official releases' (`sentence1` / `sentence2` /
`gold_label`). String labels are mapped by name; integer labels by the file's ClassLabel names when
it carries them (parquet written by `datasets`), otherwise by the format's standard order.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, DatasetDict, Features
from huggingface_hub import constants
from transformers.utils import logging

from .rows import row_key_kind, row_keys
from .schema import NLI3_LABELS, hans_features, label_names, nli_features

logger = logging.get_logger(__name__)

DATA_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")

HANS_TSV_HEADER: tuple[str, ...] = (
    "gold_label",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "pairID",
    "heuristic",
    "subcase",
    "template",
)
"""Header of the official HANS files (heuristics_evaluation_set.txt, heuristics_train_set.txt)."""

HANS_HUB_COLUMNS: tuple[str, ...] = ("premise", "hypothesis", "label", "heuristic", "subcase", "template")
"""Columns of the Hub's `hans` dataset that the loader needs (its parse columns are ignored)."""

# label strings of every supported format, mapped to MNLI's 3-label ids (HANS: to 2-label ids)
_NLI3_ALIASES = {"entailment": 0, "neutral": 1, "contradiction": 2, "e": 0, "n": 1, "c": 2}
_NON_ENTAILMENT_ALIASES = {"non_entailment", "non-entailment", "not_entailment", "not-entailment"}
_HANS_ALIASES = {"entailment": 0, **{alias: 1 for alias in _NON_ENTAILMENT_ALIASES}}
_NO_LABEL = {-1, "-1", "-", ""}  # MNLI's "no gold label" rows

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_LIKE_SUFFIXES = (*DATA_FILE_SUFFIXES, ".gz", ".bz2", ".zip", ".xz", ".zst", ".arrow", ".xlsx", ".pkl")
_TRUE = {"1", "ON", "YES", "TRUE"}


# ------------------------------------------------------------------------------------- sources
def hub_offline() -> bool:
    """Offline mode as set now: huggingface_hub's constant or the environment variables."""
    env = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(value in _TRUE for value in env)


def _resolve(name_or_path: str | os.PathLike) -> Path | str:
    """A local file as a `Path`, or a Hub id as a `str`; raises if it is neither."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not _saved_dataset(path):
            raise ValueError(
                f"{str(path)!r} is a directory; pass one data file ({', '.join(DATA_FILE_SUFFIXES)}) inside it, or a "
                "folder written by datasets' save_to_disk."
            )
        return path
    text = str(name_or_path)
    looks_like_file = text.lower().endswith(_FILE_LIKE_SUFFIXES) or text.startswith((".", "~", os.sep))
    if looks_like_file or not _HUB_ID.match(text):
        raise FileNotFoundError(
            f"No such file: {str(path)!r}. Pass an existing data file ({', '.join(DATA_FILE_SUFFIXES)}) "
            "or a Hub dataset id such as 'nyu-mll/multi_nli'."
        )
    if hub_offline():
        raise ValueError(
            f"{text!r} is not a local file, so it would be loaded from the Hugging Face Hub, but the Hub is "
            "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). Pass a local file path instead "
            f"({', '.join(DATA_FILE_SUFFIXES)}), or go online and unset HF_HUB_OFFLINE."
        )
    return text


def _saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder `datasets.Dataset.save_to_disk` (or a DatasetDict's) wrote: its ``.arrow`` files
    are read with `datasets.load_from_disk` (one was refused, with advice to pass a data file inside it, whose only
    files are those ``.arrow`` files, which are refused)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _label_names_from_features(features: Features | None) -> list[str] | None:
    if features is not None and isinstance(features.get("label"), ClassLabel):
        return list(features["label"].names)
    return None


def _read_local(path: Path) -> tuple[pd.DataFrame, list[str] | None]:
    """Read a data file as strings-or-ints; also the label names stored in a parquet schema, if any."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt", ".csv"):
        try:
            frame = _read_tsv(path) if suffix != ".csv" else pd.read_csv(path, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:  # ("No columns to parse from file": the caller names the empty file)
            frame = pd.DataFrame()
        frame.attrs["delimited"] = True  # (empty fields are missing values)
        return frame, None
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8-sig") as handle:  # (a byte-order mark, as Notepad writes: skipped)
            text = handle.read()
        if suffix == ".json" and text.lstrip().startswith(("[", "{")):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                if text.lstrip().startswith("["):
                    raise ValueError(f"{path} is not valid JSON ({err}).") from err
                data = None  # a jsonl file named .json: read line by line below
            if isinstance(data, list):
                return pd.DataFrame.from_records(data), None
            if isinstance(data, dict) and data and all(isinstance(v, (dict, list)) for v in data.values()):
                try:
                    return pd.DataFrame(data), None  # pandas' DataFrame.to_json(): one object of columns
                except ValueError as err:
                    raise ValueError(f"{path}: its columns are of different lengths ({err}).") from err
            if isinstance(data, dict):
                return pd.DataFrame.from_records([data]), None  # one record (pretty-printed)
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {number} is not a JSON record ({err.msg}, column {err.colno}); "
                                     "a jsonl file holds one JSON object per line.") from err
        return pd.DataFrame.from_records(records), None
    if suffix == ".parquet":
        table = pq.read_table(path)
        names = None
        if table.schema.metadata and b"huggingface" in table.schema.metadata:
            names = _label_names_from_features(Features.from_arrow_schema(table.schema))
        return table.to_pandas(), names
    raise ValueError(
        f"Unknown file extension {path.suffix!r} for {str(path)!r}. Supported: {', '.join(DATA_FILE_SUFFIXES)}; "
        "convert the file (e.g. with pandas) or pass a Hub dataset id."
    )


def _read_tsv(path: Path) -> pd.DataFrame:
    """An unquoted tab-separated file (the official MNLI / HANS format; "NaN", "null" and "n/a" are words there) whose
    every line has the header's fields: a tab inside a text (a field quoted by a csv writer) shifted a row, and pandas
    took a first line with one field too many as an index column, which moved every row's columns one to the left."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        lines = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not lines:
        return pd.DataFrame()
    header, rows = lines[0], [row for row in lines[1:] if row]
    for number, row in enumerate(lines[1:], start=2):
        if row and len(row) != len(header):
            raise ValueError(f"{path}: line {number} has {len(row)} tab-separated fields, the header {len(header)} "
                             f"({header}). A tab or a line break inside a text splits it (a csv writer's quotes do "
                             "not protect it here: the format is unquoted); write the file as .jsonl or .parquet, or "
                             "remove the tabs from the texts.")
    quoted = sum(1 for row in rows for field in row if len(field) > 1 and field[0] == field[-1] == '"')
    if quoted:
        logger.warning(f"{path}: {quoted} field(s) are wrapped in double quotes, read as part of the text (the format "
                       "is unquoted, as the official files are); if a csv writer added them, write the file as .jsonl "
                       "or .parquet instead.")
    return pd.DataFrame(rows, columns=header, dtype=str)


def _not_utf8(path: Path, err: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}: {err.object[err.start:err.end]!r}). "
                      "Save it again as UTF-8 (e.g. pandas: read it with its encoding, such as encoding='cp1252' or "
                      "'utf-16', and write it with to_csv / to_json, whose default is UTF-8).")


def local_columns(path: str | os.PathLike) -> list[str] | None:
    """The column names of a local data file (None: not a local file, or a format whose columns are not read
    here)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    try:
        return _local_columns(path)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _local_columns(path: Path) -> list[str] | None:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".tsv", ".csv"):
        with open(path, encoding="utf-8-sig") as handle:
            return next(csv.reader(handle, delimiter="," if suffix == ".csv" else "\t"), [])
    if suffix == ".parquet":
        return pq.read_schema(path).names
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8-sig") as handle:
            first = handle.read(1 << 20).lstrip()
        try:  # the first record of a jsonl file, or of a json list
            record = json.JSONDecoder().raw_decode(first[1:].lstrip() if first.startswith("[") else first)[0]
        except ValueError:
            return None  # the loader names what is wrong with it
        return list(record) if isinstance(record, dict) else None
    return None


def _load(source: Path | str, split: str) -> tuple[pd.DataFrame, list[str] | None]:
    """Read a resolved source: a local file, or a Hub id through `datasets.load_dataset`."""
    if isinstance(source, Path) and source.is_dir():  # a save_to_disk folder (`_saved_dataset`)
        saved = datasets.load_from_disk(str(source))
        if isinstance(saved, DatasetDict):
            if split not in saved:
                raise ValueError(f"{str(source)!r} holds the splits {list(saved)}, not {split!r}: name one as the "
                                 "split (--train_split / --test_split).")
            saved = saved[split]
        logger.info(f"Loading {source} (a saved dataset, {len(saved)} rows).")
        return saved.to_pandas(), _label_names_from_features(saved.features)
    if isinstance(source, Path):
        logger.info(f"Loading {source} (local file; split {split!r} ignored).")
        try:
            frame, file_names = _read_local(source)
        except UnicodeDecodeError as err:
            raise _not_utf8(source, err) from err
        if not len(frame.columns):  # an empty file: no header to name columns by
            raise ValueError(f"{str(source)!r} gives no data: it is empty (no header, no rows). Pass a file with "
                             "labelled rows.")
        return frame, file_names
    logger.info(f"Loading {source!r} split {split!r} from the Hugging Face Hub.")
    dataset = datasets.load_dataset(source, split=split)  # looked up at call time, so tests can stand in for it
    return dataset.to_pandas(), _label_names_from_features(dataset.features)


# -------------------------------------------------------------------------------------- labels
def _as_key(value: Any) -> Any:
    """Label value as int when it is integral (1, 1.0, "1"), else as a stripped lower-case string."""
    if isinstance(value, (bool, np.bool_)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text.lower()


def _bad_labels(rows: Sequence[tuple[int, Any]], accepted: str) -> ValueError:
    """The refusal of ``(row, value)`` labels that are not ``accepted``: each value once, with the first row holding
    it (0-based, in file order)."""
    first = {}
    for row, value in rows:
        first.setdefault(repr(value), row)
    shown = ", ".join(f"{value} (row {row})" for value, row in list(first.items())[:10])
    return ValueError(f"Unexpected label values {shown}; expected {accepted}. Fix or drop these rows (rows 0-based, "
                      "in file order).")


@contextlib.contextmanager
def _naming(name_or_path) -> Iterator[None]:
    """Refusals of a file's contents name the file (a build reads two: which one held the bad label was not said)."""
    try:
        yield
    except ValueError as err:
        if str(name_or_path) in str(err):
            raise
        raise ValueError(f"{str(name_or_path)!r}: {err}") from err


def _mnli_labels(raw: pd.Series, file_names: list[str] | None, num_labels: int) -> np.ndarray:
    """Map MNLI/ANLI labels to `num_labels` ids; -1 for rows without a gold label."""
    aliases = dict(_NLI3_ALIASES)
    if file_names is not None:  # integer ids follow the file's own ClassLabel order
        lowered = [n.lower() for n in file_names]
        unknown = [n for n in lowered if n not in aliases and n not in _NON_ENTAILMENT_ALIASES]
        if unknown:
            raise ValueError(
                f"Unexpected label names {unknown} in the file's schema; expected names in {NLI3_LABELS}."
            )
    out, bad = np.empty(len(raw), dtype=np.int64), []
    for i, value in enumerate(raw.tolist()):
        key = _as_key(value)
        if key in _NO_LABEL:
            out[i] = -1
            continue
        if isinstance(key, int) and file_names is not None and 0 <= key < len(file_names):
            key = file_names[key].lower()
        if isinstance(key, str) and key in _NON_ENTAILMENT_ALIASES:
            if num_labels == 3:
                raise ValueError(
                    f"Label {value!r} (row {i}) is 2-label (entailment / non_entailment) and cannot be split into "
                    "neutral / contradiction: use a 2-label (MNLI-2) model, or data with 3-way labels (num_labels=2 "
                    "when loading in Python)."
                )
            out[i] = 1
            continue
        if isinstance(key, str):
            key = aliases.get(key, key)
        if key in (0, 1, 2) and not isinstance(key, bool):
            out[i] = key if num_labels == 3 else min(key, 1)
        else:
            bad.append((i, value))
    if bad:
        raise _bad_labels(
            bad, "0/1/2 or entailment/neutral/contradiction (e/n/c), or -1/'-' for no gold label"
        )
    return out


def _hans_labels(raw: pd.Series, file_names: list[str] | None) -> np.ndarray:
    """Map HANS labels to 0 = entailment, 1 = non_entailment."""
    names = [n.lower() for n in file_names] if file_names is not None else ["entailment", "non-entailment"]
    if any(n not in _HANS_ALIASES for n in names):
        raise ValueError(
            f"Unexpected label names {file_names} in the file's schema; expected entailment / non-entailment."
        )
    out, bad = np.empty(len(raw), dtype=np.int64), []
    for i, value in enumerate(raw.tolist()):
        key = _as_key(value)
        if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(names):
            key = names[key]
        if isinstance(key, str) and key in _HANS_ALIASES:
            out[i] = _HANS_ALIASES[key]
        else:
            bad.append((i, value))
    if bad:
        raise _bad_labels(bad, "'entailment' / 'non-entailment', or 0 = entailment / 1 = non-entailment")
    return out


# ------------------------------------------------------------------------------------- columns
def _pick(frame: pd.DataFrame, candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in frame.columns), None)


def _not_empty(dataset: Dataset, name_or_path, read: int) -> Dataset:
    """``dataset``, refused when it has no rows (a header-only file): it failed later, after training, or in
    `split_hans` with a numpy error."""
    if len(dataset):
        return dataset
    why = f"none of its {read} rows has a gold label" if read else "it holds no rows (a header only, or empty)"
    raise ValueError(f"{str(name_or_path)!r} gives no data: {why}. Pass a file with labelled rows.")


def _first_rows(rows: np.ndarray, count: int = 10) -> str:
    """The first ``count`` row numbers, joined, with ", ..." where there are more."""
    return ", ".join(str(int(r)) for r in rows[:count]) + (", ..." if len(rows) > count else "")


def _texts(frame: pd.DataFrame, column: str, keep: np.ndarray | None = None) -> list[str]:
    """The text column ``column`` as strings (of the rows ``keep`` marks); a row without its text (missing in a jsonl
    record, null, NaN) is refused by row number, instead of being read as the word "nan" or "None"."""
    values = frame[column] if keep is None else frame[column][keep]
    missing = values.isna()
    if frame.attrs.get("delimited"):  # an empty field of a csv / tsv file is its missing value (jsonl: "" is text)
        missing |= values.astype(str).str.strip() == ""
    missing = np.flatnonzero(missing.to_numpy())
    if len(missing):
        rows = np.arange(len(frame))[keep] if keep is not None else np.arange(len(frame))
        raise ValueError(f"{len(missing)} row(s) have no {column!r} text (missing or null; in a csv / tsv file, an empty "
                         f"field), e.g. rows {_first_rows(rows[missing])} (0-based, in file order). Fill them in or "
                         "drop those rows.")
    return values.astype(str).tolist()


def _nli_frame(frame: pd.DataFrame, file_names: list[str] | None, num_labels: int, genre: str) -> Dataset:
    premise = _pick(frame, ("premise", "sentence1", "context"))
    hypothesis = _pick(frame, ("hypothesis", "sentence2"))
    label = _pick(frame, ("label", "gold_label"))
    if premise is None or hypothesis is None or label is None:
        raise ValueError(
            "Expected NLI columns premise/hypothesis/label (Hub style) or sentence1/sentence2/gold_label "
            f"(official MNLI style); found {list(frame.columns)}. Rename the columns or pass the official file."
        )
    labels = _mnli_labels(frame[label], file_names, num_labels)
    keep = labels >= 0
    if not keep.all():  # (the ids were only counted: a table's train_id 10 held the file's row 11, unsaid)
        dropped = np.flatnonzero(~keep)
        logger.warning(f"Dropped {len(dropped)} of {len(keep)} rows without a gold label (rows {_first_rows(dropped)}; "
                       "0-based, in file order). The rows kept are numbered anew from 0, so a table's train_id / "
                       "test_id count the kept rows: past a dropped row they are not the file's row numbers.")
    genres = frame["genre"].astype(str) if "genre" in frame.columns else pd.Series([genre] * len(frame))
    rows = {
        "premise": _texts(frame, premise, keep),
        "hypothesis": _texts(frame, hypothesis, keep),
        "label": labels[keep].tolist(),
        "genre": genres.to_numpy()[keep].tolist(),
    }
    return Dataset.from_dict(rows, features=nli_features(num_labels))


def _hans_frame(frame: pd.DataFrame, file_names: list[str] | None, tsv: bool) -> Dataset:
    columns = list(frame.columns)
    official = all(c in columns for c in HANS_TSV_HEADER)
    hub = all(c in columns for c in HANS_HUB_COLUMNS)
    if tsv and not official:
        raise ValueError(
            "Not an official HANS file: expected the tab-separated header\n  "
            + "\t".join(HANS_TSV_HEADER)
            + f"\nbut found the columns {columns}. Pass heuristics_evaluation_set.txt / heuristics_train_set.txt "
            "as released, or a parquet/jsonl copy of the Hub's hans dataset."
        )
    if not (official or hub):
        raise ValueError(
            f"Not a HANS file: expected the official columns {list(HANS_TSV_HEADER)} or the Hub hans columns "
            f"{list(HANS_HUB_COLUMNS)}; found {columns}."
        )
    if official:
        premise, hypothesis, label, pair_ids = (
            "sentence1",
            "sentence2",
            "gold_label",
            frame["pairID"].astype(str),
        )
    else:
        premise, hypothesis, label = "premise", "hypothesis", "label"
        # the Hub copy has no pair ids; HANS's own are ex0, ex1, ... in file order
        pair_ids = (
            frame["pairID"].astype(str)
            if "pairID" in columns
            else pd.Series([f"ex{i}" for i in range(len(frame))])
        )
    rows = {
        "premise": _texts(frame, premise),
        "hypothesis": _texts(frame, hypothesis),
        "label": _hans_labels(frame[label], file_names).tolist(),
        "heuristic": frame["heuristic"].astype(str).tolist(),
        "subcase": frame["subcase"].astype(str).tolist(),
        "template": frame["template"].astype(str).tolist(),
        "pair_id": pair_ids.tolist(),
    }
    return Dataset.from_dict(rows, features=hans_features())


# --------------------------------------------------------------------------------------- public
def load_mnli(
    name_or_path: str | os.PathLike = "nyu-mll/multi_nli", split: str = "train", num_labels: int = 2
) -> Dataset:
    """Load MNLI (or any MNLI-format NLI data) from the Hub or a local file.

    Args:
        name_or_path: a Hub dataset id, or a local `.jsonl`/`.json`/`.csv`/`.tsv`/`.txt`/`.parquet` file
            with columns premise/hypothesis/label or the official sentence1/sentence2/gold_label.
        split: the Hub split (`train`, `validation_matched`, `validation_mismatched`); ignored for files.
        num_labels: 2 maps neutral and contradiction to 1 = non_entailment (MNLI-2); 3 keeps MNLI's
            0 = entailment, 1 = neutral, 2 = contradiction.

    Returns:
        A `Dataset` with `premise`, `hypothesis`, `label`, `genre` (the data's own, e.g. `fiction`; `mnli`, the
        source, for a file without a genre column); rows without a gold label (-1, "-") are dropped.
    """
    label_names(num_labels)
    frame, file_names = _load(_resolve(name_or_path), split)
    with _naming(name_or_path):
        return _not_empty(_nli_frame(frame, file_names, num_labels, genre="mnli"), name_or_path, len(frame))


def load_anli(
    name_or_path: str | os.PathLike = "facebook/anli", split: str = "train_r1", num_labels: int = 3
) -> Dataset:
    """Load ANLI from the Hub or a local file (Hub columns, or the official jsonl's context/hypothesis/label e/n/c).

    Args:
        name_or_path: a Hub dataset id or a local data file.
        split: the Hub split (`train_r1` ... `test_r3`); ignored for files except for the genre tag.
        num_labels: 3 (entailment / neutral / contradiction) or 2 (entailment / non_entailment).

    Returns:
        A `Dataset` with `premise`, `hypothesis`, `label`, `genre` (`anli_r1` etc. from the split name).
    """
    label_names(num_labels)
    round_match = re.search(r"r(\d)", split)
    genre = f"anli_r{round_match.group(1)}" if round_match else "anli"
    frame, file_names = _load(_resolve(name_or_path), split)
    with _naming(name_or_path):
        return _not_empty(_nli_frame(frame, file_names, num_labels, genre=genre), name_or_path, len(frame))


def load_hans(name_or_path: str | os.PathLike, split: str = "validation") -> Dataset:
    """Load HANS from the official tab-separated file, a parquet/jsonl/csv copy of the Hub's `hans`, or a Hub id.

    Args:
        name_or_path: `heuristics_evaluation_set.txt` / `heuristics_train_set.txt` (official header
            `gold_label ... pairID heuristic subcase template`, labels "entailment" / "non-entailment"),
            a file with the Hub columns (premise, hypothesis, label with 0 = entailment, 1 = non-entailment,
            heuristic, subcase, template; a ClassLabel order stored in a parquet schema is honoured),
            or a Hub dataset id.
        split: the Hub split (`validation` = the evaluation set, `train`); ignored for files.

    Returns:
        A `Dataset` with `premise`, `hypothesis`, `label` (0 = entailment, 1 = non_entailment),
        `heuristic`, `subcase`, `template`, `pair_id`.
    """
    source = _resolve(name_or_path)
    tsv = isinstance(source, Path) and source.suffix.lower() in (".tsv", ".txt")
    frame, file_names = _load(source, split)
    with _naming(name_or_path):
        return _not_empty(_hans_frame(frame, file_names, tsv=tsv), name_or_path, len(frame))


def split_hans(dataset: Dataset, validation_fraction: float = 0.5, seed: int = 0) -> DatasetDict:
    """Split HANS into disjoint validation (anchors) and test parts, stratified by subcase.

    Identical pairs stay on one side: rows with the same token ids (``input_ids``, when tokenized), else the same
    whitespace-normalised premise and hypothesis, go to the side that most of them fell on (ties: the side of the
    first), so no validation row is also a test row even where the data repeat a pair. Without repeats this is
    the plain stratified split.

    Args:
        dataset: a HANS-style `Dataset` with a `subcase` column.
        validation_fraction: share of each subcase that goes to `validation`, in (0, 1).
        seed: the same seed gives the same split.

    Returns:
        `DatasetDict(validation=..., test=...)`; each keeps the rows' original order.
    """
    if "subcase" not in dataset.column_names:
        raise ValueError(
            f"split_hans needs a 'subcase' column; found {dataset.column_names}. Load the data with load_hans "
            "or generate_nli."
        )
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction must be strictly between 0 and 1, got {validation_fraction!r}."
        )
    rng = np.random.default_rng(seed)
    subcases = np.asarray(dataset["subcase"])
    validation: list[int] = []
    for subcase in sorted(set(subcases.tolist())):
        rows = rng.permutation(np.flatnonzero(subcases == subcase))
        validation.extend(rows[: int(round(len(rows) * validation_fraction))].tolist())
    in_validation = np.zeros(len(dataset), dtype=bool)
    in_validation[validation] = True
    by = row_key_kind(dataset)
    keys = row_keys(dataset, by) if by is not None else range(len(dataset))  # nothing to compare: every row its own
    groups: dict = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    for rows in groups.values():
        if len(rows) > 1:
            votes = int(in_validation[rows].sum())
            in_validation[rows] = votes * 2 > len(rows) or (votes * 2 == len(rows) and in_validation[rows[0]])
    for part, rows in (("validation", in_validation), ("test", ~in_validation)):
        if not rows.any():
            sizes = np.unique(subcases, return_counts=True)[1]
            raise ValueError(f"validation_fraction={validation_fraction!r} leaves the {part} split empty (each subcase "
                             f"has {sizes.min()}-{sizes.max()} rows, rounded per subcase); choose a fraction that "
                             "leaves rows on both sides, e.g. --validation_fraction 0.5.")
    return DatasetDict(
        validation=dataset.select(np.flatnonzero(in_validation)),
        test=dataset.select(np.flatnonzero(~in_validation)),
    )
