"""Loading the Space's state: a table from a local folder or the Hub (`open_table`), the embedded default
(`load_default`), either with its live engine (`load_state`), and the notices that say where live values can differ
from the table's."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging

from ..annotate import TRAIN_TEXT
from ..cache import SPACE_ENGINES
from ..data import NLI_MAX_LENGTH
from ..fingerprint import dataset_fingerprint
from ..params import num_parameters, select_parameters
from ..table import METADATA_FILE, InfluenceTable, InfluenceTableError
from ..table.format import candidate_pool, label_id
from .build import ENGINE_DIR, READY_FILE, build_default_with_explainer, default_cache_dir
from .explainer import Explainer
from .settings import KIND_ENV, MAX_TRAIN_ROWS, MODEL_ENV, REVISION_ENV, TABLE_ENV
from .state import SpaceState

logger = logging.get_logger(__name__)


def open_table(source: str, revision: str | None = None, *, force_download: bool = False
               ) -> tuple[InfluenceTable, str]:
    """``(table, description)`` of a local table folder or a Hub dataset repo id (the Space's ``--table``, ``hf-fastif
    show``). What is neither gets an error saying which was tried: a build folder names its table, a path that does
    not exist says so, and a name that could be either (``out/table``) says both were tried."""
    path = Path(source).expanduser()
    if path.is_dir():
        if revision:
            raise ValueError(f"A revision ({revision!r}) picks a version of a Hub repo, but {source!r} is a local "
                             "folder, which holds one version: drop the revision, or pass the Hub repo id.")
        try:
            return InfluenceTable.load(path), f"local folder {source}"
        except InfluenceTableError as err:  # a build folder: its table is one level down
            if (path / "table" / METADATA_FILE).is_file():
                raise InfluenceTableError(f"{err} It holds a build; its table is {path / 'table'}.") from err
            raise
    if path.exists():
        raise ValueError(f"{source!r} is not a table folder (pass the folder holding {METADATA_FILE}).")
    if source.startswith((".", "/", "~")):
        raise ValueError(f"There is no folder {source!r}: for a table on disk, check the path.")
    try:
        table = InfluenceTable.from_hub(source, revision=revision, force_download=force_download)
    except ValueError as err:  # 'out/table' could be either: say both were tried, where no such repo was found
        if not isinstance(err.__cause__, (RepositoryNotFoundError, HFValidationError, LocalEntryNotFoundError)):
            raise  # (a revision, a damaged copy of a repo that exists: not a local folder's matter)
        raise InfluenceTableError(f"{err} Nor is there a local folder {source!r}: for a table on disk, check the "
                                  "path.") from err
    return table, f"Hub dataset {source}" + (f"@{revision}" if revision else "")


def load_default(directory: str | os.PathLike | None = None, *, kind: str | None = None,
                 max_train_samples: int | None = None, progress: Callable[[str], None] | None = None,
                 notices: list[str] | None = None) -> SpaceState:
    """The embedded default's state: its build in ``directory`` (default `default_build_dir`) reused, or made now
    (``kind`` and ``max_train_samples`` as `build_default`), and its live engine warm (caches read from ``engine/``,
    or built and saved there)."""
    progress = progress or (lambda stage: None)
    directory, explainer = build_default_with_explainer(directory, None, kind=kind,
                                                        max_train_samples=max_train_samples, progress=progress)
    table = InfluenceTable.load(directory / "table")
    if explainer is None:
        progress("loading the model and the live engine's caches")
        explainer = _explainer(table, str(directory / "model"), Dataset.from_parquet(str(directory / "train.parquet")),
                               cache_dir=directory / ENGINE_DIR)
    progress(warm_up_stage(explainer))
    explainer.warm_up()
    built = json.loads((directory / READY_FILE).read_text()).get("config", {})
    return SpaceState.from_table(table, f"embedded default ({built.get('model', 'generated NLI')})", explainer,
                                 notices)


def load_state(source: str | None = None, *, revision: str | None = None, model: str | None = None,
               kind: str | None = None, max_train_samples: int | None = None,
               progress: Callable[[str], None] | None = None) -> SpaceState:
    """The Space's state. ``source``: a local table folder, a Hub dataset repo id, or None for the embedded
    default (`load_default`; also the fallback, with a notice, when ``source`` cannot be loaded). ``model``: a local
    dir or Hub id of the table's model for live explanations; without it, or when it does not match the table, the
    table is shown without them (and a notice says why). Environment: `TABLE_ENV`, `REVISION_ENV`, `MODEL_ENV`,
    `KIND_ENV` (``kind`` and ``max_train_samples``: the embedded default's, see `build_default`)."""
    progress = progress or (lambda stage: None)
    source = source if source is not None else os.environ.get(TABLE_ENV) or None
    revision = revision or os.environ.get(REVISION_ENV) or None
    model = model or os.environ.get(MODEL_ENV) or None
    kind = kind or os.environ.get(KIND_ENV) or None
    notices: list[str] = []
    failed: str | None = None  # why the table asked for did not load
    if source is None and (model is not None or revision is not None):
        notices.append(f"The {'model' if model is not None else 'revision'} given ({model or revision!r}) is for a "
                       "--table (HF_FASTIF_TABLE); the embedded default brings its own model, so it is not used.")
    if source is not None:
        progress(f"loading the influence table {source}")
        try:
            table, label = open_table(source, revision)
        except Exception as err:  # an offline Hub, a folder that is not a table...: the default instead
            logger.error(f"Could not load the influence table {source!r}: {type(err).__name__}: {err}")
            failed = f"Could not load the influence table {source!r}: {err}"
            notices.append(f"{failed} Showing the embedded default instead.")
            source = None
    if source is None:
        try:
            return load_default(kind=kind, max_train_samples=max_train_samples, progress=progress, notices=notices)
        except Exception as err:
            if failed is None:
                raise
            # the operator's own mistake (a table that would not load) must not vanish behind the default's failure
            raise RuntimeError(f"{failed} The embedded default could not start either: "
                               f"{type(err).__name__}: {err}") from err
    explainer = None
    if model is None:
        notices.append("Live explanations need the table's model: start the app with --model (or HF_FASTIF_MODEL).")
    else:
        progress(f"loading the model {model} and preparing live explanations")
        try:
            train = _train_from_table(table)
            explainer = _explainer(table, model, train, cache_dir=_engine_dir(table, train))
            progress(warm_up_stage(explainer))
            explainer.warm_up()
            notices += [note for note in [live_rows_notice(table, len(train))] if note]
        except Exception as err:  # a model that does not match the table, a table without text, weights that
            # cannot be read (a truncated safetensors file, a config that does not fit them): the table still shows
            logger.exception(f"Live explanations are off: {type(err).__name__}: {err}")
            why = str(err) if isinstance(err, (ValueError, OSError)) else (
                f"the model {model!r} could not be loaded or run ({type(err).__name__}: {err}; the Space's log has "
                "the details)")
            notices.append(f"Live explanations are off: {why}")
            explainer = None
        differs = settings_differ(table.metadata.get("settings") or {}, explainer)
        if differs:
            notices.append(f"Live explanations compute influence with other settings than this table ({differs}): a "
                           "typed copy of a table row can get other rows and values than the table shows.")
        own = own_functions(table) if explainer is not None else ""
        if own:
            notices.append(f"This table was computed with {own}; live explanations use the model's default loss for "
                           "both, so their values measure another quantity than the table's (and can read the other "
                           "way round).")
    return SpaceState.from_table(table, label, explainer, notices)


def live_rows_notice(table: InfluenceTable, live_rows: int) -> str | None:
    """A notice when live explanations run over other training rows than the table was computed over, else None: a
    table carries the text of the rows it scored (its candidates, of which at most `MAX_TRAIN_ROWS` are used), and
    those are the live engine's Hessian data and candidates. For a table that scored a candidate pool
    (`candidate_pool`) they are the pool's rows, not the training rows of its Hessian, which it does not carry: its
    live values differ from the table's whatever the counts (about 9% on a tiny BERT, with another third row)."""
    md = table.metadata
    if candidate_pool(md):
        pool, train = ((md.get(key) or {}).get("num_rows") for key in ("candidate_data", "train_data"))
        rows = (f"{live_rows:,} of its {pool:,} pool rows" if isinstance(pool, int) and live_rows < pool else
                f"its {live_rows:,} pool rows")
        hessian = f"the {train:,} training rows" if isinstance(train, int) else "the training rows"
        return (f"This table scored a candidate pool with the Hessian of {hessian} it was computed over, which it does "
                f"not carry: live explanations use {rows} as their Hessian data as well as their candidates, so their "
                "values differ from the table's, and they can rank other rows, even for a typed copy of a table row.")
    total = (md.get("train_data") or {}).get("num_rows")
    if not isinstance(total, int) or live_rows >= total:
        return None
    return (f"Live explanations use {live_rows:,} of the {total:,} training rows this table was computed over (the "
            "rows whose text it carries: its candidates, at most "
            f"{MAX_TRAIN_ROWS:,}): their Hessian and candidates are those rows', so a typed copy of a table row gets "
            "other values, and can get other rows, than the table shows.")


def settings_differ(table_settings: dict, explainer: Explainer | None) -> str:
    """The settings that decide the rows and values, where the live engine's differ from the table's (``solver
    cg vs arnoldi``), or "" (also without an explainer)."""
    if explainer is None:
        return ""
    keys = ("influence_solver", "influence_knn_features")  # k: a slider of each request
    return ", ".join(f"{key.removeprefix('influence_')} {table_settings.get(key)} here vs {explainer.settings.get(key)} "
                     "live" for key in keys if table_settings.get(key) != explainer.settings.get(key))


def own_functions(table: InfluenceTable) -> str:
    """The functions of its own a table was computed with (``loss_fn`` / ``measurement_fn``, as its metadata records
    them), which the live engine cannot rebuild, or ""."""
    functions = table.metadata.get("functions") or {}
    return " and ".join(f"a {key} of its own ({(functions[key] or {}).get('name')})"
                        for key in ("loss_fn", "measurement_fn") if functions.get(key))


def warm_up_stage(explainer: Explainer) -> str:
    """The start's stage that warms ``explainer`` up, saying where its caches come from."""
    if explainer.warm_from_disk:
        return "warming up the live engine (caches read from disk)"
    if explainer.saved:
        return "warming up the live engine (caches built with the table)"
    return ("warming up the live engine (building its caches: the training rows' trunk states, the low-rank Hessian "
            "and the gradient index)")


def _engine_dir(table: InfluenceTable, train: Dataset) -> Path:
    """Where the live engine of a table that is not the default keeps its caches: one folder per model and
    training rows."""
    key = hashlib.sha256(((table.metadata.get("model") or {}).get("fingerprint", "") +
                          dataset_fingerprint(train)).encode()).hexdigest()[:20]
    return default_cache_dir() / SPACE_ENGINES / key


def _train_from_table(table: InfluenceTable) -> Dataset:
    """The training rows a table carries as text (``train_premise`` ...), as a dataset, at most
    `MAX_TRAIN_ROWS` of them: the candidates and Hessian data for live explanations. A table of a candidate pool
    carries the pool's rows, not its Hessian's (`live_rows_notice` says so on the page)."""
    needed = ["train_id", "train_premise", "train_hypothesis", "train_label"]
    if any(c not in table.column_names for c in needed):
        raise InfluenceTableError("live explanations need a table that carries the training text (train_premise, "
                                  "train_hypothesis, train_label); build it with text (hf_fastif.annotate."
                                  "save_with_text or `hf-fastif build`).")
    # with the table's other text columns (`genre`): the live lists showed fewer columns than the table's own
    shown = needed + [f"train_{c}" for c in TRAIN_TEXT if f"train_{c}" in table.column_names and f"train_{c}" not in needed]
    frame = table.dataset.select_columns(shown).to_pandas().drop_duplicates("train_id").sort_values("train_id")
    if len(frame) > MAX_TRAIN_ROWS:
        logger.warning(f"Live explanations use the first {MAX_TRAIN_ROWS:,} of the {len(frame):,} training rows this "
                       "table carries (by train_id): their Hessian and candidates are those rows', not the table's.")
    frame = frame.head(MAX_TRAIN_ROWS).rename(columns=lambda c: c.removeprefix("train_"))
    names = [str(n) for n in table.metadata.get("label_names") or []]
    if names and not pd.api.types.is_numeric_dtype(frame["label"]):  # (pandas 3 reads text as "str", not object)
        # labels stored as their names, as ids (live explanations were turned off, advising a dataset.map that the
        # Space's operator, who has the table only, cannot run)
        ids = [names.index(v) if v in names else label_id(v) for v in frame["label"]]
        if all(i is not None for i in ids):
            frame["label"] = ids
    return Dataset.from_pandas(frame.rename(columns={"id": "train_id"}), preserve_index=False)


def _explainer(table: InfluenceTable, model_name: str, train: Dataset, *, cache_dir: Path | None = None) -> Explainer:
    # (the recipes' module, imported where a model is given)
    from ..applications.prepare import refuse_own_code

    refuse_own_code(model_name, None, False, None)  # (its own code would be replaced by a built-in class unsaid)
    model = AutoModelForSequenceClassification.from_pretrained(model_name, attn_implementation="eager")
    table.check_model(model)
    recorded = (table.metadata.get("model") or {}).get("num_influence_parameters")
    selected = num_parameters(select_parameters(model, (table.metadata.get("settings") or {}).get("influence_params")))
    if recorded is not None and int(recorded) != selected:
        raise ValueError(f"The table's influence is over {int(recorded):,} parameters, but its influence_params select "
                         f"{selected:,} of the model as loaded (influence_params=None takes every trainable parameter, "
                         "and lower layers frozen at build time are trainable again once loaded): live values would "
                         "not be the table's. Build the table with explicit influence_params.")
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    names = table.metadata.get("label_names") or [model.config.id2label[i] for i in range(model.config.num_labels)]
    ids = np.asarray(train["train_id"]) if "train_id" in train.column_names else None  # rows taken from a table
    return Explainer(model, tokenizer, train, table.metadata.get("settings") or {}, list(names), ids,
                     cache_dir=cache_dir, max_length=table_max_length(table))


def table_max_length(table: InfluenceTable) -> int:
    """The token limit a table's pairs were cut to (``metadata["tokenization"]``, which `hf-fastif build` records);
    `NLI_MAX_LENGTH` for a table that records none, as `hf-fastif build` cut pairs before it recorded the limit."""
    recorded = (table.metadata.get("tokenization") or {}).get("max_length")
    return int(recorded) if isinstance(recorded, int) and recorded > 0 else NLI_MAX_LENGTH
